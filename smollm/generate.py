"""Text generation with a KV cache: `generate()` and `python -m smollm.generate`.

    python -m smollm.generate --checkpoint PATH --prompt TEXT [--max_new_tokens 50]
        [--temperature 0] [--top_k K] [--top_p P] [--seed S]

PATH is a Hugging Face directory (from smollm.convert or save_hf) or a .ckpt of smollm.fit.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable, Collection

import torch

from smollm.cli import command
from smollm.errors import UsageError
from smollm.model import KVCache, SmolLM, compute_dtype
from smollm.output import note


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): argmax at temperature 0, otherwise
    a draw from softmax(logits / temperature) restricted to the top_k tokens and to the smallest
    set of most likely tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens; 0 for the first
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = logits.scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def stop_ids(eos_token_id: int | Collection[int] | None) -> list[int]:
    """The ids that end generation: none, one, or several (an end-of-turn token beside the EOS)."""
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _check_args(model: SmolLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float,
                top_k: int | None, top_p: float | None, eos_token_id: int | Collection[int] | None) -> None:
    def is_int(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    vocab = model.config.vocab_size
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
            or input_ids.dtype not in (torch.long, torch.int32) or 0 in input_ids.shape:
        got = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) \
            else type(input_ids).__name__
        raise UsageError(f"input_ids must be a non-empty (batch, length) integer tensor, got {got}")
    device = next(model.parameters()).device
    if input_ids.device != device:
        raise UsageError(f"input_ids are on {input_ids.device} but the model is on {device}")
    if input_ids.min() < 0 or input_ids.max() >= vocab:
        raise UsageError(f"input_ids must lie in [0, {vocab}), got values in "
                         f"[{input_ids.min().item()}, {input_ids.max().item()}]")
    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    total, limit = input_ids.shape[1] + max_new_tokens, model.config.max_position_embeddings
    if total > limit:
        raise UsageError(f"prompt length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} = "
                         f"{total} exceeds the model's max_position_embeddings {limit}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise UsageError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise UsageError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise UsageError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    ids = [eos_token_id] if is_int(eos_token_id) else eos_token_id
    if eos_token_id is not None and (isinstance(ids, (str, bytes)) or not isinstance(ids, Collection)
                                     or not all(is_int(i) and 0 <= i < vocab for i in ids)):
        raise UsageError(f"eos_token_id must be a token id in [0, {vocab}), a collection of them, or None, "
                         f"got {eos_token_id!r}")


def generate(model: SmolLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Collection[int] | None = None, generator: torch.Generator | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Continue each row of input_ids (B, T) by up to max_new_tokens tokens -> (B, T + new).

    The prompt goes through the model once (prefill, filling the KV cache), then one token per
    step. Temperature 0 is greedy; otherwise sampling, reproducible under torch.manual_seed or
    `generator`. With eos_token_id (one id, or several: any of them stops a row, as transformers
    takes a list), a row that produced a stop token keeps emitting it, and generation stops early
    once every row has. `on_token`, if given, is called with each step's tokens (B,) as they come
    (streaming). Prompts in a batch must have equal length (no padding). The model is in eval mode
    meanwhile and gets its training flag back afterwards.
    """
    _check_args(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id)
    was_training = model.training
    model.eval()
    try:
        out = _decode(model, input_ids, max_new_tokens, temperature, top_k, top_p, stop_ids(eos_token_id),
                      generator, on_token)
    finally:
        model.train(was_training)
    return out.clone()  # a normal tensor: an inference-mode one cannot be used in training later


@torch.inference_mode()
def _decode(model: SmolLM, input_ids: torch.Tensor, max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, stop: list[int],
            generator: torch.Generator | None, on_token: Callable[[torch.Tensor], None] | None) -> torch.Tensor:
    B, T = input_ids.shape
    device = input_ids.device
    dtype = compute_dtype(next(model.parameters()))  # the dtype keys and values are computed in
    cache = KVCache(model.config, B, T + max_new_tokens, device=device, dtype=dtype)
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)
    out[:, :T] = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    stop_tokens = torch.tensor(stop, dtype=torch.long, device=device)
    ids = out[:, :T]  # the prompt first, then the last token only
    for step in range(max_new_tokens):
        hidden = model.hidden_states(ids, cache)[:, -1]  # (B, C): only the last position
        token = sample_next(model.lm_head(hidden), temperature, top_k, top_p, generator)  # (B,)
        if stop:
            token = torch.where(finished, out[:, T + step - 1], token)  # a finished row repeats its stop token
            finished |= torch.isin(token, stop_tokens)
        out[:, T + step] = token
        if on_token is not None:
            on_token(token)
        if stop and bool(finished.all()):
            return out[:, :T + step + 1]
        ids = out[:, T + step:T + step + 1]
    return out


def complete(model: SmolLM, tokenizer: Any, prompt: str, max_new_tokens: int, chat: bool = False,
             **sampling: Any) -> tuple[str, list[int]]:
    """prompt -> token ids -> `generate` -> (the text of the new tokens, their ids); greedy unless
    `sampling` says otherwise, stopping at the tokenizer's EOS. With `chat`, the prompt is a user's
    message, rendered by the tokenizer's chat template up to the assistant's cue, and the reply
    stops at the template's end-of-turn token too (as `python -m smollm.chat` answers it)."""
    from smollm.assets import stop_token_ids

    if chat:
        ids = list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False))
    else:
        ids = tokenizer.encode(prompt)
    if not ids:
        raise UsageError(f"the prompt {prompt!r} encodes to no tokens")
    input_ids = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    stop = stop_token_ids(tokenizer) if chat else tokenizer.eos_token_id
    out = generate(model, input_ids, max_new_tokens, eos_token_id=stop, **sampling)
    new = out[0, len(ids):].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new


# ---------------------------------------------------------------------------------------------
# Command line


def load_for_generation(path: str | Path) -> tuple[SmolLM, Any]:
    """(model, tokenizer) from an HF directory or a .ckpt of smollm.fit."""
    from smollm.assets import load_tokenizer
    from smollm.checkpoint import check_tokenizer, load_model

    loaded = load_model(path)
    if Path(path).is_dir():
        return loaded.model, load_tokenizer(str(path))  # a folder without one says so in one line
    if loaded.tokenizer is None:
        raise UsageError(f"{path}: the checkpoint names no tokenizer; convert it with "
                         "`python -m smollm.convert ckpt` and add tokenizer files to the directory")
    tokenizer = load_tokenizer(loaded.tokenizer)
    check_tokenizer(path, loaded, tokenizer)  # a folder that has changed since training
    return loaded.model, tokenizer


def add_sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """--max_new_tokens, --temperature, --top_k, --top_p, --seed: the options of every command that generates."""
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `generate` keywords that the sampling options give (the seed as a generator); a note for
    those that do nothing at temperature 0."""
    unused = [f"--{name}" for name in ("top_k", "top_p", "seed") if getattr(args, name) is not None]
    if args.temperature == 0 and unused:
        verb = "does" if len(unused) == 1 else "do"
        note(f"{', '.join(unused)} {verb} nothing at --temperature 0 (greedy: always the likeliest token); "
             "give a temperature above 0 to sample")
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator)


@command
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m smollm.generate",
                                     description="Continue a prompt with a SmolLM model.")
    parser.add_argument("--checkpoint", required=True, help="a Hugging Face directory or a .ckpt file")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    add_sampling_options(parser, max_new_tokens=50)
    args = parser.parse_args(argv)
    sampling = sampling_options(args)

    if not args.prompt:
        raise UsageError("--prompt is empty")
    model, tokenizer = load_for_generation(args.checkpoint)
    text, new = complete(model, tokenizer, args.prompt, args.max_new_tokens, **sampling)
    if args.max_new_tokens == 1:
        print(f"next token after {args.prompt!r}: {tokenizer.decode(new)!r} (id {new[0]})")
    else:
        print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
