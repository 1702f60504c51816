"""The token cache's format, and reading it: a cache folder read as one stream of token ids.

A cache is a folder `<cache_dir>/tokens/<key>/` named by a hash of everything that decides its
tokens (`cache_key`). It holds shards `shard-000000.bin`, ... of exactly `shard_tokens` token ids
each (the last one fewer) and `index.json`, which lists the complete shards. Each shard is written
to a temporary file, flushed to disk and renamed into place, and only then listed; with it the
index records where the next shard starts in the sources, so a build killed at any moment starts
again from its last complete shard (`smollm.data.build`). Each shard's entry also holds its digest,
checked by `smollm.data.verify`.

A chat cache (`--data.format chat`, smollm.data.chat) stores one more byte per token after the
rest of a shard (`flags_dtype` in the index): whether the token carries loss, and whether it starts
a conversation; conversations follow one another with no EOS between them. A preference cache
(`--data.format preference`) is a chat cache whose documents are pairs: the chosen side, then the
rejected side, whose first token is flagged too.

Bits per byte needs the UTF-8 bytes of text that each token stands for, in context. For a
byte-level BPE with no normalizer that is a property of the token id: the index holds the table
(`byte_table`). For any other tokenizer (SentencePiece-style: a "▁" is one space, or none at the
start of a document; byte-fallback tokens are one byte each; a normalizer may change the text),
the builder measures each token's bytes from its offsets in the text and the shard stores those
counts after its tokens (`bytes_dtype` in the index), covered by the same digest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from smollm.errors import DataError

# Bump when the cache layout or the tokenization rule changes (3: special-token strings are text, a
# leading BOM is dropped, a max_tokens cut ends with EOS, byte counts in context).
FORMAT_VERSION = 3
INDEX = "index.json"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the token ids: the tokenizer's full JSON (vocab, merges, rules) + EOS."""
    spec = tokenizer.backend_tokenizer.to_str() + f"\neos={tokenizer.eos_token_id}"
    return hashlib.sha256(spec.encode()).hexdigest()


def byte_tokens(tokenizer: Any) -> tuple[bool, np.ndarray, np.ndarray]:
    """(byte-level, own, part): whether the tokenizer is a byte-level BPE; for each id the UTF-8
    bytes it stands for alone (a byte-level token's characters, one per byte; a byte-fallback
    token <0xNN>, one; any other, its text with "▁" as a space; EOS, which we insert between
    documents, none); and `part`: `own` where a token may be a part of one character's bytes
    (byte-level and byte-fallback tokens), else 0."""
    from tokenizers import decoders

    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    byte_level = isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel)
    added = set(getattr(tokenizer, "added_tokens_decoder", {}))
    own, part = np.empty(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for i, piece in enumerate(pieces):
        if i in added or piece is None:
            own[i] = len(tokenizer.decode([i]).encode("utf-8"))
        elif byte_level:
            own[i] = part[i] = len(piece)  # one character of the byte-level alphabet per byte
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            own[i] = part[i] = 1
        else:
            own[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    own[tokenizer.eos_token_id] = part[tokenizer.eos_token_id] = 0
    return byte_level, own, part


def context_free(tokenizer: Any) -> bool:
    """Whether the tokenizer is a byte-level BPE that neither normalizes the text nor adds a space
    before it. Then a token's bytes are a property of its id, and a text cut where the
    pre-tokenizer splits anyway tokenizes piece by piece exactly as whole (`sources.read_pieces`).
    SentencePiece-style tokenizers add a "▁" before each text they are given, so for them neither
    holds."""
    from tokenizers import decoders

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    return (isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel)
            and backend.get("normalizer") is None
            and '"add_prefix_space": true' not in json.dumps(backend["pre_tokenizer"]))


def byte_table(tokenizer: Any) -> np.ndarray | None:
    """(vocab,) int64: the UTF-8 bytes of text that each token id stands for wherever it occurs,
    if that is a property of the id (`context_free`); else None, and the bytes are measured in
    context as the cache is built."""
    return byte_tokens(tokenizer)[1] if context_free(tokenizer) else None

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


BYTES_DTYPE = np.dtype(np.uint16)  # a token's bytes in context, stored after a shard's tokens
# A chat cache's flags, one byte per token after the rest of a shard: bit 0, the token carries loss
# as a target; bit 1, it is the first token of a conversation; bit 2 (a preference cache, whose
# documents are pairs: the chosen side, then the rejected side), the first token of the rejected side.
FLAGS_DTYPE = np.dtype(np.uint8)
LOSS, START, SPLIT = 1, 2, 4


def shard_size(index: dict[str, Any], entry: dict[str, Any]) -> int:
    """The size in bytes of shard `entry`'s file: its tokens, then their byte counts if stored,
    then (a chat cache) their flags."""
    itemsize = sum(np.dtype(index[k]).itemsize for k in ("dtype", "bytes_dtype", "flags_dtype") if k in index)
    return entry["tokens"] * itemsize


def cache_key(spec: dict[str, Any], version: int = FORMAT_VERSION) -> str:
    """sha256 of the cache's spec: format, tokenizer, text key, sources (files by content hash, a
    dataset by name, subset, split, revision and fingerprint) and max_tokens. `version` names an
    earlier format's key for the same spec (what a checkpoint of an earlier smollm recorded). The
    version is written last, so that no field of a spec can stand in for it."""
    return hashlib.sha256(json.dumps({**spec, "format": version}, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Reading: the shards as one stream


class TokenCache:
    """A complete cache folder, read as one stream of `n_tokens` token ids: `cache.read(a, b)`
    returns tokens a..b-1 (native dtype), across shard boundaries;
    `cache.n_bytes(a, b)` the UTF-8 bytes of text that they stand for.

    The shards are memory-mapped on first use in each process and never pickled, so DataLoader
    workers share the page cache instead of copying the tokens.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = read_index(self.folder)
        if index is None or not index.get("complete"):
            raise DataError(f"{self.folder} holds no complete token cache; run again to build it")
        self.index = index
        self.dtype = np.dtype(index["dtype"])
        self.byte_table = np.asarray(index["byte_table"], dtype=np.int64) if "byte_table" in index else None
        self.bytes_dtype = np.dtype(index["bytes_dtype"]) if "bytes_dtype" in index else None
        if (self.byte_table is None) == (self.bytes_dtype is None):
            raise DataError(f"{self.folder} is a token cache without byte counts (an older smollm's); delete it "
                            "and run again")
        self.flags_dtype = np.dtype(index["flags_dtype"]) if "flags_dtype" in index else None
        self.shards = [(s["file"], s["tokens"]) for s in index["shards"]]
        self.n_tokens, self.n_documents = index["n_tokens"], index["n_docs"]
        self.starts = np.cumsum([0] + [n for _, n in self.shards])  # shard k holds [starts[k], starts[k+1])
        for name, n in self.shards:
            path = self.folder / name
            if not path.is_file() or path.stat().st_size != shard_size(index, {"tokens": n}):
                raise DataError(f"token cache shard {path} is missing or damaged; delete {self.folder} and "
                                "run again")
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def __len__(self) -> int:
        return self.n_tokens

    def check_ids(self, vocab_size: int) -> None:
        """Refuse a cache holding a token id the model has no embedding for (on CUDA it would be a
        device-side assert that brings down every process), naming the shard."""
        for entry in self.index["shards"]:
            if entry.get("max_id", -1) >= vocab_size:
                raise DataError(f"token cache shard {self.folder / entry['file']} holds token id {entry['max_id']}, "
                                f"outside the model's vocabulary of {vocab_size}; train with the tokenizer this "
                                f"cache was built with (and a vocab_size above {entry['max_id']}), or delete "
                                f"{self.folder} and run again")

    def _shard(self, k: int, part: str = "tokens") -> np.ndarray:
        """Shard k's tokens, or the byte counts ("counts") or flags ("flags") stored after them."""
        if (k, part) not in self._maps:
            name, n = self.shards[k]
            layout = [("tokens", self.dtype), ("counts", self.bytes_dtype), ("flags", self.flags_dtype)]
            offset = 0
            for which, dtype in layout:
                if which == part:
                    break
                offset += n * dtype.itemsize if dtype is not None else 0
            self._maps[k, part] = np.memmap(self.folder / name, dtype=dtype, mode="r", offset=offset, shape=(n,))
        return self._maps[k, part]

    def n_bytes(self, start: int, stop: int, tokens: np.ndarray | None = None) -> int:
        """The UTF-8 bytes of text that tokens [start, stop) stand for in context (`tokens`: those
        tokens, if already read)."""
        if self.byte_table is not None:
            return int(self.byte_table[self.read(start, stop) if tokens is None else tokens].sum())
        return int(self.read(start, stop, counts=True).sum(dtype=np.int64))

    def read(self, start: int, stop: int, counts: bool = False, flags: bool = False) -> np.ndarray:
        """Tokens [start, stop) of the stream, a copy (stop is clipped to the end); with `counts`,
        their stored byte counts instead; with `flags` (a chat cache), their flags."""
        part = "counts" if counts else "flags" if flags else "tokens"
        if flags and self.flags_dtype is None:
            raise DataError(f"{self.folder} is a token cache of text, without loss masks; it holds no conversations")
        stop = min(stop, self.n_tokens)
        if not 0 <= start <= stop:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.n_tokens})")
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            begin = int(self.starts[k])
            end = min(stop, int(self.starts[k + 1]))
            parts.append(self._shard(k, part)[start - begin:end - begin])
            start, k = end, k + 1
        dtype = {"counts": self.bytes_dtype, "flags": self.flags_dtype, "tokens": self.dtype}[part]
        return np.concatenate(parts) if parts else np.empty(0, dtype)

    @property
    def is_chat(self) -> bool:
        """Whether the cache holds conversations with loss masks (smollm.data.chat)."""
        return self.flags_dtype is not None

    @property
    def data_format(self) -> str:
        """What the cache holds: "text", "chat" (conversations) or "preference" (pairs)."""
        return self.index.get("spec", {}).get("data_format") or ("chat" if self.is_chat else "text")

    def splits(self, chunk: int = 1 << 26) -> np.ndarray:
        """Where each pair's rejected side begins in the stream (a preference cache), in order; one
        streaming read of the flags."""
        found = [a + np.flatnonzero(self.read(a, a + chunk, flags=True) & SPLIT) for a in range(0, self.n_tokens, chunk)]
        return np.concatenate(found).astype(np.int64) if found else np.empty(0, np.int64)

    def loss_mask(self, start: int, stop: int) -> np.ndarray:
        """(stop - start,) bool: whether each token of [start, stop) carries loss as a target."""
        return (self.read(start, stop, flags=True) & LOSS).astype(bool)

    def documents(self, chunk: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
        """(starts, loss tokens) of a chat cache's conversations: where each begins in the stream,
        and how many of its tokens carry loss; one streaming read of the flags."""
        starts: list[np.ndarray] = []
        totals: list[int] = []
        carry = None  # loss tokens so far of the conversation still open at a chunk's end
        for a in range(0, self.n_tokens, chunk):
            flags = self.read(a, a + chunk, flags=True)
            loss = (flags & LOSS).astype(np.int64)
            at = np.flatnonzero(flags & START)
            if not len(at):
                carry = (carry or 0) + int(loss.sum())
                continue
            if carry is not None:
                totals.append(carry + int(loss[:at[0]].sum()))
            sums = np.add.reduceat(loss, at)  # from each start to the next (the last to the chunk's end)
            totals.extend(sums[:-1].tolist())
            carry = int(sums[-1])
            starts.append(a + at)
        if carry is not None:
            totals.append(carry)
        begin = np.concatenate(starts).astype(np.int64) if starts else np.empty(0, np.int64)
        return begin, np.asarray(totals, dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}


def read_index(folder: Path) -> dict[str, Any] | None:
    path = folder / INDEX
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def is_complete(folder: Path) -> bool:
    index = read_index(folder)
    return bool(index and index.get("complete"))


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1

