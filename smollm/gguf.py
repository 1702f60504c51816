"""GGUF (llama.cpp's format) -> SmolLM, through transformers' GGUF reader.

transformers dequantizes every tensor and undoes llama.cpp's permutation of the q and k
projections (llama.cpp stores RoPE pairs interleaved); we take its weights by name and check
them like any Hugging Face checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from smollm.errors import MissingPathError
from smollm.hf import HFFormatError, config_from_hf, model_from_state
from smollm.model import SmolLM

def gguf_architecture(path: str | os.PathLike) -> str:
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
    except Exception as e:  # noqa: BLE001  gguf raises ValueError, KeyError, OSError, ...
        raise HFFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    return bytes(field.parts[field.data[0]]).decode()


def load_gguf(path: str | os.PathLike) -> tuple[SmolLM, Any]:
    """A llama-architecture GGUF -> (float32 SmolLM, its tokenizer with its own special tokens).

    transformers' GGUF reader dequantizes every tensor and undoes llama.cpp's permutation of the
    q and k projections (llama.cpp stores RoPE pairs interleaved); we take its weights by name.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"{path}: no such file")
    arch = gguf_architecture(path)
    if arch != "llama":
        raise HFFormatError(f"{path}: GGUF architecture is {arch!r}, expected 'llama'")
    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    dtype=torch.float32)
    config = config_from_hf(hf_model.config.to_dict())
    model = model_from_state(config, hf_model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer
