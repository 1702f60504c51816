"""Shared fixtures: the tiny model and a tiny tokenizer built locally (no hub)."""

from __future__ import annotations

import pytest
import torch

from smollm import ModelConfig, SmolLM

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Once upon a time there was a small language model that learned to write.",
    "def add(a, b):\n    return a + b\n",
]


@pytest.fixture
def tiny_model() -> SmolLM:
    torch.manual_seed(0)
    return SmolLM(ModelConfig.from_name("tiny")).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 300-token byte-level BPE with <|endoftext|> as bos/eos/unk, like SmolLM2's (ids < vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")
