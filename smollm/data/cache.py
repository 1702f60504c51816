"""Documents -> a sharded token cache on disk, built once, resumed after a kill, read as one stream.

A cache is a folder `<cache_dir>/tokens/<key>/` named by a hash of everything that decides its
tokens (`cache_key`). It holds shards `shard-000000.bin`, ... of exactly `shard_tokens` token ids
each (the last one fewer) and `index.json`, which lists the complete shards. Each shard is written
to a temporary file, flushed to disk and renamed into place, and only then listed; with it the
index records where the next shard starts in the sources, so a build killed at any moment starts
again from its last complete shard.

Each shard's index entry also holds its digest (`smollm.digest`, computed as the shard is written:
no second read), its largest token id, and where the sources stood when it began. Opening the
cache verifies every shard (`check_shards`: one streaming read, on threads); a damaged one is
rebuilt from that start if its sources still give the same bytes (`rebuild_shard`), else it is one
line naming the shard. `verify_shard` is the one check of a shard against its entry, for whoever
copies shards (downloads included).

Bits per byte needs the UTF-8 bytes of text that each token stands for, in context. For a
byte-level BPE with no normalizer that is a property of the token id: the index holds the table
(`byte_table`). For any other tokenizer (SentencePiece-style: a "▁" is one space, or none at the
start of a document; byte-fallback tokens are one byte each; a normalizer may change the text),
the worker measures each token's bytes from its offsets in the text and the shard stores those
counts after its tokens (`bytes_dtype` in the index), covered by the same digest.

Tokenizing runs in one worker process per core (the tokenizer's Rust code, the conversion of its
output to arrays and the pickling, all in parallel), fed with batches of about BATCH_BYTES of text
by the main process, which reads the sources and writes the shards. At most two batches per worker
are in flight, so memory does not grow with the corpus.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from smollm import assets
from smollm.data.sources import Position, Unit
from smollm.digest import CHUNK, Hasher, HashingWriter
from smollm.errors import DataError, SmolLMError, first_line
from smollm.io import fsync_file, replace_durably, write_json_atomic

log = logging.getLogger(__name__)

# Bump when the cache layout or the tokenization rule changes (3: special-token strings are text, a
# leading BOM is dropped, a max_tokens cut ends with EOS, byte counts in context).
FORMAT_VERSION = 3
SHARD_TOKENS = 1 << 27  # 134M tokens: 256 MB of uint16; a kill loses at most one shard of work
BATCH_BYTES = 1 << 20  # text handed to one worker at a time
INDEX = "index.json"


def load_tokenizer(name: str, cache_dir: str | None = None) -> Any:
    """`smollm.assets.load_tokenizer(name)`, checked for what the token cache needs."""
    try:
        tokenizer = assets.load_tokenizer(name, cache_dir=cache_dir)
    except SmolLMError as e:  # already one line with the name and a fix
        raise DataError(str(e)) from e
    except Exception as e:  # noqa: BLE001  whatever went wrong, the user needs the name and a fix
        raise DataError(f"cannot load tokenizer {name!r} ({first_line(e)}); pass --data.tokenizer a "
                        "tokenizer directory or Hugging Face name, or 'smollm2'") from e
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise DataError(f"tokenizer {name!r} is not a fast (Rust) tokenizer; use one with a "
                        "tokenizer.json")
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {name!r} has no EOS token to separate documents; "
                        "use a tokenizer that defines eos_token")
    return tokenizer


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the token ids: the tokenizer's full JSON (vocab, merges, rules) + EOS."""
    spec = tokenizer.backend_tokenizer.to_str() + f"\neos={tokenizer.eos_token_id}"
    return hashlib.sha256(spec.encode()).hexdigest()


def _byte_tokens(tokenizer: Any) -> tuple[bool, np.ndarray, np.ndarray]:
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
    return _byte_tokens(tokenizer)[1] if context_free(tokenizer) else None


def bytes_in_context(text: str, offsets: list[tuple[int, int]], ids: list[int], part: np.ndarray) -> np.ndarray:
    """The UTF-8 bytes of `text` that each of its tokens stands for; they add up to the text's.

    Token i stands for the text from where it starts to where the next one starts (the first
    from 0, the last to the end), so a prefix the tokenizer added ("▁" before a document) or a
    character a normalizer removed counts where it is in the text, once. Tokens that start at
    the same character (the byte-fallback tokens of one character) take their own bytes in turn
    (`part`, from `_byte_tokens`).
    """
    total = len(text.encode("utf-8"))
    if not ids:
        return np.empty(0, dtype=np.int64)
    starts = np.fromiter((a for a, _ in offsets), dtype=np.int64, count=len(ids))
    if not text.isascii():  # character offsets -> byte offsets
        code = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        width = 1 + (code >= 0x80) + (code >= 0x800) + (code >= 0x10000)
        at = np.zeros(len(code) + 1, dtype=np.int64)
        np.cumsum(width, out=at[1:])
        starts = at[np.minimum(starts, len(code))]
    starts = np.maximum.accumulate(starts)
    starts[0] = 0
    counts = np.diff(np.append(starts, total))
    for j in np.flatnonzero(counts[:-1] == 0):  # shares its start with the next token
        k = j + 1
        while counts[k] == 0 and k + 1 < len(counts):
            k += 1
        give = min(int(part[ids[j]]), int(counts[k]))
        counts[j], counts[k] = give, counts[k] - give
    return counts


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


BYTES_DTYPE = np.dtype(np.uint16)  # a token's bytes in context, stored after a shard's tokens


def shard_size(index: dict[str, Any], entry: dict[str, Any]) -> int:
    """The size in bytes of shard `entry`'s file: its tokens, then their byte counts if stored."""
    itemsize = np.dtype(index["dtype"]).itemsize + (np.dtype(index["bytes_dtype"]).itemsize
                                                    if "bytes_dtype" in index else 0)
    return entry["tokens"] * itemsize


def cache_key(spec: dict[str, Any], version: int = FORMAT_VERSION) -> str:
    """sha256 of the cache's spec: format, tokenizer, text key, sources (files by content hash, a
    dataset by name, subset, split, revision and fingerprint) and max_tokens. `version` names an
    earlier format's key for the same spec (what a checkpoint of an earlier smollm recorded)."""
    return hashlib.sha256(json.dumps({"format": version, **spec}, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Reading: the shards as one stream


class TokenCache:
    """A complete cache folder, read as one stream of `n_tokens` token ids: `cache[a:b]` or
    `cache.read(a, b)` returns tokens a..b-1 (native dtype), across shard boundaries;
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
        self.shards = [(s["file"], s["tokens"]) for s in index["shards"]]
        self.n_tokens, self.n_documents = index["n_tokens"], index["n_docs"]
        self.starts = np.cumsum([0] + [n for _, n in self.shards])  # shard k holds [starts[k], starts[k+1])
        for name, n in self.shards:
            path = self.folder / name
            if not path.is_file() or path.stat().st_size != shard_size(index, {"tokens": n}):
                raise DataError(f"token cache shard {path} is missing or damaged; delete {self.folder} and "
                                "run again")
        self._maps: dict[tuple[int, bool], np.ndarray] = {}

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

    def _shard(self, k: int, counts: bool = False) -> np.ndarray:
        """Shard k's tokens, or with `counts` the byte counts stored after them."""
        if (k, counts) not in self._maps:
            name, n = self.shards[k]
            dtype, offset = (self.bytes_dtype, n * self.dtype.itemsize) if counts else (self.dtype, 0)
            self._maps[k, counts] = np.memmap(self.folder / name, dtype=dtype, mode="r", offset=offset, shape=(n,))
        return self._maps[k, counts]

    def n_bytes(self, start: int, stop: int, tokens: np.ndarray | None = None) -> int:
        """The UTF-8 bytes of text that tokens [start, stop) stand for in context (`tokens`: those
        tokens, if already read)."""
        if self.byte_table is not None:
            return int(self.byte_table[self.read(start, stop) if tokens is None else tokens].sum())
        return int(self.read(start, stop, counts=True).sum(dtype=np.int64))

    def read(self, start: int, stop: int, counts: bool = False) -> np.ndarray:
        """Tokens [start, stop) of the stream, a copy (stop is clipped to the end); with `counts`,
        their stored byte counts instead."""
        stop = min(stop, self.n_tokens)
        if not 0 <= start <= stop:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.n_tokens})")
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            begin = int(self.starts[k])
            end = min(stop, int(self.starts[k + 1]))
            parts.append(self._shard(k, counts)[start - begin:end - begin])
            start, k = end, k + 1
        return np.concatenate(parts) if parts else np.empty(0, self.bytes_dtype if counts else self.dtype)

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("TokenCache takes a slice with step 1: cache[a:b]")
        start, stop, _ = item.indices(self.n_tokens)
        return self.read(start, max(start, stop))

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


# ------------------------------------------------------------------------------------------------
# Verifying: every shard against the digest written with it


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
        log.warning(f"note: token cache {folder} was built before shards carried digests; recorded them now "
                    "for the shards as they are")
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


# ------------------------------------------------------------------------------------------------
# Workers: text -> token ids


_worker: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, eos: int, dtype: str, part: np.ndarray | None) -> None:
    """Each worker: one single-threaded copy of the tokenizer; dies with the process that
    started it (Linux), so a killed build leaves no worker behind. With `part` (see
    `_byte_tokens`), it also measures each token's bytes in context."""
    from tokenizers import Tokenizer

    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    tokenizer = Tokenizer.from_str(_text_only(tokenizer_json))
    # A document's text is text: "<|endoftext|>" written in it is tokenized as the characters it is,
    # never as the special token, which only we insert between documents.
    tokenizer.encode_special_tokens = True
    _worker.update(tokenizer=tokenizer, eos=eos, dtype=np.dtype(dtype), part=part)


def _text_only(tokenizer_json: str) -> str:
    """The tokenizer with its special tokens out of reach of text: a Unigram model lists them as
    pieces like any other, which it would choose for "</s>" written in a document (a BPE never
    merges up to them). Their pieces are renamed to strings no text holds; ids stay."""
    spec = json.loads(tokenizer_json)
    special = {t["content"] for t in spec.get("added_tokens") or [] if t.get("special")}
    if spec["model"].get("type") == "Unigram" and special:
        spec["model"]["vocab"] = [[_UNREACHABLE + piece if piece in special else piece, score]
                                  for piece, score in spec["model"]["vocab"]]
        return json.dumps(spec)
    return tokenizer_json


_UNREACHABLE = "\U0010fffe" * 16  # a noncharacter, 16 times: in no text that we tokenize


def _tokenize_batch(texts: list[str], eos: list[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The token ids of `texts` concatenated, EOS after each text whose flag is set, the number
    of tokens that each text contributed, and (if the worker measures them) each token's bytes."""
    part = _worker["part"]
    tokenizer = _worker["tokenizer"]
    encode = tokenizer.encode_batch_fast if part is None else tokenizer.encode_batch  # offsets only if needed
    encodings = encode(texts, add_special_tokens=False)
    ids: list[int] = []
    counts: list[np.ndarray] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    eos_id = _worker["eos"]
    for j, (encoding, end) in enumerate(zip(encodings, eos)):
        x = encoding.ids
        ids += x
        if part is not None:
            counts += [bytes_in_context(texts[j], encoding.offsets, x, part), np.zeros(int(end), dtype=np.int64)]
        if end:
            ids.append(eos_id)
        lengths[j] = len(x) + end
    n_bytes = _as_counts(np.concatenate(counts)) if part is not None else None
    return np.array(ids, dtype=_worker["dtype"]), lengths, n_bytes


def _as_counts(n_bytes: np.ndarray) -> np.ndarray:
    """Byte counts as stored (BYTES_DTYPE): a count past its largest value (a token standing for
    more than 64 KiB of text, which only a normalizer that deletes text can make) passes the
    excess to the next token, so that the sums stay exact."""
    top = np.iinfo(BYTES_DTYPE).max
    over = np.flatnonzero(n_bytes > top)
    for j in range(int(over[0]) if over.size else len(n_bytes), len(n_bytes) - 1):
        if n_bytes[j] > top:
            n_bytes[j + 1] += n_bytes[j] - top
            n_bytes[j] = top
    if over.size and n_bytes[-1] > top:
        raise DataError(f"a token stands for {int(n_bytes[-1]):,} bytes of text, more than a token cache records; "
                        "use a tokenizer whose normalizer keeps the text")
    return n_bytes.astype(BYTES_DTYPE)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------------
# Writing: shards, each made durable before the index lists it


class _ShardWriter:
    """Appends tokens to the open shard, hashing them as they are written; commits each full one
    (fsync, rename, index with its digest, largest id and where the sources stood at its start)."""

    def __init__(self, folder: Path, index: dict[str, Any],
                 on_commit: Callable[[dict[str, Any], str | None], None] | None = None) -> None:
        self.folder, self.index, self.on_commit = folder, index, on_commit
        self.dtype = np.dtype(index["dtype"])
        self.shard_tokens = index["shard_tokens"]
        self.total = sum(s["tokens"] for s in index["shards"])  # tokens appended so far
        self.in_shard = 0
        self.file: Any = None
        self.writer: HashingWriter | None = None
        self.counts: Any = None  # the open shard's byte counts, appended to it when it is closed
        self.max_id = -1
        self.start: dict[str, Any] | None = None

    def _tmp(self) -> Path:
        return self.folder / f"shard-{len(self.index['shards']):06d}.bin.tmp"

    def _counts_tmp(self) -> Path:
        return self._tmp().with_name(self._tmp().name + ".bytes")

    def append(self, tokens: np.ndarray, state_at: Callable[[int], dict[str, Any]],
               n_bytes: np.ndarray | None = None) -> None:
        """Append `tokens` (and their byte counts, if the cache stores them); `state_at(b)` gives
        the counts after token b - 1 and where the sources resume from there, for the index when
        a shard fills at token b."""
        while len(tokens):
            if self.file is None:
                self.file = open(self._tmp(), "wb")
                self.writer, self.max_id = HashingWriter(self.file), -1
                if n_bytes is not None:
                    self.counts = open(self._counts_tmp(), "w+b")
                index = self.index  # the state after the last commit: where this shard begins
                self.start = {"n_docs": index["n_docs"], "sources": [dict(c) for c in index["sources"]],
                              "resume": index["resume"]}
            take = tokens[:self.shard_tokens - self.in_shard]
            self.writer.write(np.ascontiguousarray(take))
            if n_bytes is not None:
                self.counts.write(np.ascontiguousarray(n_bytes[:len(take)]))
                n_bytes = n_bytes[len(take):]
            self.max_id = max(self.max_id, int(take.max()))
            self.in_shard += len(take)
            self.total += len(take)
            tokens = tokens[len(take):]
            if self.in_shard == self.shard_tokens:
                self.commit(state_at(self.total))

    def _close(self) -> dict[str, Any]:
        """Make the open shard durable; its index entry (not yet listed)."""
        if self.counts is not None:  # the byte counts after the tokens, under the same digest
            self.counts.seek(0)
            while chunk := self.counts.read(CHUNK):
                self.writer.write(chunk)
            self.counts.close()
            self.counts = None
            self._counts_tmp().unlink()
        fsync_file(self.file)
        self.file.close()
        self.file = None
        entry = {"file": f"shard-{len(self.index['shards']):06d}.bin", "tokens": self.in_shard,
                 "digest": self.writer.digest(), "max_id": self.max_id, "start": self.start}
        self.in_shard = 0
        return entry

    def commit(self, state: dict[str, Any], complete: bool = False) -> None:
        """Make the open shard durable and list it, with the resume `state` for what follows."""
        index, name = self.index, None
        if self.file is not None:
            entry = self._close()
            name = entry["file"]
            replace_durably(self._tmp(), self.folder / name)
            index["shards"].append(entry)
        index.update(n_tokens=sum(s["tokens"] for s in index["shards"]), n_docs=state["n_docs"],
                     sources=state["sources"], resume=None if complete else state["resume"],
                     complete=complete)
        write_json_atomic(self.folder / INDEX, index)
        if self.on_commit is not None:  # e.g. upload the shard, then this index (smollm.data.remote)
            self.on_commit(index, name)

    def discard(self) -> None:
        """Drop the open shard (an error or an interrupt): the listed shards stay as they are."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.counts is not None:
            self.counts.close()
            self.counts = None
        for path in (self._tmp(), self._counts_tmp()):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


class _Rebuilt(Exception):
    """The shard being rebuilt is complete and in place."""


class _RebuildWriter(_ShardWriter):
    """Writes shard k again, from where the sources stood at its start, and puts it in place only
    if its digest is the one recorded: the index is never touched."""

    def __init__(self, folder: Path, index: dict[str, Any], k: int) -> None:
        self.expected = index["shards"][k]
        start = self.expected["start"]
        view = {**index, "shards": index["shards"][:k], "n_docs": start["n_docs"],
                "sources": start["sources"], "resume": start["resume"]}
        super().__init__(folder, view)

    def _tmp(self) -> Path:
        return self.folder / f"{self.expected['file']}.rebuild.tmp"

    def commit(self, state: dict[str, Any], complete: bool = False) -> None:
        if self.file is None:
            raise DataError("nothing to rebuild")
        entry = self._close()
        if (entry["tokens"], entry["digest"]) != (self.expected["tokens"], self.expected["digest"]):
            self._tmp().unlink()
            raise DataError(f"token cache shard {self.folder / self.expected['file']} is damaged, and its sources "
                            "no longer give the same tokens, so it cannot be rebuilt; delete "
                            f"{self.folder} and run again to tokenize them afresh")
        replace_durably(self._tmp(), self.folder / self.expected["file"])
        raise _Rebuilt


def _batches(units: Iterator[Unit], size: int) -> Iterator[tuple[list[Position], list[str], list[bool]]]:
    """Units grouped into batches of about `size` characters."""
    positions, texts, eos, chars = [], [], [], 0
    for position, text, end in units:
        positions.append(position)
        texts.append(text)
        eos.append(end)
        chars += len(text)
        if chars >= size:
            yield positions, texts, eos
            positions, texts, eos, chars = [], [], [], 0
    if texts:
        yield positions, texts, eos


def build_cache(folder: Path, sources: list[Any], tokenizer: Any, meta: dict[str, Any],
                max_tokens: list[int | None], workers: int | None = None, progress: bool = True,
                on_commit: Callable[[dict[str, Any], str | None], None] | None = None) -> None:
    """Tokenize `sources` in order into the cache `folder`, each document followed by EOS, source
    i cut at its first max_tokens[i] tokens; resume from the last complete shard if an earlier
    build was interrupted. The caller holds the cache's lock.

    `meta` goes into the index as it is (key, spec, tokenizer name, ...). `on_commit(index, shard)`
    runs after each commit of the index: `shard` is the file just listed, None for the final commit.
    """
    folder.mkdir(parents=True, exist_ok=True)
    index = read_index(folder)
    if index is not None and index.get("key") != meta.get("key"):
        index = None
    if index is None:  # a fresh build: nothing of an earlier one is usable
        for old in folder.glob("shard-*"):
            old.unlink()
        table = byte_table(tokenizer)
        layout = {"byte_table": table.tolist()} if table is not None else {"bytes_dtype": BYTES_DTYPE.name}
        index = {**meta, "format": FORMAT_VERSION, "dtype": token_dtype(len(tokenizer)).name, **layout,
                 "shard_tokens": SHARD_TOKENS, "shards": [], "n_tokens": 0, "n_docs": 0,
                 "sources": [{"source": s.describe(), "tokens": 0, "documents": 0} for s in sources],
                 "complete": False, "resume": {"source": 0, "unit": [0, 0, 0], "skip": 0}}
    listed = {s["file"] for s in index["shards"]}
    for stray in folder.glob("shard-*"):  # a shard renamed but not yet listed, a temporary file
        if stray.name not in listed:
            stray.unlink()
    writer = _ShardWriter(folder, index, on_commit)
    if index["shards"]:
        print(f"resuming the tokenization at shard {len(index['shards'])} ({writer.total:,} tokens "
              f"done) in {folder}", file=sys.stderr, flush=True)
    start_time = time.perf_counter()
    n_docs, counts = _tokenize(writer, sources, tokenizer, max_tokens, workers, progress, "tokenizing")
    index["seconds"] = round(index.get("seconds", 0) + time.perf_counter() - start_time, 2)
    try:
        writer.commit({"n_docs": n_docs, "sources": counts, "resume": None}, complete=True)
    except BaseException:
        writer.discard()
        raise


def rebuild_shard(folder: Path, index: dict[str, Any], k: int, sources: list[Any], tokenizer: Any,
                  max_tokens: list[int | None], workers: int | None = None) -> None:
    """Tokenize shard k of a complete cache again from where its sources stood when it was built,
    and put it in place if it comes out with the recorded digest; else one DataError naming the
    shard. The caller holds the cache's lock."""
    entry = index["shards"][k]
    if "start" not in entry:
        raise DataError(f"token cache shard {folder / entry['file']} is damaged, and the cache is too old to say "
                        f"where its sources start; delete {folder} and run again")
    writer = _RebuildWriter(folder, index, k)
    try:
        _tokenize(writer, sources, tokenizer, max_tokens, workers, False, f"rebuilding {entry['file']}")
        writer.commit({})  # the sources ended: the last shard, or sources that have shrunk
    except _Rebuilt:
        return
    except DataError as e:
        if str(e).startswith("token cache shard"):
            raise
        raise DataError(f"token cache shard {folder / entry['file']} is damaged and cannot be rebuilt: "
                        f"{first_line(e)}; copy the cache again from where it was built, or delete {folder} "
                        "and run where the sources can be read") from None


def _tokenize(writer: _ShardWriter, sources: list[Any], tokenizer: Any, max_tokens: list[int | None],
              workers: int | None, progress: bool, desc: str) -> tuple[int, list[dict[str, Any]]]:
    """Tokenize the sources from where the writer's index says they resume, into `writer`:
    (documents, per-source counts) when the sources end. `writer` may stop it earlier by raising."""
    from tqdm import tqdm

    index = writer.index
    resume = index["resume"]
    counts = [dict(s) for s in index["sources"]]  # tokens and documents per source so far
    n_docs = index["n_docs"]
    workers = workers or cpu_count()
    eos_id = tokenizer.eos_token_id
    # Workers are forked where that is possible: they start at once and share the parent's pages.
    # They use only the tokenizer and numpy, never a thread the parent started, so Python 3.12's
    # warning about forking a multi-threaded process does not apply to them.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with _env("TOKENIZERS_PARALLELISM", "false"), warnings.catch_warnings():  # one thread per worker
        warnings.filterwarnings("ignore", message=".*use of fork", category=DeprecationWarning)
        part = _byte_tokens(tokenizer)[2] if "bytes_dtype" in index else None
        pool = context.Pool(workers, initializer=_init_worker,
                            initargs=(tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id,
                                      index["dtype"], part))
    bar = tqdm(initial=writer.total, unit="tok", unit_scale=True, desc=desc, file=sys.stderr,
               disable=not progress, mininterval=2.0)
    try:
        for s in range(resume["source"], len(sources)):
            cap = max_tokens[s]
            if cap is not None and counts[s]["tokens"] >= cap:
                continue
            first = tuple(resume["unit"]) if s == resume["source"] else (0, 0, 0)
            skip = resume["skip"] if s == resume["source"] else 0
            begin = writer.total - counts[s]["tokens"]  # where source s starts in the stream
            batches = _batches(sources[s].units(first), BATCH_BYTES)
            pending: collections.deque = collections.deque()
            done = False
            try:
                while not done:
                    for positions, texts, eos in batches:
                        pending.append((positions, eos, pool.apply_async(_tokenize_batch, (texts, eos))))
                        if len(pending) >= 2 * workers:
                            break
                    else:
                        done = True  # the source is read: drain what is in flight
                    while pending and (done or len(pending) >= 2 * workers):
                        positions, eos, result = pending.popleft()
                        tokens, lengths, n_bytes = result.get()
                        # Unit j's tokens are stream[starts[j] : starts[j] + lengths[j]]; the first
                        # unit's first `skip` tokens were written before an interruption.
                        first_new = writer.total
                        starts = first_new - skip + np.concatenate(([0], np.cumsum(lengths)[:-1]))
                        ends = starts + lengths
                        eos_at = (ends - 1)[np.asarray(eos, dtype=bool)]  # where the EOS tokens go
                        if n_bytes is not None:  # the byte counts of the tokens kept, as the tokens
                            n_bytes = n_bytes[skip:]
                        tokens, skip = tokens[skip:], 0
                        written = first_new - begin
                        if cap is not None and written + len(tokens) >= cap:
                            tokens, done = tokens[:cap - written], True
                            pending.clear()
                            if tokens[-1] != eos_id:  # the cut document still ends: the next source starts anew
                                tokens[-1] = eos_id
                                eos_at = np.append(eos_at, begin + cap - 1)
                                if n_bytes is not None:  # the EOS we insert stands for no bytes
                                    n_bytes = n_bytes.copy()
                                    n_bytes[len(tokens) - 1] = 0
                        if n_bytes is not None:
                            n_bytes = n_bytes[:len(tokens)]
                        docs_before, source_docs_before = n_docs, counts[s]["documents"]

                        def state_at(b: int, positions=positions, starts=starts, ends=ends, eos_at=eos_at,
                                     first_new=first_new, docs_before=docs_before,
                                     source_docs_before=source_docs_before, s=s) -> dict[str, Any]:
                            """The counts after token b - 1, and where the stream resumes."""
                            new_docs = int(np.count_nonzero((eos_at >= first_new) & (eos_at < b)))
                            counts[s] = {**counts[s], "tokens": b - begin,
                                         "documents": source_docs_before + new_docs}
                            j = int(np.searchsorted(ends, b, side="left"))  # the unit of token b - 1
                            return {"n_docs": docs_before + new_docs, "sources": [dict(c) for c in counts],
                                    "resume": {"source": s, "unit": list(positions[j]),
                                               "skip": int(b - starts[j])}}

                        writer.append(tokens, state_at, n_bytes)
                        n_docs = state_at(writer.total)["n_docs"]
                        bar.update(len(tokens))
            finally:
                batches.close()
        return n_docs, counts
    except BaseException:
        writer.discard()
        raise
    finally:
        bar.close()
        pool.terminate()
        pool.join()
