"""The token stream -> fixed-length windows, the held-out validation tail, and the training order,
a pure function of (seed, global sample index). How one optimizer step splits over processes is
smollm.batch's (`BatchPlan`).

Window i of a split spans tokens [start + i*L, start + i*L + L] of the stream (L = seq_len): the
model's inputs and the shifted targets in one row of L + 1 tokens. The stream is the token cache
read as one sequence (`TokenCache`), so a window may span two shards.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from smollm.data.cache import TokenCache
from smollm.errors import DataError


def split_windows(n_tokens: int, seq_len: int, val_fraction: float) -> tuple[int, int, int]:
    """(n_train, n_val, val_start): train windows from token 0, validation windows from val_start.

    Validation is the tail of the stream, val_fraction of the tokens rounded to whole windows (at
    least one). Train window i spans tokens [i*L, i*L + L] and validation window j spans
    [val_start + j*L, val_start + j*L + L], and the last train window ends before val_start, so
    no token is in both. Each window has seq_len + 1 tokens: inputs plus the shifted target.
    """
    n_val = max(1, round(val_fraction * n_tokens / seq_len))
    need = (n_val + 1) * seq_len + 2
    if n_tokens < need:
        raise DataError(
            f"the corpus has {n_tokens:,} tokens but {need:,} are needed for one training window and "
            f"{n_val} validation window(s) of seq_len {seq_len}; add text to --data.files or lower "
            "--data.seq_len")
    val_start = n_tokens - n_val * seq_len - 1
    n_train = (val_start - 1) // seq_len
    return n_train, n_val, val_start


class TokenWindows(Dataset):
    """Window k is tokens[start + ids[k] * seq_len : ... + seq_len + 1] of `cache` as int64, with
    its id and the UTF-8 bytes of text that its targets (all its tokens but the first) stand for:
    {"input_ids": LongTensor (seq_len + 1,), "index": ids[k], "n_bytes": int}.

    With `stop`, no window reads past token stop - 1, so the last one may be shorter (at least
    two tokens): that is how `TextDataModule.corpus_windows` covers every token.
    """

    def __init__(self, cache: TokenCache, seq_len: int, start: int, ids: range, stop: int | None = None) -> None:
        self.cache, self.seq_len, self.start, self.ids = cache, seq_len, start, ids
        self.stop = len(cache) if stop is None else stop
        self.dtype = cache.dtype

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int) -> dict[str, Any]:
        window = self.ids[k]
        begin = self.start + window * self.seq_len
        stop = min(begin + self.seq_len + 1, self.stop)
        row = self.cache.read(begin, stop)
        n_bytes = self.cache.n_bytes(begin + 1, stop, row[1:])
        return {"input_ids": torch.from_numpy(row.astype(np.int64)), "index": window, "n_bytes": n_bytes}


# ------------------------------------------------------------------------------------------------
# The training order: a pure function of (seed, step)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}".encode()).digest()[:8], "little")


class ResumableSampler(Sampler[int]):
    """Endless window ids for one rank; the order depends only on (seed, global sample index).

    Global sample g is window perm_e[g % n_windows] of epoch e = g // n_windows, where perm_e is
    torch.randperm(n_windows) seeded by (seed, e): every window once per epoch, a fresh shuffle
    each epoch. Iteration starts at global sample `start`; the k-th micro-batch after it, on rank
    r of world_size ranks (batch_size each), is global samples start + (k*W + r)*B ... + B-1. So
    ranks never share a sample, and an optimizer step of A micro-batches takes the next A*B*W
    samples in a block: with the same global batch, any (world size, micro-batch, accumulation)
    trains on the same samples at each step, which is what lets a run resume on another number
    of processes. There is no __len__ on purpose, so Lightning trains until max_steps.
    """

    def __init__(self, n_windows: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, start: int = 0) -> None:
        if n_windows <= 0 or batch_size <= 0 or not 0 <= rank < world_size or start < 0:
            raise ValueError(f"bad sampler arguments: n_windows={n_windows} batch_size={batch_size} "
                             f"rank={rank} world_size={world_size} start={start}")
        self.n_windows, self.batch_size, self.seed = n_windows, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self._epoch, self._perm = -1, []

    def window(self, g: int) -> int:
        """The window id of global sample g."""
        epoch, i = divmod(g, self.n_windows)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n_windows, generator=generator).tolist()
        return self._perm[i]

    def __iter__(self) -> Iterator[int]:
        B, W = self.batch_size, self.world_size
        first = self.start + self.rank * B
        while True:
            for g in range(first, first + B):
                yield self.window(g)
            first += B * W

