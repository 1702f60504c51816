"""Documents -> packed windows: whole conversations placed into rows of seq_len + 1 tokens, with
their boundaries and loss masks (the batch contract: input_ids, loss_mask, document_ids).

- `fit_lengths`: what to do with a document longer than a window (`--data.overlong`): truncate it
  to the window (the default), drop it, or refuse it.
- `pack_bfd`: best-fit decreasing, as TRL's SFTTrainer packs: documents, longest first (ties in
  document order), each into the window whose free space is the smallest that holds it, else into
  a new window. A pure function of the lengths and the window size: the same windows every time.
  Which window a step trains on is the seeded, resumable order of smollm.data.windows.
- `pack_row`: one window's documents -> its row: input_ids (L + 1), loss_mask (L, aligned with the
  targets input_ids[1:]), document_ids (L, aligned with the inputs input_ids[:-1]: 0, 1, ... per
  document in the row, and padding at the end an id of its own); padding carries no loss, and no
  document's first token does (it would be predicted from the document before it).
- `PackedWindows`: the Dataset that reads a window's documents from the token cache.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from smollm.data.cache import TokenCache
from smollm.errors import DataError

OVERLONG = ("truncate", "drop", "error")


def fit_lengths(lengths: np.ndarray, capacity: int, overlong: str) -> tuple[np.ndarray, np.ndarray]:
    """(lengths as packed, the documents longer than `capacity`): truncated to `capacity`, or (drop)
    set to 0, which `pack_bfd` leaves out. "error" leaves them for the caller to refuse."""
    lengths = np.asarray(lengths, dtype=np.int64)
    over = np.flatnonzero(lengths > capacity)
    if overlong not in OVERLONG:
        raise DataError(f"overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
    used = lengths.copy()
    used[over] = 0 if overlong == "drop" else capacity
    return used, over


def pack_bfd(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: (order, bounds), where window w holds the documents
    order[bounds[w]:bounds[w + 1]] (in the order placed). Documents of length 0 are left out; every
    other one must fit (length <= capacity)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a document of {int(lengths.max())} tokens does not fit a window of {capacity}")
    docs = np.argsort(-lengths, kind="stable")
    docs = docs[lengths[docs] > 0]
    spaces: list[int] = []  # the distinct free spaces of open windows, sorted
    holding: dict[int, list[int]] = {}  # free space -> the windows that have it
    contents: list[list[int]] = []
    for d in docs.tolist():
        n = int(lengths[d])
        k = bisect.bisect_left(spaces, n)
        if k < len(spaces):  # the tightest window that holds it (of those, the last one opened)
            space = spaces[k]
            w = holding[space].pop()
            if not holding[space]:
                del holding[space]
                spaces.pop(k)
        else:
            space, w = capacity, len(contents)
            contents.append([])
        contents[w].append(d)
        left = space - n
        if left > 0:
            if left not in holding:
                holding[left] = []
                bisect.insort(spaces, left)
            holding[left].append(w)
    bounds = np.zeros(len(contents) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in contents], out=bounds[1:])
    order = np.fromiter((d for c in contents for d in c), dtype=np.int64, count=int(bounds[-1]))
    return order, bounds


def pack_row(pieces: list[tuple[np.ndarray, np.ndarray]], capacity: int,
             pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (capacity,), loss_mask (capacity - 1,), document_ids (capacity - 1,)) of one
    window holding `pieces`, each (ids, mask) of one document, mask[j] saying whether token j
    carries loss as a target. The row is padded at its end with `pad_id`."""
    ids = np.full(capacity, pad_id, dtype=np.int64)
    mask = np.zeros(capacity, dtype=bool)
    doc = np.full(capacity, len(pieces), dtype=np.int64)
    at = 0
    for j, (tokens, loss) in enumerate(pieces):
        n = len(tokens)
        if at + n > capacity:
            raise ValueError(f"documents of {at + n} tokens do not fit a window of {capacity}")
        ids[at:at + n] = tokens
        mask[at:at + n] = loss
        mask[at] = False  # a document's first token is never predicted from the one before
        doc[at:at + n] = j
        at += n
    return torch.from_numpy(ids), torch.from_numpy(mask[1:]), torch.from_numpy(doc[:-1])


class PackedWindows(Dataset):
    """Packed window `ids[k]` of a chat cache, as one row of the batch contract: {"input_ids"
    (L + 1,), "loss_mask" (L,), "document_ids" (L,), "index": the window's id, "n_bytes": the UTF-8
    bytes that its loss-carrying targets stand for}. Document d spans tokens [starts[d], starts[d] +
    lengths[d]) of the cache (its length as packed: a truncated one is cut)."""

    def __init__(self, cache: TokenCache, seq_len: int, starts: np.ndarray, lengths: np.ndarray,
                 order: np.ndarray, bounds: np.ndarray, ids: range, pad_id: int) -> None:
        self.cache, self.seq_len, self.starts, self.lengths = cache, seq_len, starts, lengths
        self.order, self.bounds, self.ids, self.pad_id = order, bounds, ids, pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def documents(self, window: int) -> np.ndarray:
        return self.order[self.bounds[window]:self.bounds[window + 1]]

    def __getitem__(self, k: int) -> dict[str, Any]:
        window = self.ids[k]
        pieces, n_bytes = [], 0
        for d in self.documents(window).tolist():
            a = int(self.starts[d])
            b = a + int(self.lengths[d])
            tokens = self.cache.read(a, b)
            loss = self.cache.loss_mask(a, b)
            pieces.append((tokens, loss))
            if loss.any():
                counts = (self.cache.byte_table[tokens] if self.cache.byte_table is not None
                          else self.cache.read(a, b, counts=True))
                n_bytes += int(counts[loss].sum(dtype=np.int64))
        input_ids, loss_mask, document_ids = pack_row(pieces, self.seq_len + 1, self.pad_id)
        return {"input_ids": input_ids, "loss_mask": loss_mask, "document_ids": document_ids, "index": window,
                "n_bytes": n_bytes}
