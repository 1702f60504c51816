"""Nothing silently wrong: the smallest damage to a token shard or a checkpoint (the low byte of a
few aligned words: a token id off by one, a float off by about 1e-5) is caught by every reader, a
damaged shard is rebuilt from its sources, and every run ends on a validation of the weights it
saved."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fitutil
from helpers_data import documents, write_records
from smollm.checkpoint import read_checkpoint
from smollm.data import TextDataModule, TokenCache, build, verify
from smollm.digest import file_digest
from smollm.errors import DamagedCheckpointError, DataError
from smollm.fit import main as fit


def flip(path: Path, offset: int, word: int, xor: int, count: int = 4) -> None:
    """XOR the low byte (little-endian) of `count` aligned words of `word` bytes from `offset`,
    keeping the file's modification time, as silent damage would."""
    st = os.stat(path)
    offset -= offset % word
    with open(path, "r+b") as f:
        for i in range(count):
            f.seek(offset + i * word)
            byte = f.read(1)[0]
            f.seek(offset + i * word)
            f.write(bytes([byte ^ xor]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ---- token shards


def open_cache(tmp_path: Path, tok_dir: str) -> TextDataModule:
    dm = TextDataModule(files=str(tmp_path / "corpus"), tokenizer=tok_dir, seq_len=16, batch_size=4,
                        val_fraction=0.05, num_workers=0, cache_dir=str(tmp_path / "cache"))
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture
def shards(tmp_path, tok_dir, monkeypatch):
    """A cache of five 700-token shards (the last one in the second source): (its folder, its index, the data module)."""
    monkeypatch.setattr(build, "SHARD_TOKENS", 700)
    write_records(tmp_path / "corpus" / "a.jsonl", documents(60, seed=1))
    (tmp_path / "corpus" / "b.txt").write_text("".join(documents(30, seed=3)))
    dm = open_cache(tmp_path, tok_dir)
    folder = Path(dm.store.corpus.folder)
    index = json.loads((folder / "index.json").read_text())
    assert len(index["shards"]) >= 3
    return folder, index, dm


def new_launch(folder: Path) -> None:
    """What a new run finds: no record that this launch verified the cache."""
    for stamp in folder.parent.glob(f"{folder.name}.verified-*"):
        stamp.unlink()


def test_each_shard_carries_its_digest_and_largest_id(shards):
    folder, index, _ = shards
    for entry in index["shards"]:
        path = folder / entry["file"]
        assert entry["digest"] == file_digest(path)
        assert entry["max_id"] == int(np.fromfile(path, dtype=index["dtype"]).max())
        assert verify.verify_shard(folder, entry)


@pytest.mark.parametrize("k", [1, -1])  # one that starts inside a document; the last, of the second source
def test_a_token_off_by_one_is_caught_and_the_shard_rebuilt(shards, tmp_path, tok_dir, capfd, k):
    folder, index, dm = shards
    stream = dm.token_cache.read(0, dm.n_tokens)
    path = folder / index["shards"][k]["file"]
    before = path.read_bytes()
    flip(path, len(before) // 2, word=2, xor=1)  # four token ids, each off by one
    assert np.count_nonzero(np.fromfile(path, np.uint16) != np.frombuffer(before, np.uint16)) == 4
    assert not verify.verify_shard(folder, index["shards"][k], index)
    new_launch(folder)
    capfd.readouterr()
    dm = open_cache(tmp_path, tok_dir)
    warned = [line for line in capfd.readouterr().err.splitlines() if "damaged" in line]
    assert len(warned) == 1 and str(path) in warned[0] and "rebuilding" in warned[0]
    assert path.read_bytes() == before
    assert np.array_equal(dm.token_cache.read(0, dm.n_tokens), stream)


def test_a_shard_that_cannot_be_rebuilt_is_one_line_and_left_as_it_is(shards, tmp_path, tok_dir):
    folder, index, _ = shards
    # The sources no longer give these bytes: what a changed or unreachable source looks like.
    index["shards"][2]["digest"] = "xxh3_128:" + "0" * 32
    (folder / "index.json").write_text(json.dumps(index))
    path = folder / index["shards"][2]["file"]
    before = path.read_bytes()
    new_launch(folder)
    with pytest.raises(DataError) as e:
        open_cache(tmp_path, tok_dir)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "delete" in message
    assert path.read_bytes() == before
    assert not list(folder.glob("*.tmp"))


def test_a_cache_open_verifies_once_per_launch(shards, tmp_path, tok_dir, monkeypatch):
    folder, _, _ = shards
    scanned = []
    scan = verify.scan_shard
    monkeypatch.setattr(verify, "scan_shard", lambda path, dtype: scanned.append(path) or scan(path, dtype))
    open_cache(tmp_path, tok_dir)  # another process of this launch: the stamp says it is done
    assert scanned == []
    new_launch(folder)
    open_cache(tmp_path, tok_dir)
    assert len(scanned) == len(list(folder.glob("shard-*.bin")))


def test_a_stamp_left_by_an_earlier_launch_does_not_hide_a_damaged_shard(shards, tmp_path, tok_dir, capfd):
    folder, index, dm = shards
    stream = dm.token_cache.read(0, dm.n_tokens)
    (stamp,) = folder.parent.glob(f"{folder.name}.verified-*")
    earlier = {**json.loads(stamp.read_text()), "began": verify._process_start() - 3600}
    stamp.write_text(json.dumps(earlier))  # what the last run left: it verified, then ended
    path = folder / index["shards"][1]["file"]
    flip(path, 100, word=2, xor=1)  # size, inode and modification time kept: the stamp's files still match
    capfd.readouterr()
    dm = open_cache(tmp_path, tok_dir)
    assert f"token cache shard {path} is damaged" in capfd.readouterr().err
    assert np.array_equal(dm.token_cache.read(0, dm.n_tokens), stream)


def test_shards_listed_without_digests_get_them_once(shards, tmp_path, tok_dir):
    folder, index, _ = shards
    for entry in index["shards"]:
        del entry["digest"], entry["max_id"]
    (folder / "index.json").write_text(json.dumps(index))
    new_launch(folder)
    open_cache(tmp_path, tok_dir)
    upgraded = json.loads((folder / "index.json").read_text())
    assert [e["digest"] for e in upgraded["shards"]] == [file_digest(folder / e["file"]) for e in index["shards"]]


def test_a_token_id_outside_the_vocabulary_is_refused_naming_the_shard(shards):
    folder, index, _ = shards
    top = max(e["max_id"] for e in index["shards"])
    worst = next(e for e in index["shards"] if e["max_id"] == top)
    TokenCache(folder).check_ids(top + 1)
    with pytest.raises(DataError, match=str(folder / worst["file"])):
        TokenCache(folder).check_ids(top)


# ---- checkpoints


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    """A 4-step tiny run, checkpoints at steps 2 and 4, validating every 3 steps."""
    root = tmp_path_factory.mktemp("run")
    corpus, tok = data
    assert fit(fitutil.fit_args(root, corpus, tok, 4, every=2, extra=["--trainer.val_check_interval", "3"])) == 0
    return root


def tensor_offset(path: Path, tensor: torch.Tensor) -> int:
    """Where `tensor`'s bytes begin in the checkpoint file: the zip member that holds them, past
    its local header (torch.save stores members uncompressed)."""
    data = tensor.contiguous().numpy().tobytes()
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size >= len(data) and data in z.read(info):
                f.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", f.read(4))
                return info.header_offset + 30 + name_len + extra_len + z.read(info).index(data)
    raise AssertionError("tensor not found in the checkpoint")


def damaged_copy(run: Path, tmp_path: Path, what: str) -> tuple[Path, Path, float]:
    """A copy of the run's checkpoints whose newest has a few floats of `what` ("weights" or
    "optimizer") moved: (the damaged file, the intact step-2 one, the largest relative change)."""
    folder = tmp_path / "checkpoints" / "tiny"
    shutil.copytree(run / "checkpoints" / "tiny", folder, symlinks=True)
    path = folder / "step=000004.ckpt"
    ckpt = torch.load(path, weights_only=True)
    tensor = (ckpt["state_dict"]["model.embed_tokens.weight"] if what == "weights"
              else ckpt["optimizer_states"][0]["state"][0]["exp_avg_sq"])
    flat = tensor.flatten()
    middle = flat.numel() // 2
    flip(path, tensor_offset(path, tensor) + 4 * middle, word=4, xor=0xFF)
    after = torch.load(path, weights_only=True)
    moved = (after["state_dict"]["model.embed_tokens.weight"] if what == "weights"
             else after["optimizer_states"][0]["state"][0]["exp_avg_sq"]).flatten()
    changed = (moved != flat).nonzero().flatten()
    assert len(changed) == 4
    change = ((moved[changed] - flat[changed]).abs() / flat[changed].abs()).max().item()
    return path, folder / "step=000002.ckpt", change


def test_every_checkpoint_carries_its_digest(run):
    folder = run / "checkpoints" / "tiny"
    for step in ("000002", "000004"):
        sidecar = json.loads((folder / f"step={step}.ckpt.digest").read_text())
        assert sidecar == {"digest": file_digest(folder / f"step={step}.ckpt"),
                           "size": (folder / f"step={step}.ckpt").stat().st_size}


@pytest.mark.parametrize("what", ["weights", "optimizer"])
def test_a_float_moved_by_1e5_is_caught_naming_the_newest_intact(run, tmp_path, what):
    path, intact, change = damaged_copy(run, tmp_path, what)
    assert 1e-7 < change < 1e-4  # the smallest damage: nothing a non-finite check would ever see
    with pytest.raises(DamagedCheckpointError) as e:
        read_checkpoint(path)
    assert str(path) in str(e.value) and str(intact) in str(e.value) and "\n" not in str(e.value)


def test_an_older_checkpoint_without_digest_is_named_as_unverified_not_intact(run, tmp_path):
    path, older, _ = damaged_copy(run, tmp_path, "weights")
    os.remove(str(older) + ".digest")
    with pytest.raises(DamagedCheckpointError) as e:
        read_checkpoint(path)
    assert str(older) in str(e.value) and "unverified" in str(e.value) and "intact" not in str(e.value)


def test_every_reader_refuses_a_damaged_checkpoint_in_one_line(run, data, tmp_path, capsys):
    from smollm.convert import main as convert
    from smollm.evaluate import main as evaluate
    from smollm.generate import main as generate

    path, intact, _ = damaged_copy(run, tmp_path, "weights")
    corpus, tok = data
    commands = {
        "fit --ckpt_path": lambda: fit(fitutil.fit_args(tmp_path, corpus, tok, 6, every=2,
                                                        extra=["--ckpt_path", str(path)])),
        "fit --model.init_from": lambda: fit(fitutil.fit_args(tmp_path / "other", corpus, tok, 2, extra=[
            "--model.init_from", str(path)])),
        "generate": lambda: generate(["--checkpoint", str(path), "--prompt", "the", "--max_new_tokens", "1"]),
        "evaluate": lambda: evaluate(["--checkpoint", str(path)]),
        "convert": lambda: convert(["ckpt", str(path), str(tmp_path / "hf")]),
    }
    for name, command in commands.items():
        capsys.readouterr()
        assert command() == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: checkpoint") and str(path) in err[0], (name, err)
        assert str(intact) in err[0], name


def test_resume_from_last_stops_at_a_damaged_newest_file_naming_the_intact_one(run, data, tmp_path, capsys):
    path, intact, _ = damaged_copy(run, tmp_path, "optimizer")
    corpus, tok = data
    shutil.copytree(run / "lightning_logs", tmp_path / "lightning_logs")
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    capsys.readouterr()
    assert fit(fitutil.fit_args(tmp_path, corpus, tok, 5, every=2, extra=["--ckpt_path", "last"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint") and "damaged" in err[0]
    assert str(path) in err[0] and str(intact) in err[0]
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before  # nothing saved is touched


def test_a_checkpoint_without_digest_loads_with_one_note(run, tmp_path, capsys):
    from smollm.generate import main as generate

    path = tmp_path / "foreign.ckpt"
    shutil.copy(run / "checkpoints" / "tiny" / "step=000004.ckpt", path)
    capsys.readouterr()
    assert generate(["--checkpoint", str(path), "--prompt", "the", "--max_new_tokens", "1"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "digest" in line]
    assert len(notes) == 1 and notes[0].startswith("note:") and str(path) in notes[0]


# ---- every run ends on a validation of what it saved


def validations(err: str) -> list[str]:
    return [line.split(":")[0] for line in err.splitlines() if line.startswith("validation at")]


def test_a_run_and_its_resume_end_on_a_validation_of_their_last_step(run, data, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    corpus, tok = data
    root = tmp_path / "r"
    shutil.copytree(run, root, symlinks=True)
    capsys.readouterr()
    assert fit(fitutil.fit_args(root, corpus, tok, 7, every=2, extra=[
        "--ckpt_path", "last", "--trainer.val_check_interval", "3"])) == 0
    captured = capsys.readouterr()
    # The first run (4 steps, interval 3) validated at steps 3 and 4; the resume at 6 and at its end, 7.
    assert validations(captured.err) == ["validation at step 6", "validation at step 7"]
    final = next(line for line in captured.out.splitlines() if line.startswith("done:"))
    assert "(step 7)" in final
    acc = EventAccumulator(str(root / "lightning_logs" / "tiny" / "version_0"))
    acc.Reload()
    logged = acc.Scalars("val/loss")  # steps 3, 4, 6, 7 (Lightning labels them 2, 3, 5, 6)
    assert len(logged) == 4 and logged[-1].step == max(e.step for e in logged)
    last = float(captured.err.split("validation at step 7: loss ")[1].split(",")[0])
    assert logged[-1].value == pytest.approx(last, abs=1e-4)


# ---- evaluate says what it scores


def test_evaluate_scores_at_the_trained_seq_len_and_describes_those_windows(run, data, tmp_path, capsys):
    from smollm.evaluate import main as evaluate

    corpus, _ = data
    out = tmp_path / "s.json"
    capsys.readouterr()
    assert evaluate(["--checkpoint", str(run / "checkpoints" / "tiny" / "last.ckpt"), "--data.files",
                     str(corpus / "doc1.txt"), "--data.cache_dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["seq_len"] == 16  # what the run trained on (fitutil: --data.seq_len 16), not the 2048 default
    line = capsys.readouterr().out.splitlines()[0]
    assert line == report["data"] and "train windows" not in line
    assert f"scoring all of its text: {report['windows']:,} windows of 16 tokens" in line
