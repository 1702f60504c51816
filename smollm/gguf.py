"""GGUF (llama.cpp's format) <-> SmolLM.

In: `load_gguf` reads with the gguf package: every tensor dequantized, renamed to Hugging Face's
names, q and k put back from llama.cpp's RoPE order; the tokenizer through transformers.

Out: `save_gguf` writes a llama-architecture GGUF with the `gguf` package's GGUFWriter (what
llama.cpp's own converter is built on): llama.cpp's tensor names and metadata keys, the
tokenizer inside (byte-level BPE: tokens, merges, special ids), weights in f32, f16, bf16 or
q8_0. llama.cpp applies RoPE to interleaved pairs (2i, 2i+1) where we (and transformers) use
the rotate_half pairs (i, i + head_dim/2), so q and k rows are permuted on the way out exactly as
llama.cpp's converter does, and undone on the way in. The tokenizer's chat
template and its end-of-turn token (eot) go in too, so llama.cpp's chat ends a reply where it should.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from smollm.assets import end_of_turn_id
from smollm.config import ModelConfig
from smollm.errors import GGUFExportError, HFFormatError, MissingPathError
from smollm.hf import config_from_hf, hf_keys, hf_state_dict, model_from_state
from smollm.io import replace_durably, tmp_path
from smollm.model import SmolLM


def _reader(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001  gguf raises ValueError, KeyError, OSError, ...
        raise HFFormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _architecture(path: Path, reader: Any) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise HFFormatError(f"{path}: not a readable GGUF file (no general.architecture)")
    return str(field.contents())


def gguf_architecture(path: str | os.PathLike) -> str:
    return _architecture(Path(path), _reader(Path(path)))


def _config_from_gguf(path: Path, reader: Any) -> ModelConfig:
    """ModelConfig from a llama GGUF's llama.* metadata, as transformers' reader maps it to a
    LlamaConfig (absent optional keys take LlamaConfig's defaults; no output.weight means tied)."""
    def value(key: str, default: Any = None) -> Any:
        field = reader.fields.get(f"llama.{key}")
        return default if field is None else field.contents()

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise HFFormatError(f"{path}: no token_embd.weight (not a llama model's GGUF)")
    hf = {"vocab_size": int(tensors["token_embd.weight"].shape[-1]), "hidden_size": value("embedding_length"),
          "intermediate_size": value("feed_forward_length"), "num_hidden_layers": value("block_count"),
          "num_attention_heads": value("attention.head_count"),
          "num_key_value_heads": value("attention.head_count_kv"), "head_dim": value("attention.key_length"),
          "max_position_embeddings": value("context_length", 2048), "rope_theta": value("rope.freq_base"),
          "rms_norm_eps": value("attention.layer_norm_rms_epsilon", 1e-6),
          "tie_word_embeddings": "output.weight" not in tensors}
    if value("rope.scaling.type", "none") not in ("none", "linear") or value("rope.scaling.factor", 1.0) != 1.0:
        raise HFFormatError(f"{path}: RoPE scaling is not supported (only plain RoPE)")
    head_dim = hf["head_dim"] or (hf["hidden_size"] // hf["num_attention_heads"] if hf["num_attention_heads"] else None)
    for key in ("rope.dimension_count", "attention.value_length"):  # partial RoPE, other value heads
        if value(key) not in (None, head_dim):
            raise HFFormatError(f"{path}: llama.{key} is {value(key)}, not the head size {head_dim}: "
                                "a model this reader does not build")
    try:
        return config_from_hf(hf)
    except HFFormatError as e:
        raise HFFormatError(f"{path}: {str(e).removeprefix('config.json: ')}") from None


def unpermute_from_llama_cpp(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_for_llama_cpp`: q or k rows from llama.cpp's interleaved RoPE order
    back to rotate_half order (what transformers' GGUF reader does too)."""
    out, C = weight.shape
    d = out // n_heads
    return weight.reshape(n_heads, d // 2, 2, C).transpose(1, 2).reshape(out, C)


def load_gguf(path: str | os.PathLike) -> tuple[SmolLM, Any]:
    """A llama-architecture GGUF -> (float32 SmolLM, its tokenizer with its own special tokens).

    The weights are read with the gguf package (llama.cpp's own Python reader, which transformers'
    GGUF loading is built on): each tensor dequantized, renamed from llama.cpp's names to Hugging
    Face's, and the q and k rows put back from llama.cpp's RoPE order; the same numbers as
    transformers' reading (tests/test_gguf.py), in about half its time. The tokenizer is read by
    transformers.
    """
    from gguf import MODEL_ARCH, dequantize, get_tensor_name_map
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"{path}: no such file")
    reader = _reader(path)
    arch = _architecture(path, reader)
    if arch != "llama":
        raise HFFormatError(f"{path}: GGUF architecture is {arch!r}, expected 'llama'")
    config = _config_from_gguf(path, reader)
    tensors = {t.name: t for t in reader.tensors}
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = {}
    for hf_key in hf_keys(config):
        name = names.get_name(hf_key, try_suffixes=(".weight",))
        tensor = tensors.get(name)
        if tensor is None:
            raise HFFormatError(f"{path}: no tensor {name} ({hf_key})")
        try:
            values = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))
        except (NotImplementedError, ValueError) as e:  # a type gguf cannot dequantize, bytes that do not fit
            raise HFFormatError(f"{path}: tensor {name} ({tensor.tensor_type.name}) cannot be read: {e}") from None
        weight = torch.from_numpy(np.array(values, dtype=np.float32))  # a copy: the file is mapped read-only
        if hf_key.endswith("self_attn.q_proj.weight"):
            weight = unpermute_from_llama_cpp(weight, config.num_attention_heads)
        elif hf_key.endswith("self_attn.k_proj.weight"):
            weight = unpermute_from_llama_cpp(weight, config.num_key_value_heads)
        state[hf_key] = weight
    model = model_from_state(config, state)
    with _quiet_bars():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


@contextlib.contextmanager
def _quiet_bars() -> Iterator[None]:
    """Without transformers' progress bars (one per tensor dequantized, one per weight loaded): a few
    seconds of noise in the output of every command that loads a GGUF."""
    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars, dequantizing = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = functools.partial(dequantizing, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = dequantizing
        if bars:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------
# SmolLM -> GGUF

# --dtype -> (the type of every matrix, general.file_type); vectors (the norms) stay float32, as
# llama.cpp's converter keeps them.
EXPORT_DTYPES = ("f32", "f16", "bf16", "q8_0")


def _dtype_types(dtype: str) -> tuple[Any, int]:
    from gguf import GGMLQuantizationType as Q
    from gguf import LlamaFileType as F

    return {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
            "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0)}[dtype]


def permute_for_llama_cpp(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q or k projection rows, per head, from rotate_half order (x_i pairs with x_{i+d/2}) to
    llama.cpp's interleaved order (x_2i pairs with x_2i+1); llama.cpp's converter's `permute`."""
    out, C = weight.shape
    d = out // n_heads
    w = weight.reshape(n_heads, 2, d // 2, C)  # (heads, half, d/2, C): row i and row i + d/2
    return w.transpose(1, 2).reshape(out, C)  # (heads, d/2, 2, C): the two now adjacent


def gguf_tensors(model: SmolLM) -> dict[str, np.ndarray]:
    """Every weight under its llama.cpp name, float32, q and k permuted; a tied head is left out
    (llama.cpp then uses token_embd for the output, and transformers ties them on reading)."""
    from gguf import MODEL_ARCH, get_tensor_name_map

    config = model.config
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out = {}
    for hf_key, value in hf_state_dict(model).items():
        if hf_key.endswith("self_attn.q_proj.weight"):
            value = permute_for_llama_cpp(value, config.num_attention_heads)
        elif hf_key.endswith("self_attn.k_proj.weight"):
            value = permute_for_llama_cpp(value, config.num_key_value_heads)
        name = names.get_name(hf_key, try_suffixes=(".weight",))
        if name is None:
            raise GGUFExportError(f"weight {hf_key} has no llama.cpp name")
        out[name] = value.contiguous().numpy()
    return out


def encode_tensor(data: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """(bytes or values to store, their GGML type). Vectors stay float32; a q8_0 matrix whose
    rows are not a multiple of 32 (q8_0's block) falls back to f16, as llama.cpp's converter does."""
    from gguf import GGMLQuantizationType as Q
    from gguf import QuantError, quantize

    qtype = Q.F32 if data.ndim == 1 else _dtype_types(dtype)[0]
    try:
        return quantize(data, qtype), qtype
    except QuantError:
        return quantize(data, Q.F16), Q.F16


def write_config(writer: Any, config: ModelConfig, dtype: str) -> None:
    """llama.* hyperparameters, as llama.cpp's converter writes them for a Llama model."""
    from gguf import GGML_QUANT_VERSION

    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_dtype_types(dtype)[1])
    writer.add_quantization_version(GGML_QUANT_VERSION)


def llama_cpp_pre_tokenizer(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for a Hugging Face byte-level pre-tokenizer."""
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    kinds = [(p.get("type"), p.get("individual_digits")) for p in steps]
    # llama.cpp's GPT-2 split neither adds a leading space nor works without its regex
    byte_level = [p for p in steps if p.get("type") == "ByteLevel" and p.get("use_regex", True)
                  and not p.get("add_prefix_space")]
    if kinds == [("ByteLevel", None)] and byte_level:
        return "gpt-2"  # GPT-2's split, then bytes
    if kinds == [("Digits", True), ("ByteLevel", None)] and byte_level:
        return "smollm"  # every digit apart, then GPT-2's split (SmolLM2's own tokenizer)
    raise GGUFExportError(f"the tokenizer's pre-tokenizer {json.dumps(pre_tokenizer)[:200]} has no llama.cpp "
                          "equivalent smollm knows (byte-level BPE, as SmolLM2's, is supported)")


def write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" vocabulary: tokens by id (ids the model
    has but the tokenizer lacks become unused "[PADn]"), their types, the merges, special ids."""
    from gguf import TokenType

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"].get("type") != "BPE" or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFExportError("the tokenizer is not a byte-level BPE (as SmolLM2's is); llama.cpp's GGUF "
                              "export supports only that kind")
    pre = llama_cpp_pre_tokenizer(backend.get("pre_tokenizer"))
    if len(tokenizer) > vocab_size:
        raise GGUFExportError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size}")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    ids = tokenizer.encode("a")
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and len(ids) > 1 and ids[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
        eot = end_of_turn_id(tokenizer)
        if eot is not None:  # llama.cpp's chat ends a reply at it (an end-of-generation token), as at eos
            writer.add_eot_token_id(eot)


def save_gguf(model: SmolLM, path: str | os.PathLike, tokenizer: Any, dtype: str = "f32",
              name: str = "SmolLM") -> dict[str, str]:
    """Write `model` and `tokenizer` as a llama-architecture GGUF at `path`.

    The file appears whole or not at all (written to a temporary name, then renamed). Returns
    the GGML type of every tensor by name (e.g. a q8_0 export keeps the norms in F32).
    """
    from gguf import GGUFWriter

    if dtype not in EXPORT_DTYPES:
        raise GGUFExportError(f"unknown GGUF dtype {dtype!r}; choose one of: {', '.join(EXPORT_DTYPES)}")
    if tokenizer is None:
        raise GGUFExportError("a GGUF for llama.cpp needs the tokenizer inside, and none was given")
    path = Path(path)
    tmp = tmp_path(path)
    types = {}
    try:
        writer = GGUFWriter(tmp, "llama")
        writer.add_name(name)
        write_config(writer, model.config, dtype)
        write_tokenizer(writer, tokenizer, model.config.vocab_size)
        for tensor_name, data in gguf_tensors(model).items():
            encoded, qtype = encode_tensor(data, dtype)
            writer.add_tensor(tensor_name, encoded, raw_dtype=qtype)
            types[tensor_name] = qtype.name
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:  # GGUFWriter closes without flushing to the disk
            os.fsync(f.fileno())
        replace_durably(tmp, path)
    except OSError as e:  # a full disk, a folder without write permission
        raise GGUFExportError(f"could not write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return types
