"""Gradient accumulation: an interrupt at any micro-batch resumes bit-exact, and what a step
logs (its loss, its learning rate) is that step's, whatever the split of the global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fitutil
from smollm.checkpoint import find_last_checkpoint
from smollm.fit import main

EXIT = {"SIGTERM": 143, "SIGINT": 130}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    base = tmp_path_factory.mktemp("small")
    tok = fitutil.build_tokenizer(base / "tok", fitutil.write_corpus(base / "tokcorpus"))
    corpus = fitutil.write_corpus(base / "corpus", n_files=2, words_per_file=60, seed=1)
    return corpus, tok


def callback(class_path: str, **init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})


def run_args(root: Path, data, max_steps: int, every: int = 1000, batch: int = 2, global_batch: int = 6,
             extra=()) -> list[str]:
    corpus, tok = data
    return fitutil.fit_args(root, corpus, tok, max_steps, every,
                            ["--data.batch_size", str(batch), "--data.global_batch_size", str(global_batch),
                             *extra])


def saved(root: Path, step: int) -> dict:
    return torch.load(root / "checkpoints" / "tiny" / f"step={step:06d}.ckpt", weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Weights, optimizer moments, schedule, loop counters and data position: all identical."""
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for name in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][name]), torch.as_tensor(sb[i][name])), (i, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a["loops"]["fit_loop"]["epoch_loop.batch_progress"] == b["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert a["TextDataModule"]["samples_seen"] == b["TextDataModule"]["samples_seen"]


@pytest.fixture(scope="module")
def straight(small, tmp_path_factory):
    """4 uninterrupted steps of 3 micro-batches, a checkpoint at every step."""
    root = tmp_path_factory.mktemp("straight")
    assert main(run_args(root, small, 4, every=1)) == 0
    return root


@pytest.mark.parametrize("signal", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("micro", [0, 1, 2])
def test_an_interrupt_at_any_micro_batch_of_a_step_resumes_bit_exact(tmp_path, small, straight, signal, micro,
                                                                     capsys):
    root = tmp_path / "run"
    stop = callback("fitutil.SignalAt", step=3, micro=micro, signal=signal)
    assert main(run_args(root, small, 4, extra=[stop])) == EXIT[signal]
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--ckpt_path last" in err
    # The step the signal landed in is finished, then saved: the checkpoint is the uninterrupted
    # run's at that step, its sample count and loop counters included.
    last = torch.load(find_last_checkpoint(str(root / "checkpoints" / "tiny")), weights_only=True)
    assert last["global_step"] == 3
    assert last["TextDataModule"]["samples_seen"] == 3 * 6
    assert_same_training_state(last, saved(straight, 3))

    assert main(run_args(root, small, 4, every=1, extra=["--ckpt_path", "last"])) == 0  # saved as straight's
    assert_same_training_state(saved(root, 4), saved(straight, 4))
