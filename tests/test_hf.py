"""Hugging Face directories: what save_hf writes transformers loads, what load_hf refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from smollm import ModelConfig, SmolLM
from smollm.assets import load_tokenizer
from smollm.errors import HFFormatError, TokenizerLoadError
from smollm.gguf import load_gguf
from smollm.hf import load_hf, save_hf

ROOT = Path(__file__).resolve().parents[1]
X = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(3))


def logits(model, x=X):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def test_save_hf_loads_in_transformers(tmp_path, tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_hf(tiny_model, tmp_path, tokenizer=tiny_tokenizer)
    assert set(load_file(tmp_path / "model.safetensors")) == {
        "model." + k for k in tiny_model.state_dict() if k != "lm_head.weight"}  # tied: stored once
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["bos_token_id"] == config["eos_token_id"] == 0

    theirs, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.testing.assert_close(logits(theirs.eval()), logits(tiny_model))
    assert AutoTokenizer.from_pretrained(tmp_path).encode("The fox") == tiny_tokenizer.encode("The fox")
    torch.testing.assert_close(logits(load_hf(tmp_path)), logits(tiny_model), rtol=0, atol=0)


def test_untied_head_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = SmolLM(ModelConfig.from_name("tiny", tie_word_embeddings=False)).eval()
    save_hf(model, tmp_path)
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    loaded = load_hf(tmp_path)
    assert loaded.lm_head.weight is not loaded.embed_tokens.weight
    assert loaded.num_params == model.num_params
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    theirs, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    torch.testing.assert_close(logits(theirs.eval()), logits(model))


def test_loaded_model_is_complete_and_float32(tmp_path, tiny_model):
    save_hf(tiny_model, tmp_path)
    loaded = load_hf(tmp_path)
    assert not loaded.training
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    for name, t in list(loaded.named_parameters()) + list(loaded.named_buffers()):
        assert t.device.type == "cpu" and t.dtype == torch.float32, name
    torch.testing.assert_close(loaded.rotary.inv_freq, tiny_model.rotary.inv_freq, rtol=0, atol=0)


def test_pytorch_bin_and_sharded_weights(tmp_path, tiny_model):
    save_hf(tiny_model, tmp_path / "st")
    tensors = load_file(tmp_path / "st" / "model.safetensors")
    bin_dir, shard_dir = tmp_path / "bin", tmp_path / "shards"
    for d in (bin_dir, shard_dir):
        d.mkdir()
        (d / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(tensors, bin_dir / "pytorch_model.bin")
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for file, names in halves.items():
        save_file({k: tensors[k] for k in names}, shard_dir / file, metadata={"format": "pt"})
    weight_map = {k: file for file, names in halves.items() for k in names}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    for d in (bin_dir, shard_dir):
        torch.testing.assert_close(logits(load_hf(d)), logits(tiny_model), rtol=0, atol=0)


@pytest.fixture
def saved(tmp_path, tiny_model):
    save_hf(tiny_model, tmp_path)
    return tmp_path


def edit_config(path, **fields):
    config = json.loads((path / "config.json").read_text())
    config.update(fields)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("fields, message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"model_type": "mistral"}, "model_type is 'mistral'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling with rope_type 'llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters with rope_type 'yarn'"),
    ({"num_attention_heads": 5}, "not divisible by num_attention_heads 5"),
])
def test_unsupported_config_is_refused(saved, fields, message):
    edit_config(saved, **fields)
    with pytest.raises(HFFormatError, match=message):
        load_hf(saved)


def test_gpt2_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(HFFormatError, match="model_type is 'gpt2'"):
        load_hf(tmp_path)


def test_shape_mismatch_names_the_tensor(saved):
    tensors = load_file(saved / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:100]
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match=r"layers\.1\.mlp\.up_proj\.weight has shape \(100, 64\)"):
        load_hf(saved)


def test_missing_and_unexpected_keys(saved):
    tensors = load_file(saved / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, saved / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match=r"missing layers\.0\.self_attn\.k_proj\.weight; "
                                            r"unexpected layers\.0\.self_attn\.q_proj\.bias"):
        load_hf(saved)


def test_untied_config_without_head_is_missing_lm_head(saved):
    edit_config(saved, tie_word_embeddings=False)
    with pytest.raises(HFFormatError, match="missing lm_head.weight"):
        load_hf(saved)


def test_missing_directory_config_and_weights(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_hf(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFFormatError, match="no config.json"):
        load_hf(tmp_path / "empty")
    (saved / "model.safetensors").unlink()
    with pytest.raises(HFFormatError, match="no weights"):
        load_hf(saved)


def test_corrupt_weights_file(saved):
    (saved / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(HFFormatError, match="cannot read weights"):
        load_hf(saved)


def test_load_tokenizer_from_directory_and_errors(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path)).encode("The fox") == tiny_tokenizer.encode("The fox")
    with pytest.raises(TokenizerLoadError, match="'smollm2'"):
        load_tokenizer(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerLoadError, match="cannot load tokenizer .*empty"):
        load_tokenizer(str(tmp_path / "empty"))


def test_save_hf_of_compiled_model_uses_plain_names(tmp_path, tiny_model):
    save_hf(torch.compile(tiny_model), tmp_path)  # compiles nothing until called
    assert not any("_orig_mod" in k for k in load_file(tmp_path / "model.safetensors"))
    torch.testing.assert_close(logits(load_hf(tmp_path)), logits(tiny_model), rtol=0, atol=0)


def test_gguf_of_another_architecture_is_refused(tmp_path):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(HFFormatError, match="GGUF architecture is 'gpt2', expected 'llama'"):
        load_gguf(tmp_path / "gpt2.gguf")


@pytest.mark.parametrize("source, name, content, message", [
    ("gguf", "absent.gguf", None, "absent.gguf: no such file"),
    ("gguf", "fake.gguf", b"not a gguf", "not a readable GGUF file"),
    ("ckpt", "absent.ckpt", None, "absent.ckpt: no such file"),
])
def test_convert_errors_are_one_line(tmp_path, source, name, content, message, capsys):
    """(In this process: test_gguf runs the command in a fresh one for its one-line errors.)"""
    from smollm.convert import main as convert_main

    if content is not None:
        (tmp_path / name).write_bytes(content)
    assert convert_main([source, str(tmp_path / name), str(tmp_path / "out")]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: ") and out.err.count("\n") == 1, out.err
    assert message in out.err and not (tmp_path / "out").exists()


def test_convert_refuses_to_overwrite_a_model_and_writes_ordinary_files(tmp_path, tiny_model, capsys):
    from smollm.convert import main as convert_main

    out = save_hf(tiny_model, tmp_path / "out")
    mode = (out / "model.safetensors").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask()  # not safetensors' private 0600
    with pytest.raises(Exception, match="already holds a model"):
        save_hf(tiny_model, out)
    checkpoint = tmp_path / "x.ckpt"
    checkpoint.write_bytes(b"")
    assert convert_main(["ckpt", str(checkpoint), str(out)]) == 2  # refused before reading anything
    assert f"{out} already holds a model" in capsys.readouterr().err
    assert convert_main(["ckpt", str(checkpoint), str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: checkpoint {checkpoint} is empty (0 bytes); use an earlier checkpoint of its run"]
    assert not list((tmp_path / "new").glob("*"))  # nothing written for it
    save_hf(tiny_model, out, overwrite=True)


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_hub_tokenizer_with_the_hub_unreachable_fails_at_once(tmp_path):
    # A closed local port stands for an unreachable hub: one request, no minute of retries.
    import time

    code = ("from smollm.assets import load_tokenizer\n"
            "try:\n    load_tokenizer('nobody/no-such-tokenizer')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    env = {**__import__("os").environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path)}
    env.pop("HF_HUB_OFFLINE", None)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120).stdout
    assert time.perf_counter() - t0 < 30
    assert out.startswith("TokenizerLoadError cannot load tokenizer 'nobody/no-such-tokenizer'")
    assert "hub cannot be reached" in out
