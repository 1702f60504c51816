"""`python -m smollm.convert`: real weights or a training checkpoint -> Hugging Face directory.

    python -m smollm.convert gguf FILE.gguf OUT_DIR   # SmolLM2 GGUF (weights + its tokenizer)
    python -m smollm.convert ckpt FILE.ckpt OUT_DIR   # a Lightning checkpoint of smollm.fit

The output loads with `smollm.hf.load_hf` and with transformers.AutoModelForCausalLM.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smollm.assets import load_tokenizer
from smollm.checkpoint import model_from_checkpoint
from smollm.cli import fail_on
from smollm.errors import MissingPathError, SmolLMError
from smollm.gguf import load_gguf
from smollm.hf import check_output_dir, save_hf


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Dequantized float32 weights and the GGUF's tokenizer (its own special tokens) -> out_dir."""
    check_output_dir(out_dir, overwrite)  # before the slow part
    if not Path(gguf_path).is_file():
        raise MissingPathError(f"{gguf_path}: no such file")
    model, tokenizer = load_gguf(gguf_path)
    return save_hf(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)


def convert_ckpt(ckpt_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """The model of a training checkpoint, and the tokenizer it was trained with, -> out_dir."""
    check_output_dir(out_dir, overwrite)
    if not Path(ckpt_path).is_file():
        raise MissingPathError(f"{ckpt_path}: no such file")
    model, tokenizer_name = model_from_checkpoint(ckpt_path)
    tokenizer = load_tokenizer(tokenizer_name) if tokenizer_name is not None else None
    return save_hf(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smollm.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    for name, help_ in (("gguf", "a llama-architecture GGUF file (e.g. SmolLM2-135M-Instruct)"),
                        ("ckpt", "a Lightning checkpoint written by smollm.fit")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("file", help=f"the .{name} file")
        p.add_argument("out_dir", help="Hugging Face directory to write (created if missing)")
        p.add_argument("--overwrite", action="store_true", help="replace a model already in out_dir")
    args = parser.parse_args(argv)

    out_dir = Path(args.out_dir)
    try:
        convert = convert_gguf if args.source == "gguf" else convert_ckpt
        convert(args.file, out_dir, overwrite=args.overwrite)
    except SmolLMError as e:
        return fail_on(e)
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
