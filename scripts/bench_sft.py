"""SFT speed: packed windows against one conversation per padded row, as supervised tokens per second,
measured side by side in one run; writes its figures and the command to a note.

    python scripts/bench_sft.py [--layers 2] [--seq_len 2048] [--conversations 32] [--rows 1]
        [--repeats 3] [--median 400] [--sigma 0.9] [--device cpu|cuda] [--threads N]
        [--note notes/sft-speed.md [--append]]

The conversations: `--conversations` lengths drawn from a log-normal with median `--median` tokens
and shape `--sigma` (no real chat data is at hand offline; smol-smoltalk-like: a median near 400,
a long tail), cut to a window (seq_len + 1 tokens, as `--data.overlong truncate` does). Each one's
first 20-50% (uniform) is its prompt, without loss; the rest, its reply, carries loss. Token ids are
random: the speed does not depend on them. Every variant trains on the same conversations, so on
the same supervised tokens (checked); supervised tokens per second = those tokens / the time of one
pass over them (forward + backward + clip_grad_norm_ + AdamW step, LitSmolLM's defaults).
  - packed: smollm's chat windows, as `--data.format chat` builds them (smollm.data.packing:
    best-fit decreasing, `pack_row`'s input_ids, loss_mask and document_ids), `--rows` windows a
    step, through SmolLM.loss with its default per-document attention (`--model.document_attention
    varlen`: each conversation attended to on its own, flash varlen_attn on CUDA in bf16, causal
    SDPA per conversation on CPU; no pair across conversations computed);
  - packed, SDPA mask: the same windows through SDPA with a block-diagonal causal mask over the
    whole window (`--model.document_attention sdpa`: every pair computed, the masked ones dropped);
  - packed, flex_attention (CUDA only; torch has no flex backward on CPU): `--model.document_attention
    flex`, a BlockMask that skips the blocks of pairs across conversations;
  - padded, length-grouped: one conversation per row, right-padded to the longest in its batch (TRL's
    DataCollatorForLanguageModeling), loss off on the padding, plain causal attention; batches in the
    order of transformers' `train_sampling_strategy="group_by_length"` (get_length_grouped_indices)
    with mega-batches of 50 batches, which at this size hold all the conversations: each batch holds
    neighbours in length, the least padding a fixed batch size can have (the stronger baseline);
  - padded, random: the same rows in random batches (TRL's default sampler).
The padded batch size is the packed step's conversations on average (rows x conversations per
window), so both take about the same number of optimizer steps. One model (the same weights and
optimizer throughout) trains on all of them, their steps interleaved within each repeat (each
variant's k-th of n batches k/n of the way through), so that other load falls on all alike. On
CPU the table also gives supervised tokens per CPU-second of this process, which other jobs on a
shared machine disturb less than wall time.

The model has SmolLM2-135M's widths and heads with `--layers` layers and, by default, a vocabulary
cut to 49,152 x layers / 30 (rounded to 64): the lm head then does the same share of a step's work
as in the real 30-layer 135M (with the full vocabulary and 2 layers it would be most of it), so the
ratios stand for the real model's. `--layers 30` is the real 135M.

Plain pretraining windows (no loss_mask, no document_ids) must lose no speed to packing: the last
line times `--rows` x seq_len plain windows (forward + backward) through today's SmolLM.loss
against the model code of commit BEFORE (the last one before per-document attention, read with
`git show`), holding the same weights, alternating; their losses must be equal, bit for bit.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from smollm import ModelConfig, SmolLM
from smollm.data.packing import fit_lengths, pack_bfd, pack_row

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "53895a6"  # main before 85d6b9c, which gave the model document_ids
PAD_ID = 0


def conversations(n: int, median: float, sigma: float, capacity: int, seed: int) -> tuple[list, np.ndarray]:
    """n (ids, loss flags) of log-normal lengths cut to `capacity`, and their lengths before the cut."""
    rng = np.random.default_rng(seed)
    drawn = np.maximum(8, np.rint(rng.lognormal(np.log(median), sigma, n))).astype(np.int64)
    used, _ = fit_lengths(drawn, capacity, "truncate")
    docs = []
    for n_tokens in used.tolist():
        ids = rng.integers(1, 49152, n_tokens)
        loss = np.zeros(n_tokens, dtype=bool)
        loss[int(round(n_tokens * rng.uniform(0.2, 0.5))):] = True
        docs.append((ids, loss))
    return docs, drawn


def packed_batches(docs: list, capacity: int, rows: int) -> list[dict[str, torch.Tensor]]:
    """The chat windows of smollm.data.packing, `rows` a batch (the last one may hold fewer)."""
    order, bounds = pack_bfd(np.array([len(ids) for ids, _ in docs]), capacity)
    windows = [pack_row([docs[d] for d in order[bounds[w]:bounds[w + 1]]], capacity, PAD_ID)
               for w in range(len(bounds) - 1)]
    batches = []
    for i in range(0, len(windows), rows):
        ids, mask, documents = (torch.stack(x) for x in zip(*windows[i:i + rows]))
        batches.append({"input_ids": ids, "loss_mask": mask, "document_ids": documents})
    return batches


def padded_batches(docs: list, order: list[int], size: int) -> list[dict[str, torch.Tensor]]:
    """One conversation per row, right-padded to the longest of its batch; padding carries no loss."""
    batches = []
    for i in range(0, len(order), size):
        chosen = [docs[d] for d in order[i:i + size]]
        width = max(len(ids) for ids, _ in chosen)
        ids = torch.full((len(chosen), width), PAD_ID, dtype=torch.int64)
        mask = torch.zeros(len(chosen), width, dtype=torch.bool)
        for r, (tokens, loss) in enumerate(chosen):
            ids[r, :len(tokens)] = torch.from_numpy(tokens)
            mask[r, :len(tokens)] = torch.from_numpy(loss)
        batches.append({"input_ids": ids, "loss_mask": mask[:, 1:]})
    return batches


def length_grouped(lengths: list[int], size: int, seed: int) -> list[int]:
    """transformers' group_by_length order, mega-batches of 50 batches."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    return get_length_grouped_indices(lengths, size, mega_batch_mult=50,
                                      generator=torch.Generator().manual_seed(seed))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def model_before_packing(config: ModelConfig, state: dict, device: str) -> SmolLM | None:
    """smollm/model.py as of commit BEFORE, holding `state`; None where git or the commit is missing."""
    try:
        source = subprocess.run(["git", "show", f"{BEFORE}:smollm/model.py"], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
    except OSError:
        return None
    if source.returncode:
        return None
    module = types.ModuleType("smollm_model_before")
    exec(compile(source.stdout, f"smollm/model.py@{BEFORE}", "exec"), module.__dict__)
    model = module.SmolLM(config).to(device)
    model.load_state_dict(state)
    return model


def hardware(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "CPU"
    return f"{name}, {os.cpu_count()} cores"


def bench(args: argparse.Namespace) -> dict:
    device, capacity = args.device, args.seq_len + 1
    torch.manual_seed(0)
    vocab = args.vocab_size or max(64, round(49152 * args.layers / 30 / 64) * 64)
    config = ModelConfig.from_name("135m", num_hidden_layers=args.layers, vocab_size=vocab)
    model = SmolLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda")

    docs, drawn = conversations(args.conversations, args.median, args.sigma, capacity, args.seed)
    docs = [(ids % vocab, loss) for ids, loss in docs]
    lengths = [len(ids) for ids, _ in docs]
    packed = packed_batches(docs, capacity, args.rows)
    windows = sum(len(b["input_ids"]) for b in packed)
    size = max(1, round(args.rows * len(docs) / windows))
    # (document_attention, batches); padded rows have no document_ids, so theirs is not used
    variants = {"packed": ("varlen", packed), "packed, SDPA mask": ("sdpa", packed)}
    if device == "cuda":
        variants["packed, flex_attention"] = ("flex", packed)
    variants["padded, length-grouped"] = ("varlen", padded_batches(docs, length_grouped(lengths, size, args.seed),
                                                                   size))
    random_order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(args.seed)).tolist()
    variants["padded, random"] = ("varlen", padded_batches(docs, random_order, size))

    supervised = {name: int(sum(b["loss_mask"].sum() for b in batches)) for name, (_, batches) in variants.items()}
    assert len(set(supervised.values())) == 1, supervised  # every variant trains on the same tokens
    scored = next(iter(supervised.values()))

    def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch["input_ids"].to(device, non_blocking=True)
        mask = batch["loss_mask"].to(device, non_blocking=True)
        documents = batch.get("document_ids")
        with autocast:
            return model.loss(ids[:, :-1], ids[:, 1:], mask, chunk_size=8192,
                              document_ids=None if documents is None else documents.to(device, non_blocking=True))

    # The packed variants compute the same loss, up to summation order.
    with torch.no_grad():
        losses = {}
        for name, (kind, batches) in variants.items():
            if name.startswith("packed"):
                model.document_attention = kind
                losses[name] = loss_of(batches[0]).item()
    loss_spread = max(losses.values()) - min(losses.values())
    assert loss_spread < 1e-3, losses

    def step(batch: dict[str, torch.Tensor]) -> None:
        loss_of(batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # One pass over every variant's batches per repeat, their steps interleaved (each variant's k-th of n
    # batches at (k + 0.5) / n of the way), so that load from other processes falls on all of them alike.
    schedule = sorted(((k + 0.5) / len(batches), name, k) for name, (_, batches) in variants.items()
                      for k in range(len(batches)))
    for name, (kind, batches) in variants.items():  # warm-up: the longest batch of each (flex compiles here)
        model.document_attention = kind
        step(max(batches, key=lambda b: b["input_ids"].numel()))
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}
    load_start = os.getloadavg()[0]
    for r in range(args.repeats):
        wall, cpu = dict.fromkeys(variants, 0.0), dict.fromkeys(variants, 0.0)
        for _, name, k in schedule:
            kind, batches = variants[name]
            model.document_attention = kind
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            step(batches[k])
            sync(device)
            wall[name] += time.perf_counter() - start
            cpu[name] += time.process_time() - cpu_start
        for name in variants:
            times[name].append(wall[name])
            cpu_times[name].append(cpu[name])
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.1f}s" for n, t in times.items()),
              file=sys.stderr, flush=True)

    rows = []
    for name, (_, batches) in variants.items():
        slots = sum(b["input_ids"].numel() for b in batches)  # token positions in its rows (with the last target)
        t = statistics.median(times[name])
        rows.append({"variant": name, "steps": len(batches), "slots": slots, "fill": sum(lengths) / slots, "s": t,
                     "min_s": min(times[name]), "tok_s": scored / t, "runs": times[name],
                     "cpu_tok_s": scored / statistics.median(cpu_times[name])})
    base = {row["variant"]: row["tok_s"] for row in rows}

    # Plain pretraining windows through today's path and through the model before document_ids.
    plain = None
    before = model_before_packing(config, model.state_dict(), device)
    if before is not None:
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, vocab, (args.rows, capacity), generator=g).to(device)

        def plain_step(m):
            def go():
                m.zero_grad(set_to_none=True)
                with autocast:
                    loss = m.loss(ids[:, :-1], ids[:, 1:], chunk_size=8192)
                loss.backward()
                return loss
            return go

        sides = {"today": plain_step(model), "before": plain_step(before)}
        losses = {name: fn().detach() for name, fn in sides.items()}
        assert torch.equal(losses["today"], losses["before"]), losses
        plain_times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.plain_repeats):
            for name, fn in sides.items():
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                plain_times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in plain_times.items()}
        plain = {"times": plain_times, "ratio": med["today"] / med["before"],
                 "tok_s": {name: args.rows * args.seq_len / t for name, t in med.items()}}

    return {"config": config, "vocab": vocab, "drawn": drawn, "lengths": lengths, "windows": windows, "size": size,
            "scored": scored, "rows": rows, "loss_spread": loss_spread, "base": base, "plain": plain,
            "load": (load_start, os.getloadavg()[0])}


def report(args: argparse.Namespace, result: dict) -> list[str]:
    """The figures, as markdown lines (printed, and written to the note)."""
    drawn, lengths = result["drawn"], np.array(result["lengths"])
    base = result["base"]
    packed = base["packed"]
    cpu = args.device == "cpu"  # per CPU-second too: on a shared machine other load inflates wall time, not this
    packed_cpu = result["rows"][0]["cpu_tok_s"]
    threads = f", {torch.get_num_threads()} threads" if args.device == "cpu" else ""
    layers = f"{args.layers} layer{'s' * (args.layers != 1)}"
    lines = [
        f"Setup: SmolLM2-135M widths and heads, {layers}, vocabulary {result['vocab']:,}, "
        f"seq_len {args.seq_len}, {'bf16 autocast' if args.device == 'cuda' else 'float32'}, on "
        f"{hardware(args.device)} ({args.device}{threads}), torch {torch.__version__}; "
        f"load average {result['load'][0]:.2f} at the start, {result['load'][1]:.2f} at the end.",
        "",
        f"Conversations: {len(lengths)}, lengths log-normal (median {args.median:.0f}, sigma {args.sigma}, seed "
        f"{args.seed}): median {np.median(drawn):.0f}, mean {drawn.mean():.0f}, 90th percentile "
        f"{np.percentile(drawn, 90):.0f}, longest {drawn.max()}; {int((drawn > args.seq_len + 1).sum())} cut to "
        f"the window ({args.seq_len + 1} tokens), mean {lengths.mean():.0f} after. {result['scored']:,} supervised "
        f"tokens. Packed: {result['windows']} windows, {args.rows} a step; padded: {result['size']} conversations "
        f"a step.",
        "",
        "| variant | steps | token positions computed | filled with conversation | median s | fastest s "
        "| supervised tokens/s | packed's speed / this |"
        + (" supervised tokens per CPU-second | ratio |" if cpu else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if cpu else ""),
    ]
    for row in result["rows"]:
        lines.append(f"| {row['variant']} | {row['steps']} | {row['slots']:,} | {row['fill']:.0%} | {row['s']:.2f} "
                     f"| {row['min_s']:.2f} | {row['tok_s']:,.0f} | {packed / row['tok_s']:.2f}x |"
                     + (f" {row['cpu_tok_s']:,.0f} | {packed_cpu / row['cpu_tok_s']:.2f}x |" if cpu else ""))
    lines += ["", "Runs (s), alternating: " + "; ".join(
        f"{row['variant']} {', '.join(f'{t:.2f}' for t in row['runs'])}" for row in result["rows"]), ""]
    grouped, random_ = packed / base["padded, length-grouped"], packed / base["padded, random"]
    lines.append(f"Packed against padded, length-grouped (the stronger baseline): {grouped:.2f}x; against padded "
                 f"in random batches: {random_:.2f}x (supervised tokens per second). Target 2x: "
                 f"{'met' if grouped >= 2 else 'not met'} against the length-grouped baseline, "
                 f"{'met' if random_ >= 2 else 'not met'} against random batches.")
    for name in base:
        if name.startswith("packed,"):
            lines.append(f"Packed with {name[8:]} instead: {base[name] / base['padded, length-grouped']:.2f}x padded "
                         f"length-grouped's speed, {base[name] / base['padded, random']:.2f}x padded random's; "
                         f"the default (varlen) runs {packed / base[name]:.2f}x its speed.")
    lines.append(f"The packed variants' losses on the first window agree within {result['loss_spread']:.1e}.")
    plain = result["plain"]
    lines.append("")
    if plain is None:
        lines.append(f"Plain pretraining windows, today against before packing: not measured "
                     f"(no git history with {BEFORE}).")
    else:
        lines.append(
            f"Plain pretraining windows ({args.rows} x {args.seq_len}, forward + backward, median of "
            f"{args.plain_repeats} alternating): today {plain['tok_s']['today']:,.0f} tokens/s, the model before "
            f"per-document attention (commit {BEFORE}) {plain['tok_s']['before']:,.0f}; time today / before "
            f"{plain['ratio']:.2f}; the losses are equal, bit for bit.")
    return lines


def write_note(path: Path, args: argparse.Namespace, lines: list[str]) -> None:
    """Write the note: its title and this run's section (--append: add the section to the note)."""
    command = "python scripts/bench_sft.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    section = [f"## {args.device}, seq_len {args.seq_len}, {args.layers} layer{'s' * (args.layers != 1)}", "",
               f"Command: `{command.strip()}`", "", *lines, ""]
    if args.append and path.exists():
        text = path.read_text().rstrip("\n") + "\n\n" + "\n".join(section)
    else:
        text = "\n".join([
            "# SFT speed: packed against padded", "",
            "Written by `scripts/bench_sft.py`, one section a run; what it measures: the script's docstring and "
            "[docs/speed.md](../docs/speed.md#sft-packed-against-padded).", "", *section])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab_size", type=int, default=None, help="default: 49152 x layers / 30")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--rows", type=int, default=1, help="packed windows per step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain_repeats", type=int, default=5)
    parser.add_argument("--median", type=float, default=400, help="median conversation length, tokens")
    parser.add_argument("--sigma", type=float, default=0.9, help="log-normal shape of the lengths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--note", default=str(ROOT / "notes" / "sft-speed.md"),
                        help="write the figures and the command here (empty: do not write)")
    parser.add_argument("--append", action="store_true", help="add this run's section to the note")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = report(args, bench(args))
    print("\n".join(lines))
    if args.note:
        write_note(Path(args.note), args, lines)
        print(f"wrote {args.note}", file=sys.stderr)
