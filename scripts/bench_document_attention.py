"""Per-document attention in a packed row: what it costs against plain causal attention, and
varlen (each document on its own), SDPA's bool mask and flex_attention's BlockMask against each
other, measured side by side in one run.

    python scripts/bench_document_attention.py [--layers 2] [--seq_len 2048] [--batch 1] [--repeats 5]
        [--mean_doc 400] [--device cpu|cuda] [--threads N]

The model has SmolLM2-135M's widths and heads (fewer layers, so that a CPU run takes a minute).
Each row packs documents of lengths drawn from a log-normal around `mean_doc` (conversations and
web pages are long-tailed). Timed, as medians of runs that alternate between the variants:
  - training: SmolLM.loss forward + backward, plain rows (is_causal, today's path) against the
    same tokens as packed documents (`document_ids`: varlen, the default, which computes no pair
    across documents; SDPA with a (B, 1, T, T) bool mask; with flex_attention too where torch has
    its backward: not on CPU);
  - scoring: the same loss without gradients, plain, varlen, SDPA mask and flex_attention (compiled);
  - the attention kernel alone (the 135M's 9 query and 3 key/value heads), with and without
    backward, the mask (or varlen's spans) built inside each run as the model builds it once per
    forward. On CUDA the model runs in float32 here, where varlen is SDPA per document (its flash
    kernel takes bf16/fp16: scripts/bench_sft.py times that).
The figures printed are ratios within this run; absolute times depend on what else runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from smollm import ModelConfig, SmolLM


def packed_document_ids(batch: int, seq_len: int, mean_doc: float, generator: torch.Generator) -> torch.Tensor:
    """(batch, seq_len) ids, each row filled with documents of log-normal lengths (the last one cut)."""
    rows = []
    for _ in range(batch):
        ids, n, doc = [], 0, 0
        while n < seq_len:
            length = max(1, int(torch.empty(1).log_normal_(mean=0.0, std=0.8, generator=generator).item()
                                * mean_doc / 1.377))  # E[lognormal(0, 0.8)] = e^0.32 = 1.377
            length = min(length, seq_len - n)
            ids += [doc] * length
            n, doc = n + length, doc + 1
        rows.append(ids)
    return torch.tensor(rows)


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(layers: int, seq_len: int, batch: int, repeats: int, mean_doc: float, device: str) -> dict[str, float]:
    torch.manual_seed(0)
    config = ModelConfig.from_name("135m", num_hidden_layers=layers)
    model = SmolLM(config).to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=g).to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    documents = packed_document_ids(batch, seq_len, mean_doc, g).to(device)
    n_docs = int((documents[:, -1] + 1).sum())
    flex_trains = device != "cpu"  # torch 2.13 has no flex_attention backward on CPU

    def loss(kind: str | None):
        model.document_attention = kind or "sdpa"
        return model.loss(inputs, targets, document_ids=None if kind is None else documents)

    def train(kind: str | None):
        def step():
            model.zero_grad(set_to_none=True)
            loss(kind).backward()
        return step

    def score(kind: str | None):
        def step():
            with torch.no_grad():
                loss(kind)
        return step

    variants = {"train plain": train(None), "train varlen": train("varlen"), "train sdpa mask": train("sdpa")}
    if flex_trains:
        variants["train flex"] = train("flex")
    variants.update({"score plain": score(None), "score varlen": score("varlen"), "score sdpa mask": score("sdpa"),
                     "score flex": score("flex")})

    # The variants compute the same loss up to summation order: packed documents are not the plain row.
    with torch.no_grad():
        model.document_attention = "flex"
        flex_loss = model.loss(inputs, targets, document_ids=documents)
        model.document_attention = "sdpa"
        sdpa_loss = model.loss(inputs, targets, document_ids=documents)
        model.document_attention = "varlen"
        varlen_loss = model.loss(inputs, targets, document_ids=documents)
    assert abs(flex_loss.item() - sdpa_loss.item()) < 1e-4, (flex_loss.item(), sdpa_loss.item())
    assert abs(varlen_loss.item() - sdpa_loss.item()) < 1e-4, (varlen_loss.item(), sdpa_loss.item())

    for fn in variants.values():  # warm-up (flex compiles here)
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    median = {name: statistics.median(t) for name, t in times.items()}

    # The attention kernel alone, the 135M's heads: (B, 9 query heads, T, 64) against 3 key/value heads.
    from smollm.model import (DocumentSpans, document_block_mask, document_mask, document_starts, flex_attention,
                              varlen_attention)

    starts = document_starts(documents)
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = torch.randn(batch, heads, seq_len, hd, device=device, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq_len, hd, device=device, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq_len, hd, device=device, requires_grad=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def attend(kind: str | None, grad: bool):
        def step():
            x = (q, k, v) if grad else (q.detach(), k.detach(), v.detach())
            with torch.set_grad_enabled(grad):
                if kind is None:
                    y = sdpa(*x, is_causal=True, enable_gqa=True)
                elif kind == "varlen":
                    y = varlen_attention(*x, DocumentSpans(starts), True)
                elif kind == "sdpa":
                    y = sdpa(*x, attn_mask=document_mask(starts), enable_gqa=True)
                else:
                    y = flex_attention(*x, document_block_mask(starts), True)
                if grad:
                    y.sum().backward()
        return step

    kernels = {"attn train plain": attend(None, True), "attn train varlen": attend("varlen", True),
               "attn train sdpa mask": attend("sdpa", True)}
    if flex_trains:
        kernels["attn train flex"] = attend("flex", True)
    kernels.update({"attn fwd plain": attend(None, False), "attn fwd varlen": attend("varlen", False),
                    "attn fwd sdpa mask": attend("sdpa", False), "attn fwd flex": attend("flex", False)})
    for fn in kernels.values():
        fn()
    for name in kernels:
        times[name] = []
    for _ in range(repeats):
        for name, fn in kernels.items():
            times[name].append(timed(fn, device))
    median.update({name: statistics.median(times[name]) for name in kernels})

    tokens = batch * seq_len
    print(f"SmolLM2-135M widths, {layers} layers, {batch} x {seq_len} tokens on {device} "
          f"({torch.get_num_threads()} threads), {n_docs} documents (mean {tokens / n_docs:.0f} tokens), "
          f"median of {repeats}")
    for name, t in median.items():
        print(f"  {name:20s} {tokens / t:9.0f} tok/s   runs: {', '.join(f'{x * 1000:.0f}ms' for x in times[name])}")
    result = {"train sdpa mask / plain": median["train sdpa mask"] / median["train plain"],
              "train varlen / plain": median["train varlen"] / median["train plain"],
              "train varlen / sdpa mask": median["train varlen"] / median["train sdpa mask"],
              "score sdpa mask / plain": median["score sdpa mask"] / median["score plain"],
              "score varlen / sdpa mask": median["score varlen"] / median["score sdpa mask"],
              "score flex / sdpa mask": median["score flex"] / median["score sdpa mask"]}
    if flex_trains:
        result["train flex / sdpa mask"] = median["train flex"] / median["train sdpa mask"]
    for kind in ("train", "fwd"):
        result[f"attn {kind} sdpa mask / plain"] = median[f"attn {kind} sdpa mask"] / median[f"attn {kind} plain"]
        result[f"attn {kind} varlen / sdpa mask"] = median[f"attn {kind} varlen"] / median[f"attn {kind} sdpa mask"]
        if kind == "fwd" or flex_trains:
            result[f"attn {kind} flex / sdpa mask"] = median[f"attn {kind} flex"] / median[f"attn {kind} sdpa mask"]
    for name, ratio in result.items():
        print(f"  time {name}: {ratio:.2f}x")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mean_doc", type=float, default=400)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench(args.layers, args.seq_len, args.batch, args.repeats, args.mean_doc, args.device)
