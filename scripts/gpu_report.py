"""One command for a GPU session: CUDA tests, the benchmark against transformers, 300 steps of
the real config through `python -m smollm.fit`, and a profile of steady training steps.

    python scripts/gpu_report.py --out gpu-report        # about 7 minutes on one H100

It needs only the README's set-up. It writes DIR/summary.txt (short, also printed) and
DIR/report.json (every figure), plus the logs of each part:
  1. `pytest -m cuda`: the tests that need a GPU.
  2. scripts/benchmark.py at seq_len 2048, bf16-mixed, both models compiled per layer, each side
     at the largest micro-batch that fits (found by trying): tokens/s, MFU, peak memory, ratio.
  3. `python -m smollm.fit --config configs/135m.yaml --trainer.max_steps 300`: the tokens/s, MFU
     and peak memory that fit itself logged to TensorBoard (median of the logged windows after
     the first 100 steps, which hold compilation), and its wall time.
  4. torch.profiler over a few steady steps of the same training step (LitSmolLM's model, loss,
     clipping and fused AdamW): GPU time by phase (layers forward, head and loss, backward,
     optimizer) and by kind (attention, matmul, other kernels), the idle gaps between kernels,
     and which SDPA backend ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, float, str]:
    """Run cmd with its output in log; (exit code, seconds, the output's tail)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout,
                                  env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                                       **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            code = 124
    text = log.read_text(errors="replace")
    return code, time.perf_counter() - t0, text[-3000:]


def part_tests(out: Path, report: dict) -> str:
    code, seconds, tail = run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                               "tests"], out / "tests.log", 240)
    last = [line for line in tail.splitlines() if line.strip()][-1:] or ["no output"]
    report["tests"] = {"exit": code, "seconds": seconds, "result": last[0]}
    return f"CUDA tests: {last[0]} (exit {code}, {seconds:.0f} s)"


def part_benchmark(out: Path, report: dict) -> str:
    path = out / "benchmark.json"
    code, seconds, tail = run([sys.executable, "scripts/benchmark.py", "--device", "cuda", "--preset", "135m",
                               "--seq-len", "2048", "--batch-size", "0", "--compile", "--pairs", "5",
                               "--warmup", "2", "--skip-gen", "--json", str(path)], out / "benchmark.log", 300)
    if code != 0 or not path.exists():
        report["benchmark"] = {"exit": code, "tail": tail}
        return f"benchmark against transformers: failed (exit {code}), see benchmark.log"
    tr = json.loads(path.read_text())["train"]
    ours, theirs = tr["smollm"], tr["transformers"]
    report["benchmark"] = {"batch_size": tr["batch_size"], "seconds": seconds, **{
        side: {k: tr[side][k] for k in ("tokens_per_s", "mfu", "peak_mem_bytes", "median_s")} for side in ("smollm", "transformers")}}
    ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
    report["benchmark"]["speedup"] = ratio
    return (f"training step, seq_len 2048, bf16-mixed, both compiled per layer, largest micro-batch each:\n"
            f"  smollm       micro-batch {tr['batch_size']['smollm']:>3}: {ours['tokens_per_s']:>9,.0f} tokens/s, "
            f"MFU {ours['mfu']:.1%}, peak {ours['peak_mem_bytes'] / 2**30:.1f} GiB\n"
            f"  transformers micro-batch {tr['batch_size']['transformers']:>3}: {theirs['tokens_per_s']:>9,.0f} tokens/s, "
            f"MFU {theirs['mfu']:.1%}, peak {theirs['peak_mem_bytes'] / 2**30:.1f} GiB\n"
            f"  smollm / transformers tokens/s: {ratio:.2f}x")


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(logdir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


def part_fit(out: Path, report: dict, steps: int, extra: list[str]) -> str:
    root = out / "fit"
    cmd = [sys.executable, "-m", "smollm.fit", "--config", "configs/135m.yaml", "--trainer.max_steps", str(steps),
           "--trainer.default_root_dir", str(root), "--name", "gpu-report", "--trainer.enable_progress_bar", "false",
           *extra]
    code, seconds, tail = run(cmd, out / "fit.log", 360)
    scalars = read_scalars(root / "lightning_logs") if (root / "lightning_logs").exists() else {}
    steady = lambda tag: [v for s, v in scalars.get(tag, []) if s > min(100, steps // 3)]  # noqa: E731
    tps, mfu, mem = steady("train/tokens_per_sec"), steady("train/mfu"), scalars.get("train/peak_memory_gib", [])
    loss = scalars.get("train/loss", [])
    fit = {"exit": code, "wall_s": seconds, "command": " ".join(cmd[1:]),
           "tokens_per_s": statistics.median(tps) if tps else None, "mfu": statistics.median(mfu) if mfu else None,
           "peak_memory_gib": max(v for _, v in mem) if mem else None,
           "loss_first_last": [loss[0][1], loss[-1][1]] if loss else None, "tail": tail if code else None}
    for path in root.rglob("*.ckpt"):  # 1.6 GB each; the figures are what the report keeps
        path.unlink()
    report["fit"] = fit
    if code != 0 or fit["tokens_per_s"] is None:
        return f"fit: failed (exit {code}), see fit.log"
    return (f"python -m smollm.fit --config configs/135m.yaml --trainer.max_steps {steps}: "
            f"{fit['tokens_per_s']:,.0f} tokens/s, MFU {fit['mfu']:.1%}, peak {fit['peak_memory_gib']:.1f} GiB, "
            f"loss {fit['loss_first_last'][0]:.2f} -> {fit['loss_first_last'][1]:.2f}, {seconds:.0f} s wall")


KINDS = [("attention", re.compile(r"sdpa|flash|fmha|attention|cudnn", re.I)),
         ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|cublas|Kernel2", re.I)),
         ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I))]
PHASES = ("forward: layers", "forward: head and loss", "backward", "optimizer")


def part_profile(out: Path, report: dict, batch_size: int, chunk: int) -> str:
    """Profile steady steps of LitSmolLM's training step in this process."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from smollm.model import chunked_cross_entropy
    from smollm.module import LitSmolLM

    torch.manual_seed(0)
    lit = LitSmolLM(preset="135m", compile=True, loss_chunk_size=chunk).cuda()
    lit.configure_model()
    opt = lit.configure_optimizers()["optimizer"]
    model = lit.model.train()
    batch = torch.randint(model.config.vocab_size, (batch_size, 2049), device="cuda")
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def step():
        # SmolLM.loss, written out in its two halves so that the profile times them apart.
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with record_function(PHASES[0]):
                hidden = model.hidden_states(inputs)
            with record_function(PHASES[1]):
                loss = chunked_cross_entropy(hidden, model.lm_head.weight, targets, chunk, compiled=True)
        with record_function(PHASES[2]):
            loss.backward()
        with record_function(PHASES[3]):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    n = 4
    t0 = time.perf_counter()  # the step time, measured without the profiler's own overhead
    for _ in range(2 * n):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / (2 * n)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    trace = out / "profile_trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ranges = [(e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
              if e.get("cat") == "user_annotation" and e["name"] in PHASES]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    by_phase = {p: 0.0 for p in PHASES}
    by_kind: dict[str, float] = {}
    attention_names: dict[str, float] = {}
    for k in kernels:
        kind = next((name for name, rx in KINDS if rx.search(k["name"])), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + k["dur"]
        if kind == "attention":
            attention_names[k["name"][:80]] = attention_names.get(k["name"][:80], 0.0) + k["dur"]
        at = launches.get(k.get("args", {}).get("correlation"))
        phase = next((p for a, b, p in ranges if at is not None and a <= at <= b), "other")
        by_phase[phase] = by_phase.get(phase, 0.0) + k["dur"]
    spans = sorted((k["ts"], k["ts"] + k["dur"]) for k in kernels)
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # the union of kernel intervals: time the GPU was running something
        if b > end:
            busy += b - max(a, end)
            end = b
    ms = lambda us: us / 1e3 / n  # noqa: E731  microseconds over n steps -> ms per step
    prof_report = {"batch_size": batch_size, "chunk": chunk, "step_ms": wall * 1e3,
                   "tokens_per_s": batch_size * 2048 / wall,
                   "gpu_busy_ms": ms(busy), "idle_ms": max(0.0, wall * 1e3 - ms(busy)),
                   "by_phase_ms": {p: ms(v) for p, v in by_phase.items()},
                   "by_kind_ms": {k: ms(v) for k, v in sorted(by_kind.items())},
                   "attention_kernels_ms": {k: ms(v) for k, v in sorted(attention_names.items(), key=lambda x: -x[1])}}
    report["profile"] = prof_report
    trace.unlink()  # large; the summary keeps what matters
    lines = [f"profile of {n} steady steps (micro-batch {batch_size} x 2048, loss chunk {chunk}): "
             f"{wall * 1e3:.1f} ms per step unprofiled, GPU busy {ms(busy):.1f} ms of it, idle "
             f"{prof_report['idle_ms']:.1f} ms"]
    lines.append("  by phase (ms per step): " + ", ".join(f"{p} {v:.1f}" for p, v in prof_report["by_phase_ms"].items() if v))
    lines.append("  by kind (ms per step): " + ", ".join(f"{k} {v:.1f}" for k, v in prof_report["by_kind_ms"].items()))
    top = list(prof_report["attention_kernels_ms"].items())[:3]
    lines.append("  SDPA kernels: " + "; ".join(f"{k} {v:.1f} ms" for k, v in top))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu-report", help="folder for summary.txt, report.json and logs")
    p.add_argument("--steps", type=int, default=300, help="steps of configs/135m.yaml through fit")
    p.add_argument("--parts", default="tests,benchmark,fit,profile")
    p.add_argument("--profile-batch", type=int, default=None, help="default: configs/135m.yaml's micro-batch")
    p.add_argument("--fit-args", default="", help="extra options for fit, e.g. '--data.batch_size 48 --data.global_batch_size 48' (the global batch must be a multiple of the micro-batch)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: scripts/gpu_report.py needs a CUDA GPU; this machine has none")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "135m.yaml").read_text())
    batch = a.profile_batch or cfg["data"]["batch_size"]
    props = torch.cuda.get_device_properties(0)
    report: dict = {"device": f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs",
                    "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                    "python": platform.python_version(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    lines = [f"{report['device']}; torch {report['torch']} (CUDA {report['cuda']}, cuDNN {report['cudnn']}), "
             f"Python {report['python']}"]
    print(lines[0], flush=True)
    t0 = time.perf_counter()
    parts = {"tests": lambda: part_tests(out, report),
             "benchmark": lambda: part_benchmark(out, report),
             "fit": lambda: part_fit(out, report, a.steps, a.fit_args.split()),
             "profile": lambda: part_profile(out, report, batch, cfg["model"].get("loss_chunk_size", 8192))}
    for name in a.parts.split(","):
        try:
            line = parts[name]()
        except Exception as e:  # noqa: BLE001  one part failing must not lose the others' figures
            line = f"{name}: failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        print(line, flush=True)
        lines.append(line)
        (out / "report.json").write_text(json.dumps(report, indent=1))
    lines.append(f"total {time.perf_counter() - t0:.0f} s")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(lines[-1])


if __name__ == "__main__":
    main()
