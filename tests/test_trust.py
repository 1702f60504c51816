"""Trust: exact resume, nothing lost on a kill or a pre-emption, non-finite values, bad input,
and several processes. Where only a separate process proves it, a fresh subprocess runs fit."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
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
    """The same as above through a real `python -m smollm.fit` process."""
    result = fitutil.run_fit(run_args(tmp_path / "run", small, 1, extra=["--ckpt_path", "last"]))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --ckpt_path last: no checkpoint to resume in {tmp_path / 'run' / 'checkpoints' / 'tiny'}; "
        "start without --ckpt_path, or give the checkpoint's path"]


# ---- several processes ----

DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]


def assert_two_process_resume_is_exact(run: Path, small, extra: list[str], straight: Path, ranks) -> None:
    """3 steps, then resumed to 6, on two processes: each rank's windows and losses are those of
    the uninterrupted run `straight` (whose records are `ranks`), and so is the final state."""
    for steps, more in ((3, []), (6, ["--ckpt_path", "last"])):
        result = fitutil.run_fit(run_args(run, small, steps, every=3, record=run / "rec.jsonl", extra=extra + more))
        assert result.returncode == 0, result.stderr[-3000:]
    for r in (0, 1):
        resumed = fitutil.read_records(Path(f"{run / 'rec.jsonl'}.rank{r}"))
        assert [x["windows"] for x in resumed] == [x["windows"] for x in ranks[r]]
        assert [x["loss"] for x in resumed] == [x["loss"] for x in ranks[r]]
    assert_same_state(checkpoint_at(run, 6), checkpoint_at(straight, 6))


@pytest.fixture(scope="module")
def ddp_straight(tmp_path_factory, small):
    """6 steps of DDP on two CPU processes, a checkpoint every 3: (run folder, each rank's records).
    Each rank's parameter groups are in groups.json.rankN."""
    straight = tmp_path_factory.mktemp("ddp") / "straight"
    writes = ["--trainer.plugins", json.dumps({"class_path": "fitutil.CountingCheckpointIO",
                                               "init_args": {"path": str(straight.parent / "writes.txt")}})]
    groups = "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.GroupNames",
                                                   "init_args": {"path": str(straight / "groups.json")}})
    result = fitutil.run_fit(run_args(straight, small, 6, every=3, record=straight / "rec.jsonl",
                                      extra=[*DDP, *writes, groups]))
    assert result.returncode == 0, result.stderr[-3000:]
    (straight / "stderr.txt").write_text(result.stderr)
    (straight / "stdout.txt").write_text(result.stdout)
    return straight, [fitutil.read_records(Path(f"{straight / 'rec.jsonl'}.rank{r}")) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_on_two_processes_splits_data_saves_once_and_resumes_exactly(tmp_path, small, ddp_straight):
    straight, ranks = ddp_straight
    for a, b in zip(*ranks):
        assert a["step"] == b["step"] and not set(a["windows"]) & set(b["windows"])
    assert sorted(p.name for p in (straight / "checkpoints" / "tiny").iterdir()) == [
        "last.ckpt", "step=000003.ckpt", "step=000003.ckpt.digest", "step=000006.ckpt", "step=000006.ckpt.digest"]
    writes = [line.split() for line in (straight.parent / "writes.txt").read_text().splitlines()]
    assert [(rank, name) for rank, _, name in writes] == [("0", "step=000003.ckpt"), ("0", "step=000006.ckpt")]
    assert len({pid for _, pid, _ in writes}) == 1  # each checkpoint written once, by rank 0 alone

    assert_two_process_resume_is_exact(tmp_path / "resumed", small, DDP, straight, ranks)


def single_process_groups() -> dict:
    """The parameter groups of the tiny model in one process, as fitutil.GroupNames records them."""
    from smollm.module import LitSmolLM
    from smollm.optim import parameter_groups

    lit = LitSmolLM(preset="tiny", config_overrides={"vocab_size": 320})
    optimizer = lit.configure_optimizers()["optimizer"]
    return {"groups": fitutil.group_names(optimizer, lit.model),
            "with_muon": {k: sorted(n for n, _ in v) for k, v in parameter_groups(lit.model, muon=True).items()}}


def assert_clean_output(stderr: str) -> None:
    """What two processes print is what one prints: no line per rank, no warning to act on."""
    for noise in ("sync_dist", "[rank: 1]", "Initializing distributed", "distributed_backend", "MEMBER: 2/2",
                  "Traceback"):
        assert noise not in stderr, (noise, stderr[-3000:])
    assert stderr.count("waiting for another process") <= 1  # rank 0 waiting for the one that builds


def windows_per_step(records: list[dict], micro_batches: int) -> list[list[int]]:
    """The windows of each optimizer step, sorted, from one process's records (one a micro-batch)."""
    return [sorted(sum((r["windows"] for r in records[i:i + micro_batches]), []))
            for i in range(0, len(records), micro_batches)]


def ranks_per_step(path: Path, n_ranks: int) -> list[list[int]]:
    """The windows of each optimizer step, all ranks together, sorted (one micro-batch a step)."""
    ranks = [fitutil.read_records(Path(f"{path}.rank{r}")) for r in range(n_ranks)]
    return [sorted(sum((rank[i]["windows"] for rank in ranks), [])) for i in range(len(ranks[0]))]


def assert_close_state(a: dict, b: dict, atol: float) -> None:
    assert a["global_step"] == b["global_step"] and a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], atol=atol, rtol=0, msg=key)


@pytest.mark.slow
def test_ddp_output_is_as_clean_as_one_process(ddp_straight):
    straight, _ = ddp_straight
    stderr = (straight / "stderr.txt").read_text()
    assert_clean_output(stderr)
    assert stderr.count("smollm: tiny model") == 1 and stderr.count("validation at the start") == 1
    assert "batch: 4 windows x 16 = 64 tokens per step = 1 micro-batch of 2 x 2 processes" in stderr
    # the end summary counts every process's tokens: 6 steps x 2 processes x 2 windows x 16 tokens
    assert "done: trained 6 steps (384 tokens)" in (straight / "stdout.txt").read_text()


@pytest.mark.slow
def test_resume_on_another_number_of_processes_keeps_the_global_batch(tmp_path, small, ddp_straight, capsys):
    """2 -> 1 and 1 -> 2 processes, 4 windows per step throughout: each step trains on the windows
    of the uninterrupted two-process run, and the final weights are its own within 1e-4 (the
    float sums of a gradient run in another order). The 1 -> 2 resume is started as srun starts
    it, through Lightning's SLURMEnvironment."""
    straight, ranks = ddp_straight
    per_step = ranks_per_step(straight / "rec.jsonl", 2)
    assert all(len(w) == 4 for w in per_step)

    # 2 -> 1: the two-process run's step 3, resumed on one process: 2 micro-batches of 2 per step
    one = tmp_path / "one"
    (one / "checkpoints" / "tiny").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "tiny" / "step=000003.ckpt", one / "checkpoints" / "tiny")
    result = fitutil.run_here(run_args(one, small, 6, every=3, record=one / "rec.jsonl", extra=["--ckpt_path", "last"]),
                              capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("batch: 4 windows x 16 = 64 tokens per step, as in the checkpoint; resumed on 1 process (was 2): "
            "2 micro-batches of 2 per step") in result.stderr
    assert windows_per_step(fitutil.read_records(one / "rec.jsonl"), 2) == per_step[3:]
    assert_close_state(checkpoint_at(one, 6), checkpoint_at(straight, 6), atol=1e-4)

    # 1 -> 2: three steps on one process (the global batch set: 2 micro-batches of 2), then
    # resumed on two "nodes" of one process each, under SLURM
    two = tmp_path / "two"
    result = fitutil.run_here(run_args(two, small, 3, every=3, record=two / "rec.jsonl",
                                       extra=["--data.global_batch_size", "4"]), capsys)
    assert result.returncode == 0, result.stderr[-3000:]
    assert windows_per_step(fitutil.read_records(two / "rec.jsonl"), 2) == per_step[:3]
    results = fitutil.srun(run_args(two, small, 6, every=3, record=two / "resumed.jsonl",
                                    extra=["--trainer.accelerator", "cpu", "--ckpt_path", "last"]), nodes=2)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed on 2 processes (was 1): 1 micro-batch of 2 per step" in results[0].stderr
    assert "device: 2 x cpu (CPU) on 2 nodes" in results[0].stderr
    assert ranks_per_step(two / "resumed.jsonl", 2) == per_step[3:]
    assert_close_state(checkpoint_at(two, 6), checkpoint_at(straight, 6), atol=1e-4)
    continue_line = next(line for line in results[0].stdout.splitlines() if line.startswith("continue:"))
    assert "relaunch the same way (srun, on every node) with: python -m smollm.fit" in continue_line
    assert "--ckpt_path last" in continue_line
    assert_clean_output(results[0].stderr + results[1].stderr)
    assert results[1].stderr.strip() == "" and results[1].stdout.strip() == ""  # rank 1 says nothing


@pytest.mark.slow
def test_two_nodes_with_torchrun_train_resume_exactly_and_share_or_not_the_token_cache(tmp_path, small, ddp_straight):
    """2 "nodes" x 1 process on this machine, started by torchrun as on a cluster: 3 steps with
    each node's own local cache (each builds its copy), then resumed to 6 with one shared cache
    (one copy, built once under its lock; the lock itself is tested in test_data_cache). Each
    rank trains on the windows of the two-process run started by Lightning, and ends with its
    weights, optimizer and schedule exactly."""
    straight, ranks = ddp_straight
    run = tmp_path / "run"

    def node_args(steps: int, more: list[str], builds: Path) -> list[str]:
        count = {"class_path": "fitutil.CountBuilds", "init_args": {"path": str(builds)}}
        argv = run_args(run, small, steps, every=3, record=run / "rec.jsonl",
                        extra=["--trainer.accelerator", "cpu", "--trainer.callbacks+=" + json.dumps(count), *more])
        i = argv.index("--data.cache_dir")
        return argv[:i] + argv[i + 2:]  # $SMOLLM_CACHE: each node's, or the shared one

    def builders(builds: Path) -> list[str]:
        return builds.read_text().split() if builds.exists() else []

    local = [tmp_path / "node0", tmp_path / "node1"]
    results = fitutil.torchrun(node_args(3, [], tmp_path / "local-builds.txt"), local, rendezvous="static")
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    built = [list((cache / "tokens").glob("*/index.json")) for cache in local]
    assert [len(b) for b in built] == [1, 1]
    local_builds = builders(tmp_path / "local-builds.txt")
    assert len(local_builds) == len(set(local_builds)) == 2  # each node tokenized its own copy, once
    assert json.loads(built[0][0].read_text())["n_tokens"] == json.loads(built[1][0].read_text())["n_tokens"]
    assert "device: 2 x cpu (CPU) on 2 nodes" in results[0].stderr
    continue_line = next(line for line in results[0].stdout.splitlines() if line.startswith("continue:"))
    assert "relaunch the same way (torchrun, on every node) with: python -m smollm.fit" in continue_line
    assert "--ckpt_path last" in continue_line
    assert_clean_output(results[0].stderr + results[1].stderr)

    shared = tmp_path / "shared"
    results = fitutil.torchrun(node_args(6, ["--ckpt_path", "last"], tmp_path / "shared-builds.txt"),
                               [shared, shared], rendezvous="c10d")
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((shared / "tokens").glob("*/index.json"))) == 1
    assert len(builders(tmp_path / "shared-builds.txt")) == 1  # one process tokenized; the other waited
    assert_clean_output(results[0].stderr + results[1].stderr)
    for r in (0, 1):
        trained = fitutil.read_records(Path(f"{run / 'rec.jsonl'}.rank{r}"))
        assert [x["windows"] for x in trained] == [x["windows"] for x in ranks[r]]
    assert_same_state(checkpoint_at(run, 6), checkpoint_at(straight, 6))


@pytest.mark.slow
def test_fsdp_on_two_processes_shards_by_layer_trains_as_ddp_resumes_exactly_and_converts(tmp_path, small,
                                                                                         ddp_straight):
    """Lightning's FSDP on 2 CPU processes (gloo) through the real CLI. Lightning refuses FSDP
    without CUDA; fitutil.CPUFSDPStrategy is its FSDPStrategy with the two GPU assumptions
    replaced (see there)."""
    fsdp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.val_check_interval", "3",  # validation and its sample generation, sharded
            "--trainer.strategy", json.dumps({"class_path": "fitutil.CPUFSDPStrategy"})]
    units = "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.FSDPUnits",
                                                  "init_args": {"path": str(tmp_path / "units.json")}})
    groups = "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.GroupNames",
                                                   "init_args": {"path": str(tmp_path / "groups.json")}})
    straight = tmp_path / "straight"
    result = fitutil.run_fit(run_args(straight, small, 6, every=3, record=straight / "rec.jsonl",
                                      extra=fsdp + [units, groups]))
    assert result.returncode == 0, result.stderr[-3000:]
    # one unit per decoder layer; embedding, final norm and the tied head in the root unit
    assert json.loads((tmp_path / "units.json").read_text()) == ["", "model.layers.0", "model.layers.1"]
    assert sorted(p.name for p in (straight / "checkpoints" / "tiny").iterdir()) == [
        "last.ckpt", "step=000003.ckpt", "step=000003.ckpt.digest", "step=000006.ckpt",
        "step=000006.ckpt.digest"]  # one full file each (and its digest), written by rank 0
    ranks = [fitutil.read_records(Path(f"{straight / 'rec.jsonl'}.rank{r}")) for r in (0, 1)]

    # The parameter groups are those of one process and of DDP, name for name, though FSDP shows
    # every parameter as a 1-D shard: what decays (or would go to Muon) is decided by what it is.
    one = single_process_groups()
    for r in (0, 1):
        sharded = json.loads(Path(f"{tmp_path / 'groups.json'}.rank{r}").read_text())
        ddp = json.loads(Path(f"{ddp_straight[0] / 'groups.json'}.rank{r}").read_text())
        assert sharded["shapes"] == [1] and ddp["shapes"] == [1, 2]
        assert sharded["groups"] == ddp["groups"] == one["groups"]
        assert sharded["with_muon"] == ddp["with_muon"] == one["with_muon"]

    # Training is DDP's up to the order of float sums (1e-5 relative): losses, gradient norms (the
    # whole model's on every rank; a shard's would be about 1/sqrt(2) of it) and the weights.
    for r in (0, 1):
        reference = ddp_straight[1][r]  # the same run under DDP
        assert [x["windows"] for x in ranks[r]] == [x["windows"] for x in reference]
        assert [x["grad_norm"] for x in ranks[r]] == [x["grad_norm"] for x in ranks[0]]
        assert [x["grad_norm"] for x in ranks[r]] == pytest.approx([x["grad_norm"] for x in reference], rel=1e-5)
        assert [x["loss"] for x in ranks[r]] == pytest.approx([x["loss"] for x in reference], rel=1e-5)
    assert ranks[0][0]["grad_norm"] > 1.0  # above the clip (1.0): the clip acts
    sharded, ddp = checkpoint_at(straight, 6)["state_dict"], checkpoint_at(ddp_straight[0], 6)["state_dict"]
    assert sharded.keys() == ddp.keys()
    for key in ddp:
        torch.testing.assert_close(sharded[key], ddp[key], rtol=1e-5, atol=1e-6, msg=key)

    run = tmp_path / "resumed"
    assert_two_process_resume_is_exact(run, small, fsdp, straight, ranks)

    # The checkpoint converts to a Hugging Face directory whose greedy next token is the one the
    # sharded model printed at the end of training.
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "smollm.convert", "ckpt", str(run / "checkpoints" / "tiny" /
                           "step=000006.ckpt"), str(out)], check=False, cwd=fitutil.ROOT, capture_output=True,
                          text=True, timeout=300, env=fitutil.subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smollm.generate import generate
    from smollm.hf import load_hf

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer.encode("The quick brown fox")])
    ours = load_hf(out)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits)
    token = generate(ours, ids, max_new_tokens=1)[0, -1].item()
    printed = next(line for line in result.stdout.splitlines() if line.startswith("next token after"))
    assert f"(id {token})" in printed
