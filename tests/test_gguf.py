"""GGUF export: what smollm writes, transformers' GGUF reader and llama.cpp read back as our model.

The real SmolLM2 weights round trip (GGUF in, GGUF out) is in test_real_weights.py.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fitutil
from smollm import ModelConfig, SmolLM
from smollm.assets import load_tokenizer
from smollm.convert import main as convert_main
from smollm.errors import GGUFExportError, HFFormatError
from smollm.gguf import load_gguf, permute_for_llama_cpp, save_gguf, unpermute_from_llama_cpp
from smollm.hf import save_hf

ROOT = Path(__file__).resolve().parents[1]
X = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
TEXT = "the model reads tokens and predicts the next one: 42 + 7 = 49\n\tdone."

# The largest logit difference an export may make, as a share of the largest logit: what
# rounding the weight matrices to each type costs. Measured (test below, tiny random model): f16
# 0.16%, bf16 1.4%, q8_0 3.8%; on the real SmolLM2-135M weights f16 0.10%, bf16 0.44%, q8_0 3.0%
# (top-1 token unchanged at 44/44, 44/44, 43/44 positions of four prompts). The bounds leave about
# 3x room; the exact check is the one against a model holding the same rounded weights.
TOLERANCE = {"f16": 0.005, "bf16": 0.04, "q8_0": 0.10}


def tiny(tied: bool = True, seed: int = 0) -> SmolLM:
    """The tiny preset with a 320-token vocabulary (a 300-token tokenizer plus unused ids)."""
    torch.manual_seed(seed)
    return SmolLM(ModelConfig.from_name("tiny", vocab_size=320, tie_word_embeddings=tied)).eval()


def read_back(path: Path):
    """transformers' own reading of a GGUF file: model and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@torch.no_grad()
def logits(model, x=X) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("tied", [True, False])
def test_f32_export_is_our_model_in_transformers(tmp_path, tiny_tokenizer, tied):
    from smollm.hf import config_from_hf

    model = tiny(tied)
    types = save_gguf(model, tmp_path / "m.gguf", tiny_tokenizer, "f32")
    assert set(types.values()) == {"F32"}
    assert ("output.weight" in types) == (not tied)  # a tied head is stored once, as token_embd
    theirs, _ = read_back(tmp_path / "m.gguf")
    read_config = config_from_hf(theirs.config.to_dict())
    assert read_config == dataclasses.replace(model.config, initializer_range=read_config.initializer_range)
    torch.testing.assert_close(logits(theirs), logits(model), rtol=0, atol=1e-4)
    assert_read_as_transformers_does(tmp_path / "m.gguf", theirs)


def assert_read_as_transformers_does(path: Path, theirs) -> None:
    """smollm's own reading of a GGUF (load_gguf) gives transformers' config and weights, bit for bit."""
    from smollm.hf import config_from_hf, hf_state_dict

    ours = load_gguf(path)[0]
    read_config = config_from_hf(theirs.config.to_dict())
    assert ours.config == dataclasses.replace(read_config, initializer_range=ours.config.initializer_range)
    mine, want = hf_state_dict(ours), theirs.state_dict()
    assert set(mine) == set(want) - ({"lm_head.weight"} if ours.config.tie_word_embeddings else set())
    for key, value in mine.items():
        assert torch.equal(value, want[key]), key


def rounded(model: SmolLM, types: dict[str, str]) -> SmolLM:
    """A copy of `model` whose weights went through the same rounding as the export's tensors."""
    import copy

    from gguf import GGMLQuantizationType, MODEL_ARCH, dequantize, get_tensor_name_map, quantize

    names = get_tensor_name_map(MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for key, p in out.named_parameters():
            hf_key = key if key == "lm_head.weight" else "model." + key
            qtype = GGMLQuantizationType[types[names.get_name(hf_key, try_suffixes=(".weight",))]]
            data = p.detach().numpy()
            p.copy_(torch.from_numpy(dequantize(quantize(data, qtype), qtype).reshape(data.shape)))
    return out


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_lower_precision_exports_lose_only_their_rounding(tmp_path, tiny_tokenizer, dtype):
    model = tiny(seed=1)
    types = save_gguf(model, tmp_path / "m.gguf", tiny_tokenizer, dtype)
    assert {types["blk.0.attn_norm.weight"], types["output_norm.weight"]} == {"F32"}  # vectors stay f32
    assert types["blk.0.attn_q.weight"] == dtype.upper()
    if dtype == "q8_0":  # tiny's MLP is 172 wide: rows of ffn_down are not whole blocks of 32
        assert types["blk.0.ffn_down.weight"] == "F16"
    read = read_back(tmp_path / "m.gguf")[0]
    assert_read_as_transformers_does(tmp_path / "m.gguf", read)
    theirs = logits(read)
    torch.testing.assert_close(theirs, logits(rounded(model, types)), rtol=0, atol=1e-4)
    ours = logits(model)
    error = (theirs - ours).abs().max() / ours.abs().max()
    assert 0 < error < TOLERANCE[dtype], error


def test_the_tokenizer_travels_inside(tmp_path, tiny_tokenizer):
    from gguf import GGUFReader, TokenType

    save_gguf(tiny(), tmp_path / "m.gguf", tiny_tokenizer, "f32")
    _, theirs = read_back(tmp_path / "m.gguf")
    assert theirs.encode(TEXT) == tiny_tokenizer.encode(TEXT)
    assert theirs.decode(tiny_tokenizer.encode(TEXT)) == TEXT
    assert theirs.eos_token == theirs.bos_token == "<|endoftext|>"

    fields = GGUFReader(tmp_path / "m.gguf").fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == 320 and tokens[0] == "<|endoftext|>" and types[0] == TokenType.CONTROL
    assert tokens[300:] == [f"[PAD{i}]" for i in range(300, 320)]  # ids the model has, the tokenizer not
    assert set(types[300:]) == {TokenType.UNUSED}
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # a plain byte-level BPE: GPT-2's split
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False


def test_q_and_k_rows_are_interleaved_for_llama_cpp():
    # One head of 8 dims: rotate_half pairs rows (i, i + 4); llama.cpp pairs rows (2i, 2i + 1).
    w = torch.arange(16.0).reshape(16, 1)  # two heads
    permuted = permute_for_llama_cpp(w, n_heads=2).flatten().tolist()
    assert permuted == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert torch.equal(unpermute_from_llama_cpp(permute_for_llama_cpp(w, n_heads=2), n_heads=2), w)


def test_a_tokenizer_llama_cpp_cannot_read_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    with pytest.raises(GGUFExportError, match="not a byte-level BPE"):
        save_gguf(tiny(), tmp_path / "m.gguf", tokenizer)
    assert not list(tmp_path.iterdir())  # nothing left behind, not even a temporary file


# ---- the command line ----

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of `python -m smollm.fit` after 3 steps (tiny, 320 ids, a 300-token tokenizer)."""
    base = tmp_path_factory.mktemp("trained")
    corpus = fitutil.write_corpus(base / "corpus", n_files=2, words_per_file=300)
    tok = fitutil.build_tokenizer(base / "tok", corpus)
    from smollm.fit import main

    assert main(fitutil.fit_args(base / "run", corpus, tok, max_steps=3)) == 0
    return base / "run" / "checkpoints" / "tiny" / "step=000003.ckpt"


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smollm.convert", *map(str, args)], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=fitutil.subprocess_env())


def test_to_gguf_from_a_training_checkpoint_and_from_a_hugging_face_directory(tmp_path, trained, capsys):
    from smollm.checkpoint import model_from_checkpoint

    model, tokenizer_dir = model_from_checkpoint(trained)
    assert convert_main(["to-gguf", str(trained), str(tmp_path / "ckpt.gguf")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "ckpt.gguf")
    theirs, tokenizer = read_back(tmp_path / "ckpt.gguf")
    torch.testing.assert_close(logits(theirs), logits(model), rtol=0, atol=1e-4)
    assert tokenizer.encode(TEXT) == load_tokenizer(tokenizer_dir).encode(TEXT)  # the one it trained with

    save_hf(model, tmp_path / "hf", tokenizer=tokenizer)
    assert convert_main(["to-gguf", str(tmp_path / "hf"), str(tmp_path / "hf.gguf"), "--dtype", "q8_0"]) == 0
    assert "kept in f16" in capsys.readouterr().err  # tiny's 172-wide MLP rows, said once
    assert (tmp_path / "hf.gguf").stat().st_size < (tmp_path / "ckpt.gguf").stat().st_size / 2


def test_an_existing_output_is_never_replaced_without_overwrite(tmp_path, tiny_tokenizer, capsys):
    save_hf(tiny(), tmp_path / "hf", tokenizer=tiny_tokenizer)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    assert convert_main(["to-gguf", str(tmp_path / "hf"), str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out} already exists; add --overwrite to replace it\n"
    assert out.read_bytes() == b"precious"
    assert convert_main(["to-gguf", str(tmp_path / "hf"), str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("key, setter", [("rope.dimension_count", "add_rope_dimension_count"),
                                         ("attention.value_length", "add_value_length")])
def test_a_gguf_of_another_attention_shape_is_refused_not_read_as_ours(tmp_path, tiny_tokenizer, monkeypatch, key,
                                                                       setter):
    """A llama GGUF whose RoPE covers part of each head, or whose value heads have another size, is a
    model SmolLM does not build: refused in one line rather than loaded as full-RoPE heads."""
    from gguf import GGUFWriter

    write = getattr(GGUFWriter, setter)
    monkeypatch.setattr(GGUFWriter, setter, lambda self, n: write(self, n // 2))
    save_gguf(tiny(), tmp_path / "m.gguf", tiny_tokenizer, "f32")
    monkeypatch.undo()
    with pytest.raises(HFFormatError, match=f"llama.{key} is 8, not the head size 16"):
        load_gguf(tmp_path / "m.gguf")


@pytest.mark.parametrize("case, message", [
    ("missing", "absent: no such file or directory"),
    ("not a checkpoint", "not-a.ckpt is truncated or not a PyTorch checkpoint"),
    ("no tokenizer", "holds no tokenizer and a GGUF needs one; add --tokenizer"),
    ("output is a folder", "is a directory; give the .gguf file to write"),
    ("no output folder", "no such directory to write m.gguf into"),
    ("bad dtype", "argument --dtype: invalid choice: 'q4'"),
    ("unknown tokenizer", "cannot load tokenizer"),
])
def test_bad_input_is_one_line(tmp_path, tiny_tokenizer, capsys, case, message):
    save_hf(tiny(), tmp_path / "bare")  # weights and config, no tokenizer
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "not-a.ckpt").write_bytes(b"junk")
    (tmp_path / "folder").mkdir()
    source, out, extra = tmp_path / "bare", tmp_path / "m.gguf", ["--tokenizer", str(tmp_path / "tok")]
    if case == "missing":
        source = tmp_path / "absent"
    elif case == "not a checkpoint":
        source = tmp_path / "not-a.ckpt"
    elif case == "no tokenizer":
        extra = []
    elif case == "output is a folder":
        out = tmp_path / "folder"
    elif case == "no output folder":
        out = tmp_path / "nowhere" / "m.gguf"
    elif case == "bad dtype":
        extra = ["--dtype", "q4"]
    elif case == "unknown tokenizer":
        extra = ["--tokenizer", str(tmp_path / "folder")]  # a folder with no tokenizer in it
    assert convert_main(["to-gguf", str(source), str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "m.gguf").exists()


def test_a_bad_command_line_is_one_line_without_a_traceback(tmp_path):
    proc = convert("to-gguf", tmp_path / "absent", tmp_path / "m.gguf")
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr == f"error: {tmp_path / 'absent'}: no such file or directory\n"
    proc = convert("to-gguf")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


# ---- llama.cpp itself, where it can be had (pip install llama-cpp-python builds it) ----

def llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama.cpp is not installed here (pip install llama-cpp-python builds it): {e}")
    return llama_cpp


def llama_cpp_greedy(llama_cpp, path: Path, ids: list[int], n: int) -> list[int]:
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False)
    try:
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(token)
            if len(out) == n:
                return out
    finally:
        llm.close()


def test_llama_cpp_continues_the_f32_export_as_we_do(tmp_path, tiny_tokenizer):
    from smollm.generate import generate

    llama = llama_cpp()
    model = tiny(seed=2)
    save_gguf(model, tmp_path / "m.gguf", tiny_tokenizer, "f32")
    prompt = tiny_tokenizer.encode("the model reads tokens and")
    ours = generate(model, torch.tensor([prompt]), max_new_tokens=16)[0, len(prompt):].tolist()
    assert llama_cpp_greedy(llama, tmp_path / "m.gguf", prompt, 16) == ours

    llm = llama.Llama(str(tmp_path / "m.gguf"), n_ctx=128, n_threads=2, verbose=False, vocab_only=True)
    try:  # and it splits text into the same tokens (the pre-tokenizer written is the right one)
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tiny_tokenizer.encode(TEXT)
    finally:
        llm.close()
