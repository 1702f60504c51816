"""Gradient accumulation: an interrupt at any micro-batch resumes bit-exact, and what a step
logs (its loss, its learning rate) is that step's, whatever the split of the global batch."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

import fitutil
from smollm.checkpoint import find_last_checkpoint
from smollm.fit import main
from test_trust import small  # noqa: F401  (the small corpus and tokenizer)

EXIT = {"SIGTERM": 143, "SIGINT": 130}


def callback(class_path: str, **init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": class_path, "init_args": init_args})


def run_args(root: Path, data, max_steps: int, every: int = 1000, batch: int = 2, global_batch: int = 6,
             extra=()) -> list[str]:
    corpus, tok = data
    return fitutil.fit_args(root, corpus, tok, max_steps, every,
                            ["--data.batch_size", str(batch), "--data.global_batch_size", str(global_batch),
                             *extra])


saved = fitutil.checkpoint_at


def assert_same_training_state(a: dict, b: dict) -> None:
    """Weights, optimizer moments, schedule, loop counters and data position: all identical."""
    fitutil.assert_same_state(a, b, loops=True)


@pytest.fixture(scope="module")
def straight(small, tmp_path_factory):
    """4 uninterrupted steps of 3 micro-batches, a checkpoint at every step."""
    root = tmp_path_factory.mktemp("straight")
    assert main(run_args(root, small, 4, every=1)) == 0
    return root


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("micro", [0, 1, 2])
def test_an_interrupt_at_any_micro_batch_of_a_step_resumes_bit_exact(tmp_path, small, straight, sig, micro, capsys):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    root = tmp_path / "run"
    stop = callback("fitutil.SignalAt", step=3, micro=micro, signal=sig)
    assert main(run_args(root, small, 4, extra=[stop])) == EXIT[sig]
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--ckpt_path last" in err
    assert err.count("finishing the current step, then saving it and stopping") == 1
    # The step the signal landed in is finished, then saved: the checkpoint is the uninterrupted
    # run's at that step, its sample count and loop counters included.
    last = torch.load(find_last_checkpoint(str(root / "checkpoints" / "tiny")), weights_only=True)
    assert last["global_step"] == 3
    assert last["TextDataModule"]["samples_seen"] == 3 * 6
    assert_same_training_state(last, saved(straight, 3))

    assert main(run_args(root, small, 4, every=1, extra=["--ckpt_path", "last"])) == 0  # saved as straight's
    assert_same_training_state(saved(root, 4), saved(straight, 4))
    # nothing of the runs' signal handling outlives them (a forked worker would inherit it)
    assert {s: signal.getsignal(s) for s in handlers} == handlers


# ---- what a step logs is that step's ----

def logged(root: Path, tag: str) -> list[float]:
    """A TensorBoard scalar of the run, one value per logged step, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "lightning_logs" / "tiny" / "version_0")).Reload()
    return [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)]


EVERY_STEP = ["--trainer.log_every_n_steps", "1"]


def test_the_logged_loss_is_the_steps_mean_over_its_micro_batches_whatever_the_split(tmp_path, small):
    # The same 4 windows a step in 1, 2 or 4 micro-batches: the same loss, the mean of the
    # micro-batch losses (whose gradients the step averages), not the last micro-batch's.
    losses = {}
    for batch in (4, 2, 1):
        root = tmp_path / f"split_{4 // batch}x{batch}"
        rec = root / "rec.jsonl"
        extra = [*EVERY_STEP, callback("fitutil.Recorder", path=str(rec))]
        assert main(run_args(root, small, 2, batch=batch, global_batch=4, extra=extra)) == 0
        losses[batch] = logged(root, "train/loss")
        assert len(losses[batch]) == 2
        accumulate = 4 // batch
        # Lightning's outputs hold each micro-batch's loss divided by the accumulation
        micro = [r["loss"] * accumulate for r in fitutil.read_records(rec)[:accumulate]]
        assert losses[batch][0] == pytest.approx(sum(micro) / accumulate, rel=1e-6, abs=0)
    for batch in (2, 1):
        assert losses[batch][0] == pytest.approx(losses[4][0], rel=1e-6, abs=0)  # the same weights and data
        assert losses[batch][1] == pytest.approx(losses[4][1], rel=1e-5, abs=0)  # another summation order


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_logged_rates_are_those_the_step_used(tmp_path, small, optimizer, capsys):
    from smollm.optim import lr_lambda

    root = tmp_path / "run"
    extra = [*EVERY_STEP, "--model.optimizer", optimizer, "--model.muon_lr", "0.02",
             "--trainer.enable_progress_bar", "true"]
    assert main(run_args(root, small, 5, batch=2, global_batch=4, extra=extra)) == 0
    # step k (1-based) is update k-1 of the schedule: warmup 3, so step 1 uses a third of the peak
    used = [lr_lambda(k - 1, warmup_steps=3, decay_steps=20, min_lr_ratio=0.1, schedule="cosine")
            for k in range(1, 6)]
    lr = logged(root, "train/lr")  # from step 2 on: the first step opens the throughput window
    assert lr == pytest.approx([0.01 * m for m in used[1:]], rel=1e-6)
    if optimizer == "muon":
        assert logged(root, "train/lr_muon") == pytest.approx([0.02 * m for m in used[1:]], rel=1e-6)
    steps = [line.split() for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [s[1] for s in steps] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
    for s in steps:  # the console's rate is the step's too
        k = int(s[1].split("/")[0])
        assert float(s[s.index("lr") + 1]) == pytest.approx(0.01 * used[k - 1], rel=5e-3)
        if optimizer == "muon":
            assert float(s[s.index("lr_muon") + 1]) == pytest.approx(0.02 * used[k - 1], rel=5e-3)


@pytest.mark.slow
def test_under_ddp_the_logged_loss_is_the_mean_over_processes_too(tmp_path, small):
    one = tmp_path / "one"
    assert main(run_args(one, small, 1, batch=4, global_batch=4, extra=EVERY_STEP)) == 0
    ddp = tmp_path / "ddp"  # 2 processes x 2 micro-batches of 1: the same 4 windows
    two = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    result = fitutil.run_ranks(run_args(ddp, small, 1, batch=1, global_batch=4, extra=[*EVERY_STEP, *two]))
    assert result.returncode == 0, result.stderr[-3000:]
    assert logged(ddp, "train/loss") == pytest.approx(logged(one, "train/loss"), rel=1e-6, abs=0)


@pytest.mark.slow
def test_under_ddp_a_signal_to_one_process_stops_all_at_the_same_step_end(tmp_path, small):
    root = tmp_path / "run"  # 2 processes x 3 micro-batches of 1; only rank 1 is signalled
    two = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    stop = callback("fitutil.SignalAt", step=2, micro=1, signal="SIGTERM", rank=1)
    result = fitutil.run_ranks(run_args(root, small, 4, batch=1, extra=[*two, stop]))
    assert result.returncode == 143, result.stderr[-3000:]
    last = torch.load(find_last_checkpoint(str(root / "checkpoints" / "tiny")), weights_only=True)
    assert last["global_step"] == 2 and last["TextDataModule"]["samples_seen"] == 2 * 6
    progress = last["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]
    assert progress["ready"] == progress["processed"] == 2 * 3  # whole steps of 3 micro-batches
