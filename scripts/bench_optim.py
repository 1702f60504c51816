"""Which optimizer and learning rate for a token budget: Muon beside AdamW against AdamW alone.

    nice python scripts/bench_optim.py [--steps 120] [--seeds 0 1] [--lrs 3e-3 1e-2 3e-2]
        [--corpora stdlib prose] [--json FILE]

Both sides train the same model from the same initialization (per seed) on the same windows in
the same order (TextDataModule's (seed, step) order) for the same number of tokens, with the
optimizer, schedule and clipping that `python -m smollm.fit` builds (smollm.optim.
configure_optimizers): AdamW alone, or Muon on the decoder projections with AdamW on the
embedding/head and norms (one learning rate for both groups, as `--model.muon_lr` None does).
Held-out loss is smollm.evaluate.score over the corpus's held-out windows, at several points.

The model is this architecture at reduced size: width 128, 4 layers, MLP 384 (SmolLM2's 8/3
ratio), 4 query / 2 key-value heads of 32, windows of 128 tokens, batch 16. With SmolLM2's 49,152-
token vocabulary the embedding would be 6.3M of 7.1M parameters and Muon would train a ninth of
the model; a byte-level BPE of 2,048 tokens trained on each corpus (the `tokenizers` library)
keeps the embedding at 262k of 1.05M, so the decoder matrices Muon takes are three quarters.

Corpora: "stdlib", the project's default corpus (this Python's standard library source), and
"prose", English prose: the paragraphs (<p> elements; code listings, tables and navigation
dropped) of the Rust project's books as the rustup toolchain ships them, offline, in
share/doc/rust/html (The Rust Programming Language, the Reference, the Rustonomicon, Cargo,
rustc, Rust by Example, ...): technical English about programming, written by people; and
"man", this machine's manual pages as their roff source (sections 1-8 in English, comment lines,
`.so` redirections and the 16,631 generated gcloud pages left out): a markup language
interleaved with terse reference English, in many short documents. scripts/bench_recipe.py runs
the staged comparison of rates, schedules and document masking on the same pieces.

Printed: the held-out loss of every run at every point, the best learning rate of each side (by
the mean final loss over seeds), the ratio tokens Muon needs to reach AdamW's best final held-out
loss / tokens AdamW used (linear between measured points; per seed and on the seed-mean curves),
and each side's training time per step (evaluation excluded). Runs alternate AdamW, Muon at each
learning rate and seed, so that load from other processes falls on both alike.
"""

from __future__ import annotations

import argparse
import html.parser
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
             initializer_range=128 ** -0.5)


class _Paragraphs(html.parser.HTMLParser):
    """The text of every <p> element of an mdBook print page, chapter by chapter (<h1>)."""

    def __init__(self) -> None:
        super().__init__()
        self.chapters: list[list[str]] = [[]]
        self.depth, self.text = 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "h1" and self.chapters[-1]:
            self.chapters.append([])
        if tag == "p":
            self.depth, self.text = 1, []

    def handle_endtag(self, tag):
        if tag == "p" and self.depth:
            paragraph = " ".join("".join(self.text).split())
            if len(paragraph) > 40:
                self.chapters[-1].append(paragraph)
            self.depth = 0

    def handle_data(self, data):
        if self.depth:
            self.text.append(data)


def rust_books() -> list[Path]:
    """The print pages of the Rust books under the rustup toolchains (sorted), or []."""
    home = Path(os.environ.get("RUSTUP_HOME", Path.home() / ".rustup")) / "toolchains"
    return sorted(home.glob("*/share/doc/rust/html/*/print.html"))


def prose_corpus(folder: Path) -> list[str]:
    """Write one text file per chapter of the Rust books' prose into `folder` (once), in a
    fixed shuffled order, so the held-out tail is a mix of books rather than the last one."""
    done = folder / "DONE"
    if not done.exists():
        books = rust_books()
        if not books:
            sys.exit("error: no Rust book found under ~/.rustup/toolchains/*/share/doc/rust/html; give "
                     "--corpora stdlib, or install a Rust toolchain's docs (rustup component add rust-docs)")
        chapters = []
        for book in books:
            parser = _Paragraphs()
            parser.feed(book.read_text(encoding="utf-8", errors="replace"))
            chapters += ["\n\n".join(c) + "\n" for c in parser.chapters if len(c) >= 3]
        random.Random(0).shuffle(chapters)
        folder.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(chapters):
            (folder / f"{i:05d}.txt").write_text(text, encoding="utf-8")
        done.write_text(json.dumps({"books": [str(b) for b in books], "chapters": len(chapters)}))
    return sorted(str(p) for p in folder.glob("*.txt"))


def man_pages() -> list[Path]:
    """This machine's English manual pages (sections 1-8), sorted, minus the generated gcloud ones."""
    root = Path("/usr/share/man")
    return sorted(p for d in range(1, 9) for p in (root / f"man{d}").glob("*")
                  if p.is_file() and not p.is_symlink() and not p.name.startswith("gcloud"))


def man_corpus(folder: Path) -> list[str]:
    """Write one text file per manual page's roff source into `folder` (once), comment lines
    dropped, `.so` redirections and pages under 200 bytes left out, in a fixed shuffled order."""
    import gzip

    done = folder / "DONE"
    if not done.exists():
        pages = []
        for path in man_pages():
            raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
            text = raw.decode("utf-8", errors="replace")
            if text.startswith(".so ") or len(text) < 200:
                continue
            lines = [line for line in text.splitlines() if not line.startswith(('.\\"', "'\\\"", '.\\#'))]
            pages.append("\n".join(lines).strip() + "\n")
        if not pages:
            sys.exit("error: no manual page found under /usr/share/man/man1-8; choose other --corpora")
        random.Random(0).shuffle(pages)
        folder.mkdir(parents=True, exist_ok=True)
        for i, text in enumerate(pages):
            (folder / f"{i:05d}.txt").write_text(text, encoding="utf-8")
        done.write_text(json.dumps({"pages": len(pages)}))
    return sorted(str(p) for p in folder.glob("*.txt"))


def train_tokenizer(folder: Path, files: list[str], max_bytes: int = 8_000_000) -> str:
    """A byte-level BPE of MODEL's vocabulary trained on (up to `max_bytes` of) `files`, saved as
    a Hugging Face tokenizer folder, EOS "<|endoftext|>" as SmolLM2's."""
    if (folder / "tokenizer.json").exists():
        return str(folder)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts, size = [], 0
    for f in files:
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text)
        if size > max_bytes:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=MODEL["vocab_size"], special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(str(folder))
    return str(folder)


CORPORA = ("stdlib", "prose", "man")


def data_module(corpus: str, work: Path, seed: int, args, seq_len: int | None = None,
                batch_size: int | None = None, document_mask: bool = False):
    """The corpus's TextDataModule (windows of `seq_len`, default args.seq_len); with
    `document_mask`, its batches carry "document_ids" as --data.document_mask gives them."""
    from smollm.data import TextDataModule
    from smollm.data.sources import stdlib_files

    if corpus == "stdlib":
        files, source = ["@stdlib"], [str(p) for p in stdlib_files()]
    elif corpus == "man":
        files = source = man_corpus(work / "man")
    else:
        files = source = prose_corpus(work / "prose")
    tokenizer = train_tokenizer(work / f"tokenizer-{corpus}", source)
    dm = TextDataModule(files=files, tokenizer=tokenizer, seq_len=seq_len or args.seq_len,
                        batch_size=batch_size or args.batch_size, val_fraction=args.val_fraction,
                        max_val_windows=args.eval_windows, num_workers=0, seed=seed, cache_dir=str(work / "cache"),
                        max_tokens=args.max_tokens, document_mask=document_mask)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def held_out(model, dm, batch_size: int, per_document: bool = False) -> float:
    """Held-out loss over the corpus's first held-out windows (smollm.evaluate.score); with
    `per_document`, each document within a window attended to on its own (the document_ids that
    --data.document_mask's collate gives), else each window as one causal sequence."""
    from smollm.data.module import DocumentIds
    from smollm.evaluate import batches, score

    windows = dm.val_windows()
    if not per_document:
        return score(model, batches(windows, batch_size)).loss
    collate = DocumentIds(dm.tokenizer.eos_token_id)
    return score(model, (collate([windows[j] for j in range(i, min(len(windows), i + batch_size))])
                         for i in range(0, len(windows), batch_size))).loss


def run(corpus: str, optimizer: str, lr: float, seed: int, dm, args, schedule: str = "wsd") -> dict:
    """Train one model; return its held-out loss at each evaluation step and its step times.
    A `dm` built with document_mask trains with document_ids (attention within documents). The
    final model is also scored per document ("loss_per_document")."""
    from smollm.module import LitSmolLM

    torch.manual_seed(seed)
    lit = LitSmolLM(preset="tiny", config_overrides=MODEL, optimizer=optimizer, learning_rate=lr,
                    warmup_steps=args.warmup, decay_steps=args.steps, schedule=schedule, min_lr_ratio=0.1,
                    weight_decay=0.01, grad_clip=1.0)
    model = lit.model.train()
    configured = lit.configure_optimizers()  # exactly what smollm.fit trains with
    opt, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    evals, step_times = [], []
    every = max(1, args.steps // args.points)
    for step, batch in enumerate(dm.train_dataloader(), start=1):
        start = time.perf_counter()
        loss = train_step(model, opt, scheduler, batch["input_ids"], batch.get("document_ids"))
        step_times.append(time.perf_counter() - start)
        if step % every == 0 or step == args.steps:
            evals.append((step, held_out(model, dm, dm.batch_size)))
            model.train()
        if step == args.steps:
            break
    tokens_per_step = dm.batch_size * dm.seq_len
    return {"corpus": corpus, "optimizer": optimizer, "lr": lr, "seed": seed, "schedule": schedule,
            "seq_len": dm.seq_len, "document_mask": dm.document_mask,
            "tokens": [s * tokens_per_step for s, _ in evals], "loss": [v for _, v in evals],
            "loss_per_document": held_out(model, dm, dm.batch_size, per_document=True),
            "s_per_step": statistics.median(step_times[5:] or step_times),
            "train_loss": loss.item()}


def train_step(model, opt, scheduler, ids: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One optimizer step as smollm.fit takes it (chunked loss, clipping at 1.0, the schedule)."""
    loss = model.loss(ids[:, :-1], ids[:, 1:], document_ids=document_ids, chunk_size=8192)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    scheduler.step()
    opt.zero_grad(set_to_none=True)
    return loss


def time_steps(dm, args) -> dict[str, float]:
    """Median seconds per training step of each side, measured step by step in alternation on
    the same batches, so that load from other processes falls on both alike."""
    from smollm.module import LitSmolLM

    sides = {}
    for optimizer in ("adamw", "muon"):
        torch.manual_seed(0)
        lit = LitSmolLM(preset="tiny", config_overrides=MODEL, optimizer=optimizer, learning_rate=1e-2,
                        warmup_steps=args.warmup, decay_steps=args.steps)
        configured = lit.configure_optimizers()
        sides[optimizer] = (lit.model.train(), configured["optimizer"], configured["lr_scheduler"]["scheduler"])
    times: dict[str, list[float]] = {"adamw": [], "muon": []}
    for i, batch in enumerate(dm.train_dataloader()):
        ids = batch["input_ids"]
        for optimizer, (model, opt, scheduler) in sides.items():
            start = time.perf_counter()
            train_step(model, opt, scheduler, ids)
            if i >= 3:  # after warm-up
                times[optimizer].append(time.perf_counter() - start)
        if i >= args.timing_steps + 2:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def tokens_to_reach(tokens: list[int], losses: list[float], target: float) -> float | None:
    """Tokens at which a held-out curve first reaches `target`, linear between points; None if never."""
    prev_t, prev_l = 0, float("inf")
    for t, l in zip(tokens, losses):
        if l <= target:
            if prev_l == float("inf"):
                return float(t)
            return prev_t + (t - prev_t) * (prev_l - target) / (prev_l - l)
        prev_t, prev_l = t, l
    return None


def summarize(runs: list[dict], corpus: str, out) -> dict:
    """Best learning rate per side (mean final loss over seeds), then Muon's tokens to AdamW's best."""
    mine = [r for r in runs if r["corpus"] == corpus]
    seeds = sorted({r["seed"] for r in mine})
    best = {}
    for side in ("adamw", "muon"):
        by_lr = {}
        for r in mine:
            if r["optimizer"] == side:
                by_lr.setdefault(r["lr"], []).append(r)
        best[side] = min(by_lr.items(), key=lambda kv: statistics.mean(r["loss"][-1] for r in kv[1]))
    (a_lr, a_runs), (m_lr, m_runs) = best["adamw"], best["muon"]
    used = a_runs[0]["tokens"][-1]
    ratios = {}
    for seed in seeds:
        a = next(r for r in a_runs if r["seed"] == seed)
        m = next(r for r in m_runs if r["seed"] == seed)
        reach = tokens_to_reach(m["tokens"], m["loss"], a["loss"][-1])
        ratios[seed] = None if reach is None else reach / used
    mean = lambda rs: [statistics.mean(v) for v in zip(*(r["loss"] for r in rs))]  # noqa: E731
    reach = tokens_to_reach(m_runs[0]["tokens"], mean(m_runs), mean(a_runs)[-1])
    t_a = statistics.median(r["s_per_step"] for r in mine if r["optimizer"] == "adamw")
    t_m = statistics.median(r["s_per_step"] for r in mine if r["optimizer"] == "muon")
    fmt = lambda x: "never" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"\n{corpus}: best AdamW lr {a_lr:g} (final held-out {mean(a_runs)[-1]:.4f}), best Muon lr {m_lr:g} "
          f"(final {mean(m_runs)[-1]:.4f}), seeds {seeds}", file=out)
    print(f"{corpus}: tokens Muon needs to reach AdamW's best final loss / tokens AdamW used: "
          + ", ".join(f"seed {s} {fmt(v)}" for s, v in ratios.items())
          + f"; seed-mean curves {fmt(None if reach is None else reach / used)}", file=out)
    print(f"{corpus}: time per step (median over runs): AdamW {t_a * 1e3:.0f} ms, Muon {t_m * 1e3:.0f} ms "
          f"({t_m / t_a:.2f}x)", file=out)
    return {"corpus": corpus, "adamw_lr": a_lr, "muon_lr": m_lr, "ratio_per_seed": ratios,
            "ratio_mean_curve": None if reach is None else reach / used,
            "adamw_final": mean(a_runs)[-1], "muon_final": mean(m_runs)[-1],
            "adamw_s_per_step": t_a, "muon_s_per_step": t_m}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per run (the token budget)")
    parser.add_argument("--points", type=int, default=8, help="held-out evaluations per run")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2],
                        help="peak learning rates tried by each side (Muon: both groups)")
    parser.add_argument("--corpora", nargs="+", default=["stdlib", "prose"], choices=CORPORA)
    parser.add_argument("--timing-steps", type=int, default=20, help="paired steps timed per corpus")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows scored at each point")
    parser.add_argument("--val-fraction", type=float, default=0.02)
    parser.add_argument("--max-tokens", type=int, default=3_000_000, help="tokens of each corpus to cache")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("SMOLLM_CACHE", Path.home() / ".cache" / "smollm"))
                        / "bench_optim", help="folder for the prose text, tokenizers and token caches")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 keeps small matmuls from stalling on a shared machine")
    parser.add_argument("--json", type=Path, default=None, help="also write every run and the summary here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    runs, summaries, timings = [], [], {}
    started = time.time()
    print(f"model {MODEL}; {args.steps} steps of {args.batch_size} x {args.seq_len} tokens; lrs {args.lrs}; "
          f"seeds {args.seeds}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for corpus in args.corpora:
        for seed in args.seeds:
            dm = data_module(corpus, args.work, seed, args)
            if seed == args.seeds[0]:
                print(f"{corpus}: {dm.n_documents:,} documents, {dm.n_tokens:,} tokens (vocab {dm.vocab_size}), "
                      f"{dm.n_train_windows:,} training windows, {dm.n_val_windows} held-out windows scored",
                      flush=True)
                timing = timings[corpus] = time_steps(dm, args)
                print(f"{corpus}: paired step times (alternating, same batches, median of {args.timing_steps}): "
                      f"AdamW {timing['adamw'] * 1e3:.0f} ms, Muon {timing['muon'] * 1e3:.0f} ms "
                      f"({timing['muon'] / timing['adamw']:.2f}x)", flush=True)
            for lr in args.lrs:
                for optimizer in ("adamw", "muon"):
                    r = run(corpus, optimizer, lr, seed, dm, args)
                    runs.append(r)
                    print(f"{corpus:6s} {optimizer:5s} lr {lr:<7g} seed {seed}  held-out "
                          + " ".join(f"{v:.3f}" for v in r["loss"])
                          + f"  {r['s_per_step'] * 1e3:.0f} ms/step  [{time.time() - started:.0f}s]", flush=True)
        print(f"\n{corpus}: held-out loss at tokens " + " ".join(str(t) for t in runs[-1]["tokens"]))
        summaries.append({**summarize(runs, corpus, sys.stdout), "paired_s_per_step": timings[corpus]})
    if args.json:
        args.json.write_text(json.dumps({"model": MODEL, "args": {k: str(v) for k, v in vars(args).items()},
                                         "runs": runs, "summary": summaries}, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
