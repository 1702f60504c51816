"""The ground floor of what smollm writes and reads on disk.

A file is written to a temporary name beside its place, flushed to the disk, and renamed into
place; then its folder is flushed, so the rename survives a power loss. A process killed midway
leaves at worst a stray `*.tmp`, never a truncated file. A torch file is read with
`weights_only=True`: tensors and plain values, never code.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Any

import torch

from smollm.errors import UnsafeFileError, UsageError


def tmp_path(path: str | os.PathLike) -> str:
    """A temporary name beside `path`, unique to this process."""
    return f"{os.fspath(path)}.{os.getpid()}.tmp"


def fsync_file(f: IO[Any]) -> None:
    """Flush a file that is open for writing down to the disk."""
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to the disk; a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_durably(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a written and flushed `tmp` onto `path`, and flush the folder that holds it."""
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside `path` for writing; when the block ends without an error, flush
    it to the disk and rename it into place. On an error the temporary file is removed and `path`
    is untouched."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = tmp_path(path)
    try:
        with open(tmp, mode) as f:
            yield f
            fsync_file(f)
        replace_durably(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[str]:
    """A temporary folder beside `path` to fill (yielded, not yet created); when the block ends
    without an error it takes the place of `path`, replacing a half-made or damaged one. If another
    process puts its own there first, theirs stays. On an error `path` is untouched."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}-") as tmp:
        staged = os.path.join(tmp, os.path.basename(path))
        yield staged
        shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(staged, path)
        except OSError:  # another process put its own there in between
            if not os.path.isdir(path):
                raise
        fsync_dir(os.path.dirname(path))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as JSON, atomically (see `atomic_file`)."""
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=1)


def load_torch_file(path: str | os.PathLike, mmap: bool = False) -> Any:
    """torch.load with weights_only=True: tensors and plain Python values only. A file whose
    pickle asks for anything else (code that would run on loading) is refused in one line."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise
        unsafe = re.search(r"GLOBAL ([\w.]+ [\w.]+|[\w.]+)", str(e))
        what = f" ({unsafe.group(1)})" if unsafe else ""
        raise UnsafeFileError(f"{path} holds Python objects other than tensors and plain values{what}, which "
                              "could run code when loaded; refused") from None


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Create `folder` if needed and write a file in it, or raise one line saying which folder."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to {what} {folder} ({e.strerror or e}); choose a writable "
                         "folder (--trainer.default_root_dir, --checkpoint.dirpath)") from None


__all__ = ["atomic_file", "check_writable", "fsync_dir", "fsync_file", "load_torch_file", "replace_durably",
           "tmp_path", "write_json_atomic"]

