"""Hugging Face Llama directories <-> SmolLM: `load_hf` and `save_hf`.

Our module names are Hugging Face Llama's, so a checkpoint converts by adding or dropping the
"model." prefix; what needs care is checking that the two sides really describe the same model:
the config fields we do not implement (rope scaling, biases, another activation) and the key set
and shapes of the weights. Anything that differs is one `HFFormatError` naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from smollm.assets import stop_token_ids
from smollm.config import ModelConfig
from smollm.errors import HFFormatError, MissingPathError, UnsafeFileError, UsageError
from smollm.io import load_torch_file
from smollm.model import RotaryEmbedding, SmolLM

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PYTORCH_BIN, PYTORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN, PYTORCH_BIN_INDEX)

# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig from a Hugging Face Llama config dict, refusing what our model lacks.

    Absent optional fields take LlamaConfig's defaults, so we build the model transformers would.
    """
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in architectures:
        raise HFFormatError(f"config.json: architectures is {architectures}, expected LlamaForCausalLM")
    if hf.get("model_type", "llama") != "llama":
        raise HFFormatError(f"config.json: model_type is {hf['model_type']!r}, expected 'llama'")
    unsupported = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}
    for field, ours in unsupported.items():
        if hf.get(field, ours) != ours:
            raise HFFormatError(f"config.json: {field}={hf[field]!r} is not supported (only {ours!r})")
    for field in ("rope_scaling", "rope_parameters"):  # transformers 4 and 5 spellings
        rope = hf.get(field) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise HFFormatError(f"config.json: {field} with rope_type {rope_type!r} is not supported "
                                "(only plain RoPE)")
    missing = [f for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if hf.get(f) is None]
    if missing:
        raise HFFormatError(f"config.json: missing field(s) {', '.join(missing)}")

    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    fields: dict[str, Any] = {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "intermediate_size": hf["intermediate_size"],
        "num_hidden_layers": hf["num_hidden_layers"],
        "num_attention_heads": hf["num_attention_heads"],
        "num_key_value_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "head_dim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        "max_position_embeddings": hf.get("max_position_embeddings", 2048),
        "rope_theta": float(rope_theta),
        # GGUF stores eps as float32 (9.999999747e-06); round it back to the value meant.
        "rms_norm_eps": float(f"{hf.get('rms_norm_eps', 1e-6):.6g}"),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    if hf.get("initializer_range"):
        fields["initializer_range"] = float(hf["initializer_range"])
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise HFFormatError(f"config.json: {e}") from None


def config_to_hf(config: ModelConfig, tokenizer: Any = None) -> dict[str, Any]:
    """A config.json that transformers 4 and 5 both read as our model.

    rope_theta is written at the top level (transformers 4) and in rope_parameters (5).
    """
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "rope_scaling": None,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    # Without a tokenizer, say so: LlamaConfig would otherwise invent bos 1 and eos 2.
    hf["bos_token_id"] = tokenizer.bos_token_id if tokenizer is not None else None
    hf["eos_token_id"] = tokenizer.eos_token_id if tokenizer is not None else None
    hf["pad_token_id"] = tokenizer.pad_token_id if tokenizer is not None else None
    return hf


def generation_config(tokenizer: Any) -> dict[str, Any]:
    """generation_config.json for a folder with `tokenizer`: transformers' `generate` stops at any
    of its eos ids, so they are the chat template's end-of-turn token (ChatML's <|im_end|>) and
    the tokenizer's EOS; a chat reply then ends where its turn does."""
    stop = stop_token_ids(tokenizer)
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": stop[0] if len(stop) == 1 else stop or None,
            "pad_token_id": tokenizer.pad_token_id}


# ---------------------------------------------------------------------------------------------
# Weights


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory: single or sharded safetensors, or pytorch_model.bin."""
    from safetensors.torch import load_file

    def shards(index_name: str) -> list[Path]:
        weight_map = json.loads((path / index_name).read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]

    if (path / SAFETENSORS).is_file():
        files, loader = [path / SAFETENSORS], load_file
    elif (path / SAFETENSORS_INDEX).is_file():
        files, loader = shards(SAFETENSORS_INDEX), load_file
    elif (path / PYTORCH_BIN).is_file():
        files, loader = [path / PYTORCH_BIN], _load_bin
    elif (path / PYTORCH_BIN_INDEX).is_file():
        files, loader = shards(PYTORCH_BIN_INDEX), _load_bin
    else:
        raise HFFormatError(f"{path}: no weights ({SAFETENSORS}, {SAFETENSORS_INDEX}, {PYTORCH_BIN} "
                            f"or {PYTORCH_BIN_INDEX})")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise HFFormatError(f"{path}: the index names a missing shard {f.name}")
        try:
            tensors.update(loader(f))
        except UnsafeFileError:
            raise
        except Exception as e:  # noqa: BLE001  a truncated or foreign file; say which one
            raise HFFormatError(f"{f}: cannot read weights ({type(e).__name__}: {e})") from None
    return tensors


def _load_bin(f: Path) -> dict[str, torch.Tensor]:
    return load_torch_file(f)


def _from_hf_keys(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF Llama keys -> ours (drop "model."), then check the key set and every shape."""
    state = {}
    for key, value in tensors.items():
        if key.endswith("rotary_emb.inv_freq"):  # older transformers saved this buffer; we derive it
            continue
        state[key.removeprefix("model.")] = value
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers ignores a stored copy of a tied head too

    with torch.device("meta"):
        expected = {k: v.shape for k, v in SmolLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        del expected["lm_head.weight"]
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise HFFormatError(f"weights do not match the config: {'; '.join(parts)}")
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise HFFormatError(f"weight {key} has shape {tuple(state[key].shape)}, "
                                f"the config implies {tuple(shape)}")
    return state


def _few(keys: list[str], n: int = 5) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def model_from_state(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> SmolLM:
    """A float32 SmolLM holding `tensors` (HF keys), built on the meta device: no wasted init."""
    state = {k: v.to(torch.float32).contiguous() for k, v in _from_hf_keys(tensors, config).items()}
    with torch.device("meta"):
        model = SmolLM(config)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)  # the buffer, on the CPU
    return model.eval()


def load_hf(path: str | os.PathLike) -> SmolLM:
    """A Hugging Face Llama directory of this family -> float32 SmolLM in eval mode."""
    path = Path(path)
    if not path.is_dir():
        raise MissingPathError(f"{path}: no such directory")
    if not (path / "config.json").is_file():
        raise HFFormatError(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        hf = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    config = config_from_hf(hf)
    return model_from_state(config, _read_weights(path))


def hf_keys(config: ModelConfig) -> list[str]:
    """The Hugging Face Llama names of a model's weights, as `hf_state_dict` gives them."""
    with torch.device("meta"):
        keys = list(SmolLM(config).state_dict())
    tied = config.tie_word_embeddings
    return [key if key == "lm_head.weight" else "model." + key for key in keys if not (tied and key == "lm_head.weight")]


def hf_state_dict(model: SmolLM) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face Llama names ("model." + ours), float32 on the CPU;
    a tied head is left out (stored once, as model.embed_tokens.weight, as transformers does)."""
    model = getattr(model, "_orig_mod", model)
    tied = model.config.tie_word_embeddings
    return {(key if key == "lm_head.weight" else "model." + key): value.detach().to("cpu", torch.float32).contiguous()
            for key, value in model.state_dict().items() if not (tied and key == "lm_head.weight")}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def holds_model(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / f).exists() for f in ("config.json", *WEIGHT_FILES))


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to write a model into a folder that already holds one, unless asked to."""
    if Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{path}: exists and is not a folder")
    if holds_model(path) and not overwrite:
        raise UsageError(f"{path} already holds a model; choose another folder, or pass --overwrite to replace it")


def save_hf(model: SmolLM, path: str | os.PathLike, tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Write `model` (and `tokenizer`, with its chat template and a generation_config.json whose eos
    ids end a chat reply) as a directory transformers.AutoModelForCausalLM loads.

    Weights are saved in float32 under HF names; a tied head is stored once, as
    model.embed_tokens.weight, which is what transformers writes and expects. A folder that
    already holds a model is refused unless `overwrite`. Files get the usual permissions (the
    umask's), not safetensors' private 0600.
    """
    from safetensors.torch import save_file

    check_output_dir(path, overwrite)
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: save the model inside
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(model), str(path / SAFETENSORS), metadata={"format": "pt"})
    os.chmod(path / SAFETENSORS, 0o666 & ~_umask())
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config, tokenizer), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))  # its chat template too (chat_template.jinja)
        (path / "generation_config.json").write_text(json.dumps(generation_config(tokenizer), indent=2) + "\n")
    return path
