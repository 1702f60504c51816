"""Verifying a token cache: every shard against the digest written with it, once per launch.

Each shard's index entry holds its digest (`smollm.digest`, computed as the shard is written: no
second read) and its largest token id. Opening a cache verifies every shard (`check_shards`: one
streaming read, on threads); the store rebuilds a damaged one from its sources or downloads it
again (`smollm.data.store`). `verify_shard` is the one check of a shard against its entry, for
whoever copies shards (downloads included).

The first process of a launch on a machine verifies and leaves a stamp beside the cache folder
(`stamp_verified`); the other ranks of the node find it (`verified_in_this_launch`) and read
nothing. A new run verifies again.
"""

from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from smollm.data.cache import INDEX, cpu_count, read_index, shard_size
from smollm.digest import CHUNK, Hasher
from smollm.io import write_json_atomic
from smollm.output import note


def scan_shard(path: Path, dtype: np.dtype, tokens: int | None = None) -> tuple[str, int]:
    """(digest, largest token id) of a shard file, in one streaming read; the ids are its first
    `tokens` items (default: all of it)."""
    hasher, largest, at = Hasher(), -1, 0
    end = None if tokens is None else tokens * dtype.itemsize
    buf = bytearray(CHUNK - CHUNK % dtype.itemsize)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            hasher.update(view[:n])
            ids = n if end is None else max(0, min(n, end - at))
            if ids >= dtype.itemsize:
                largest = max(largest, int(np.frombuffer(buf, dtype, ids // dtype.itemsize).max()))
            at += n
    return hasher.digest(), largest


def verify_shard(folder: str | os.PathLike, entry: dict[str, Any], index: dict[str, Any] | None = None) -> bool:
    """Whether shard `entry` of index.json (its "file", "tokens", "digest") is intact in `folder`:
    the right size and the recorded digest, in one streaming read. An entry without a digest (a
    cache built before shards had one) checks the size only. `index` defaults to the folder's."""
    path = Path(folder) / entry["file"]
    if index is None:
        index = read_index(Path(folder)) or {"dtype": "uint16"}
    if not path.is_file() or path.stat().st_size != shard_size(index, entry):
        return False
    return "digest" not in entry or scan_shard(path, np.dtype(index["dtype"]))[0] == entry["digest"]


def check_shards(folder: str | os.PathLike, index: dict[str, Any], threads: int | None = None) -> list[int]:
    """Verify every shard of a complete cache (one streaming read each, `threads` at a time: the
    hash and the reads release the GIL); return the positions of the damaged ones. Shards listed
    without a digest get one recorded here (and their largest id), once, with a note: what they
    hold now is trusted from then on."""
    folder, dtype = Path(folder), np.dtype(index["dtype"])
    shards = index["shards"]

    def check(k: int) -> bool:
        entry = shards[k]
        if not verify_shard(folder, entry, index):  # the size, and the digest where there is one
            return False
        if "digest" not in entry:
            entry["digest"], entry["max_id"] = scan_shard(folder / entry["file"], dtype, entry["tokens"])
        return True

    legacy = [k for k, e in enumerate(shards) if "digest" not in e]
    workers = max(1, min(threads or min(8, cpu_count()), len(shards)))
    with ThreadPoolExecutor(workers) as pool:
        ok = list(pool.map(check, range(len(shards))))
    if legacy:
        note(f"token cache {folder} was built before shards carried digests; recorded them now for the shards as "
             "they are", every_rank=True)
        write_json_atomic(folder / INDEX, index)
    return [k for k, good in enumerate(ok) if not good]


def _process_start() -> float:
    """When this process started (wall clock), from Linux's /proc; else when this module loaded."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _LOADED


_LOADED = time.time()


def _stamp_path(folder: Path) -> Path:
    """Beside the cache folder, as its lock is: the folder holds only what its mirror holds."""
    return folder.parent / f"{folder.name}.verified-{socket.gethostname()}.json"


def _stat_signature(folder: Path, index: dict[str, Any]) -> dict[str, list[int]]:
    signature = {}
    for entry in index["shards"]:
        st = (folder / entry["file"]).stat()
        signature[entry["file"]] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return signature


def verified_in_this_launch(folder: Path, index: dict[str, Any]) -> bool:
    """Whether a process of this launch on this machine has verified the cache already: its stamp
    began after this process started and the shards are the same files. The ranks of one node
    then read the shards once, not once each; a new run verifies again."""
    try:
        stamp = json.loads(_stamp_path(folder).read_text())
        return stamp["began"] >= _process_start() - 1.0 and stamp["shards"] == _stat_signature(folder, index)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def stamp_verified(folder: Path, index: dict[str, Any], began: float) -> None:
    write_json_atomic(_stamp_path(folder), {"began": began, "shards": _stat_signature(folder, index)})



def verified_here(folder: Path) -> bool:
    """Whether the cache in `folder` is complete and a process of this launch on this machine has
    verified it."""
    index = read_index(folder)
    return bool(index and index.get("complete")) and verified_in_this_launch(folder, index)
