"""Trust: exact resume, nothing lost on a kill or a pre-emption, non-finite values, bad input
(several processes: test_processes.py). Where only a separate process proves it, a fresh
subprocess runs fit."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fitutil
from smollm.checkpoint import find_last_checkpoint
from smollm.fit import main
from smollm.checkpoint import model_from_checkpoint as load_checkpoint_model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """22 training windows of 16 tokens: at batch 2 an epoch is exactly 11 steps."""
    base = tmp_path_factory.mktemp("small")
    tok = fitutil.build_tokenizer(base / "tok", fitutil.write_corpus(base / "tokcorpus"))
    corpus = fitutil.write_corpus(base / "corpus", n_files=2, words_per_file=60, seed=1)
    return corpus, tok


def run_args(root: Path, data, max_steps: int, every: int = 1000, workers: int = 0, record: Path | None = None,
             extra=()) -> list[str]:
    corpus, tok = data
    extra = ["--data.batch_size", "2", "--data.num_workers", str(workers), *extra]
    if record is not None:
        extra += ["--trainer.callbacks+=" + json.dumps(
            {"class_path": "fitutil.Recorder", "init_args": {"path": str(record)}})]
    return fitutil.fit_args(root, corpus, tok, max_steps, every, extra)


checkpoint_at, assert_same_state = fitutil.checkpoint_at, fitutil.assert_same_state


# ---- exact resume, no window lost or repeated ----

@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_exact_mid_epoch_and_on_an_epoch_boundary(tmp_path, small, workers):
    total = 14
    straight = tmp_path / "straight"
    assert main(run_args(straight, small, total, record=straight / "rec.jsonl", workers=workers)) == 0
    reference = fitutil.read_records(straight / "rec.jsonl")
    assert sorted(w for r in reference[:11] for w in r["windows"]) == list(range(22))  # epoch = 11 steps

    for stop in (7, 11):  # mid-epoch, exactly on the epoch boundary
        run = tmp_path / f"resumed_at_{stop}"
        rec = run / "rec.jsonl"
        assert main(run_args(run, small, stop, record=rec, workers=workers)) == 0
        assert main(run_args(run, small, total, record=rec, workers=workers, extra=["--ckpt_path", "last"])) == 0
        records = fitutil.read_records(rec)
        assert [r["step"] for r in records] == list(range(1, total + 1))
        assert [r["windows"] for r in records] == [r["windows"] for r in reference]  # none lost or repeated
        assert [r["loss"] for r in records] == [r["loss"] for r in reference]  # identical, not close
        assert_same_state(checkpoint_at(run, total), checkpoint_at(straight, total))


def test_resume_is_bit_exact_on_a_parquet_corpus(tmp_path, small, capsys):
    from helpers_data import write_records

    corpus, tok = small
    lines = [line for p in sorted(corpus.glob("*.txt")) for line in p.read_text().splitlines()]
    parquet = write_records(tmp_path / "corpus.parquet", [line + "\n" for line in lines])
    data = (tmp_path, tok)  # run_args takes the corpus and the tokenizer
    files = ["--data.files", json.dumps([str(parquet)])]
    total = 12
    straight = tmp_path / "straight"
    assert main(run_args(straight, data, total, record=straight / "rec.jsonl", extra=files)) == 0
    assert "data: 1 files (1 parquet)" in capsys.readouterr().err  # the console's data line
    reference = fitutil.read_records(straight / "rec.jsonl")
    run = tmp_path / "resumed"
    rec = run / "rec.jsonl"
    assert main(run_args(run, data, 5, record=rec, extra=files)) == 0
    assert main(run_args(run, data, total, record=rec, extra=files + ["--ckpt_path", "last"])) == 0
    records = fitutil.read_records(rec)
    assert [r["step"] for r in records] == list(range(1, total + 1))
    assert [r["windows"] for r in records] == [r["windows"] for r in reference]
    assert [r["loss"] for r in records] == [r["loss"] for r in reference]
    assert_same_state(checkpoint_at(run, total), checkpoint_at(straight, total))


# ---- an interrupted save, pre-emption ----

def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, small):
    root = tmp_path / "run"
    signal_file = tmp_path / "writing"
    args = run_args(root, small, 8, every=2,
                    extra=["--trainer.plugins", "fitutil.HangingCheckpointIO"])
    proc = subprocess.Popen([sys.executable, "-m", "smollm.fit", *args], cwd=fitutil.ROOT,
                            env=fitutil.subprocess_env({"SMOLLM_TEST_SIGNAL": str(signal_file)}),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not signal_file.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "the checkpoint of step 4 was never being written"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    folder = root / "checkpoints" / "tiny"
    assert any(p.name.endswith(".tmp") for p in folder.iterdir())  # the half-written file
    assert not (folder / "step=000004.ckpt").exists()
    last = find_last_checkpoint(str(folder))
    assert Path(last).name == "step=000002.ckpt"
    load_checkpoint_model(last)  # loads
    # and the run resumes from it
    assert main(run_args(root, small, 5, extra=["--ckpt_path", "last"])) == 0
    assert torch.load(folder / "step=000005.ckpt", weights_only=True)["global_step"] == 5


def test_sigterm_saves_at_the_next_step_and_the_resume_reproduces_the_run(tmp_path, small):
    straight = tmp_path / "straight"
    assert main(run_args(straight, small, 12, record=straight / "rec.jsonl")) == 0
    reference = fitutil.read_records(straight / "rec.jsonl")

    root = tmp_path / "run"
    rec = root / "rec.jsonl"
    slow = "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.SlowStep", "init_args": {"seconds": 0.3}})
    args = run_args(root, small, 12, record=rec, extra=[slow])
    proc = fitutil.start_fit(args)
    fitutil.wait_for(proc, lambda: len(fitutil.read_records(rec)) >= 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM" in err and "Traceback" not in err
    stopped_at = fitutil.read_records(rec)[-1]["step"]
    assert stopped_at < 12
    assert Path(find_last_checkpoint(str(root / "checkpoints" / "tiny"))).name == f"step={stopped_at:06d}.ckpt"

    assert main(run_args(root, small, 12, record=rec, extra=["--ckpt_path", "last"])) == 0
    records = fitutil.read_records(rec)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert [r["loss"] for r in records] == [r["loss"] for r in reference]
    assert_same_state(checkpoint_at(root, 12), checkpoint_at(straight, 12))


# ---- Ctrl-C keeps the work ----

def test_ctrl_c_in_training_saves_the_last_step_and_says_how_to_resume(tmp_path, small, capsys):
    straight = tmp_path / "straight"
    assert main(run_args(straight, small, 8, record=straight / "rec.jsonl")) == 0
    root, rec = tmp_path / "run", tmp_path / "run" / "rec.jsonl"
    slow = "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.SlowStep", "init_args": {"seconds": 0.3}})
    proc = fitutil.start_fit(run_args(root, small, 8, every=1000, record=rec, extra=[slow]))
    fitutil.wait_for(proc, lambda: len(fitutil.read_records(rec)) >= 3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Resume with:" in err and "--ckpt_path last" in err
    stopped = fitutil.read_records(rec)[-1]["step"]
    assert stopped < 8
    assert Path(find_last_checkpoint(str(root / "checkpoints" / "tiny"))).name == f"step={stopped:06d}.ckpt"
    capsys.readouterr()
    assert main(run_args(root, small, 8, record=rec, extra=["--ckpt_path", "last"])) == 0
    assert f"; resuming at step {stopped}; training to step 8" in capsys.readouterr().err  # the start block says so
    assert_same_state(checkpoint_at(root, 8), checkpoint_at(straight, 8))  # nothing lost


def test_ctrl_c_during_validation_saves_the_last_step(tmp_path, small):
    root = tmp_path / "run"
    marker = tmp_path / "validating"
    slow = "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.SlowValidation",
                                                 "init_args": {"marker": str(marker)}})
    proc = fitutil.start_fit(run_args(root, small, 8, extra=[slow, "--trainer.val_check_interval", "3"]))
    fitutil.wait_for(proc, marker.exists)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Resume with:" in err
    assert Path(find_last_checkpoint(str(root / "checkpoints" / "tiny"))).name == "step=000003.ckpt"


def test_a_second_ctrl_c_stops_at_once(tmp_path, small):
    root = tmp_path / "run"
    marker = tmp_path / "validating"
    slow = "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.SlowValidation",
                                                 "init_args": {"marker": str(marker), "seconds": 30}})
    proc = fitutil.start_fit(run_args(root, small, 8, extra=[slow, "--trainer.val_check_interval", "3"]))
    fitutil.wait_for(proc, marker.exists)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 20  # not after the 30 s validation batch
    assert proc.returncode == 130, err
    assert "stopped at once" in err and "Traceback" not in err


# ---- non-finite values ----

def test_a_nan_loss_stops_before_the_optimizer_step_and_saves_nothing_non_finite(tmp_path, small, capsys):
    poison = "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.PoisonWeights", "init_args": {"at_step": 4}})
    root = tmp_path / "run"
    err = one_line_error(capsys, main(run_args(root, small, 8, every=1, extra=[poison])))
    assert err.startswith("error: step 4:") and "nan" in err
    saved = sorted(p.name for p in (root / "checkpoints" / "tiny").glob("step=*.ckpt"))
    assert saved == ["step=000001.ckpt", "step=000002.ckpt", "step=000003.ckpt"]
    for name in saved:
        state = torch.load(root / "checkpoints" / "tiny" / name, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values())


def test_the_fused_adamw_skips_a_flagged_step_on_the_device():
    # What the guard relies on: found_inf = 1 leaves weights, moments and step count untouched.
    from smollm.module import LitSmolLM

    lit = LitSmolLM(preset="tiny", config_overrides={"num_hidden_layers": 1})
    optimizer = lit.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"]
    for p in lit.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    before = {k: v.clone() for k, v in lit.state_dict().items()}
    moments = [optimizer.state[p]["exp_avg"].clone() for p in lit.parameters()]
    for p in lit.parameters():
        p.grad = torch.full_like(p, float("nan"))
    optimizer.found_inf = torch.tensor(1.0)
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in lit.state_dict().items())
    assert all(torch.equal(m, optimizer.state[p]["exp_avg"]) for m, p in zip(moments, lit.parameters()))
    assert all(optimizer.state[p]["step"].item() == 1 for p in lit.parameters())


def test_the_guard_reports_the_bad_step_when_its_flag_is_read():
    from smollm.module import NonFiniteError, NonFiniteGuard

    guard = NonFiniteGuard()
    guard.push(3, torch.tensor([0.0, 2.5, 1.0]))
    guard.push(4, torch.tensor([1.0, float("nan"), float("inf")]))
    with pytest.raises(NonFiniteError, match=r"^step 4: the loss is nan and the gradient norm is inf"):
        guard.check()
    guard.check()  # reported once


# ---- bad input: one line, non-zero, nothing saved is harmed ----

def one_line_error(capsys, code: int) -> str:
    assert code != 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    errors = [line for line in captured.err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, captured.err  # progress lines may come before it, nothing after
    assert errors[0].startswith("error:") and captured.err.strip().endswith(errors[0]), captured.err
    return errors[0]


def test_a_glob_that_matches_nothing(tmp_path, small, capsys):
    _, tok = small
    args = run_args(tmp_path / "run", small, 2) + ["--data.files", json.dumps([str(tmp_path / "nothing*.txt")])]
    assert "nothing*.txt" in one_line_error(capsys, main(args))


def test_an_empty_file_is_skipped_with_a_warning(tmp_path, small, capsys):
    corpus, _ = small
    (tmp_path / "empty.txt").write_text("  \n\n")
    files = json.dumps([str(corpus), str(tmp_path / "empty.txt")])
    assert main(run_args(tmp_path / "run", small, 1) + ["--data.files", files]) == 0
    assert re.search(r"^warning: skipping 1 empty file\(s\): .*empty.txt", capsys.readouterr().err, re.M)


def test_bytes_that_are_not_utf8(tmp_path, small, capsys):
    corpus, _ = small
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9 au lait\n" * 50)
    files = json.dumps([str(corpus), str(bad)])
    err = one_line_error(capsys, main(run_args(tmp_path / "run", small, 1) + ["--data.files", files]))
    assert "latin1.txt" in err and "3" in err  # the file and the byte offset
    assert "encoding_errors" in err


def test_a_corpus_too_small(tmp_path, small, capsys):
    (tmp_path / "tiny.txt").write_text("just a few words here\n")
    files = json.dumps([str(tmp_path / "tiny.txt")])
    err = one_line_error(capsys, main(run_args(tmp_path / "run", small, 1) + ["--data.files", files]))
    assert "tokens" in err and "needed" in err


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_broken_checkpoint(tmp_path, small, capsys, damage):
    root = tmp_path / "run"
    assert main(run_args(root, small, 2, every=1)) == 0
    path = root / "checkpoints" / "tiny" / "step=000002.ckpt"
    good = (root / "checkpoints" / "tiny" / "step=000001.ckpt").read_bytes()
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(4096)}[damage])
    capsys.readouterr()
    err = one_line_error(capsys, main(run_args(root, small, 3, extra=["--ckpt_path", str(path)])))
    assert "step=000002.ckpt" in err
    assert (root / "checkpoints" / "tiny" / "step=000001.ckpt").read_bytes() == good


def test_a_sharded_checkpoint_folder_is_refused(tmp_path, small, capsys):
    # FSDP's state_dict_type="sharded" writes a folder whose metadata is a pickle (could run code).
    folder = tmp_path / "step=000002.ckpt"
    folder.mkdir()
    (folder / "meta.pt").write_bytes(b"not loaded")
    err = one_line_error(capsys, main(run_args(tmp_path / "run", small, 3, extra=["--ckpt_path", str(folder)])))
    assert f"checkpoint {folder} is a folder" in err and "state_dict_type 'full'" in err


def test_a_checkpoint_of_another_model_configuration(tmp_path, small, capsys):
    root = tmp_path / "run"
    assert main(run_args(root, small, 1, every=1)) == 0
    capsys.readouterr()
    other = ["--ckpt_path", "last", "--model.config_overrides", '{"vocab_size": 320, "num_hidden_layers": 3}']
    err = one_line_error(capsys, main(run_args(root, small, 2, extra=other)))
    assert "num_hidden_layers: 3 != 2" in err


def test_an_unknown_option_and_an_unknown_preset(tmp_path, small, capsys):
    err = one_line_error(capsys, main(run_args(tmp_path / "run", small, 1, extra=["--model.lerning_rate", "1"])))
    assert "lerning_rate" in err
    err = one_line_error(capsys, main(run_args(tmp_path / "run", small, 1, extra=["--optimizer", "SGD"])))
    assert "--optimizer" in err  # LitSmolLM's own options set the optimizer, not LightningCLI's
    err = one_line_error(capsys, main(run_args(tmp_path / "run", small, 1, extra=["--model.preset", "7b"])))
    assert "7b" in err and "135m" in err


def test_a_tokenizer_that_cannot_be_loaded(tmp_path, small):
    # A hub name on a machine set up to be offline (with the hub merely unreachable, the same
    # error comes after the hub client's retries).
    args = run_args(tmp_path / "run", small, 1) + ["--data.tokenizer", "nobody/no-such-tokenizer"]
    result = fitutil.run_fit(args, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "nobody/no-such-tokenizer" in last


def test_a_tokenizer_larger_than_the_model_vocabulary(tmp_path, small, capsys):
    args = run_args(tmp_path / "run", small, 1, extra=["--model.config_overrides", '{"vocab_size": 256}'])
    err = one_line_error(capsys, main(args))
    assert "300 tokens" in err and "256" in err


def test_a_full_disk_while_writing_a_checkpoint(tmp_path, small, capsys, monkeypatch):
    root = tmp_path / "run"
    assert main(run_args(root, small, 2, every=2)) == 0
    good = (root / "checkpoints" / "tiny" / "step=000002.ckpt").read_bytes()
    capsys.readouterr()

    from smollm.callbacks import AtomicCheckpointIO

    def full(self, checkpoint, f):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(AtomicCheckpointIO, "_write", full)
    err = one_line_error(capsys, main(run_args(root, small, 4, every=2, extra=["--ckpt_path", "last"])))
    assert "step=000004.ckpt" in err and "No space left" in err
    assert sorted(p.name for p in (root / "checkpoints" / "tiny").iterdir()) == ["last.ckpt", "step=000002.ckpt",
                                                                             "step=000002.ckpt.digest"]
    assert (root / "checkpoints" / "tiny" / "step=000002.ckpt").read_bytes() == good


def test_fsdp_on_the_cpu_and_a_model_too_big_for_memory_are_refused_before_starting(tmp_path, small, capsys,
                                                                                     monkeypatch):
    err = one_line_error(capsys, main(run_args(tmp_path / "run", small, 1, extra=["--trainer.strategy", "fsdp"])))
    assert err == ("error: --trainer.strategy fsdp needs CUDA GPUs (Lightning's FSDP does not run on the CPU); "
                   "on CPU use --trainer.strategy ddp")
    import smollm.preflight

    monkeypatch.setattr(smollm.preflight, "available_memory", lambda: 10**6)  # 1 MB free
    err = one_line_error(capsys, main(run_args(tmp_path / "run", small, 1)))
    assert "needs at least 0.0 GB for float32 weights, gradients and AdamW state, and 0.0 GB are free" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_bad_input_from_the_command_line_reads_as_one_line(tmp_path, small):
    """The same as above through a fresh `python -m smollm.fit` process: all a user sees, what its
    imports print included (the other tests' processes are mostly forked from one that imported already)."""
    result = fitutil.run_fit(run_args(tmp_path / "run", small, 1, extra=["--ckpt_path", "last"]), fresh=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --ckpt_path last: no checkpoint to resume in {tmp_path / 'run' / 'checkpoints' / 'tiny'}; "
        "start without --ckpt_path, or give the checkpoint's path"]


# Several processes (DDP, FSDP, torchrun, SLURM): test_processes.py.
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
