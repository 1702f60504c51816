"""Greedy generation speed on the real SmolLM2 weights: ours (KV cache) vs transformers' generate.

    python scripts/bench_generate.py [--new_tokens 64] [--repeats 3] [--threads N]

Both models hold the same float32 weights (transformers reads the GGUF; ours is converted from
it). Runs alternate, ours then theirs, so that load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PROMPT = "The history of the Roman Empire begins with"


def bench_generate(new_tokens: int = 64, repeats: int = 3, prompt: str = PROMPT) -> dict[str, float]:
    """Tokens/s of ours and transformers' greedy decoding of `new_tokens` tokens (medians)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smollm.generate import generate
    from smollm.assets import smollm2_gguf
    from smollm.hf import config_from_hf, model_from_state

    gguf = smollm2_gguf()
    theirs = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ours = model_from_state(config_from_hf(theirs.config.to_dict()), theirs.state_dict())
    ids = torch.tensor([tokenizer.encode(prompt)])

    def run_ours() -> torch.Tensor:
        return generate(ours, ids, max_new_tokens=new_tokens)

    def run_theirs() -> torch.Tensor:
        with torch.inference_mode():
            return theirs.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   pad_token_id=tokenizer.eos_token_id)

    assert run_ours().tolist() == run_theirs().tolist()  # warm-up, and the same tokens
    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    for _ in range(repeats):
        for name, fn in (("ours", run_ours), ("transformers", run_theirs)):
            start = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - start)
            assert out.shape[1] == ids.shape[1] + new_tokens
    result = {f"{name}_tok_s": new_tokens / statistics.median(t) for name, t in times.items()}
    result["ratio"] = result["ours_tok_s"] / result["transformers_tok_s"]
    print(f"prompt {ids.shape[1]} tokens, {new_tokens} new tokens, greedy, float32, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    for name, t in times.items():
        print(f"  {name:13s} {new_tokens / statistics.median(t):7.1f} tok/s   "
              f"runs: {', '.join(f'{x:.2f}s' for x in t)}")
    print(f"  ours / transformers: {result['ratio']:.2f}x")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_generate(args.new_tokens, args.repeats)
