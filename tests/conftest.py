"""Shared fixtures: the tiny model and a tiny tokenizer built locally (no hub)."""

from __future__ import annotations

import os

import pytest
import torch

from smollm import ModelConfig, SmolLM

def pytest_configure(config) -> None:
    """Under pytest-xdist (`-n auto`), each worker is one of several processes sharing the cores:
    it takes its share of them as torch threads, and so do the processes its tests start (through
    OMP_NUM_THREADS), instead of every worker running as many threads as there are cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


# Modules whose module-scoped fixtures take most of a minute (the real weights, read by transformers and
# converted by smollm; one two-process DDP run that several tests compare with): under pytest-xdist each
# module's tests go to one worker together, so that those fixtures are built once, not once per worker.
TOGETHER = ("test_real_weights.py", "test_processes.py")


def pytest_collection_modifyitems(config, items) -> None:
    """The slow tests first, in their files' order: under pytest-xdist they then start early and the
    quick ones fill the gaps at the end, rather than one worker running the last minute-long test alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's load scheduling (one test at a time to whichever worker is free), except that each module of
    TOGETHER is one unit of work. (pytest-xdist's own `--dist loadgroup` does this by renaming tests, which
    this pytest no longer sees.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return module if module.endswith(TOGETHER) else nodeid

    return Scheduling(config, log)

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
def tiny_tokenizer(tmp_path_factory):
    """A 300-token byte-level BPE with <|endoftext|> as bos/eos/unk, like SmolLM2's (ids < vocab)."""
    from transformers import AutoTokenizer

    from helpers_data import make_tokenizer

    return AutoTokenizer.from_pretrained(make_tokenizer(tmp_path_factory.mktemp("tok"), 300, texts=TEXT))


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """(corpus folder, tokenizer folder): 4 files of pseudo-random English words and a 300-token
    byte-level BPE trained on them, for tests that run smollm.fit."""
    import fitutil

    base = tmp_path_factory.mktemp("data")
    corpus = fitutil.write_corpus(base / "corpus")
    return corpus, fitutil.build_tokenizer(base / "tok", corpus)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> str:
    """A 600-token byte-level BPE tokenizer folder (helpers_data.make_tokenizer)."""
    from helpers_data import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tokenizer(tok_dir):
    """That tokenizer, loaded and checked as the data package loads one."""
    from smollm.assets import load_tokenizer

    return load_tokenizer(tok_dir, for_cache=True)
