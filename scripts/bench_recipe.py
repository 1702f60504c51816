"""The default recipe decided by measurement: Muon's and AdamW's rates, the schedule, document masking.

    nice python scripts/bench_recipe.py [--stages rates seeds schedules masks report]
        [--corpora stdlib prose man] [--seeds 0 1] [--json notes/recipe-cpu.json]

A staged search on scripts/bench_optim.py's pieces (the same small model, per-corpus 2,048-token
BPE, the optimizer and schedule smollm.fit builds, TextDataModule's (seed, step) order, held-out
loss by smollm.evaluate.score), every run 120 steps of 2,048 tokens:

  rates      on the first seed, every rate of each side (AdamW alone; Muon on the decoder
             matrices with AdamW on the rest, one rate for both, as `--model.muon_lr` null does),
             warmup-stable-decay, windows of --seq-len, attention across documents;
  seeds      each side's best rate (lowest final held-out loss on the first seed) on the other seeds;
  schedules  cosine at each side's best rate, every seed (against the wsd runs above);
  masks      at each side's best rate, every seed: attention across documents against
             `--data.document_mask` (document_ids: attention within each document, positions
             restarting), both arms scored both ways (each window as one sequence, and each document
             on its own); at --seq-len the mask-off arm is the wsd runs above, and --mask-seq-len
             runs both arms at longer windows (as many tokens per step), where more windows hold
             several documents;
  report     the markdown (--notes): a table per corpus and choice, the verdicts, the command.

Runs alternate AdamW and Muon (and mask off and on) so that load from other processes falls on
both alike; time per step is also measured in alternation on the same batches ("paired"). Every
finished run is written to --json at once and skipped when found there, so the stages can be run
one at a time and a crash loses only the run in progress. The report is rewritten after each stage.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_optim import CORPORA, MODEL, data_module, run, tokens_to_reach, train_step  # noqa: E402

SIDES = ("adamw", "muon")
STAGES = ("rates", "seeds", "schedules", "masks", "report")
NAMES = {"adamw": "AdamW", "muon": "Muon", "stdlib": "`@stdlib` (Python source)",
         "prose": "prose (the Rust books' paragraphs)", "man": "man pages (roff source)"}


def key(corpus: str, optimizer: str, lr: float, seed: int, schedule: str, seq_len: int, mask: bool) -> str:
    return f"{corpus}|{optimizer}|{lr:g}|{seed}|{schedule}|{seq_len}|{'mask' if mask else 'nomask'}"


class Results:
    """The JSON file: every finished run by key, the paired timings, the corpora's statistics."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data = json.loads(path.read_text()) if path.exists() else {}
        self.runs: dict[str, dict] = data.get("runs", {})
        self.timings: dict[str, dict] = data.get("timings", {})
        self.corpora: dict[str, dict] = data.get("corpora", {})
        self.commands: list[str] = data.get("commands", [])

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": MODEL, "commands": self.commands, "corpora": self.corpora,
                                   "timings": self.timings, "runs": self.runs}, indent=1))
        tmp.replace(self.path)

    def get(self, *k) -> dict | None:
        return self.runs.get(key(*k))


def best_lr(res: Results, args, corpus: str, optimizer: str) -> float | None:
    """The rate with the lowest final held-out loss on the search seed (the first), wsd, base windows."""
    finals = {lr: r["loss"][-1] for lr in lrs_of(args, optimizer)
              if (r := res.get(corpus, optimizer, lr, args.seeds[0], "wsd", args.seq_len, False))}
    return min(finals, key=finals.get) if finals else None


def lrs_of(args, optimizer: str) -> list[float]:
    return args.adamw_lrs if optimizer == "adamw" else args.muon_lrs


def mask_args(args):
    """args for the mask stage: windows of --mask-seq-len, as many tokens per step and scored."""
    a = copy.copy(args)
    a.seq_len = args.mask_seq_len
    a.batch_size = max(1, args.batch_size * args.seq_len // args.mask_seq_len)
    a.eval_windows = max(1, args.eval_windows * args.seq_len // args.mask_seq_len)
    return a


def log(res: Results, r: dict, started: float) -> None:
    print(f"{r['corpus']:6s} {r['optimizer']:5s} lr {r['lr']:<6g} seed {r['seed']} {r['schedule']:6s} "
          f"L={r['seq_len']:<4d} {'mask  ' if r['document_mask'] else 'nomask'} held-out "
          + " ".join(f"{v:.3f}" for v in r["loss"]) + f" (per doc {r['loss_per_document']:.3f})  "
          f"{r['s_per_step'] * 1e3:.0f} ms/step  [{time.time() - started:.0f}s]", flush=True)


def do_runs(res: Results, args, corpus: str, jobs: list[tuple], started: float, a=None) -> None:
    """Run (optimizer, lr, seed, schedule, mask) jobs not yet in the JSON, in the order given
    (callers interleave the arms), one data module per (seed, mask)."""
    a = a or args
    modules: dict[tuple, object] = {}
    for optimizer, lr, seed, schedule, mask in jobs:
        if res.get(corpus, optimizer, lr, seed, schedule, a.seq_len, mask):
            continue
        if (seed, mask) not in modules:
            modules[(seed, mask)] = data_module(corpus, a.work, seed, a, document_mask=mask)
        r = run(corpus, optimizer, lr, seed, modules[(seed, mask)], a, schedule=schedule)
        res.runs[key(corpus, optimizer, lr, seed, schedule, a.seq_len, mask)] = r
        res.save()
        log(res, r, started)


def describe(res: Results, args, corpus: str) -> None:
    """Documents and tokens of the corpus, and the share of scored held-out tokens whose context
    per-document attention cuts (a document started earlier in the window), at both window lengths."""
    if corpus in res.corpora:
        return
    info = {}
    for a in {args.seq_len: args, args.mask_seq_len: mask_args(args)}.values():
        dm = data_module(corpus, a.work, args.seeds[0], a)
        eos = dm.tokenizer.eos_token_id
        windows = dm.val_windows()
        cut = total = 0
        for i in range(len(windows)):
            inputs = windows[i]["input_ids"][:-1]
            after = (inputs == eos).long().cumsum(0) - (inputs == eos).long()
            cut += int((after > 0).sum())
            total += inputs.numel()
        info.setdefault("documents", dm.n_documents)
        info.setdefault("tokens", dm.n_tokens)
        info.setdefault("train_windows", dm.n_train_windows)
        info[f"cut_share_{a.seq_len}"] = cut / total
        info[f"val_windows_{a.seq_len}"] = len(windows)
    res.corpora[corpus] = info
    res.save()
    print(f"{corpus}: {info['documents']:,} documents, {info['tokens']:,} tokens; held-out tokens whose context "
          "per-document attention cuts: " + ", ".join(f"{info[f'cut_share_{L}']:.1%} at {L}" for L in
                                                      (args.seq_len, args.mask_seq_len)), flush=True)


def paired_times(res: Results, args, corpus: str, name: str, sides: list[tuple[str, bool]], a, lrs) -> None:
    """Median seconds per training step of each (optimizer, mask) side, stepping them in
    alternation on the same batches (after 3 warm-up steps), so load falls on all alike."""
    from smollm.module import LitSmolLM

    k = f"{corpus}|{name}"
    if k in res.timings:
        return
    dm = data_module(corpus, a.work, args.seeds[0], a, document_mask=any(m for _, m in sides))
    models = []
    for optimizer, mask in sides:
        torch.manual_seed(0)
        lit = LitSmolLM(preset="tiny", config_overrides=MODEL, optimizer=optimizer, learning_rate=lrs[optimizer],
                        warmup_steps=args.warmup, decay_steps=args.steps)
        c = lit.configure_optimizers()
        models.append((lit.model.train(), c["optimizer"], c["lr_scheduler"]["scheduler"]))
    times: list[list[float]] = [[] for _ in sides]
    for i, batch in enumerate(dm.train_dataloader()):
        for j, ((optimizer, mask), (model, opt, sched)) in enumerate(zip(sides, models)):
            start = time.perf_counter()
            train_step(model, opt, sched, batch["input_ids"], batch.get("document_ids") if mask else None)
            if i >= 3:
                times[j].append(time.perf_counter() - start)
        if i >= args.timing_steps + 2:
            break
    res.timings[k] = {f"{o}{'+mask' if m else ''}": statistics.median(t) for (o, m), t in zip(sides, times)}
    res.save()
    print(f"{corpus}: paired ms/step ({name}, L={a.seq_len}): "
          + ", ".join(f"{s} {v * 1e3:.0f}" for s, v in res.timings[k].items()), flush=True)


def stage(res: Results, args, name: str, corpus: str, started: float) -> None:
    seeds, first = args.seeds, args.seeds[0]
    if name == "rates":
        describe(res, args, corpus)
        paired_times(res, args, corpus, "optimizers", [("adamw", False), ("muon", False)], args,
                     {"adamw": statistics.median(args.adamw_lrs), "muon": statistics.median(args.muon_lrs)})
        pairs = itertools.zip_longest(args.adamw_lrs, args.muon_lrs)
        jobs = [(o, lr, first, "wsd", False) for pair in pairs for o, lr in zip(SIDES, pair) if lr is not None]
        do_runs(res, args, corpus, jobs, started)
        return
    best = {o: best_lr(res, args, corpus, o) for o in SIDES}
    if None in best.values():
        sys.exit(f"error: stage {name} needs the rates stage's runs on {corpus} in {args.json}; run --stages rates")
    if name == "seeds":
        do_runs(res, args, corpus, [(o, best[o], s, "wsd", False) for s in seeds[1:] for o in SIDES], started)
    elif name == "schedules":
        do_runs(res, args, corpus, [(o, best[o], s, "cosine", False) for s in seeds for o in SIDES], started)
    elif name == "masks":
        a = mask_args(args)
        paired_times(res, args, corpus, "masks", [(o, m) for o in SIDES for m in (False, True)], a, best)
        do_runs(res, args, corpus, [(o, best[o], s, "wsd", m) for s in seeds for o in SIDES for m in (False, True)],
                started, a)


# ------------------------------------------------------------------------------------------------
# The report


def mean(xs) -> float:
    return statistics.mean(xs)


def verdicts(res: Results, args) -> dict:
    """Per corpus: best rates, best-vs-best finals (mean over seeds, and per seed), schedule and
    mask comparisons; None where a stage's runs are missing."""
    out = {}
    for corpus in args.corpora:
        best = {o: best_lr(res, args, corpus, o) for o in SIDES}
        if None in best.values():
            continue
        v = {"best": best}

        def finals(o, schedule="wsd", L=args.seq_len, mask=False, field="final"):
            """{seed: final held-out loss} over the seeds finished so far, or None if none is."""
            rs = {s: r for s in args.seeds if (r := res.get(corpus, o, best[o], s, schedule, L, mask))}
            return {s: r["loss"][-1] if field == "final" else r["loss_per_document"] for s, r in rs.items()} or None

        v["wsd"] = {o: finals(o) for o in SIDES}
        v["cosine"] = {o: finals(o, "cosine") for o in SIDES}
        L = args.mask_seq_len
        v["mask"] = {o: {"off": finals(o, L=L), "on": finals(o, L=L, mask=True),
                         "off_doc": finals(o, L=L, field="doc"), "on_doc": finals(o, L=L, mask=True, field="doc")}
                     for o in SIDES}
        out[corpus] = v
    return out


def fmt_seeds(xs: dict[int, float] | None) -> str:
    """The mean over the seeds in bold, then each seed's value (the seeds named when not all ran)."""
    if xs is None:
        return "-"
    return f"**{mean(xs.values()):.3f}** ({' / '.join(f'{x:.3f}' for x in xs.values())})"


def common(*xs: dict[int, float] | None) -> list[int]:
    """The seeds every one of `xs` has (empty if one is None)."""
    if any(x is None for x in xs):
        return []
    return sorted(set.intersection(*(set(x) for x in xs)))


def report(res: Results, args) -> str:
    v = verdicts(res, args)
    L, Lm = args.seq_len, args.mask_seq_len
    lines = ["# The default recipe decided by measurement (CPU): optimizer and rate, schedule, document masking", "",
             f"Written by `scripts/bench_recipe.py` from its JSON ([{args.json.name}]({args.json.name})"
             + (f"; its printed output: [{txt.name}]({txt.name})" if (txt := args.notes.with_suffix(".txt")).exists()
                else "") + "); the commands that made it:", ""]
    lines += [f"    {c}" for c in res.commands]
    lines += ["", "(Every command resumes from the JSON and skips the runs it holds: stages can run one at a time, "
              "in any order after `rates`, and a crash loses only the run in progress.)", ""]
    lines += [
        f"Setup: scripts/bench_optim.py's model (width 128, 4 layers, MLP 384, 4/2 heads of 32; 1.05M parameters, "
        f"786k of them the decoder matrices Muon takes) with a 2,048-token byte-level BPE trained on each corpus; "
        f"{args.steps} steps of {args.batch_size * args.seq_len:,} tokens ({args.batch_size} x {L}"
        + (f"; the mask stage {mask_args(args).batch_size} x {Lm}" if Lm != L else "") + f"), warmup {args.warmup}, then warmup-stable-decay (the last 20% decaying "
        f"to 0.1 of the peak) or cosine (to 0.1), weight decay 0.01, clipping 1.0, one torch thread, `nice`, on a "
        f"2-core machine shared with other sessions. Held-out loss (nats/token): `smollm.evaluate.score` on the "
        f"corpus's first {args.eval_windows} held-out windows of {L} tokens"
        + (f" ({mask_args(args).eval_windows} of {Lm} in the mask stage)" if Lm != L else "") + f", every {max(1, args.steps // args.points)} steps. \"Muon\" is Muon on the decoder "
        f"matrices and AdamW on the embedding and norms at one rate (`--model.muon_lr` null). Rates: searched on "
        f"seed {args.seeds[0]} (AdamW {', '.join(f'{x:g}' for x in args.adamw_lrs)}; Muon "
        f"{', '.join(f'{x:g}' for x in args.muon_lrs)}); the best of each side (lowest final held-out loss) then "
        f"runs on every seed ({', '.join(map(str, args.seeds))}), with cosine, and with document masking. Figures "
        f"in bold are means over seeds, seeds in brackets.", "",
        "Corpora:", ""]
    for corpus in args.corpora:
        c = res.corpora.get(corpus)
        if c:
            lines.append(f"- {NAMES[corpus]}: {c['documents']:,} documents, {c['tokens']:,} tokens; share of "
                         f"held-out tokens whose context per-document attention cuts: "
                         + ", ".join(f"{c[f'cut_share_{n}']:.1%} in windows of {n}" for n in sorted({L, Lm})) + ".")
    lines += ["", "The third corpus is this machine's manual pages as roff source (`/usr/share/man/man1-8`, English; "
              "comment lines, `.so` redirections and the 16,631 generated `gcloud` pages left out): neither a "
              "programming language nor running prose but a markup language interleaved with terse reference "
              "English (pages of median 4.3 kB of source). C headers would be code again, and the translated pages and "
              "message catalogues are too small for a corpus.", ""]

    for corpus in args.corpora:
        if corpus not in v:
            continue
        best = v[corpus]["best"]
        lines += [f"## {NAMES[corpus]}", ""]
        runs0 = [res.get(corpus, o, lr, args.seeds[0], "wsd", L, False) for o in SIDES for lr in lrs_of(args, o)]
        runs0 = [r for r in runs0 if r]
        steps = [t // (args.batch_size * L) for t in runs0[0]["tokens"]]
        lines += [f"Rates, seed {args.seeds[0]}, warmup-stable-decay: held-out loss after each number of steps",
                  "", "| optimizer | lr | " + " | ".join(map(str, steps)) + " | per document | ms/step |",
                  "|---|---|" + "---|" * len(steps) + "---|---|"]
        for r in runs0:
            grid = lrs_of(args, r["optimizer"])
            edge = " (best; the grid's edge)" if r["lr"] in (min(grid), max(grid)) else " (best)"
            star = edge if best[r["optimizer"]] == r["lr"] else ""
            lines.append(f"| {r['optimizer']} | {r['lr']:g}{star} | " + " | ".join(f"{x:.3f}" for x in r["loss"])
                         + f" | {r['loss_per_document']:.3f} | {r['s_per_step'] * 1e3:.0f} |")
        w = v[corpus]["wsd"]
        lines += ["", "Best against best (final held-out loss; tokens Muon needs to reach AdamW's final loss / "
                  "AdamW's tokens; time per step paired, and the runs' medians):", "",
                  "| | AdamW | Muon | Muon's tokens / AdamW's | ms/step AdamW / Muon | Muon's time / AdamW's |",
                  "|---|---|---|---|---|---|"]
        if seeds := common(*w.values()):
            ratios, reach = [], []
            for s in seeds:
                a = res.get(corpus, "adamw", best["adamw"], s, "wsd", L, False)
                m = res.get(corpus, "muon", best["muon"], s, "wsd", L, False)
                t = tokens_to_reach(m["tokens"], m["loss"], a["loss"][-1])
                ratios.append("never" if t is None else f"{t / a['tokens'][-1]:.2f}")
                reach.append(None if t is None else t / a["tokens"][-1])
            t = res.timings.get(f"{corpus}|optimizers", {})
            slower = t.get("muon", 0) / max(t.get("adamw", 1), 1e-9)
            times = " / ".join("never" if x is None else f"{x * slower:.2f}" for x in reach)
            med = {o: statistics.median(res.get(corpus, o, best[o], s, "wsd", L, False)["s_per_step"]
                                        for s in seeds) for o in SIDES}
            lines.append(f"| rate {best['adamw']:g} / {best['muon']:g} | {fmt_seeds(w['adamw'])} | "
                         f"{fmt_seeds(w['muon'])} | {' / '.join(ratios)} | paired {t.get('adamw', 0) * 1e3:.0f} / "
                         f"{t.get('muon', 0) * 1e3:.0f} ({t.get('muon', 0) / max(t.get('adamw', 1), 1e-9):.2f}x); "
                         f"runs {med['adamw'] * 1e3:.0f} / {med['muon'] * 1e3:.0f} | {times} |")
        c = v[corpus]["cosine"]
        lines += ["", "Schedule at each side's best rate (final held-out loss):", "",
                  "| optimizer | lr | warmup-stable-decay | cosine |", "|---|---|---|---|"]
        for o in SIDES:
            lines.append(f"| {o} | {best[o]:g} | {fmt_seeds(w[o])} | {fmt_seeds(c[o])} |")
        m = v[corpus]["mask"]
        t = res.timings.get(f"{corpus}|masks", {})
        lines += ["", f"Document masking at each side's best rate, windows of {Lm} (final held-out loss, each window "
                  "scored as one sequence / each document on its own; paired ms/step):", "",
                  "| optimizer | off, scored as windows | on, scored as windows | off, scored per document | "
                  "on, scored per document | ms/step off / on |", "|---|---|---|---|---|---|"]
        for o in SIDES:
            mo = m[o]
            lines.append(f"| {o} | {fmt_seeds(mo['off'])} | {fmt_seeds(mo['on'])} | {fmt_seeds(mo['off_doc'])} | "
                         f"{fmt_seeds(mo['on_doc'])} | " + (f"{t[o] * 1e3:.0f} / {t[o + '+mask'] * 1e3:.0f} |" if t else "- |"))
        lines.append("")
    lines += verdict_text(v, args)
    return "\n".join(lines) + "\n"


def verdict_text(v: dict, args) -> list[str]:
    """Which choice wins on every corpus (by the mean over seeds), for the summary table."""
    corpora = [c for c in args.corpora if c in v]
    if not corpora:
        return []
    rows, wins = [], {}

    def row(name: str, per: dict[str, str | None], *options: str) -> None:
        """The choice of `options` that wins on every corpus, else "neither" (the configs keep theirs)."""
        cells = [per.get(c) or "-" for c in corpora]
        done = all(per.get(c) for c in corpora)
        every = [o for o in options if done and all(per[c].startswith(o + " ") for c in corpora)]
        wins[name] = (every[0] if every else "neither") if done else None
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {'**' + wins[name] + '**' if done else 'not measured'} |")

    def only(seeds: list[int]) -> str:
        return "" if len(seeds) == len(args.seeds) else f"; seed {', '.join(map(str, seeds))} only"

    def cmp(a: dict | None, b: dict | None, na: str, nb: str) -> str | None:
        if not (seeds := common(a, b)):
            return None
        ma, mb = mean(a[s] for s in seeds), mean(b[s] for s in seeds)
        lower = sum(a[s] < b[s] for s in seeds)
        return f"{na if ma < mb else nb} ({ma:.3f} vs {mb:.3f}; {na} lower on {lower}/{len(seeds)} seeds{only(seeds)})"

    row("optimizer", {c: cmp(v[c]["wsd"]["muon"], v[c]["wsd"]["adamw"], "muon", "adamw") for c in corpora},
        "muon", "adamw")
    chosen = wins["optimizer"] if wins["optimizer"] in SIDES else "adamw"
    rates = {c: v[c]["best"][chosen] for c in corpora}
    rows.append(f"| {chosen}'s best rate | " + " | ".join(f"{rates[c]:g}" for c in corpora) + " | |")
    for o in SIDES:
        row(f"schedule ({o})", {c: cmp(v[c]["cosine"][o], v[c]["wsd"][o], "cosine", "wsd") for c in corpora},
            "cosine", "wsd")

    def mask_cmp(c: str, o: str) -> str | None:
        m = v[c]["mask"][o]
        if not (seeds := common(*m.values())):
            return None
        mm = {k: mean(x[s] for s in seeds) for k, x in m.items()}
        on_both = mm["on"] < mm["off"] and mm["on_doc"] < mm["off_doc"]
        return (f"{'on' if on_both else 'off'} (windows {mm['on']:.3f} vs {mm['off']:.3f}; "
                f"per document {mm['on_doc']:.3f} vs {mm['off_doc']:.3f}{only(seeds)})")

    for o in SIDES:
        row(f"document mask ({o})", {c: mask_cmp(c, o) for c in corpora}, "on", "off")
    out = ["## Verdict", "",
           "A choice wins on a corpus when its mean final held-out loss over the seeds is lower (document masking: "
           "lower scored both ways, windows and per document); the recipe takes a choice only if it wins on every "
           "corpus, and otherwise the configs keep what they had (AdamW; warmup-stable-decay, cosine in the tiny "
           "demo; no mask). Muon's time / AdamW's (best against best) is the tokens Muon needs to reach AdamW's final "
           "loss over AdamW's, times the paired time per step.", "",
           "| choice | " + " | ".join(NAMES[c] for c in corpora) + " | wins on every corpus |",
           "|---|" + "---|" * len(corpora) + "---|"] + rows
    out += ["", "In words: " + "; ".join(
        f"{name}: {w if w else 'not measured'}" for name, w in wins.items()) + "."]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=CORPORA)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="the first is the search seed")
    parser.add_argument("--adamw-lrs", type=float, nargs="+", default=[3e-3, 1e-2, 2e-2])
    parser.add_argument("--muon-lrs", type=float, nargs="+", default=[1e-2, 3e-2, 6e-2, 1e-1])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--points", type=int, default=6, help="held-out evaluations per run")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mask-seq-len", type=int, default=None,
                        help="window length of the mask stage (default --seq-len, whose runs are then the "
                             "mask-off arm; the batch is scaled to keep the tokens per step)")
    parser.add_argument("--timing-steps", type=int, default=10, help="paired steps timed per comparison")
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows of --seq-len scored")
    parser.add_argument("--val-fraction", type=float, default=0.02)
    parser.add_argument("--max-tokens", type=int, default=3_000_000, help="tokens of each corpus to cache")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("SMOLLM_CACHE", Path.home() / ".cache" /
                                                                          "smollm")) / "bench_optim")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=ROOT / "notes" / "recipe-cpu.json")
    parser.add_argument("--notes", type=Path, default=ROOT / "notes" / "recipe-cpu.md")
    args = parser.parse_args(argv)
    args.mask_seq_len = args.mask_seq_len or args.seq_len

    torch.set_num_threads(args.threads)
    res = Results(args.json)
    command = "nice python scripts/bench_recipe.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if command.strip() not in res.commands and set(args.stages) != {"report"}:
        res.commands.append(command.strip())
        res.save()
    started = time.time()
    print(f"model {MODEL}; {args.steps} steps; stages {args.stages}; corpora {args.corpora}; seeds {args.seeds}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for name in args.stages:
        if name != "report":
            for corpus in args.corpora:
                stage(res, args, name, corpus, started)
        args.notes.write_text(report(res, args))
        print(f"[{time.time() - started:.0f}s] stage {name} done; {args.notes} written", flush=True)
    print("\n".join(verdict_text(verdicts(res, args), args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
