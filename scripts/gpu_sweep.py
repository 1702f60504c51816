"""Training-step speed of the 135m model on one CUDA GPU, variant by variant.

    PYTHONPATH=. python scripts/gpu_sweep.py --variants eager:gqa,eager:repeat,layers:repeat --batch 16

A variant is COMPILE:ATTENTION[:BACKEND]:
  COMPILE    eager | layers (each decoder layer, as --model.compile) | model (hidden_states whole)
             | loss (hidden_states and the chunked loss, one function)
  ATTENTION  gqa (SDPA's enable_gqa) | repeat (K/V repeated to the query heads before SDPA)
  BACKEND    auto (SDPA chooses) | flash | cudnn | efficient | math  (forced with sdpa_kernel)
Each variant runs in its own process (clean memory and compile state): the full step of
forward + chunked loss + backward + clip_grad_norm_ + fused AdamW, bf16 autocast over float32
weights, as LitSmolLM trains. It prints tokens/s (median of timed windows), the time of one step,
peak CUDA memory and the attention kernels the profiler saw, and appends a JSON line per variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def step_fn(model, batch, variant: str, chunk: int):
    compile_mode = variant.split(":")[0]
    inputs, targets = batch[:, :-1], batch[:, 1:]
    if compile_mode == "layers":
        for layer in model.layers:
            layer.compile()
    elif compile_mode == "model":  # SmolLM.loss calls this instance's hidden_states: the compiled one
        model.hidden_states = torch.compile(model.hidden_states)

    def loss_fn():
        return model.loss(inputs, targets, chunk_size=chunk, compiled=compile_mode != "eager")
    if compile_mode == "loss":
        loss_fn = torch.compile(loss_fn)
    params = list(model.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def set_attention(mode: str) -> None:
    """'repeat': expand each K/V head to its query heads before SDPA (any backend can take it)."""
    import smollm.model as m

    if mode == "gqa" or hasattr(m.Attention, "set_gqa_mode"):
        if hasattr(m.Attention, "set_gqa_mode"):
            m.Attention.set_gqa_mode(mode)
        return
    import torch.nn.functional as F

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = m.apply_rotary(q, cos, sin), m.apply_rotary(k, cos, sin)
        rep = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
    m.Attention.forward = forward


def child(variant: str, batch_size: int, seq_len: int, chunk: int, steps: int, windows: int) -> dict:
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from smollm.config import ModelConfig
    from smollm.model import SmolLM

    parts = variant.split(":")
    attention, backend = parts[1], (parts[2] if len(parts) > 2 else "auto")
    set_attention(attention)
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("135m")
    model = SmolLM(cfg).cuda().train()
    batch = torch.randint(cfg.vocab_size, (batch_size, seq_len + 1), device="cuda")
    step = step_fn(model, batch, variant, chunk)
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    ctx = sdpa_kernel([backends[backend]]) if backend != "auto" else nullcontext()
    with ctx:
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(windows):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / steps)
        peak = torch.cuda.max_memory_allocated()
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    kernels = sorted({e.key for e in prof.key_averages()
                      if any(s in e.key.lower() for s in ("flash", "fmha", "cudnn", "sdpa", "attention",
                                                          "softmax", "bmm"))})
    step_s = statistics.median(times)
    return {"variant": variant, "batch": batch_size, "seq_len": seq_len, "chunk": chunk,
            "step_ms": step_s * 1e3, "tokens_per_s": batch_size * seq_len / step_s,
            "mfu": batch_size * seq_len / step_s * cfg.flops_per_token(seq_len) / 989e12,
            "peak_gib": peak / 2**30, "warmup_s": warmup_s, "window_ms": [t * 1e3 for t in times],
            "attention_kernels": [k[:90] for k in kernels][:6]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="eager:gqa,eager:repeat")
    p.add_argument("--batch", default="16", help="comma-separated micro-batch sizes")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--chunk", default="4096", help="comma-separated loss chunk sizes")
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--json", default="sweep.jsonl")
    p.add_argument("--child", default=None)
    a = p.parse_args()
    if a.child:
        variant, b, c = a.child.split("@")
        print("RESULT " + json.dumps(child(variant, int(b), a.seq_len, int(c), a.steps, a.windows)))
        return
    print(f"{'variant':<28}{'batch':>6}{'chunk':>7}{'ms/step':>9}{'tok/s':>10}{'MFU':>7}{'GiB':>7}"
          f"{'warm s':>8}  attention kernels")
    for variant in a.variants.split(","):
        for b in a.batch.split(","):
            for c in a.chunk.split(","):
                proc = subprocess.run([sys.executable, __file__, "--child", f"{variant}@{b}@{c}",
                                       "--seq-len", str(a.seq_len), "--steps", str(a.steps),
                                       "--windows", str(a.windows)], capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    err = (proc.stderr.strip().splitlines() or ["?"])[-1][:150]
                    print(f"{variant:<28}{b:>6}{c:>7}  failed: {err}", flush=True)
                    r = {"variant": variant, "batch": int(b), "chunk": int(c), "error": proc.stderr[-3000:]}
                else:
                    r = json.loads(line[7:])
                    print(f"{variant:<28}{b:>6}{c:>7}{r['step_ms']:>9.1f}{r['tokens_per_s']:>10,.0f}"
                          f"{r['mfu']:>7.1%}{r['peak_gib']:>7.1f}{r['warmup_s']:>8.1f}  "
                          + " | ".join(k[:40] for k in r["attention_kernels"][:3]), flush=True)
                with open(a.json, "a") as f:
                    f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
