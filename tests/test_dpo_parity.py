"""Parity with TRL: smollm's DPO (`python -m smollm.fit --model.objective dpo --data.format preference`)
and TRL's DPOTrainer, from the same tiny weights on the same pairs with the same hyper-parameters,
start at ln 2 and give the same loss and rewards at each of 10 steps, scoring the same tokens
(scripts/dpo_parity.py runs both; notes/dpo-parity.md has the same on the real SmolLM2 weights)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import dpo_parity as dp  # noqa: E402

from helpers_data import make_tokenizer  # noqa: E402
from smollm import ModelConfig, SmolLM  # noqa: E402
from smollm.hf import save_hf  # noqa: E402
from test_data_chat import CHATML  # noqa: E402  (SmolLM2's ChatML template)

HP = dp.Hyper(steps=10, batch_size=2, accumulation=2, lr=1e-3, beta=0.5, weight_decay=0.1, grad_clip=1.0)
VOCAB = 640


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(work folder, HF folder of tiny random weights with a ChatML tokenizer that pads with <|im_end|>,
    as SmolLM2-Instruct's does)."""
    from transformers import AutoTokenizer

    work = tmp_path_factory.mktemp("dpo-parity")
    texts = [str(v) for p in dp.PAIRS for v in p.values()]
    make_tokenizer(work / "tok", vocab_size=600, texts=texts * 4)
    tok = AutoTokenizer.from_pretrained(str(work / "tok"))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.pad_token = "<|im_end|>"
    torch.manual_seed(0)
    return work, save_hf(SmolLM(ModelConfig.from_name("tiny", vocab_size=VOCAB)), work / "hf", tokenizer=tok)


@pytest.mark.parametrize("precompute", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["frozen-reference", "precomputed-reference"])
def test_the_loss_and_rewards_agree_at_every_step(tiny, precompute):
    work, folder = tiny
    hp = dp.Hyper(**{**HP.__dict__, "precompute": precompute})
    result = dp.parity(folder, folder, dp.PAIRS, work / str(precompute), hp, "tiny", {"vocab_size": VOCAB})
    # dp.compare raised unless every row's tokens and scored targets were TRL's
    steps = result["steps"]
    assert [s["step"] for s in steps] == list(range(1, HP.steps + 1))
    assert steps[0]["smollm loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference
    assert steps[0]["trl loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert max(result["max_diff"].values()) < 1e-4, result["max_diff"]
    assert steps[-1]["smollm loss"] < math.log(2) - 0.05 and steps[-1]["smollm rewards/margins"] > 0.1  # it trained


def test_trls_template_renders_smollm2s_text_but_the_last_reply_ends_at_im_end(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny[1]))
    variant = dp.without_final_separator(tok.chat_template)
    for pair in dp.PAIRS:
        prompt = [{"role": "user", "content": pair["prompt"]}] if isinstance(pair["prompt"], str) else pair["prompt"]
        assert (tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, chat_template=variant)
                == tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
        full = prompt + [{"role": "assistant", "content": "x"}]
        assert (tok.apply_chat_template(full, tokenize=False, chat_template=variant) + "\n"
                == tok.apply_chat_template(full, tokenize=False))
