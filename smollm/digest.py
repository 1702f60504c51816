"""Digests of files, to catch silent damage (a flipped bit, a partial copy, stale blocks).

One algorithm, named inside every digest string: xxHash's XXH3-128 (the `xxhash` package, which
`datasets` already depends on), at several GB/s on one core. A digest is computed in the same
streaming pass that writes the bytes (`HashingWriter`), and verified by one streaming read
(`file_digest`): never a second copy of a file in memory.

    "xxh3_128:<32 hex digits>"
"""

from __future__ import annotations

import os
from typing import Any, BinaryIO, Callable

import xxhash

ALGORITHM = "xxh3_128"
CHUNK = 1 << 23  # 8 MiB per read: large enough for full speed, small enough to never matter


class Hasher:
    """Incremental digest: `update(bytes)` as the data goes by, `digest()` at the end."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)

    def digest(self) -> str:
        return f"{ALGORITHM}:{self._h.hexdigest()}"


class HashingWriter:
    """A write-only file object that hashes every byte on its way to `f` (sequential writes only:
    a seek would make the digest describe other bytes, so it is refused)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.hasher = Hasher()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.size += len(view)
        return self.f.write(view)

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:  # for os.fsync by whoever writes through it
        return self.f.fileno()

    def tell(self) -> int:
        return self.size

    def seekable(self) -> bool:
        return False

    def digest(self) -> str:
        return self.hasher.digest()


def file_digest(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    """The digest of a file's bytes, read once in chunks."""
    h = Hasher()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.digest()


def state_digest(module: Any, skip: Callable[[str], bool] | None = None) -> str:
    """The digest of a module's weights: every state-dict entry (but those `skip` names) by name,
    dtype, shape and bytes, in name order: the same weights give the same digest whatever file they
    were read from."""
    import torch

    h = Hasher()
    for key, value in sorted(module.state_dict().items()):
        if skip is not None and skip(key):
            continue
        t = value.detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.digest()
