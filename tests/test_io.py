"""The ground floor's writes: whole or not at all, and nothing left behind."""

from __future__ import annotations

import json

import pytest

from smollm.io import atomic_file, write_json_atomic


def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "index.json"
    write_json_atomic(path, {"shards": [1, 2]})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"shards": [1, 2, 3], "bad": object()})  # fails inside json.dump
    assert json.loads(path.read_text()) == {"shards": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]


def test_an_interrupt_inside_the_block_keeps_the_old_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_file(path) as f:
        f.write(b"half of the new")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def test_a_finished_write_replaces_the_file_and_creates_its_folder(tmp_path):
    path = tmp_path / "new" / "folder" / "a.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]
