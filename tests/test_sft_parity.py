"""Parity with TRL: smollm's fine-tuning (`python -m smollm.fit --data.format chat`) and TRL's
SFTTrainer, from the same tiny weights on the same conversations with the same hyper-parameters,
give the same training loss at each of 20 steps, with loss on the same tokens (scripts/sft_parity.py
runs both; notes/sft-parity.md has the same on the real SmolLM2 weights)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import sft_parity as sp  # noqa: E402

from helpers_data import make_tokenizer  # noqa: E402
from smollm import ModelConfig, SmolLM  # noqa: E402
from smollm.hf import save_hf  # noqa: E402
from test_data_chat import CHATML  # noqa: E402  (SmolLM2's ChatML template)

HP = sp.Hyper(steps=20, batch_size=2, accumulation=2, lr=1e-3, weight_decay=0.1, grad_clip=1.0)
VOCAB = 640


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(work folder, HF folder of tiny random weights with a ChatML tokenizer of 602 tokens that
    pads with <|im_end|>, as SmolLM2-Instruct's does: transformers then builds the embedding with
    that padding_idx, a row TRL would not train as an input unless the script clears it)."""
    from transformers import AutoTokenizer

    work = tmp_path_factory.mktemp("sft-parity")
    texts = [m["content"] for c in sp.CONVERSATIONS for m in c]
    make_tokenizer(work / "tok", vocab_size=600, texts=texts * 4)
    tok = AutoTokenizer.from_pretrained(str(work / "tok"))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.pad_token = "<|im_end|>"
    torch.manual_seed(0)
    folder = save_hf(SmolLM(ModelConfig.from_name("tiny", vocab_size=VOCAB)), work / "hf", tokenizer=tok)
    assert json.loads((folder / "config.json").read_text())["pad_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    return work, folder


@pytest.fixture(scope="module")
def parity(tiny):
    work, folder = tiny
    return sp.parity(folder, folder, sp.CONVERSATIONS, work, HP, "tiny", {"vocab_size": VOCAB})


def test_the_training_template_renders_smollm2s_text(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny[1]))
    marked = sp.with_generation_markers(tok.chat_template)
    assert tok.chat_template == CHATML and "{% generation %}" in marked
    for messages in sp.CONVERSATIONS:
        for add in (False, True):
            assert (tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add, chat_template=marked)
                    == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add))


def test_smollm_and_trl_train_the_same_tokens_with_loss_on_the_replies(parity, tiny):
    # sp.compare (run by the fixture) raised unless every row's ids and scored targets are TRL's and
    # each step's scored tokens are TRL's num_items_in_batch; here, that those tokens are the replies.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny[1]))
    rows = sp.trained_rows(parity["smollm"], sp.CONVERSATIONS)
    assert len(rows) == HP.steps * HP.batch_size * HP.accumulation
    r = 0
    for micro in parity["smollm"]["micro"]:
        for ids, mask in zip(micro["input_ids"], micro["loss_mask"]):
            runs, current = [], []
            for target, scored in zip(ids[1:], mask):
                if scored:
                    current.append(target)
                elif current:
                    runs, current = runs + [tok.decode(current)], []
            want = [m["content"] + "<|im_end|>" for m in rows[r] if m["role"] == "assistant"]
            assert runs == want
            r += 1


def test_the_losses_agree_at_every_step(parity):
    steps = parity["steps"]
    assert [s["step"] for s in steps] == list(range(1, HP.steps + 1))
    assert parity["max_diff"] < 1e-4, [(s["step"], s["smollm"], s["trl"]) for s in steps]
    assert steps[-1]["smollm"] < steps[0]["smollm"] - 1.0  # it trained
    # the micro-batches of a step score different numbers of tokens, often by far
    uneven = [s for s in steps if max(s["scored"]) > 3 * min(s["scored"])]
    assert len(uneven) >= 4, [s["scored"] for s in steps]


def test_a_mean_of_micro_batch_means_would_not_agree(parity, tiny):
    # The test can tell the normalization: TRL averaging each micro-batch on its own and then the
    # micro-batches (transformers before 4.46) trains otherwise, far beyond the tolerance.
    work, folder = tiny
    rows = sp.trained_rows(parity["smollm"], sp.CONVERSATIONS)
    other = sp.run_trl(folder, folder, rows, parity["seq_len"], work / "mean-of-means", HP, mean_of_means=True)
    diffs = [abs(a - b) for a, b in zip(parity["smollm"]["losses"], other["losses"])]
    assert len(diffs) == HP.steps and max(diffs) > 100 * 1e-4
