"""Building a token cache: documents -> shards on disk, resumed after a kill, a damaged shard rebuilt.

`build_cache` tokenizes the sources in order into the cache folder (`smollm.data.cache` describes
the layout), each document followed by EOS; `rebuild_shard` tokenizes one shard of a complete
cache again from where its sources stood when it was built, and puts it in place only if it
comes out with the recorded digest.

Tokenizing runs in one worker process per core (the tokenizer's Rust code, the conversion of its
output to arrays and the pickling, all in parallel), fed with batches of about BATCH_BYTES of text
by the main process, which reads the sources and writes the shards. At most two batches per worker
are in flight, so memory does not grow with the corpus. A tokenizer whose tokens' bytes depend on
their context has them measured by the workers (`bytes_in_context`) and stored after the tokens.

A chat cache (`chat`: the tokenizer's `ChatTemplate` and `loss_on`) gets, from sources that read
records as conversations, each conversation rendered by the chat template and tokenized as
apply_chat_template does (smollm.data.chat), with no EOS after it, and one byte of flags per token
after the rest of the shard (whether it carries loss, whether it starts a conversation). A
preference pair is one document: its chosen side, then its rejected side, whose first token is
flagged SPLIT. A record that the template refuses is one line naming its file and line or row.
"""

from __future__ import annotations

import collections
import contextlib
import json
import multiprocessing
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from smollm.data.cache import (BYTES_DTYPE, FLAGS_DTYPE, FORMAT_VERSION, INDEX, SPLIT, START, byte_table, byte_tokens,
                               cpu_count, read_index, token_dtype)
from smollm.data.chat import token_mask
from smollm.data.sources import Position, Unit
from smollm.digest import CHUNK, HashingWriter
from smollm.errors import DataError, first_line
from smollm.io import fsync_file, replace_durably, write_json_atomic
from smollm.output import say

SHARD_TOKENS = 1 << 27  # 134M tokens: 256 MB of uint16; a kill loses at most one shard of work
BATCH_BYTES = 1 << 20  # text handed to one worker at a time


def bytes_in_context(text: str, offsets: list[tuple[int, int]], ids: list[int], part: np.ndarray) -> np.ndarray:
    """The UTF-8 bytes of `text` that each of its tokens stands for; they add up to the text's.

    Token i stands for the text from where it starts to where the next one starts (the first
    from 0, the last to the end), so a prefix the tokenizer added ("▁" before a document) or a
    character a normalizer removed counts where it is in the text, once. Tokens that start at
    the same character (the byte-fallback tokens of one character) take their own bytes in turn
    (`part`, from `cache.byte_tokens`).
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



# ------------------------------------------------------------------------------------------------
# Workers: text -> token ids


_worker: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, eos: int, dtype: str, part: np.ndarray | None,
                 chat: tuple[Any, str] | None = None) -> None:
    """Each worker: one single-threaded copy of the tokenizer; dies with the process that
    started it (Linux), so a killed build leaves no worker behind. With `part` (see
    `cache.byte_tokens`), it also measures each token's bytes in context. With `chat` (the
    ChatTemplate and loss_on), its units are conversations."""
    from tokenizers import Tokenizer

    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if chat is not None:  # special tokens in the rendered text are special, as apply_chat_template has them
        tokenizer = Tokenizer.from_str(tokenizer_json)
    else:
        tokenizer = Tokenizer.from_str(_text_only(tokenizer_json))
        # A document's text is text: "<|endoftext|>" written in it is tokenized as the characters it is,
        # never as the special token, which only we insert between documents.
        tokenizer.encode_special_tokens = True
    _worker.update(tokenizer=tokenizer, eos=eos, dtype=np.dtype(dtype), part=part, chat=chat)


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


def _tokenize_batch(texts: list[str], eos: list[bool]) -> tuple:
    """The token ids of `texts` concatenated, EOS after each text whose flag is set, the number
    of tokens that each text contributed, (if the worker measures them) each token's bytes, and
    (a chat worker) each token's flags and the first refused unit (its index, the message)."""
    if _worker["chat"] is not None:
        return _tokenize_chat(texts)
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
    return np.array(ids, dtype=_worker["dtype"]), lengths, n_bytes, None, None


RECORD = "\x00record\x00"  # stands for the record's file and line in a chat worker's message


def _tokenize_chat(units: list[str]) -> tuple:
    """`_tokenize_batch` for conversations: each rendered by the chat template, tokenized with its
    special tokens, its mask and flags (smollm.data.chat); no EOS."""
    template, loss_on = _worker["chat"]
    tokenizer, part = _worker["tokenizer"], _worker["part"]
    ids: list[int] = []
    flags, counts = [], []
    lengths = np.empty(len(units), dtype=np.int64)
    for j, unit in enumerate(units):
        try:
            rendered = template.render_units(unit, loss_on, RECORD)
        except DataError as e:
            return None, None, None, None, (j, str(e))
        lengths[j] = 0
        for k, (text, spans) in enumerate(rendered):  # a conversation; or a pair's chosen, then rejected side
            encoding = tokenizer.encode(text, add_special_tokens=False)
            x = encoding.ids
            if not x:
                return None, None, None, None, (j, f"{RECORD}: the chat template renders the conversation as no tokens")
            f = token_mask(encoding.offsets, spans).astype(FLAGS_DTYPE)
            f[0] |= START if k == 0 else SPLIT
            ids += x
            flags.append(f)
            if part is not None:
                counts.append(bytes_in_context(text, encoding.offsets, x, part))
            lengths[j] += len(x)
    n_bytes = _as_counts(np.concatenate(counts)) if part is not None else None
    return np.array(ids, dtype=_worker["dtype"]), lengths, n_bytes, np.concatenate(flags), None


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
        self.flags: Any = None  # the open shard's flags (a chat cache), appended after the counts
        self.max_id = -1
        self.start: dict[str, Any] | None = None

    def _tmp(self) -> Path:
        return self.folder / f"shard-{len(self.index['shards']):06d}.bin.tmp"

    def _counts_tmp(self) -> Path:
        return self._tmp().with_name(self._tmp().name + ".bytes")

    def _flags_tmp(self) -> Path:
        return self._tmp().with_name(self._tmp().name + ".flags")

    def append(self, tokens: np.ndarray, state_at: Callable[[int], dict[str, Any]],
               n_bytes: np.ndarray | None = None, flags: np.ndarray | None = None) -> None:
        """Append `tokens` (and their byte counts and flags, if the cache stores them); `state_at(b)` gives
        the counts after token b - 1 and where the sources resume from there, for the index when
        a shard fills at token b."""
        while len(tokens):
            if self.file is None:
                self.file = open(self._tmp(), "wb")
                self.writer, self.max_id = HashingWriter(self.file), -1
                if n_bytes is not None:
                    self.counts = open(self._counts_tmp(), "w+b")
                if flags is not None:
                    self.flags = open(self._flags_tmp(), "w+b")
                index = self.index  # the state after the last commit: where this shard begins
                self.start = {"n_docs": index["n_docs"], "sources": [dict(c) for c in index["sources"]],
                              "resume": index["resume"]}
            take = tokens[:self.shard_tokens - self.in_shard]
            self.writer.write(np.ascontiguousarray(take))
            if n_bytes is not None:
                self.counts.write(np.ascontiguousarray(n_bytes[:len(take)]))
                n_bytes = n_bytes[len(take):]
            if flags is not None:
                self.flags.write(np.ascontiguousarray(flags[:len(take)]))
                flags = flags[len(take):]
            self.max_id = max(self.max_id, int(take.max()))
            self.in_shard += len(take)
            self.total += len(take)
            tokens = tokens[len(take):]
            if self.in_shard == self.shard_tokens:
                self.commit(state_at(self.total))

    def _close(self) -> dict[str, Any]:
        """Make the open shard durable; its index entry (not yet listed)."""
        for side, tmp in ((self.counts, self._counts_tmp()), (self.flags, self._flags_tmp())):
            if side is not None:  # the byte counts, then the flags, after the tokens, under the same digest
                side.seek(0)
                while chunk := side.read(CHUNK):
                    self.writer.write(chunk)
                side.close()
                tmp.unlink()
        self.counts = self.flags = None
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
        for side in (self.counts, self.flags):
            if side is not None:
                side.close()
        self.counts = self.flags = None
        for path in (self._tmp(), self._counts_tmp(), self._flags_tmp()):
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
                on_commit: Callable[[dict[str, Any], str | None], None] | None = None,
                chat: tuple[Any, str] | None = None) -> None:
    """Tokenize `sources` in order into the cache `folder`, each document followed by EOS, source
    i cut at its first max_tokens[i] tokens; resume from the last complete shard if an earlier
    build was interrupted. The caller holds the cache's lock. With `chat` (ChatTemplate, loss_on),
    the documents are conversations (see the module's docstring).

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
        if chat is not None:
            layout["flags_dtype"] = FLAGS_DTYPE.name
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
        say(f"resuming the tokenization at shard {len(index['shards'])} ({writer.total:,} tokens done) in {folder}",
            every_rank=True)
    start_time = time.perf_counter()
    n_docs, counts = _tokenize(writer, sources, tokenizer, max_tokens, workers, progress, "tokenizing", chat)
    index["seconds"] = round(index.get("seconds", 0) + time.perf_counter() - start_time, 2)
    try:
        writer.commit({"n_docs": n_docs, "sources": counts, "resume": None}, complete=True)
    except BaseException:
        writer.discard()
        raise


def rebuild_shard(folder: Path, index: dict[str, Any], k: int, sources: list[Any], tokenizer: Any,
                  max_tokens: list[int | None], workers: int | None = None, chat: tuple[Any, str] | None = None) -> None:
    """Tokenize shard k of a complete cache again from where its sources stood when it was built,
    and put it in place if it comes out with the recorded digest; else one DataError naming the
    shard. The caller holds the cache's lock."""
    entry = index["shards"][k]
    if "start" not in entry:
        raise DataError(f"token cache shard {folder / entry['file']} is damaged, and the cache is too old to say "
                        f"where its sources start; delete {folder} and run again")
    writer = _RebuildWriter(folder, index, k)
    try:
        _tokenize(writer, sources, tokenizer, max_tokens, workers, False, f"rebuilding {entry['file']}", chat)
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
              workers: int | None, progress: bool, desc: str,
              chat: tuple[Any, str] | None = None) -> tuple[int, list[dict[str, Any]]]:
    """Tokenize the sources from where the writer's index says they resume, into `writer`:
    (documents, per-source counts) when the sources end. `writer` may stop it earlier by raising."""
    from tqdm import tqdm

    index = writer.index
    resume = index["resume"]
    counts = [dict(s) for s in index["sources"]]  # tokens and documents per source so far
    n_docs = index["n_docs"]
    workers = workers or cpu_count()
    eos_id = tokenizer.eos_token_id
    pool = _start_workers(tokenizer, index, workers, chat)
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
            with contextlib.closing(_in_order(pool, batches, 2 * workers)) as tokenized:
                for positions, eos, (tokens, lengths, n_bytes, flags, refused) in tokenized:
                    if refused is not None:  # a record the chat template refuses, named here
                        j, message = refused
                        raise DataError(message.replace(RECORD, sources[s].where(positions[j])))
                    # Unit j's tokens are stream[starts[j] : starts[j] + lengths[j]]; the first
                    # unit's first `skip` tokens were written before an interruption.
                    first_new = writer.total
                    starts = first_new - skip + np.concatenate(([0], np.cumsum(lengths)[:-1]))
                    ends = starts + lengths
                    eos_at = (ends - 1)[np.asarray(eos, dtype=bool)]  # where the EOS tokens go
                    if n_bytes is not None:  # the byte counts of the tokens kept, as the tokens
                        n_bytes = n_bytes[skip:]
                    if flags is not None:
                        flags = flags[skip:]
                    tokens, skip = tokens[skip:], 0
                    written = first_new - begin
                    cut = cap is not None and written + len(tokens) >= cap
                    if cut and flags is not None:
                        raise DataError("max_tokens does not cut conversations; leave it out with --data.format chat")
                    if cut:
                        tokens = tokens[:cap - written]
                        if tokens[-1] != eos_id:  # the cut document still ends: the next source starts anew
                            tokens[-1] = eos_id
                            eos_at = np.append(eos_at, begin + cap - 1)
                            if n_bytes is not None:  # the EOS we insert stands for no bytes
                                n_bytes = n_bytes.copy()
                                n_bytes[len(tokens) - 1] = 0
                    if n_bytes is not None:
                        n_bytes = n_bytes[:len(tokens)]
                    placed = _Placed(counts, s, begin, positions, starts, ends, eos_at, first_new, n_docs,
                                     counts[s]["documents"])
                    writer.append(tokens, placed.state_at, n_bytes, flags)
                    n_docs = placed.state_at(writer.total)["n_docs"]
                    bar.update(len(tokens))
                    if cut:
                        break
        return n_docs, counts
    except BaseException as e:
        writer.discard()
        if not isinstance(e, Exception):  # Ctrl-C, SystemExit: a worker may have died with its batch
            pool.terminate()
        raise
    finally:
        bar.close()
        # The workers finish the few batches in flight and exit. Not terminate() here: its handler
        # thread can fork a replacement for a worker it is killing and hang (a build stopped by a bad
        # record waited forever once in the tests).
        pool.close()
        pool.join()


def _start_workers(tokenizer: Any, index: dict[str, Any], workers: int, chat: tuple[Any, str] | None = None) -> Any:
    """A pool of `workers` tokenizing processes (see `_init_worker`)."""
    # Workers are forked where that is possible: they start at once and share the parent's pages.
    # They use only the tokenizer and numpy, never a thread the parent started, so Python 3.12's
    # warning about forking a multi-threaded process does not apply to them.
    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with _env("TOKENIZERS_PARALLELISM", "false"), warnings.catch_warnings():  # one thread per worker
        warnings.filterwarnings("ignore", message=".*use of fork", category=DeprecationWarning)
        part = byte_tokens(tokenizer)[2] if "bytes_dtype" in index else None
        return context.Pool(workers, initializer=_init_worker,
                            initargs=(tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id,
                                      index["dtype"], part, chat))


def _in_order(pool: Any, batches: Iterator[tuple[list[Position], list[str], list[bool]]],
              depth: int) -> Iterator[tuple[list[Position], list[bool], tuple]]:
    """Each batch tokenized by the pool, in order, with at most `depth` batches in flight:
    (positions, eos flags, `_tokenize_batch`'s result). Closing it stops reading the source."""
    pending: collections.deque = collections.deque()
    try:
        for positions, texts, eos in batches:
            pending.append((positions, eos, pool.apply_async(_tokenize_batch, (texts, eos))))
            if len(pending) >= depth:
                positions, eos, result = pending.popleft()
                yield positions, eos, result.get()
        while pending:  # the source is read: drain what is in flight
            positions, eos, result = pending.popleft()
            yield positions, eos, result.get()
    finally:
        batches.close()


@dataclass
class _Placed:
    """One tokenized batch of source `s`, placed in the stream: unit j's tokens span [starts[j],
    ends[j]), EOS tokens lie at `eos_at`, and the batch's first token is `first_new`; `counts` is
    the build's running count per source (source s starts at token `begin`), `docs_before` and
    `source_docs_before` the documents before this batch."""

    counts: list[dict[str, Any]]
    s: int
    begin: int
    positions: list[Position]
    starts: np.ndarray
    ends: np.ndarray
    eos_at: np.ndarray
    first_new: int
    docs_before: int
    source_docs_before: int

    def state_at(self, b: int) -> dict[str, Any]:
        """The counts after token b - 1, and where the stream resumes: what the index records
        when a shard ends at token b."""
        new_docs = int(np.count_nonzero((self.eos_at >= self.first_new) & (self.eos_at < b)))
        counts, s = self.counts, self.s
        counts[s] = {**counts[s], "tokens": b - self.begin, "documents": self.source_docs_before + new_docs}
        j = int(np.searchsorted(self.ends, b, side="left"))  # the unit of token b - 1
        return {"n_docs": self.docs_before + new_docs, "sources": [dict(c) for c in counts],
                "resume": {"source": s, "unit": list(self.positions[j]), "skip": int(b - self.starts[j])}}
