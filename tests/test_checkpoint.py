"""The training checkpoint: nothing in it runs code, last.ckpt is always the newest, one run per
folder at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fitutil
from smollm.callbacks import AtomicCheckpointIO
from smollm.checkpoint import RunLock, model_from_checkpoint, read_checkpoint
from smollm.errors import CheckpointError, UnsafeFileError
from smollm.fit import main
from smollm.hf import load_hf, save_hf


def args(root: Path, data, max_steps: int, every: int = 1000, extra=()) -> list[str]:
    corpus, tok = data
    return fitutil.fit_args(root, corpus, tok, max_steps, every, list(extra))


# ---- no code runs from a checkpoint ----

class Payload:
    """Pickles as a call of open(marker, "w"): unpickled without weights_only, it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("trained")
    assert main(args(root, data, 2)) == 0
    return root / "checkpoints" / "tiny" / "step=000002.ckpt"


def crafted(tmp_path: Path, trained: Path) -> tuple[Path, Path]:
    """A real smollm.fit checkpoint with a payload added: (the file, the marker it would create)."""
    marker = tmp_path / "payload-ran"
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["hyper_parameters"]["note"] = Payload(marker)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    assert not marker.exists()
    return path, marker


def test_a_crafted_checkpoint_runs_nothing_through_the_library(tmp_path, trained):
    path, marker = crafted(tmp_path, trained)
    for load in (read_checkpoint, model_from_checkpoint, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError, match="could run code when loaded; refused"):
            load(path)
    assert not marker.exists()
    model_from_checkpoint(trained)  # a checkpoint of our own still loads


@pytest.mark.parametrize("command", ["generate", "convert", "fit --ckpt_path", "fit --model.init_from"])
def test_a_crafted_checkpoint_runs_nothing_through_the_commands(tmp_path, trained, data, command, capsys):
    """Each command's own main, in this process (where a payload that ran would leave its marker)."""
    path, marker = crafted(tmp_path, trained)
    module, argv = {
        "generate": ("generate", ["--checkpoint", str(path), "--prompt", "the", "--max_new_tokens", "1"]),
        "convert": ("convert", ["ckpt", str(path), str(tmp_path / "hf")]),
        "fit --ckpt_path": ("fit", args(tmp_path / "run", data, 4, extra=["--ckpt_path", str(path)])),
        "fit --model.init_from": ("fit", args(tmp_path / "run", data, 1, extra=["--model.init_from", str(path)])),
    }[command]
    result = fitutil.run_here(argv, capsys, command=module)
    assert result.returncode == 2, result.stderr
    assert not marker.exists()
    err = result.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and "refused" in err[-1] and str(path) in err[-1]


def test_a_crafted_pytorch_model_bin_runs_nothing(tmp_path, tiny_model):
    folder = save_hf(tiny_model, tmp_path / "hf")
    state = {"model." + k: v for k, v in tiny_model.state_dict().items() if k != "lm_head.weight"}
    state["extra"] = Payload(tmp_path / "payload-ran")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match="pytorch_model.bin holds Python objects"):
        load_hf(folder)
    assert main(["--config", str(fitutil.ROOT / "configs" / "tiny.yaml"), "--model.init_from", str(folder),
                 "--trainer.default_root_dir", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "payload-ran").exists()


# ---- --model.init_from takes weights trained on the data's token ids ----

def test_init_from_refuses_weights_whose_tokenizer_has_other_ids(tmp_path, trained, data, capsys):
    """A .ckpt, a Hugging Face folder and a GGUF each know their tokenizer; --data.tokenizer must
    give its tokens the same ids (compared as a mapping, not as file bytes), or be allowed knowingly."""
    from transformers import AutoTokenizer

    from smollm.gguf import save_gguf

    corpus, tok = data
    other = fitutil.build_tokenizer(tmp_path / "other", fitutil.write_corpus(tmp_path / "c2", seed=7))
    ours, theirs = AutoTokenizer.from_pretrained(tok), AutoTokenizer.from_pretrained(other)
    assert len(ours) == len(theirs) and ours.get_vocab() != theirs.get_vocab()  # same size, other ids
    model, _ = model_from_checkpoint(trained)
    folder = save_hf(model, tmp_path / "hf", tokenizer=ours)
    save_gguf(model, tmp_path / "m.gguf", ours)
    for source, name in ((trained, str(tok)), (folder, str(folder)), (tmp_path / "m.gguf", str(tmp_path / "m.gguf"))):
        capsys.readouterr()
        assert main(args(tmp_path / "refused", data, 1, extra=[
            "--model.init_from", str(source), "--data.tokenizer", str(other)])) == 2, source
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: --model.init_from {source} was trained with tokenizer {name!r}"), err
        assert f"--data.tokenizer {str(other)!r}" in err[-1] and "Traceback" not in "".join(err)
        assert not list((tmp_path / "refused").rglob("*.ckpt"))  # refused before training

    # The same ids, saved another way (other bytes), pass; so do other ids when allowed.
    same = tmp_path / "same"
    ours.save_pretrained(same)
    (same / "tokenizer.json").write_text(json.dumps(json.loads((same / "tokenizer.json").read_text())))
    assert (same / "tokenizer.json").read_bytes() != (Path(tok) / "tokenizer.json").read_bytes()
    assert main(args(tmp_path / "same-ids", data, 1, extra=[
        "--model.init_from", str(trained), "--data.tokenizer", str(same)])) == 0
    assert main(args(tmp_path / "allowed", data, 1, extra=["--model.init_from", str(trained), "--data.tokenizer",
                                                           str(other), "--model.allow_other_tokenizer", "true"])) == 0


def test_every_reader_refuses_a_tokenizer_of_other_ids_than_the_checkpoints(tmp_path, trained, data, capsys):
    """generate, convert and to-gguf use the checkpoint's tokenizer only if it still gives the ids
    the checkpoint records; to-gguf's --tokenizer must give the same ids."""
    from smollm.checkpoint import save_atomic
    from smollm.convert import main as convert
    from smollm.generate import main as generate

    other = fitutil.build_tokenizer(tmp_path / "other", fitutil.write_corpus(tmp_path / "c2", seed=7))
    checkpoint = torch.load(trained, weights_only=True)
    checkpoint["smollm"]["tokenizer"] = str(other)  # the folder it names, changed since training
    changed = tmp_path / "changed.ckpt"
    save_atomic(checkpoint, changed)
    commands = {
        "generate": lambda: generate(["--checkpoint", str(changed), "--prompt", "the", "--max_new_tokens", "1"]),
        "convert ckpt": lambda: convert(["ckpt", str(changed), str(tmp_path / "hf")]),
        "convert to-gguf": lambda: convert(["to-gguf", str(changed), str(tmp_path / "a.gguf")]),
    }
    for name, command in commands.items():
        capsys.readouterr()
        assert command() == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"tokenizer {str(other)!r} gives other token ids than when" in err[0], (name, err)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "a.gguf").exists()
    capsys.readouterr()
    assert convert(["to-gguf", str(trained), str(tmp_path / "b.gguf"), "--tokenizer", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"whose token ids differ from those of --tokenizer {str(other)!r}" in err[0], err
    assert convert(["to-gguf", str(trained), str(tmp_path / "b.gguf"), "--tokenizer", str(data[1])]) == 0


# ---- a resume reads its checkpoint once ----

def test_a_resume_reads_and_verifies_its_checkpoint_once(tmp_path, data, monkeypatch, capsys):
    import smollm.checkpoint as checkpoint

    root = tmp_path / "run"
    assert main(args(root, data, 2)) == 0
    loads, digests = [], []
    load, digest = checkpoint.load_torch_file, checkpoint.file_digest
    monkeypatch.setattr(checkpoint, "load_torch_file", lambda path, **kw: loads.append(str(path)) or load(path, **kw))
    monkeypatch.setattr(checkpoint, "file_digest", lambda path, **kw: digests.append(str(path)) or digest(path, **kw))
    capsys.readouterr()
    assert main(args(root, data, 3, extra=["--ckpt_path", "last"])) == 0
    assert "done: trained 1 steps" in capsys.readouterr().out  # Lightning resumed from the checkpoint handed to it
    step2 = str(root / "checkpoints" / "tiny" / "step=000002.ckpt")
    assert loads == [step2] and [os.path.realpath(p) for p in digests] == [os.path.realpath(step2)]


# ---- last.ckpt is always the newest ----

def links(folder: Path) -> dict[str, str]:
    return {p.name: os.path.basename(os.path.realpath(p)) for p in folder.iterdir() if p.name.startswith("last")}


def test_last_is_the_newest_after_resuming_from_the_first_checkpoint(tmp_path, data):
    root = tmp_path / "run"
    assert main(args(root, data, 5, every=5)) == 0
    assert main(args(root, data, 8, every=5, extra=["--ckpt_path", "last"])) == 0
    folder = root / "checkpoints" / "tiny"
    assert links(folder) == {"last.ckpt": "step=000008.ckpt"}
    assert main(args(root, data, 12, every=5, extra=["--ckpt_path", "last"])) == 0
    assert links(folder) == {"last.ckpt": "step=000012.ckpt"}
    assert sorted(p.name for p in folder.glob("step=*.ckpt")) == [
        "step=000005.ckpt", "step=000008.ckpt", "step=000010.ckpt", "step=000012.ckpt"]


def test_last_is_the_newest_after_a_sigterm_before_the_first_periodic_checkpoint(tmp_path, data):
    root = tmp_path / "run"
    rec = root / "rec.jsonl"
    slow = "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.SlowStep", "init_args": {"seconds": 0.3}})
    record = "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.Recorder", "init_args": {"path": str(rec)}})
    proc = fitutil.start_fit(args(root, data, 50, every=40, extra=[slow, record]))
    fitutil.wait_for(proc, lambda: len(fitutil.read_records(rec)) >= 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    stopped = fitutil.read_records(rec)[-1]["step"]
    folder = root / "checkpoints" / "tiny"
    assert links(folder) == {"last.ckpt": f"step={stopped:06d}.ckpt"}
    assert main(args(root, data, stopped + 2, every=40, extra=["--ckpt_path", "last"])) == 0
    assert links(folder) == {"last.ckpt": f"step={stopped + 2:06d}.ckpt"}


# ---- one run per folder at a time ----

def test_a_second_run_on_the_same_folder_is_refused_while_the_first_holds_it(tmp_path, data, capsys):
    root = tmp_path / "run"
    holder = RunLock(root / "checkpoints" / "tiny")
    holder.acquire()
    try:
        assert main(args(root, data, 2)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: another run is training into") and len(err.splitlines()) == 1
    finally:
        holder.release()
    assert main(args(root, data, 2)) == 0  # released: the run goes ahead


def test_a_killed_run_leaves_no_stuck_lock(tmp_path):
    folder = tmp_path / "checkpoints" / "run"
    code = ("import sys, time; from smollm.checkpoint import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                            env=fitutil.subprocess_env(), cwd=fitutil.ROOT)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(CheckpointError, match="another run"):
        RunLock(folder).acquire()
    proc.kill()
    proc.wait()
    lock = RunLock(folder)
    lock.acquire()  # free again
    lock.release()
