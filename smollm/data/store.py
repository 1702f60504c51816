"""The token store: where a corpus's token cache lives, and its life on this machine.

`open_store(cache_dir, options)` reads `--data.cache_dir` and gives one of three stores, which
answer the same calls:

- `TokenStore`: a local cache root; a corpus's cache is `<root>/tokens/<key[:24]>/`, built here
  from its sources.
- `RemoteStore`: an object-storage root (`s3://bucket/prefix`, smollm.data.remote) mirrored into
  the local root: the cache is downloaded, or built once in the world and uploaded.
- `NamedStore`: one built cache, named as the data line prints it (`URL/tokens/KEY`, a local
  `.../tokens/KEY`, or any folder holding an index.json), used as it is, without its sources; a
  URL's is downloaded first.

`store.find()` is the `Corpus`: what the cache holds and the key that names it, found once per
process (the sources resolved and hashed, or a named cache's index read). `store.open()` is the
`TokenCache`, complete on disk and verified: found, or built (or resumed) by this process while
it holds the cache's lock; a process that finds the lock taken waits for the one building or
verifying.

Every shard is checked against its digest once per launch on each machine: the first process
there to take the lock verifies (and repairs a damaged shard: rebuilt from its sources, or
downloaded again), the others find its stamp and read nothing (smollm.data.verify). Shards built
or downloaded here were hashed as they were written or fetched: nothing is read twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from smollm import assets
from smollm.data.build import build_cache, rebuild_shard
from smollm.data.cache import (FORMAT_VERSION, INDEX, TokenCache, cache_key, context_free, is_complete, read_index,
                               token_dtype, tokenizer_fingerprint)
from smollm.data.chat import ChatTemplate
from smollm.data.remote import Remote, is_url
from smollm.data.sources import DatasetSource, FileSource, file_format
from smollm.data.verify import check_shards, stamp_verified, verified_here
from smollm.errors import DataError
from smollm.output import global_rank, note, say, warn

NAME = re.compile(r"[0-9a-f]{24}")  # a cache folder's name: the first 24 hex digits of its key


def names_one_cache(cache_dir: str | None) -> bool:
    """Whether `--data.cache_dir` names one built cache rather than a cache root: its last two
    parts are `tokens/<24 hex digits>` (what the data line prints after "cache" or "mirror of"),
    or it is a local folder that holds an index.json. A node given one cache needs no sources: it
    takes the cache as it is, so the key need not be computed from their content."""
    if not cache_dir:
        return False
    parent, _, name = cache_dir.rstrip("/").rpartition("/")
    if parent.rpartition("/")[2] == "tokens" and NAME.fullmatch(name):
        return True
    return not is_url(cache_dir) and (Path(cache_dir).expanduser() / INDEX).is_file()


@dataclass(frozen=True)
class CorpusOptions:
    """The `--data.*` options that decide a cache's tokens, as TextDataModule checked them."""

    tokenizer: str  # a name for smollm.assets.load_tokenizer
    files: list[str]  # entries of --data.files (files, globs, folders, '@stdlib'): one source
    datasets: list[tuple[str, str | None, str, str | None]]  # (name, subset, split, revision), one source each
    text_key: str
    encoding_errors: str
    max_tokens: list[int | None]  # one cap per source: the files, then each dataset
    format: str = "text"  # "chat": records are conversations, rendered by the chat template (smollm.data.chat);
    # "preference": records are pairs (prompt, chosen, rejected), both sides rendered by that template
    loss_on: str = "assistant"  # chat: which tokens carry loss, "assistant" (the replies) or "all"


@dataclass(frozen=True)
class Corpus:
    """One token cache as found: the key that names it, what the key hashes (`spec`), its folder,
    and where its tokens come from: the sources, opened (FileSource, DatasetSource), or for a
    named cache None and its `index` as read. `docs` are the files read, `empty` those skipped."""

    key: str
    spec: dict[str, Any]
    folder: Path
    sources: list[Any] | None
    docs: list[Path]
    empty: list[Any]
    index: dict[str, Any] | None = None

    def described(self) -> list[str]:
        """Each source in one phrase, as the data line names it."""
        if self.sources is None:
            return [s["source"] for s in self.index["sources"]]
        return [s.describe() for s in self.sources]


def open_store(cache_dir: str | None, options: CorpusOptions, ignored: list[str] | None = None) -> TokenStore:
    """The store that `--data.cache_dir` names (see the module's docstring). No data work: that
    waits for `find` and `open`. `ignored`: the options a named cache makes moot, said in one note
    when it is opened."""
    if names_one_cache(cache_dir):
        return NamedStore(cache_dir.rstrip("/"), options, ignored or [])
    if is_url(cache_dir):
        return RemoteStore(Remote(cache_dir), options)
    return TokenStore(cache_dir, options)


class TokenStore:
    """A local cache root: a corpus's cache is `<root>/tokens/<key[:24]>/`, built here from its
    sources; `root` is `cache_dir`, else $SMOLLM_CACHE, else ~/.cache/smollm."""

    remote: Remote | None = None  # the object-storage root it mirrors, if any
    named: str | None = None  # the one built cache that --data.cache_dir names, as given

    def __init__(self, cache_dir: str | None, options: CorpusOptions) -> None:
        self.cache_dir = cache_dir  # the local root as given: the tokenizer "smollm2" is saved there too
        self.options = options
        self.token_dir = assets.cache_dir_path(cache_dir) / "tokens"
        self.corpus: Corpus | None = None  # set by find()
        self._tokenizer: Any = None
        self._chat: ChatTemplate | None = None

    @property
    def chat(self) -> tuple[ChatTemplate, str] | None:
        """(the tokenizer's chat template, loss_on) for a chat or preference corpus, checked on first use;
        else None."""
        if self.options.format not in ("chat", "preference"):
            return None
        if self._chat is None:
            self._chat = ChatTemplate(self.tokenizer, self.options.tokenizer)
        return self._chat, self.options.loss_on

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of `options`, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = assets.load_tokenizer(self.options.tokenizer, self.cache_dir, for_cache=True)
        return self._tokenizer

    def find(self) -> Corpus:
        """The corpus and the cache's name, found once per process."""
        if self.corpus is None:
            self._check()  # bad input in one line before any data work
            self.corpus = self._find()
        return self.corpus

    def open(self) -> TokenCache:
        """The cache, complete on disk and verified (see the module's docstring)."""
        corpus = self.find()
        folder = corpus.folder
        if not self._ready(corpus):
            with _locked(folder):
                began = time.time()
                was_complete = is_complete(folder)
                if was_complete and not verified_here(folder):
                    self._verify(corpus)  # before anything reads it, or uploads it
                self._fill(corpus, was_complete)
                stamp_verified(folder, read_index(folder), began)
        return TokenCache(folder)

    def locate(self, cache: TokenCache, k: int) -> str:
        """Where document k of the cache (counting from 0) comes from: its file and line or row,
        read again from its source (only to name a record in an error); a named cache, its number."""
        counts = [s["documents"] for s in cache.index["sources"]]
        sources = self.corpus.sources if self.corpus is not None else None
        before = 0
        for s, n in enumerate(counts):
            if k < before + n and sources is not None:
                unit = next(itertools.islice(sources[s].units(), k - before, None))
                return sources[s].where(unit[0])
            before += n
        return f"document {k:,} (counting from 0) of the token cache {cache.folder}"

    def where(self, corpus: Corpus) -> str:
        """Where the data line says the cache is: its folder, and the remote it mirrors."""
        return str(corpus.folder) + (f" (mirror of {self.remote.where(corpus.folder.name)})" if self.remote else "")

    # -- what the variants change --

    def _check(self) -> None:
        """Refuse bad input before any data work (a remote's endpoint, credentials, bucket)."""

    def _ready(self, corpus: Corpus) -> bool:
        """Whether the cache needs nothing from this process: complete and verified in this launch."""
        return verified_here(corpus.folder)

    def _fill(self, corpus: Corpus, was_complete: bool) -> None:
        """Make the cache complete (the caller holds its lock): build it, unless it was."""
        if not was_complete:
            self._build(corpus)  # each shard hashed as it is written: nothing to read again

    def _repair(self, corpus: Corpus, index: dict[str, Any], damaged: list[int]) -> None:
        """Rebuild the damaged shards from their sources."""
        for k in damaged:
            name = index["shards"][k]["file"]
            warn(f"token cache shard {corpus.folder / name} is damaged (its bytes do not match its digest); "
                 "rebuilding it from its sources", every_rank=True)
            rebuild_shard(corpus.folder, index, k, corpus.sources, self.tokenizer, self.options.max_tokens,
                          chat=self.chat)

    # -- the corpus --

    def _find(self) -> Corpus:
        """Resolve and hash the sources, load the tokenizer, and name the cache."""
        options = self.options
        is_chat = options.format in ("chat", "preference")
        kind = options.format if is_chat else False  # what a record is: a conversation or a preference pair
        sources: list[Any] = []
        files = None
        if options.files:
            files = FileSource(options.files, options.text_key, options.encoding_errors, chat=kind)
            files.resolve()
            sources.append(files)
        fingerprint = tokenizer_fingerprint(self.tokenizer)  # fail fast, before reading files
        chat = self.chat  # a tokenizer without a chat template: one line, before reading files
        if files is not None:
            files.pieces = context_free(self.tokenizer)  # pieces tokenize as the whole file only then
            names = "\n".join(map(str, files.paths)).encode()
            files.scan(memo=self.token_dir / "file-hashes" / f"{hashlib.sha256(names).hexdigest()[:24]}.json")
            if files.empty:
                shown = ", ".join(str(p) for p in files.empty[:5])
                more = f" and {len(files.empty) - 5} more" if len(files.empty) > 5 else ""
                warn(f"skipping {len(files.empty)} empty file(s): {shown}{more}")
            if not files.docs:
                raise DataError(f"every file of --data.files {options.files} is empty; give files that hold text")
            text_files = [p for p in files.docs if file_format(p) == "text"]
            if is_chat and text_files:
                raise DataError(f"{text_files[0]} is a text file; --data.format chat reads conversations from JSON "
                                "Lines or parquet records (or datasets) holding 'messages': name those files only")
        for name, subset, split, revision in options.datasets:
            source = DatasetSource(name, subset, split, revision, options.text_key, options.encoding_errors,
                                   chat=kind)
            source.open()
            sources.append(source)
        for source, cap in zip(sources, options.max_tokens):
            if getattr(source, "streaming", False) and cap is None:
                warn(f"{source.describe()} is streamed without --data.max_tokens: all of it is "
                     "tokenized before training starts; set --data.max_tokens to take its first N tokens")
        spec = {"tokenizer": fingerprint, "text_key": options.text_key, "encoding_errors": options.encoding_errors,
                "sources": [s.spec() for s in sources], "max_tokens": options.max_tokens}
        if chat is not None:  # a text cache's spec (and key) is as it always was
            spec.update(data_format=options.format, loss_on=options.loss_on, chat_template=chat[0].digest)
        key = cache_key(spec)
        return Corpus(key=key, spec=spec, folder=self.token_dir / key[:24], sources=sources,
                      docs=files.docs if files else [], empty=files.empty if files else [])

    # -- building and verifying --

    def _build(self, corpus: Corpus, on_commit: Any = None) -> None:
        """Tokenize the sources into the cache (the caller holds its lock); `on_commit` as for
        `build_cache`."""
        tokenizer, sources, name = self.tokenizer, corpus.sources, self.options.tokenizer
        say(f"tokenizing {'; '.join(s.describe() for s in sources)} with {name} into {corpus.folder}")
        meta = {"key": corpus.key, "spec": corpus.spec, "tokenizer": name,
                "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                "dtype": token_dtype(len(tokenizer)).name, "text_key": self.options.text_key,
                "files": [str(p) for p in corpus.docs],
                "skipped_empty": [str(p) for p in corpus.empty]}
        # The bar on rank 0 only: another node building its own copy would print its own bar.
        build_cache(corpus.folder, sources, tokenizer, meta, self.options.max_tokens, on_commit=on_commit,
                    progress=global_rank() == 0, chat=self.chat)
        cache = TokenCache(corpus.folder)
        say(f"tokenized {cache.n_tokens:,} tokens, {cache.n_documents:,} documents, into "
            f"{len(cache.shards)} shard(s) in {cache.index.get('seconds', 0):.1f} s")

    def _verify(self, corpus: Corpus) -> None:
        """Check every shard against its digest, and repair the damaged ones."""
        index = read_index(corpus.folder)
        damaged = check_shards(corpus.folder, index)
        if damaged:
            self._repair(corpus, index, damaged)


class RemoteStore(TokenStore):
    """A remote cache root mirrored into the local one: both copies end complete (downloaded,
    uploaded, or built here and uploaded while this process holds the remote's build lock)."""

    def __init__(self, remote: Remote, options: CorpusOptions) -> None:
        super().__init__(None, options)
        self.remote = remote

    def _check(self) -> None:
        self.remote.check()

    def _ready(self, corpus: Corpus) -> bool:
        return verified_here(corpus.folder) and self.remote.is_complete(corpus.folder.name)

    def _fill(self, corpus: Corpus, was_complete: bool) -> None:
        self.remote.sync(corpus.folder, lambda on_commit: self._build(corpus, on_commit))


class NamedStore(TokenStore):
    """One built cache, used as it is: its index says what it holds; it is never built. A URL's
    (`<root>/tokens/<name>`) is downloaded into the local cache and read there; a local folder is
    read in place (and its root, if it lies in a `tokens` folder, holds the tokenizer too)."""

    def __init__(self, named: str, options: CorpusOptions, ignored: list[str]) -> None:
        self.named, self.ignored = named, ignored
        if is_url(named):
            root, name = named.rsplit("/tokens/", 1)
            super().__init__(None, options)
            self.remote = Remote(root)
            self.folder = self.token_dir / name
        else:
            folder = Path(named).expanduser()
            super().__init__(str(folder.parent.parent) if folder.parent.name == "tokens" else named, options)
            self.folder = folder

    def _check(self) -> None:
        if self.remote is not None:
            self.remote.check()

    def _fill(self, corpus: Corpus, was_complete: bool) -> None:
        if self.remote is not None and not is_complete(corpus.folder):
            self.remote.download(corpus.folder.name, corpus.folder, corpus.index)

    def _repair(self, corpus: Corpus, index: dict[str, Any], damaged: list[int]) -> None:
        """No sources here: a damaged shard of a URL's copy is downloaded again (its index removed
        first, so that no reader takes the copy for complete); one of a folder read in place is
        one line."""
        folder = corpus.folder
        shard = folder / index["shards"][damaged[0]]["file"]
        if self.remote is None:
            raise DataError(f"token cache shard {shard} is damaged (its bytes do not match its digest), and "
                            f"--data.cache_dir names this cache without its sources; copy {folder} again from "
                            "where it was built")
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        warn(f"token cache shard {shard}{more} is damaged (its bytes do not match its digest); "
             f"downloading it again from {self.named}", every_rank=True)
        (folder / INDEX).unlink()
        for k in damaged:
            (folder / index["shards"][k]["file"]).unlink(missing_ok=True)

    def _find(self) -> Corpus:
        """The cache as its index describes it: complete, of this smollm's format, built with this
        run's tokenizer. No source is read; a URL's index is read from the remote (its shards are
        downloaded by `open`)."""
        url, folder = self.named, self.folder
        index = self.remote.read_index(folder.name) if self.remote is not None else read_index(folder)
        if index is None:
            raise DataError(f"--data.cache_dir {url} holds no token cache (no readable {INDEX}); give the cache that "
                            "the building run's data line names (after 'mirror of', or after 'cache'), or build it "
                            "first")
        if not index.get("complete"):
            raise DataError(f"--data.cache_dir {url} is not complete ({len(index.get('shards', []))} shard(s) listed "
                            "so far): its build is under way or was stopped; run the build again until it ends, "
                            "then start this run")
        if index.get("format") != FORMAT_VERSION or "tokenizer" not in index.get("spec", {}):
            raise DataError(f"--data.cache_dir {url} is a token cache of format {index.get('format')!r}, which this "
                            f"smollm (format {FORMAT_VERSION}) does not read; build it again with this version")
        if self.remote is not None and not str(index.get("key", "")).startswith(folder.name):
            raise DataError(f"--data.cache_dir {url}: its {INDEX} is that of another cache "
                            f"({str(index.get('key'))[:24]}); copy that cache to its own folder, or build this one again")
        built_with = index.get("tokenizer")
        if tokenizer_fingerprint(self.tokenizer) != index["spec"]["tokenizer"]:
            raise DataError(f"--data.cache_dir {url} was built with tokenizer {built_with!r}, whose token ids differ "
                            f"from those of --data.tokenizer {self.options.tokenizer!r}; pass --data.tokenizer "
                            f"{built_with!r} (or that tokenizer, copied to this node)")
        if self.ignored:
            built_from = "; ".join(s["source"] for s in index.get("sources", []))
            note(f"{', '.join(self.ignored)} ignored: --data.cache_dir names one built cache, "
                 f"{url}, which is used as it is (built from {built_from})")
        return Corpus(key=index["key"], spec=index["spec"], folder=folder, sources=None, index=index,
                      docs=[Path(p) for p in index.get("files", [])], empty=index.get("skipped_empty", []))


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the cache's file lock (`<folder>.lock`, beside it); a process that finds it taken
    waits, and rank 0 says so once."""
    from filelock import FileLock, Timeout

    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:  # said once, by rank 0, not by every rank that waits
        say(f"waiting for another process to finish tokenizing or verifying {folder}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
