"""Sources -> documents: text files, JSON Lines, parquet and Hugging Face datasets, read as a stream.

A source yields *units*, `(position, text, eos)`: a record of a .jsonl/.parquet file or of a
dataset is one unit and one document (EOS follows it); a text file is one document read in pieces
of about PIECE_BYTES, and only its last piece is followed by EOS. `position` is where the unit
starts, `(item, offset, line)`: the file's index, then the byte offset (text, JSON Lines) or the
row (parquet, datasets), then the line number (JSON Lines). `units(start)` starts again at any
position it yielded, which is how an interrupted tokenization resumes.

With `chat` (`--data.format chat`), a record is a conversation (smollm.data.chat: `messages`, or
`prompt` and `completion`; with chat "preference", a pair: `prompt`, `chosen`, `rejected`) instead of a text field, and its unit's text is the conversation checked
and serialized, which the cache builder renders with the chat template; text files are refused.
`where(position)` names a unit's file and line or row, for errors found later.

Every bad input is a `DataError` whose one line names the file and the line or row, and says what
to do.
"""

from __future__ import annotations

import bz2
import fnmatch
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import sysconfig
import time
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from smollm.data.chat import as_unit
from smollm.errors import DataError, first_line
from smollm.io import write_json_atomic

STDLIB = "@stdlib"
# A folder given in `files` means every file below it with one of these suffixes.
TEXT_SUFFIXES = frozenset({
    ".txt", ".text", ".md", ".markdown", ".rst", ".tex",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts", ".sh",
    ".html", ".css", ".toml", ".yaml", ".yml",
})
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")  # also compressed: .jsonl.gz, .ndjson.zst, ...
PARQUET_SUFFIXES = (".parquet",)
# Compressed files are read through these; only JSON Lines may be compressed (text files are read
# by byte offset, and compressed bytes are never text).
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bzip2", ".xz": "xz"}
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark at the start of a file: an encoding mark, not text
# A text file is read and tokenized in pieces of at most this many bytes (see `read_pieces`).
PIECE_BYTES = 1 << 20
CHAT_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected")  # what a conversation's or a pair's record may hold
PARQUET_BATCH_ROWS = 1024
DATASET_BATCH_ROWS = 1024
HUB_TIMEOUT_S = 10  # asking the hub which commit a dataset name means: never a long hang

Position = tuple[int, int, int]  # (item, byte offset or row, line number)
Unit = tuple[Position, str, bool]  # (where it starts, its text, whether EOS follows it)


# ------------------------------------------------------------------------------------------------
# Which files


def stdlib_files() -> list[Path]:
    """The running Python's standard library source: every non-empty .py file, minus
    site-packages and test suites.

    Test suites are left out because they are mostly fixtures and repetition; what remains (for
    CPython 3.11: 731 files, 12 MB, 3,429,462 SmolLM2 tokens) is real, varied, human-written code.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in root.rglob("*.py")
                  if p.is_file() and p.stat().st_size > 0
                  and not skip.intersection(p.relative_to(root).parts[:-1]))


def _compression(path: Path) -> str | None:
    """The compression suffix of the file's name (".gz", ".zst", ".bz2", ".xz"), or None."""
    suffix = path.suffix.lower()
    return suffix if suffix in COMPRESSIONS else None


def file_format(path: Path) -> str:
    """"jsonl" (.jsonl/.json/.ndjson, also .gz/.zst/.bz2/.xz), "parquet", "compressed" (any other
    compressed file: refused by `resolve_files`), or "text" (any other suffix)."""
    compressed = _compression(path)
    name = (path.stem if compressed else path.name).lower()
    if name.endswith(JSON_SUFFIXES):
        return "jsonl"
    if compressed:
        return "compressed"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _in_folder(path: Path) -> bool:
    """Whether a folder given in `files` takes this file: a data file, or a text suffix (compressed
    too, so that `resolve_files` refuses it by name rather than skip it)."""
    kind = file_format(path)
    if kind in ("text", "compressed"):
        return Path(path.stem if kind == "compressed" else path.name).suffix.lower() in TEXT_SUFFIXES
    return True


def _order(path: Path) -> tuple[str, ...]:
    """Files are taken in the order of their paths' parts, whether a folder or a glob found them."""
    return path.parts


def _walk(folder: Path) -> Iterator[Path]:
    """Every folder and file below `folder`, hidden ones skipped (as a glob's `*` and `**` skip
    them). Links to folders are followed, as a glob follows them; each folder is walked once (the
    first path to it, in sorted order), so a link back up the tree is no loop. A folder that cannot
    be read is an error, never a silent gap in the corpus."""
    def unreadable(e: OSError) -> None:
        raise DataError(f"cannot read the folder {e.filename} ({e.strerror}); fix its permissions or name the "
                        "files to read in --data.files")

    seen = set()
    for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield from (Path(root, name) for name in dirs + files if not name.startswith("."))


def _folder_files(folder: Path) -> list[Path]:
    """Every data or text file below `folder` (see `_in_folder` and `_walk`)."""
    return sorted((p for p in _walk(folder) if p.is_file() and _in_folder(p)), key=_order)


def _glob(pattern: str) -> list[Path]:
    """The paths that `pattern` matches, in `_order`. A `**` recurses through `_walk`, where
    `glob.glob` would follow a link back up the tree some 40 times over (and two such links
    2**40 times: it never ends)."""
    parts = Path(os.path.expanduser(pattern)).parts
    if "**" not in parts:
        return sorted(map(Path, glob.glob(os.path.expanduser(pattern))), key=_order)
    fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    if not base.is_dir():
        return []
    below = parts[fixed:]
    found = [base] if _matches(below, ()) else []
    found += [p for p in _walk(base) if _matches(below, p.relative_to(base).parts)]
    return sorted(found, key=_order)


def _matches(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Whether path `parts` match glob `pattern` parts, where `**` is any number of parts."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _matches(pattern[1:], parts[1:])


def _refuse_compressed(path: Path) -> None:
    """A compressed file that is not JSON Lines, refused by name: its bytes are never text."""
    if file_format(path) == "compressed":
        raise DataError(f"{path} is compressed ({_compression(path)}) but not JSON Lines; smollm reads compressed "
                        f"{'/'.join(JSON_SUFFIXES)} files only: decompress it, or store its documents as JSON Lines")


def resolve_files(entries: list[str]) -> list[Path]:
    """Expand `files` entries, in order, without duplicates.

    An entry is "@stdlib", a file (any suffix), a folder (its data and text files, see
    `_folder_files`), or a glob (`**` recurses; a folder it matches is expanded as a folder, and
    `DIR/**` is the folder DIR: the files it matches directly are all in there).
    """
    out: dict[Path, None] = {}
    for entry in entries:
        if entry == STDLIB:
            found = stdlib_files()
        else:
            path = Path(entry).expanduser()
            if path.is_file():
                found = [path]
            elif path.is_dir():
                found = _folder_files(path)
                if not found:
                    raise DataError(
                        f"folder {entry!r} holds no text file ({', '.join(sorted(TEXT_SUFFIXES))}) nor "
                        f"data file ({', '.join(JSON_SUFFIXES + PARQUET_SUFFIXES)}, also {', '.join(COMPRESSIONS)}"
                        "); name the files or a glob in --data.files")
            else:
                found = []
                everything = Path(entry).name == "**"
                for p in _glob(entry):
                    found.extend(_folder_files(p) if p.is_dir() else [p] if p.is_file() and not everything else [])
        if not found:
            raise DataError(f"no file matches {entry!r}; check the path or glob in --data.files")
        for p in found:
            _refuse_compressed(p)
            out.setdefault(p.resolve(), None)
    return list(out)


# ------------------------------------------------------------------------------------------------
# Content hashes, remembered by file identity


def _blocks(f: BinaryIO, size: int = 1 << 20) -> Iterator[bytes]:
    while block := f.read(size):
        yield block


def _scan(path: Path) -> tuple[str, bool]:
    """(sha256 of the file's bytes, whether it holds anything but whitespace and a leading BOM)."""
    sha, has_text = hashlib.sha256(), False
    with open(path, "rb") as f:
        for k, block in enumerate(_blocks(f)):
            sha.update(block)
            has_text = has_text or bool((block.removeprefix(BOM) if k == 0 else block).strip())
    return sha.hexdigest(), has_text


def scan_files(paths: list[Path], memo: Path | None = None) -> tuple[list[str], list[bool]]:
    """The sha256 of each file and whether it holds text, reading each file once.

    With `memo` (a JSON file), a file whose path, size, modification time and inode are unchanged
    since it was hashed is not read again: a 100 GB corpus costs one read, not one per start and
    rank. A file modified less than 2 s before it was hashed is not remembered, since a write in
    the same clock tick could leave its modification time unchanged.
    """
    known: dict[str, list] = {}
    if memo is not None and memo.is_file():
        try:
            known = json.loads(memo.read_text())
        except (OSError, ValueError):
            known = {}
    hashes, has_text, remember, changed = [], [], {}, False
    for path in paths:
        st = path.stat()
        ident = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = known.get(str(path))
        if entry is not None and entry[:3] == ident:
            sha, text = entry[3], entry[4]
        else:
            started = time.time_ns()
            sha, text = _scan(path)
            changed = True
            if st.st_mtime_ns > started - 2_000_000_000:
                ident = None
        hashes.append(sha)
        has_text.append(text)
        if ident is not None:
            remember[str(path)] = [*ident, sha, text]
    if memo is not None and changed:
        try:
            write_json_atomic(memo, remember)
        except OSError:
            pass  # only a shortcut: the next start hashes again
    return hashes, has_text


# ------------------------------------------------------------------------------------------------
# Text files, in pieces that tokenize as the whole file does

# Where a piece may end so that the pieces tokenize exactly as the whole text does, for a
# byte-level BPE (GPT-2, SmolLM2, Llama 3): only where its pre-tokenizer splits whatever follows.
# Its patterns read the text left to right; a pre-token takes a space only as its first
# character, and a run of whitespace keeps its last character for what follows it. So a cut is
# safe before a space followed by a visible character (" word" starts a pre-token, and the
# whitespace before it is one pre-token at the end of a piece as in the whole text), and after a
# line break between two visible characters ("\n" is a pre-token there, or ends the one of the
# punctuation before it). A cut anywhere else can change a token: after a run of line breaks
# before CJK text, or inside a word. A piece with no safe cut grows until it finds one.
_LOOK_BACK = 64 << 10  # look for such a cut in the last 64 KB of a piece


def _char_at(data: bytes, i: int) -> str | None:
    """The character whose UTF-8 bytes start at data[i], or None (outside, not a character start)."""
    if not 0 <= i < len(data):
        return None
    n = 1 if data[i] < 0x80 else 2 if data[i] >> 5 == 0b110 else 3 if data[i] >> 4 == 0b1110 else 4
    try:
        return data[i:i + n].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _char_before(data: bytes, i: int) -> str | None:
    """The character whose UTF-8 bytes end at data[i - 1], or None."""
    start = i - 1
    while start > max(0, i - 4) and data[start] & 0xC0 == 0x80:  # 10xxxxxx: a continuation byte
        start -= 1
    char = _char_at(data, start)
    return char if char is not None and start + len(char.encode()) == i else None


def _visible(char: str | None) -> bool:
    return char is not None and not char.isspace()  # isspace: a superset of the regexes' \s


def _cut(data: bytes, lo: int | None = None) -> int | None:
    """Where to end a piece of `data` (0 < cut < len(data)): after the last line break between
    two visible characters, else before the last space followed by a visible character (see
    above), searched from `lo` (default: the last _LOOK_BACK bytes); None if there is none."""
    lo = max(1, len(data) - _LOOK_BACK if lo is None else lo)
    i = len(data)
    while (i := data.rfind(b"\n", lo, i)) > 0:
        if _visible(_char_at(data, i + 1)) and _visible(_char_before(data, i)):
            return i + 1
    i = len(data)
    while (i := data.rfind(b" ", lo, i)) > 0:
        if _visible(_char_at(data, i + 1)):
            return i
    return None


def read_pieces(path: Path, size: int | None = None, start: int = 0) -> Iterator[tuple[int, bytes, bool]]:
    """(byte offset, bytes, is_last) pieces of `path` of at most `size` bytes each, from `start`.

    A piece ends only where cutting changes no token of a byte-level BPE (see `_cut`), so never
    inside a UTF-8 character; a stretch of text with no such place makes a longer piece. Each
    piece depends only on the file's bytes from its own offset, so reading from a piece's offset
    gives the same pieces again. Memory stays at about 2 * size, unless pieces must grow.
    """
    size = size or PIECE_BYTES
    total = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(start)
        offset, buf, want = start, b"", size
        while True:
            if len(buf) < want:
                buf += f.read(want - len(buf))
            if not buf:
                return
            if offset + len(buf) >= total and len(buf) <= want:
                yield offset, buf, True
                return
            cut = _cut(buf[:want], lo=want - size - 2 if want > size else None)  # the new bytes, when grown
            if cut is None:  # no safe cut yet: a longer piece
                want += size
                continue
            yield offset, buf[:cut], False
            offset, buf, want = offset + cut, buf[cut:], size


# ------------------------------------------------------------------------------------------------
# Files: text, JSON Lines, parquet


# The first bytes of each compressed format (bzip2's: "BZh", a level, then a block or the end).
_MAGIC = ((re.compile(rb"\x1f\x8b"), ".gz"), (re.compile(rb"\x28\xb5\x2f\xfd"), ".zst"),
          (re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)"), ".bz2"), (re.compile(rb"\xfd7zXZ\x00"), ".xz"))
_WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")  # UTF-16 and UTF-32, either byte order


def _check_start(path: Path, head: bytes) -> None:
    """Refuse by name what a file's first (decompressed) bytes say is not UTF-8 text: compressed
    data under a plain name, or a UTF-16/32 byte-order mark. Neither is ever decoded, not even with
    --data.encoding_errors replace."""
    if head.startswith(_WIDE_BOMS):
        raise DataError(f"{path} is UTF-16 or UTF-32 text (its byte-order mark says so), not UTF-8; convert it "
                        "to UTF-8")
    for magic, suffix in _MAGIC:
        if magic.match(head) and _compression(path) is None:
            raise DataError(f"{path} holds {COMPRESSIONS[suffix]}-compressed data, not text; decompress it, or "
                            f"name it with its compression suffix if it is JSON Lines (such as .jsonl{suffix})")


class _ZstdReader(io.RawIOBase):
    """A .zst file's decompressed bytes, frame after frame. A file that ends inside a frame is an
    EOFError: zstandard's own readers return what they decoded and stop, silently."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self._file = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._frame, self._in_frame = self._dctx.decompressobj(), False
        self._out, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._at == len(self._out):
            data = self._file.read(1 << 20)
            if not data:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame: it is truncated")
                return 0
            self._out, self._at = self._decompress(data), 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at:self._at + n]
        self._at += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            self._in_frame = True
            out.append(self._frame.decompress(data))
            if not self._frame.eof:
                break
            data = self._frame.unused_data  # the next frame's first bytes
            self._frame, self._in_frame = self._dctx.decompressobj(), False
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_binary(path: Path) -> tuple[BinaryIO, tuple[type[Exception], ...]]:
    """The file's decompressed bytes, and the errors that reading them may raise (a truncated
    file included: each of these readers raises EOFError when the file ends mid-stream)."""
    compression = _compression(path)
    if compression == ".gz":
        return gzip.open(path, "rb"), (OSError, EOFError, zlib.error)
    if compression == ".bz2":
        return bz2.open(path, "rb"), (OSError, EOFError)
    if compression == ".xz":
        return lzma.open(path, "rb"), (OSError, EOFError, lzma.LZMAError)
    if compression == ".zst":
        import zstandard

        return io.BufferedReader(_ZstdReader(path), 1 << 20), (OSError, EOFError, zstandard.ZstdError)
    return open(path, "rb"), (OSError,)


class FileSource:
    """The files of --data.files, in order, as one source. Call `resolve` and `scan` first."""

    def __init__(self, entries: list[str], text_key: str = "text", encoding_errors: str = "strict",
                 pieces: bool = True, chat: bool | str = False) -> None:
        # pieces: read a text file in pieces of about PIECE_BYTES, which tokenize exactly as the
        # whole file only for a byte-level tokenizer (`cache.context_free`); else each file whole.
        self.entries, self.text_key, self.encoding_errors, self.pieces = entries, text_key, encoding_errors, pieces
        self.chat = chat  # records are conversations (see the module's docstring)
        self.paths: list[Path] = []
        self.hashes: list[str] = []  # sha256 of each file of `paths`
        self.docs: list[Path] = []  # the files that hold text, in order: what `units` reads
        self._doc_hashes: list[str] = []
        self.empty: list[Path] = []

    def resolve(self) -> None:
        """Expand the entries into files (see `resolve_files`)."""
        self.paths = resolve_files(self.entries)

    def scan(self, memo: Path | None = None) -> None:
        """Hash every file; files with nothing but whitespace are left out (`empty`)."""
        if not self.paths:
            self.resolve()
        self.hashes, has_text = scan_files(self.paths, memo)
        self.docs = [p for p, t in zip(self.paths, has_text) if t]
        self.empty = [p for p, t in zip(self.paths, has_text) if not t]
        self._doc_hashes = [h for h, t in zip(self.hashes, has_text) if t]

    def spec(self) -> dict[str, Any]:
        """What decides this source's tokens: each file's format and content hash, in order."""
        return {"files": [[file_format(p), h] for p, h in zip(self.docs, self._doc_hashes)]}

    def where(self, position: Position) -> str:
        """The file and line (JSON Lines) or row (parquet) of the unit at `position`."""
        path = self.docs[position[0]]
        kind = file_format(path)
        return f"{path} line {position[2] + 1}" if kind == "jsonl" else f"{path} row {position[1]}"

    def describe(self) -> str:
        kinds: dict[str, int] = {}
        for p in self.docs:
            kinds[file_format(p)] = kinds.get(file_format(p), 0) + 1
        what = ", ".join(f"{n} {k}" for k, n in kinds.items())
        return f"{len(self.docs)} files ({what}) from {', '.join(self.entries)}"

    def units(self, start: Position = (0, 0, 0)) -> Iterator[Unit]:
        for i in range(start[0], len(self.docs)):
            at = start if i == start[0] else (i, 0, 0)
            path = self.docs[i]
            kind = file_format(path)
            if kind == "text" and self.chat:
                raise DataError(f"{path} is a text file; --data.format chat reads conversations from JSON Lines or "
                                "parquet records (or datasets) holding 'messages': name those files only")
            if kind == "text":
                yield from self._text(i, path, at[1])
            elif kind == "jsonl":
                yield from self._jsonl(i, path, at[1], at[2])
            else:
                yield from self._parquet(i, path, at[1])

    def _text(self, i: int, path: Path, offset: int) -> Iterator[Unit]:
        whole = None if self.pieces else max(path.stat().st_size, 1)
        for at, data, last in read_pieces(path, size=whole, start=offset):
            mark = 0
            if at == 0:
                _check_start(path, data[:16])
                mark = len(BOM) if data.startswith(BOM) else 0
            try:
                text = data[mark:].decode("utf-8", errors=self.encoding_errors)
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8 at byte {at + mark + e.start} ({e.reason}); convert it "
                                "to UTF-8, drop it, or set --data.encoding_errors replace") from None
            yield (i, at, 0), text, last

    def _jsonl(self, i: int, path: Path, offset: int, line_no: int) -> Iterator[Unit]:
        key = self.text_key
        f, read_errors = _open_binary(path)
        try:
            with f:
                if offset:
                    if _compression(path) is None:
                        f.seek(offset)
                    else:  # compressed: decompress and drop what was already read
                        left = offset
                        while left and (block := f.read(min(left, 1 << 20))):
                            left -= len(block)
                for raw in f:
                    at, offset, line_no = offset, offset + len(raw), line_no + 1
                    if at == 0:
                        _check_start(path, raw[:16])
                        raw = raw.removeprefix(BOM)
                    if not raw.strip():
                        continue
                    where = f"{path} line {line_no}"
                    try:
                        record = json.loads(raw.decode("utf-8", errors=self.encoding_errors))
                    except UnicodeDecodeError as e:
                        raise DataError(f"{where} is not UTF-8 ({e.reason}); convert the file to UTF-8 "
                                        "or set --data.encoding_errors replace") from None
                    except ValueError as e:
                        raise DataError(f"{where} is not valid JSON ({first_line(e)}); each line must be "
                                        'one JSON object such as {"text": "..."}') from None
                    if not isinstance(record, dict):
                        raise DataError(f"{where} is a JSON {type(record).__name__}, not an object; each "
                                        'line must be one JSON object such as {"text": "..."}')
                    if self.chat:
                        unit = as_unit(record, where, self.chat)
                        if b"\\u" in raw:
                            unit = self._surrogates(unit, where)
                        yield (i, at, line_no - 1), unit, True
                        continue
                    if key not in record:
                        fields = ", ".join(map(repr, list(record)[:8])) or "none"
                        raise DataError(f"{where} has no field {key!r} (its fields: {fields}); set "
                                        "--data.text_key to the field that holds the text")
                    text = record[key]
                    if not isinstance(text, str):
                        raise DataError(f"{where}: field {key!r} is {_json_type(text)}, not a string; "
                                        "fix that record or set --data.text_key")
                    if b"\\u" in raw:  # only an escape gives a lone surrogate, which no tokenizer takes
                        text = self._surrogates(text, where)
                    yield (i, at, line_no - 1), text, True
        except read_errors as e:  # a truncated or damaged .gz/.zst, an unreadable file
            raise DataError(f"cannot read {path} ({first_line(e)}); check or recompress the file") from None

    def _surrogates(self, text: str, where: str) -> str:
        """`text`, refused (strict) or with U+FFFD (replace) where it holds half of a UTF-16 pair."""
        if not (found := _SURROGATE.search(text)):
            return text
        if self.encoding_errors == "replace":
            return _SURROGATE.sub("\ufffd", text)
        raise DataError(f"{where}: field {self.text_key!r} holds \\u{ord(found.group()):04x}, half of a UTF-16 pair, "
                        "which is not a character; fix that record or set --data.encoding_errors replace")

    def _parquet(self, i: int, path: Path, row: int) -> Iterator[Unit]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        key = self.text_key
        try:
            pf = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path} is not a readable parquet file ({first_line(e)})") from None
        names = pf.schema_arrow.names
        if self.chat:
            yield from self._parquet_chat(i, path, row, pf)
            return
        if key not in names:
            raise DataError(f"{path} has no column {key!r} (its columns: {', '.join(map(repr, names[:8]))}); "
                            "set --data.text_key to the column that holds the text")
        kind = pf.schema_arrow.field(key).type
        values = kind.value_type if pa.types.is_dictionary(kind) else kind  # dictionary-encoded strings too
        if not (pa.types.is_string(values) or pa.types.is_large_string(values)
                or getattr(pa.types, "is_string_view", lambda _: False)(values)):
            raise DataError(f"{path}: column {key!r} holds {kind}, not strings; set --data.text_key to "
                            "the column that holds the text")
        # Skip the row groups that end before `row`, then the rows before it in the first one read.
        groups, first = [], 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if groups or first + n > row:
                groups.append(g)
            else:
                first += n
        if not groups:
            return
        try:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=[key]):
                texts = _arrow_texts(batch.column(0), self.encoding_errors, lambda j: f"{path} row {first + j}")
                for j, text in enumerate(texts):
                    r = first + j
                    if r < row:
                        continue
                    if text is None:
                        raise DataError(f"{path} row {r}: {key!r} is null, not a string; drop that row "
                                        "(rows count from 0)")
                    yield (i, r, 0), text, True
                first += len(texts)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"cannot read {path} ({first_line(e)}); check the file") from None


    def _parquet_chat(self, i: int, path: Path, row: int, pf: Any) -> Iterator[Unit]:
        """The conversations of a parquet file (its `messages` column, or `prompt` and `completion`)."""
        import pyarrow as pa

        columns = [c for c in CHAT_FIELDS if c in pf.schema_arrow.names]
        if not columns:
            raise DataError(f"{path} has no column 'messages' (nor 'prompt' and 'completion'); its columns: "
                            f"{', '.join(map(repr, pf.schema_arrow.names[:8]))}")
        try:
            r = 0
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
                if r + batch.num_rows <= row:
                    r += batch.num_rows
                    continue
                for record in batch.to_pylist():
                    if r >= row:
                        unit = as_unit(record, f"{path} row {r}", self.chat)
                        yield (i, r, 0), self._surrogates(unit, f"{path} row {r}"), True
                    r += 1
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"cannot read {path} ({first_line(e)}); check the file") from None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _arrow_texts(column: Any, errors: str, where: Callable[[int], str]) -> list:
    """An Arrow string column as Python strings (None for a null). Arrow does not check that a
    parquet file's strings are UTF-8: bad bytes are one line naming the row (`where(j)` for row j
    of the column), or U+FFFD with errors="replace", as in text files."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        pass
    import pyarrow as pa

    texts = column.cast(pa.large_binary()).to_pylist()
    for j, raw in enumerate(texts):
        if raw is not None:
            try:
                texts[j] = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as e:
                raise DataError(f"{where(j)}: the text is not UTF-8 at byte {e.start} ({e.reason}); fix that row "
                                "or set --data.encoding_errors replace") from None
    return texts


def _json_type(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------------
# Hugging Face datasets


def _is_saved_dataset(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


class DatasetSource:
    """One split of a Hugging Face dataset: a hub name (streamed) or a folder saved with
    `datasets` (`save_to_disk`, memory-mapped, never loaded whole). Call `open` first.

    A hub dataset's fingerprint is the commit its revision points to, asked of the hub in one
    quick request; a `revision` that is already a full commit sha needs no request, so a cache
    built elsewhere is found on a machine without hub access. The stream itself is opened only
    to tokenize.
    """

    def __init__(self, name: str, subset: str | None, split: str, revision: str | None,
                 text_key: str = "text", encoding_errors: str = "strict", chat: bool | str = False) -> None:
        self.name, self.subset, self.split, self.revision = name, subset, split, revision
        self.text_key, self.encoding_errors = text_key, encoding_errors
        self.chat = chat  # records are conversations (see the module's docstring)
        self.local = Path(name).expanduser().is_dir()
        self.fingerprint: str | None = None
        self._data: Any = None
        self._asked_hub = False

    @property
    def streaming(self) -> bool:
        return not self.local

    def describe(self) -> str:
        subset = f" {self.subset}" if self.subset else ""
        at = f" @ {self.fingerprint}" if self.streaming and self.fingerprint else ""
        return f"{self.name}{subset} ({self.split}{at})"

    def open(self) -> None:
        """Find the data's fingerprint: the saved dataset's own, or the hub commit's sha."""
        if self.fingerprint is not None:
            return
        if self.local:
            self._open_saved()
        elif self.name.startswith((".", "/", "~")):
            raise DataError(f"--data.dataset {self.name!r}: no such folder; give a folder saved with "
                            "datasets' save_to_disk, or a Hugging Face dataset name")
        elif self.revision and re.fullmatch(r"[0-9a-f]{40}", self.revision):
            self.fingerprint = self.revision
        else:
            self.fingerprint = self._ask_hub()

    def spec(self) -> dict[str, Any]:
        return {"dataset": self.name if not self.local else str(Path(self.name).expanduser().resolve()),
                "subset": self.subset, "split": self.split, "revision": self.revision,
                "fingerprint": self.fingerprint}

    def _open_saved(self) -> None:
        import datasets

        folder = Path(self.name).expanduser()
        if not _is_saved_dataset(folder):
            raise DataError(f"--data.dataset {self.name!r} is a folder but not one saved with datasets' "
                            "save_to_disk; pass its .parquet or .jsonl files with --data.files instead")
        if self.subset:
            raise DataError(f"--data.subset {self.subset!r} names a hub dataset's configuration; "
                            f"{self.name!r} is a saved dataset folder, which has none: leave it out")
        try:
            data = datasets.load_from_disk(str(folder))
        except Exception as e:  # noqa: BLE001  the library's own errors vary; the user needs the folder
            raise DataError(f"cannot load the saved dataset {self.name!r} ({first_line(e)})") from None
        if isinstance(data, datasets.DatasetDict):
            if self.split not in data:
                raise DataError(f"the saved dataset {self.name!r} has no split {self.split!r} (its splits: "
                                f"{', '.join(data)}); set --data.split")
            data = data[self.split]
        elif data.split is None and self.split != "train":
            raise DataError(f"the saved dataset {self.name!r} is one dataset without splits, so it has no split "
                            f"{self.split!r}; leave --data.split at train")
        elif data.split is not None and str(data.split) != self.split:
            raise DataError(f"the saved dataset {self.name!r} is the split {str(data.split)!r}, not {self.split!r}; "
                            f"set --data.split {data.split}")
        self._check_column(data.column_names)
        if self.chat:
            self._data, self.fingerprint = data, data._fingerprint
            return
        feature = data.features[self.text_key]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise DataError(f"dataset {self.name!r}: column {self.text_key!r} holds {feature}, not strings; "
                            "set --data.text_key to the column that holds the text")
        self._data, self.fingerprint = data, data._fingerprint

    def _ask_hub(self) -> str:
        """The commit sha of the dataset's revision. One quick request, not retried: it fails at
        once when the hub is unreachable, where `load_dataset` alone retries for a long while."""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        self._asked_hub = True
        try:
            return HfApi().dataset_info(self.name, revision=self.revision, timeout=HUB_TIMEOUT_S).sha
        except RevisionNotFoundError:
            raise DataError(f"dataset {self.name!r} has no revision {self.revision!r}; check "
                            "--data.revision") from None
        except RepositoryNotFoundError:
            raise DataError(f"no dataset {self.name!r} on the Hugging Face hub (or it is private and no "
                            "token is set); check --data.dataset") from None
        except Exception as e:  # noqa: BLE001  any network failure reads the same to the user
            raise DataError(f"cannot reach the Hugging Face hub for dataset {self.name!r} ({first_line(e)}); "
                            "check the network, or save the data with datasets' save_to_disk (or as "
                            ".parquet/.jsonl files) and pass that folder or those files") from None

    def _stream(self) -> Any:
        """The split as an IterableDataset at the pinned commit (`load_dataset(streaming=True)`)."""
        import datasets

        if not self._asked_hub:
            self._ask_hub()  # fail at once, not after load_dataset's retries
        try:
            return datasets.load_dataset(self.name, self.subset, split=self.split, revision=self.fingerprint,
                                         streaming=True)
        except Exception as e:  # noqa: BLE001  a wrong subset or split: the library says which exist
            raise DataError(f"cannot stream dataset {self.describe()} ({first_line(e)}); check "
                            "--data.subset and --data.split") from None

    def where(self, position: Position) -> str:
        return f"dataset {self.describe()} row {position[1]}"

    def _check_column(self, columns: list[str] | None) -> None:
        if columns is not None and self.chat and not set(CHAT_FIELDS) & set(columns):
            raise DataError(f"dataset {self.describe()} has no column 'messages' (nor 'prompt' and 'completion'); "
                            f"its columns: {', '.join(map(repr, columns[:8]))}")
        if columns is not None and not self.chat and self.text_key not in columns:
            raise DataError(f"dataset {self.describe()} has no column {self.text_key!r} (its columns: "
                            f"{', '.join(map(repr, columns[:8]))}); set --data.text_key")

    def units(self, start: Position = (0, 0, 0)) -> Iterator[Unit]:
        self.open()
        if self._data is None:
            self._data = self._stream()
        row, key = start[1], self.text_key
        if self.chat:
            for record in self._chat_records(row):
                where = f"dataset {self.describe()} row {row}"
                yield (0, row, 0), self._surrogates(as_unit(record, where, self.chat), where), True
                row += 1
            return
        if self.local:
            table = self._data.with_format("arrow")
            batches = (_arrow_texts(table[i:i + DATASET_BATCH_ROWS].column(key), self.encoding_errors,
                                   lambda j, i=i: f"dataset {self.describe()} row {i + j}")
                       for i in range(row, len(self._data), DATASET_BATCH_ROWS))
        else:
            stream = self._data.skip(row) if row else self._data
            batches = self._hub_batches(stream)
        for texts in batches:
            for text in texts:
                if not isinstance(text, str):
                    raise DataError(f"dataset {self.describe()} row {row}: {key!r} is {_json_type(text)}, "
                                    "not a string (rows count from 0); set --data.text_key")
                yield (0, row, 0), text, True
                row += 1

    def _surrogates(self, unit: str, where: str) -> str:
        if (found := _SURROGATE.search(unit)) is None:
            return unit
        if self.encoding_errors == "replace":
            return _SURROGATE.sub("\ufffd", unit)
        raise DataError(f"{where} holds \\u{ord(found.group()):04x}, half of a UTF-16 pair, which is not a character; "
                        "fix that record or set --data.encoding_errors replace")

    def _chat_records(self, row: int) -> Iterator[dict]:
        """The records from `row` on, each a dict of the conversation's columns."""
        if self.local:
            columns = [c for c in CHAT_FIELDS if c in self._data.column_names]
            table = self._data.with_format("arrow")
            for i in range(row, len(self._data), DATASET_BATCH_ROWS):
                yield from table[i:i + DATASET_BATCH_ROWS].select(columns).to_pylist()
            return
        stream = self._data.skip(row) if row else self._data
        try:
            for batch in stream.iter(batch_size=DATASET_BATCH_ROWS):
                self._check_column(list(batch))
                columns = [c for c in CHAT_FIELDS if c in batch]
                yield from ({c: batch[c][j] for c in columns} for j in range(len(batch[columns[0]])))
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001  a stream that breaks mid-way: the build resumes later
            raise DataError(f"reading dataset {self.describe()} failed ({first_line(e)}); run again to "
                            "resume from the last complete shard") from None

    def _hub_batches(self, stream: Any) -> Iterator[list]:
        try:
            for batch in stream.iter(batch_size=DATASET_BATCH_ROWS):
                if self.text_key not in batch:
                    self._check_column(list(batch))
                yield batch[self.text_key]
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001  a stream that breaks mid-way: the build resumes later
            raise DataError(f"reading dataset {self.describe()} failed ({first_line(e)}); run again to "
                            "resume from the last complete shard") from None
