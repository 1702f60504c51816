"""`python -m smollm.convert`: real weights or a training checkpoint -> Hugging Face directory.

    python -m smollm.convert gguf FILE.gguf OUT_DIR   # SmolLM2 GGUF (weights + its tokenizer)
    python -m smollm.convert ckpt FILE.ckpt OUT_DIR   # a Lightning checkpoint of smollm.fit

The output loads with `smollm.hf.load_hf` and with transformers.AutoModelForCausalLM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smollm.hf import load_gguf, load_tokenizer, save_hf


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantized float32 weights and the GGUF's tokenizer (its own special tokens) -> out_dir."""
    model, tokenizer = load_gguf(gguf_path)
    return save_hf(model, out_dir, tokenizer=tokenizer)


def convert_ckpt(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """The model of a training checkpoint, and the tokenizer it was trained with, -> out_dir."""
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{ckpt_path}: no such file")
    from smollm.module import load_checkpoint_model  # lazily: Lightning is only needed here

    model, tokenizer_name = load_checkpoint_model(ckpt_path)
    tokenizer = load_tokenizer(tokenizer_name) if tokenizer_name is not None else None
    return save_hf(model, out_dir, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smollm.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    for name, help_ in (("gguf", "a llama-architecture GGUF file (e.g. SmolLM2-135M-Instruct)"),
                        ("ckpt", "a Lightning checkpoint written by smollm.fit")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("file", help=f"the .{name} file")
        p.add_argument("out_dir", help="Hugging Face directory to write (created if missing)")
    args = parser.parse_args(argv)

    out_dir = Path(args.out_dir)
    try:
        if out_dir.exists() and not out_dir.is_dir():
            raise FileExistsError(f"{out_dir}: exists and is not a directory")
        if args.source == "gguf":
            if not Path(args.file).is_file():
                raise FileNotFoundError(f"{args.file}: no such file")
            convert_gguf(args.file, out_dir)
        else:
            convert_ckpt(args.file, out_dir)
    except Exception as e:  # noqa: BLE001  a command-line tool: one line, no traceback
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    print(out_dir)
    return 0


def one_line(e: BaseException) -> str:
    """The first line of an error's message; the type too where the message alone is unclear."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    if isinstance(e, (OSError, ValueError, RuntimeError)):  # ours and the usual file errors
        return lines[0]
    return f"{type(e).__name__}: {lines[0]}"


if __name__ == "__main__":
    sys.exit(main())
