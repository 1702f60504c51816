"""Benchmark smollm against transformers' LlamaForCausalLM holding the same random weights.

    PYTHONPATH=. python scripts/benchmark.py --device cpu --preset 135m --batch-size 2 --seq-len 256
    PYTHONPATH=. python scripts/benchmark.py --preset tiny --pairs 3 --warmup 1     # smoke test
    PYTHONPATH=. python scripts/benchmark.py --memory-report                      # 135m at 16 x 2048

Each measurement alternates the models (smollm, transformers, smollm, ...) so that clock or load
drift hits both; warmup is not timed. The table shows medians over the pairs that other processes
did not disturb (Linux CPU pressure stall, see --max-stall) and the fastest runs.
  1. The full training step: forward + loss + backward + clip_grad_norm_ + AdamW step + zero_grad,
     same batch, precision, device and optimizer settings (LitSmolLM's defaults) for both.
  2. Greedy generation with a KV cache from a 32-token prompt: new tokens per second (eager).
Peak memory: on CUDA torch.cuda.max_memory_allocated, reset before each step. On CPU each model's
steps run again in a fresh subprocess that holds only that model; it resets its peak RSS to its
current RSS (Linux /proc/self/clear_refs) just before the first step and reports how far the peak
(VmHWM) rose: gradients, AdamW state, activations, logits and temporaries.
The JSON file keeps every raw timing (wall and process CPU seconds).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from smollm.config import ModelConfig
from smollm.generate import generate
from smollm.callbacks import peak_flops
from smollm.model import SmolLM, chunked_cross_entropy
from smollm.module import LitSmolLM

SIDES = ("smollm", "transformers")
# The optimizer and loss settings of the real training run: LitSmolLM's defaults.
LIT = {k: p.default for k, p in inspect.signature(LitSmolLM.__init__).parameters.items() if k != "self"}
GiB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", choices=["135m", "tiny"], default="135m")
    p.add_argument("--batch-size", type=int, default=2,
                   help="micro-batch of both sides; 0 finds the largest that fits each side (CUDA)")
    p.add_argument("--hf-batch-size", type=int, default=None, help="transformers' micro-batch, if other")
    p.add_argument("--seq-len", type=int, default=256, help="T, the tokens each sequence trains on")
    p.add_argument("--dtype", choices=["float32", "bf16-mixed"], default=None,
                   help="default: float32 on CPU, bf16-mixed (autocast, float32 weights) on CUDA")
    p.add_argument("--pairs", type=int, default=5, help="timed rounds, each smollm then transformers")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before the pairs")
    p.add_argument("--max-stall", type=float, default=0.05,
                   help="medians use the pairs whose CPU stall fraction (other load) stayed under this")
    p.add_argument("--compile", nargs="?", const="layers", choices=["layers", "loss"], default=None,
                   help="torch.compile both models: each decoder layer in place, as LitSmolLM's "
                        "--model.compile does (the default), or the whole loss function")
    p.add_argument("--chunk-size", type=int, default=LIT["loss_chunk_size"], help="chunked CE rows")
    p.add_argument("--gen-tokens", type=int, default=64, help="greedy new tokens per generation")
    p.add_argument("--skip-gen", action="store_true")
    p.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s of the device, for MFU")
    p.add_argument("--memory-report", action="store_true", help="135m at micro-batch 16 x 2048")
    p.add_argument("--json", default="bench.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "train:SIDE" or "head:SIDE"
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bf16-mixed")
    return args


def build(side: str | None, cfg: ModelConfig, device: torch.device) -> list:
    """[ours, theirs], the same function; with side, only that one (and HF with its own init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ours = SmolLM(cfg) if side != "transformers" else None
    theirs = None
    if side != "smollm":
        theirs = LlamaForCausalLM(LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
            tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
            bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation="sdpa"))
        if ours is not None:  # our module names are HF's: the conversion is a prefix
            theirs.load_state_dict({k if k.startswith("lm_head") else "model." + k: v
                                    for k, v in ours.state_dict().items()})
            assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    return [m.to(device) if m is not None else None for m in (ours, theirs)]


def make_train_step(side: str, model, batch: torch.Tensor, args, device: torch.device):
    """The full training step of one model on batch (B, T + 1), as a closure."""
    params = list(model.parameters())  # a tied weight appears once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": LIT["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # Fused AdamW on CUDA as LitSmolLM; on CPU torch's default (a per-parameter loop) for both.
    opt = torch.optim.AdamW(groups, lr=LIT["learning_rate"], betas=LIT["betas"],
                            fused=True if device.type == "cuda" else None)
    if side == "smollm":  # LitSmolLM._step: T inputs, T shifted targets
        inputs, targets = batch[:, :-1], batch[:, 1:]

        def loss_fn():
            return model.loss(inputs, targets, chunk_size=args.chunk_size, compiled=args.compile is not None)
    else:  # what a transformers user writes. HF shifts the labels itself, so it gets the (B, T)
        window = batch[:, :-1]  # window: both models run on the same T tokens (HF scores T - 1).
        # use_cache=False: by default (config.use_cache) HF fills a KV cache even in training,
        # work our step does not do, and that makes per-layer compile recompile for every layer.

        def loss_fn():
            return model(input_ids=window, labels=window, use_cache=False).loss
    if args.compile == "loss":
        loss_fn = torch.compile(loss_fn)
    elif args.compile == "layers":
        for layer in model.layers if side == "smollm" else model.model.layers:
            layer.compile()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16-mixed"):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, LIT["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    return step


def cpu_stall_seconds() -> float:
    """Time some task on this machine waited for a CPU (Linux pressure stall information)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return 0.0


def alternate(fns: dict, args, device: torch.device) -> dict:
    """Warmup rounds, then args.pairs rounds of fns in order: raw timings per side, and medians.

    A shared machine's other processes slow a run down by a lot at random moments. Each run also
    records the CPU stall (time any task waited for a CPU) as a fraction of its duration; the
    medians are taken over the pairs where both runs stayed under --max-stall, if 3 or more did.
    """
    out = {side: {"warmup_s": [], "s": [], "cpu_s": [], "stall": [], "peak_bytes": []} for side in fns}
    for round_ in range(args.warmup + args.pairs):
        for side, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0, c0, s0 = time.perf_counter(), time.process_time(), cpu_stall_seconds()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            r = out[side]
            if round_ < args.warmup:
                r["warmup_s"].append(seconds)
                continue
            r["s"].append(seconds)
            r["cpu_s"].append(cpu)
            r["stall"].append((cpu_stall_seconds() - s0) / seconds)
            r["peak_bytes"].append(torch.cuda.max_memory_allocated() if device.type == "cuda" else None)
    quiet = [i for i in range(args.pairs) if all(out[side]["stall"][i] <= args.max_stall for side in SIDES)]
    out["pairs_used"] = quiet if len(quiet) >= 3 else list(range(args.pairs))
    for side in SIDES:
        r = out[side]
        r["median_s"] = statistics.median(r["s"][i] for i in out["pairs_used"])
        r["median_cpu_s"] = statistics.median(r["cpu_s"][i] for i in out["pairs_used"])
        r["min_s"] = min(r["s"])  # the least disturbed run: other load only ever adds time
    a, b = (out[side]["s"] for side in SIDES)
    out["pair_ratios"] = [x / y for x, y in zip(a, b)]  # smollm / transformers, round by round
    return out


def reset_peak_rss() -> int:
    """Set this process's peak RSS to its current RSS (Linux >= 4.0); return it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_rss()


def peak_rss() -> int:
    """VmHWM, not getrusage's ru_maxrss: that one keeps the forking parent's peak across exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(args) -> None:
    """In a subprocess: the peak RSS rise of one model's training steps, or of head + loss alone."""
    kind, side = args.child.split(":")
    cfg, g = ModelConfig.from_name(args.preset), torch.Generator().manual_seed(1)
    with open("/proc/self/oom_score_adj", "w") as f:  # if memory runs out, kill this process
        f.write("1000")
    if kind == "train":
        model = [m for m in build(side, cfg, torch.device("cpu")) if m is not None][0]
        step = make_train_step(side, model, torch.randint(cfg.vocab_size, (args.batch_size, args.seq_len + 1),
                                                          generator=g), args, torch.device("cpu"))
        base, t0 = reset_peak_rss(), time.perf_counter()
        for _ in range(2):  # the first step allocates the AdamW state, the second is steady
            step()
    else:  # the lm head and loss, forward and backward, over (B * T, C) final hidden states
        n = args.batch_size * args.seq_len
        hidden = torch.randn(n, cfg.hidden_size, generator=g).requires_grad_()
        weight = (torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g) * 0.04).requires_grad_()
        targets = torch.randint(cfg.vocab_size, (n,), generator=g)
        base, t0 = reset_peak_rss(), time.perf_counter()
        if side == "smollm":
            loss = chunked_cross_entropy(hidden, weight, targets, args.chunk_size)
        else:  # what transformers' ForCausalLMLoss does: all the logits in float32, cross entropy
            loss = F.cross_entropy((hidden @ weight.t()).float(), targets)
        loss.backward()
    print(json.dumps({"rise_bytes": peak_rss() - base, "base_bytes": base, "seconds": time.perf_counter() - t0}))


def run_child(kind: str, side: str, args) -> dict:
    argv = [sys.executable, __file__, "--child", f"{kind}:{side}", "--device", "cpu", "--preset", args.preset,
            "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--chunk-size", str(args.chunk_size)] + (["--compile", args.compile] if args.compile else [])
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        why = "killed, out of memory?" if proc.returncode < 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {proc.returncode}: {why}", "rise_bytes": None}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def largest_batch(side: str, model, args, device: torch.device, candidates=(96, 64, 48, 40, 32, 24, 16, 8, 4)) -> int:
    """The largest micro-batch of `candidates` whose training step (two of them: the first
    allocates AdamW's state) runs without running out of CUDA memory, the other model resident."""
    vocab = model.config.vocab_size
    for b in candidates:
        try:
            batch = torch.randint(vocab, (b, args.seq_len + 1), device=device)
            step = make_train_step(side, model, batch, args, device)
            for _ in range(2):
                step()
            torch.cuda.synchronize()
            return b
        except torch.OutOfMemoryError:
            pass
        finally:
            step = batch = None
            for p in model.parameters():
                p.grad = None
            torch.cuda.empty_cache()
        print(f"  {side}: micro-batch {b} x {args.seq_len} does not fit", flush=True)
    raise SystemExit(f"{side}: not even micro-batch {candidates[-1]} fits")


def train(args, device: torch.device) -> dict:
    cfg = ModelConfig.from_name(args.preset)
    ours, theirs = build(None, cfg, device)
    g = torch.Generator().manual_seed(1)
    probe = torch.randint(cfg.vocab_size, (1, 16), generator=g).to(device)
    with torch.no_grad():  # the same function: the same logits on the same tokens
        diff = (ours(probe) - theirs(input_ids=probe).logits).abs().max().item()
    sizes = {"smollm": args.batch_size, "transformers": args.hf_batch_size or args.batch_size}
    for side, m in zip(SIDES, (ours, theirs)):
        if sizes[side] == 0:
            sizes[side] = largest_batch(side, m, args, device)
            print(f"  {side}: largest micro-batch that fits: {sizes[side]} x {args.seq_len}", flush=True)
    steps = {side: make_train_step(side, m, torch.randint(cfg.vocab_size, (sizes[side], args.seq_len + 1),
                                                          generator=g).to(device), args, device)
             for side, m in zip(SIDES, (ours, theirs))}
    result = alternate(steps, args, device)
    result["logits_max_abs_diff"] = diff
    result["batch_size"] = sizes
    peak = args.peak_flops
    if peak is None and device.type == "cuda" and args.dtype == "bf16-mixed":
        peak = peak_flops(device)
    for side in SIDES:
        r = result[side]
        r["tokens_per_s"] = sizes[side] * args.seq_len / r["median_s"]
        r["mfu"] = r["tokens_per_s"] * cfg.flops_per_token(args.seq_len) / peak if peak else None
        r["peak_mem_bytes"] = max(r["peak_bytes"]) if device.type == "cuda" else None
    del steps, ours, theirs
    if device.type == "cpu":  # after the timing, which the subprocesses would disturb
        for side in SIDES:
            result[side]["rss_child"] = run_child("train", side, args)
            result[side]["peak_mem_bytes"] = result[side]["rss_child"]["rise_bytes"]
    return result


def generation(args, device: torch.device) -> dict:
    cfg = ModelConfig.from_name(args.preset)
    ours, theirs = (m.eval() for m in build(None, cfg, device))
    prompt = torch.randint(cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(2)).to(device)
    n, outs = args.gen_tokens, {}

    def ours_gen():
        outs["smollm"] = generate(ours, prompt, max_new_tokens=n)

    @torch.inference_mode()
    def theirs_gen():
        outs["transformers"] = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                               min_new_tokens=n, do_sample=False)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16-mixed"):
        result = alternate({"smollm": ours_gen, "transformers": theirs_gen}, args, device)
    a, b = outs["smollm"][:, 32:], outs["transformers"][:, 32:]
    result["same_tokens"] = (a == b).float().mean().item() if a.shape == b.shape else 0.0
    for side in SIDES:
        result[side]["tokens_per_s"] = n / result[side]["median_s"]
        result[side]["best_tokens_per_s"] = n / result[side]["min_s"]
    return result


def head_memory(args, report: dict) -> None:
    """The logits path of 135m at micro-batch 16 x 2048: computed, and measured on CPU."""
    B, T, V = 16, 2048, ModelConfig.from_name("135m").vocab_size
    full, chunk = B * T * V * 4, min(args.chunk_size, B * T) * V * 4
    print(f"\nlogits memory, 135m at micro-batch {B} x {T}, V = {V}:\n"
          f"  transformers, all float32 logits B*T*V*4: {full / 1e9:5.2f} GB = {full / GiB:5.2f} GiB (log_softmax's "
          f"output and the logits' gradient are as large again)\n  smollm, one chunk chunk*V*4 ({args.chunk_size} "
          f"rows): {chunk / 1e9:5.2f} GB = {chunk / GiB:5.2f} GiB")
    report["logits_memory"] = {"full_logits_bytes": full, "chunk_logits_bytes": chunk}
    if args.device == "cuda":
        return
    print(f"  measured on CPU: lm head + loss, forward and backward over hidden ({B * T}, 576), "
          "peak RSS rise in a fresh subprocess each:")
    args.preset, args.batch_size, args.seq_len = "135m", B, T
    for side in SIDES:
        r = report["logits_memory"][side] = run_child("head", side, args)
        print(f"    {side:<13}" + (r.get("error") or f"{r['rise_bytes'] / GiB:6.2f} GiB in {r['seconds']:.1f} s"))


def print_table(report: dict, args, device: torch.device) -> None:
    tr, gen = report["train"], report.get("gen")
    sizes = tr["batch_size"]
    mem = "CUDA max allocated" if device.type == "cuda" else "CPU RSS rise, subprocess"
    print(f"micro-batch x {args.seq_len}: smollm {sizes['smollm']}, transformers {sizes['transformers']}"
          + ("" if sizes["smollm"] == sizes["transformers"] else " (compare tokens/s, not step times)"))
    rows = [("train step s (median wall)", tr, "median_s"), ("train step s (min wall)", tr, "min_s"),
            ("train step s (median process CPU)", tr, "median_cpu_s"), ("train tokens/s (median)", tr, "tokens_per_s"),
            ("train MFU", tr, "mfu"), (f"train peak mem GiB ({mem})", tr, "peak_mem_bytes")]
    if gen:
        rows += [(f"greedy gen tokens/s ({args.gen_tokens} new, median)", gen, "tokens_per_s"),
                 ("greedy gen tokens/s (best)", gen, "best_tokens_per_s")]
    used = f"{len(tr['pairs_used'])} of {args.pairs} pairs" + (f", gen {len(gen['pairs_used'])}" if gen else "")
    print(f"\nmedians over the undisturbed pairs ({used}; all pairs if fewer than 3)")
    print(f"{'':<44}{'smollm':>10}{'transformers':>14}{'ratio':>8}")
    for label, part, key in rows:
        a, b = part["smollm"][key], part["transformers"][key]
        scale = GiB if key == "peak_mem_bytes" else 1
        if a is None or b is None:
            print(f"{label:<44}{'n/a (give --peak-flops)' if key == 'mfu' else 'n/a':>32}")
        else:
            print(f"{label:<44}{a / scale:>10.4g}{b / scale:>14.4g}{a / b:>8.3f}")
    print("ratio = smollm / transformers: <= 1 is better for time and memory, >= 1 for tokens/s")
    for name, part in (("train step", tr), ("generation", gen)):
        if part:
            used = part["pairs_used"]
            ratios = ", ".join(f"{x:.3f}" + ("" if i in used else "*") for i, x in enumerate(part["pair_ratios"]))
            print(f"{name} time ratio pair by pair (* = disturbed, CPU stall > {args.max_stall:.0%}): {ratios}; "
                  f"median of the {len(used)} used: {statistics.median(part['pair_ratios'][i] for i in used):.3f}")
    first = {side: round(tr[side]["warmup_s"][0], 2) for side in SIDES} if args.warmup else "no warmup"
    print(f"first warmup step s (includes compiling with --compile): {first}")
    print(f"same function: logits max |diff| {tr['logits_max_abs_diff']:.2e}"
          + (f"; generated tokens equal: {gen['same_tokens']:.0%}" if gen else ""))


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    report = {"args": vars(args).copy(), "loadavg_start": os.getloadavg(),
              "hardware": f"{name}; torch {torch.__version__}; {torch.get_num_threads()} threads"}
    print(f"hardware: {report['hardware']}; load average {report['loadavg_start'][0]:.2f}")
    if args.memory_report:
        head_memory(args, report)
        args.preset, args.batch_size, args.seq_len, args.skip_gen = "135m", 16, 2048, True
    if not args.memory_report or device.type == "cuda":  # CPU cannot train 16 x 2048 in useful time
        print(f"{args.preset}, {args.dtype}, batch {args.batch_size} x {args.seq_len}, {args.pairs} pairs "
              f"after {args.warmup} warmup, compile={args.compile}, chunk {args.chunk_size}")
        report["train"] = train(args, device)
        if not args.skip_gen:
            report["gen"] = generation(args, device)
        print_table(report, args, device)
    report["loadavg_end"] = os.getloadavg()
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"load average at the end {report['loadavg_end'][0]:.2f}; raw timings in {args.json}")


if __name__ == "__main__":
    main()
