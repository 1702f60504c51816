"""Peak memory of fine-tuning with LoRA against full fine-tuning, at the same micro-batch; writes a
table and the command to a note.

    python scripts/bench_lora_memory.py [--preset 1.7b] [--layers 24,3,6] [--batch 1] [--seq_len 256]
        [--steps 2] [--rank 16] [--sides full-bf16,lora-bf16,full-fp32,lora-fp32] [--device cpu|cuda]
        [--threads N] [--margin 0.75] [--note notes/lora-memory.md]

Each side runs in its own child process, one after the other: the model (`--preset`, random
weights: memory does not depend on their values) in the side's dtype, with LoRA of `--rank` on every
linear layer of the decoder (smollm.lora's defaults: alpha 2 x rank, all seven projections) or without,
the optimizer LitSmolLM builds with its default options (AdamW, fused; with LoRA over the adapters
only), and `--steps` training steps of `--batch` x `--seq_len` random tokens through SmolLM.loss
(forward, backward, clip_grad_norm_, step, zero_grad), as fit's step does. "bf16" keeps the weights,
gradients and AdamW's state in bfloat16 (`--trainer.precision bf16-true`); "fp32" in float32 (fit's
default on CPU, and what bf16-mixed keeps).

On the CPU the figure is the child's peak resident memory (ru_maxrss from os.wait4: that child's
alone, its start-up included); on CUDA also torch.cuda.max_memory_allocated. Before each side the
script reads the memory the system can still give (MemAvailable) and runs the side only when
smollm.config.estimate_memory's figure for it is below `--margin` of that: a side that would not fit
is a row saying so, never a machine driven into swap or the OOM killer.

`--layers`: the model's depth, the preset's first (its own by default), then smaller ones, at which the
sides that did not fit at the first depth run. Memory grows linearly with depth (every decoder layer adds the same weights, gradients,
optimizer state and activations), so a side that did not fit at the first depth gets a row
extrapolated from its two deepest measured depths (a + b x layers), marked as such.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 2**30


def child(args: argparse.Namespace) -> None:
    """One side: build, train `--steps` steps, print a JSON line of what it measured."""
    import torch

    from smollm import ModelConfig, SmolLM
    from smollm.lora import apply_lora
    from smollm.module import DEFAULTS
    from smollm.optim import build_optimizer

    torch.set_num_threads(args.threads)
    kind, dtype_name = args.child.split("-")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    device = torch.device(args.device)
    config = ModelConfig.from_name(args.preset, num_hidden_layers=int(args.layers))
    torch.manual_seed(0)
    with torch.device("meta"):
        model = SmolLM(config)
    model = model.to(dtype).to_empty(device=device)  # the weights allocated once, in the side's dtype
    if config.tie_word_embeddings:  # to_empty gives the two names a tensor each: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    model.init_weights()
    if kind == "lora":
        apply_lora(model, args.rank)
    model.train()
    optimizer = build_optimizer(model, DEFAULTS)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), device=device)
        loss = model.loss(ids[:, :-1], ids[:, 1:], chunk_size=DEFAULTS["loss_chunk_size"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    out = {"side": args.child, "trainable": trainable, "params": sum(p.numel() for p in model.parameters()),
           "loss": float(loss.detach()), "step_seconds": times}
    if device.type == "cuda":
        out["gpu_peak"] = torch.cuda.max_memory_allocated(device)
    print(json.dumps(out), flush=True)


def available() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def estimate(args: argparse.Namespace, side: str, layers: int) -> int:
    """estimate_memory's bytes for a side: float32 figures, halved for bf16 (weights, gradients and
    AdamW's moments all in the side's dtype)."""
    from smollm.config import ModelConfig, estimate_memory
    from smollm.lora import trainable_count

    kind, dtype = side.split("-")
    config = ModelConfig.from_name(args.preset, num_hidden_layers=layers)
    trainable = trainable_count(config, args.rank) if kind == "lora" else None
    e = estimate_memory(config, args.batch, args.seq_len, bf16=dtype == "bf16", trainable=trainable)
    state = e.model_and_optimizer // (2 if dtype == "bf16" else 1)
    return state + e.activations + e.logits


def run_side(args: argparse.Namespace, side: str, layers: int) -> dict:
    free, need = available(), estimate(args, side, layers)
    row = {"side": side, "layers": layers, "free": free, "estimate": need}
    if need > args.margin * free:
        row["skipped"] = (f"not run: estimated {need / GiB:.1f} GiB, and {free / GiB:.1f} GiB were free "
                          f"(runs below {args.margin:.0%} of it)")
        print(f"{side}, {layers} layers: {row['skipped']}", file=sys.stderr, flush=True)
        return row
    argv = [sys.executable, __file__, "--child", side, "--preset", args.preset, "--layers", str(layers),
            "--batch", str(args.batch),
            "--seq_len", str(args.seq_len), "--steps", str(args.steps), "--rank", str(args.rank),
            "--device", args.device, "--threads", str(args.threads)]
    print(f"{side}, {layers} layers: running (estimated {need / GiB:.1f} GiB, {free / GiB:.1f} GiB free)", file=sys.stderr, flush=True)
    start = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the largest of all children
    out = proc.stdout.read()
    proc.stdout.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        row["skipped"] = f"failed (exit {proc.returncode})"
        return row
    row.update(json.loads(out.strip().splitlines()[-1]))
    row["rss_peak"] = usage.ru_maxrss * 1024  # kilobytes on Linux
    row["seconds"] = time.time() - start
    print(f"{side}, {layers} layers: peak RSS {row['rss_peak'] / GiB:.2f} GiB", file=sys.stderr, flush=True)
    return row


def table(args: argparse.Namespace, rows: list[dict]) -> str:
    gpu = "GPU peak (max_memory_allocated)" if args.device == "cuda" else "GPU memory"
    lines = [f"| side | layers | weights, gradients, AdamW state | trainable parameters | peak RSS | estimate | {gpu} |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        kind, dtype = r["side"].split("-")
        what = "LoRA" if kind == "lora" else "full fine-tuning"
        head = f"| {what} | {r['layers']} | {dtype} |"
        if "extrapolated" in r:
            lines.append(f"{head} | {r['extrapolated']} | {r['estimate'] / GiB:.1f} GiB | |")
        elif "skipped" in r:
            lines.append(f"{head} | {r['skipped']} | {r['estimate'] / GiB:.1f} GiB | |")
        else:
            share = f" ({r['trainable'] / r['params']:.2%})" if kind == "lora" else ""
            g = f"{r['gpu_peak'] / GiB:.2f} GiB" if "gpu_peak" in r else "not measured (no GPU lent)"
            lines.append(f"{head} {r['trainable']:,}{share} | {r['rss_peak'] / GiB:.2f} GiB | "
                         f"{r['estimate'] / GiB:.1f} GiB | {g} |")
    return "\n".join(lines)


def extrapolate(args: argparse.Namespace, rows: list[dict], depths: list[int]) -> list[dict]:
    """For each side skipped at the first depth: its peak RSS there from its two deepest measured
    depths, a + b x layers."""
    out = []
    for r in rows:
        if r["layers"] != depths[0] or "rss_peak" in r:
            continue
        measured = sorted((m["layers"], m["rss_peak"]) for m in rows if m["side"] == r["side"] and "rss_peak" in m)
        if len(measured) < 2:
            continue
        (l1, m1), (l2, m2) = measured[-2:]
        per_layer = (m2 - m1) / (l2 - l1)
        value = m2 + per_layer * (depths[0] - l2)
        out.append({"side": r["side"], "layers": depths[0], "estimate": r["estimate"], "rss_peak_extrapolated": value,
                    "extrapolated": f"{value / GiB:.2f} GiB, extrapolated from {l1} and {l2} layers "
                                    f"({per_layer / GiB:.3f} GiB a layer); not run: it did not fit"})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="1.7b")
    p.add_argument("--layers", default=None, help="depths to run, the preset's first (default: the preset's own)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sides", default="full-bf16,lora-bf16,full-fp32,lora-fp32",
                   help="comma-separated: full-bf16, lora-bf16, full-fp32, lora-fp32, in the order to run them")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2))
    p.add_argument("--margin", type=float, default=0.75, help="run a side only below this share of the free memory")
    p.add_argument("--note", default=None, help="write the table and the command to this markdown file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    import torch

    from smollm.config import ModelConfig

    command = "python scripts/bench_lora_memory.py " + shlex.join(sys.argv[1:])
    depths = [int(d) for d in args.layers.split(",")] if args.layers else [
        ModelConfig.from_name(args.preset).num_hidden_layers]
    rows = [run_side(args, side, depths[0]) for side in args.sides.split(",")]
    unfit = [r["side"] for r in rows if "rss_peak" not in r]
    rows += [run_side(args, side, layers) for layers in depths[1:] for side in unfit]
    rows += extrapolate(args, rows, depths)
    text = table(args, rows)
    print(text)
    if args.note:
        config = ModelConfig.from_name(args.preset)
        times = {f"{r['side']} ({r['layers']} layers)": sum(r["step_seconds"][1:]) / max(1, len(r["step_seconds"]) - 1)
                 for r in rows if "step_seconds" in r}
        Path(args.note).write_text(
            f"# Peak memory of fine-tuning {args.preset}: LoRA against full fine-tuning\n\n"
            f"Command: `{command}`\n\n"
            f"{args.preset} ({config.num_params:,} parameters, {config.num_hidden_layers} layers), micro-batch {args.batch} x {args.seq_len} tokens, "
            f"{args.steps} training steps per side (forward, backward, clipping, AdamW step), each side in its own "
            f"process, one after the other; LoRA rank {args.rank}, alpha {2 * args.rank}, on all seven linear layers "
            f"of every decoder layer. Random weights. Machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"{args.threads} threads, torch {torch.__version__}, device {args.device}.\n\n"
            f"{text}\n\n"
            "Peak RSS is the child process's ru_maxrss (its start-up, Python and torch included); the estimate is "
            "smollm.config.estimate_memory's, made before anything is built (it leaves out the runtime and the "
            "allocator's slack). Seconds per step after the first: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + ".\n")


if __name__ == "__main__":
    main()
