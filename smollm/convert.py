"""`python -m smollm.convert`: move weights between smollm, Hugging Face and llama.cpp.

    python -m smollm.convert gguf FILE.gguf OUT_DIR   # SmolLM2 GGUF (weights + its tokenizer) -> HF dir
    python -m smollm.convert ckpt FILE.ckpt OUT_DIR   # a Lightning checkpoint of smollm.fit -> HF dir
    python -m smollm.convert to-gguf PATH OUT.gguf [--dtype f32|f16|bf16|q8_0] [--tokenizer NAME_OR_DIR]
                                     [--overwrite]    # a .ckpt or HF dir -> GGUF for llama.cpp

A Hugging Face directory loads with `smollm.hf.load_hf` and transformers.AutoModelForCausalLM; a
GGUF with llama.cpp (and tools built on it) and with transformers (`gguf_file=`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smollm.assets import load_tokenizer
from smollm.checkpoint import check_tokenizer, load_model, model_in_checkpoint, read_checkpoint
from smollm.cli import command
from smollm.errors import MissingPathError, UsageError
from smollm.gguf import EXPORT_DTYPES, load_gguf, save_gguf
from smollm.hf import check_output_dir, save_hf
from smollm.output import note


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
    loaded = model_in_checkpoint(ckpt_path, read_checkpoint(ckpt_path))
    tokenizer = load_tokenizer(loaded.tokenizer) if loaded.tokenizer is not None else None
    if tokenizer is not None:
        check_tokenizer(ckpt_path, loaded, tokenizer)  # a folder that has changed since training
    return save_hf(loaded.model, out_dir, tokenizer=tokenizer, overwrite=overwrite)


def convert_to_gguf(path: str | Path, out: str | Path, dtype: str = "f32", tokenizer: str | None = None,
                    overwrite: bool = False) -> dict[str, str]:
    """A training checkpoint or a Hugging Face directory, with its tokenizer, -> a GGUF file.

    The tokenizer is `tokenizer` (a name or folder) if given, else the one the checkpoint was
    trained with, or the one in the Hugging Face directory. Returns each tensor's GGML type.
    """
    path, out = Path(path), Path(out)
    if not path.exists():  # before the checks on OUT, as before loading anything
        raise MissingPathError(f"{path}: no such file or directory")
    if out.is_dir():
        raise UsageError(f"{out}: is a directory; give the .gguf file to write")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; add --overwrite to replace it")
    if not out.parent.is_dir():
        raise MissingPathError(f"{out.parent}: no such directory to write {out.name} into")
    loaded = load_model(path)
    own = loaded.tokenizer
    tokenizer = tokenizer or own
    if tokenizer is None:
        what = "holds no tokenizer" if path.is_dir() else "does not name the tokenizer it was trained with"
        raise UsageError(f"{path} {what} and a GGUF needs one; add --tokenizer NAME_OR_DIR")
    chosen = load_tokenizer(tokenizer)
    check_tokenizer(path, loaded, chosen, None if tokenizer == own else f"--tokenizer {tokenizer!r}")
    return save_gguf(loaded.model, out, chosen, dtype=dtype, name=path.stem or path.name)


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad command line as one `error:` line (smollm.cli) instead of usage + error."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


@command
def main(argv: list[str]) -> int:
    parser = _Parser(prog="python -m smollm.convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    for name, help_ in (("gguf", "a llama-architecture GGUF file (e.g. SmolLM2-135M-Instruct)"),
                        ("ckpt", "a Lightning checkpoint written by smollm.fit")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("file", help=f"the .{name} file")
        p.add_argument("out_dir", help="Hugging Face directory to write (created if missing)")
        p.add_argument("--overwrite", action="store_true", help="replace a model already in out_dir")
    p = sub.add_parser("to-gguf", help="a .ckpt of smollm.fit or a Hugging Face directory -> GGUF (llama.cpp)")
    p.add_argument("path", help="a .ckpt written by smollm.fit, or a Hugging Face Llama directory")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, default="f32",
                   help="type of the weight matrices (norms stay f32); default f32")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer name or folder to put inside (default: the checkpoint's or the directory's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)  # a bad command line is a UsageError (_Parser)

    if args.source == "to-gguf":
        types = convert_to_gguf(args.path, args.out, args.dtype, args.tokenizer, args.overwrite)
        kept = sorted(name for name, t in types.items() if t == "F16") if args.dtype == "q8_0" else []
        if kept:
            note(f"{len(kept)} matrices kept in f16 (rows not a multiple of q8_0's 32): {', '.join(kept[:3])}"
                 + (" ..." if len(kept) > 3 else ""))
        print(args.out)
        return 0

    out_dir = Path(args.out_dir)
    convert = convert_gguf if args.source == "gguf" else convert_ckpt
    convert(args.file, out_dir, overwrite=args.overwrite)
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
