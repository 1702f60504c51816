"""Preference pairs -> batches (`--data.format preference`, DPO): each pair of a preference cache as
its chosen and rejected sequences, fitted to a window, and a micro-batch of pairs as one padded batch.

- `pair_table`: where each pair's two sides lie in the token cache (smollm.data.cache: a pair is one
  document, its chosen side, then its rejected side, whose first token is flagged SPLIT).
- `fit_pairs`: what to do with a side longer than a window of seq_len + 1 tokens (`--data.overlong`):
  truncate it (the pair is dropped if a side keeps no reply token), drop the pair, or refuse it.
- `PreferencePairs`: the Dataset of pairs; `PadPairs`: its collate. A batch of P pairs extends the
  batch contract: "input_ids" (2P, T + 1), the P chosen sequences, then the P rejected ones (TRL's
  order), each padded at its end to the longest of the micro-batch; "loss_mask" (2P, T), aligned with
  the targets input_ids[:, 1:], marks the reply tokens (padding carries none); "index" (P,), the
  pairs' numbers in the cache (the key of precomputed reference log-probabilities). No
  "document_ids": one sequence per row, right-padded, so causal attention is all it needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from smollm.data.cache import TokenCache
from smollm.errors import DataError

CHOSEN, REJECTED = 0, 1


def pair_table(cache: TokenCache) -> np.ndarray:
    """(n_pairs, 2, 2) int64: for pair k and side s (CHOSEN, REJECTED), its [start, length] in the stream."""
    starts, _ = cache.documents()
    splits = cache.splits()
    if len(splits) != len(starts) or not np.all((starts < splits) & (splits < np.append(starts[1:], cache.n_tokens))):
        raise DataError(f"{cache.folder} is not a cache of preference pairs (each document a chosen and a rejected "
                        "side); build it with --data.format preference")
    ends = np.append(starts[1:], cache.n_tokens)
    table = np.empty((len(starts), 2, 2), dtype=np.int64)
    table[:, CHOSEN] = np.stack([starts, splits - starts], axis=1)
    table[:, REJECTED] = np.stack([splits, ends - splits], axis=1)
    return table


def fit_pairs(cache: TokenCache, table: np.ndarray, capacity: int, overlong: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(lengths as used (n_pairs, 2), the pairs with a side longer than `capacity`, how many of those
    truncation emptied): "truncate" cuts a side to its first `capacity` tokens and drops the pair
    (lengths 0) if a side is left with no reply token; "drop" drops it; "error" leaves it to the caller."""
    lengths = table[:, :, 1].copy()
    over = np.flatnonzero((lengths > capacity).any(axis=1))
    emptied = 0
    for k in over.tolist():
        if overlong == "drop":
            lengths[k] = 0
        elif overlong == "truncate":
            lengths[k] = np.minimum(lengths[k], capacity)
            if not all(cache.loss_mask(int(a), int(a) + capacity)[1:].any() for a in table[k, :, 0]):
                lengths[k], emptied = 0, emptied + 1
    return lengths, over, emptied


class PreferencePairs(Dataset):
    """Pair `pairs[i]` of a preference cache: {"chosen" (n,), "chosen_mask" (n - 1,), "rejected" (m,),
    "rejected_mask" (m - 1,), "index": the pair's number}, each side's tokens as `lengths` cut them and
    the mask over its targets (its reply tokens)."""

    def __init__(self, cache: TokenCache, table: np.ndarray, lengths: np.ndarray, pairs: np.ndarray) -> None:
        self.cache, self.table, self.lengths, self.pairs = cache, table, lengths, np.asarray(pairs, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = int(self.pairs[i])
        item: dict[str, Any] = {"index": k}
        for side, name in ((CHOSEN, "chosen"), (REJECTED, "rejected")):
            a = int(self.table[k, side, 0])
            b = a + int(self.lengths[k, side])
            item[name] = torch.from_numpy(self.cache.read(a, b).astype(np.int64))
            item[f"{name}_mask"] = torch.from_numpy(self.cache.loss_mask(a, b)[1:])
        return item


class PadPairs:
    """The collate of preference pairs: see the module's docstring."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [(item[side], item[f"{side}_mask"]) for side in ("chosen", "rejected") for item in items]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        loss_mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
        for r, (ids, mask) in enumerate(rows):
            input_ids[r, :len(ids)] = ids
            loss_mask[r, :len(mask)] = mask
        return {"input_ids": input_ids, "loss_mask": loss_mask,
                "index": torch.tensor([item["index"] for item in items], dtype=torch.int64)}
