"""TextDataModule: the LightningDataModule whose typed, documented __init__ arguments are the
`--data.*` options. It wires sources -> token cache -> windows -> batches, and says in one line
what it trains on.
"""

from __future__ import annotations

import hashlib
import logging
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from smollm import assets
from smollm.data.cache import (FORMAT_VERSION, INDEX, TokenCache, build_cache, cache_key, check_shards,
                               is_complete, load_tokenizer, read_index, rebuild_shard, stamp_verified,
                               context_free, token_dtype, tokenizer_fingerprint, verified_in_this_launch)
from smollm.data.remote import Remote, is_url
from smollm.data.sources import STDLIB, DatasetSource, FileSource
from smollm.batch import BatchPlan
from smollm.data.windows import ResumableSampler, TokenWindows, split_windows
from smollm.errors import DataError

log = logging.getLogger(__name__)

NAME = re.compile(r"[0-9a-f]{24}")  # a cache folder's name: the first 24 hex digits of its key


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


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


class TextDataModule(L.LightningDataModule):
    """Text tokenized once into a sharded disk cache, served as seq_len + 1 token windows.

    The sources are the files of `files` (one source, in order), then each dataset of `dataset`;
    their documents, each followed by EOS, make one token stream. A batch is
    {"input_ids": LongTensor (B, seq_len + 1), "index": LongTensor (B,)}: inputs are
    input_ids[:, :-1], targets input_ids[:, 1:], and index holds the window ids (to check that a
    resume neither repeats nor skips a window). Training batches come in an endless order that is a
    pure function of (seed, global sample index), so the Trainer must be built with
    `use_distributed_sampler=False` (this module splits data across ranks itself) and stopped by
    `max_steps`. An optimizer step takes the next `global_batch_size` samples, split into
    accumulate_grad_batches micro-batches of batch_size on each process: the same samples per
    step whatever the number of processes, so a run can resume on another number of them.
    Validation is the held-out tail of the token stream, the same windows every time.

    With several processes, one builds the cache while the others wait for it (a file lock in
    the cache folder); on several machines, put `cache_dir` on a shared file system, or make it an
    object-storage URL that each node mirrors into its local cache (smollm.data.remote).

    For evaluation, after `setup()`: `tokenizer`, `token_cache` (every token, one stream),
    `val_windows()`, `heldout_windows()` and `corpus_windows()`.

    Args:
        files: Files to train on, one entry or a list: files, globs (** recurses) or folders; .jsonl/.json (one JSON object per line, also .gz/.zst) and .parquet hold one document per record, any other file is one document of text; a folder means its data files and its .txt .md .rst .py ... files, hidden ones skipped. "@stdlib" is this Python's standard-library source, the default when no dataset is given.
        text_key: The field of a JSON record, or the column of a parquet file or dataset, that holds the text.
        dataset: A Hugging Face dataset, or a list of them: a hub name (streamed, never downloaded whole) or a folder saved with datasets' save_to_disk. Its documents follow those of files.
        subset: The dataset's configuration (hub datasets), e.g. "cosmopedia-v2"; a list makes one source per entry. dataset, subset, split and revision each take one value or one per source.
        split: The dataset split to read.
        revision: A hub dataset's branch, tag or commit (default: the main branch, pinned to its commit when the cache is built).
        max_tokens: Take only the first N tokens of each source, the last of them EOS (files count as one source); a list gives one N per source, in order. Without it every source is read whole: a streamed hub dataset is tokenized to its end before training starts.
        tokenizer: Tokenizer name for smollm.assets.load_tokenizer: "smollm2", a tokenizer directory or a Hugging Face name.
        seq_len: Tokens per training sequence; each window holds seq_len + 1 tokens (inputs and shifted targets).
        batch_size: Sequences per micro-batch on each device.
        global_batch_size: Windows per optimizer step, all processes together (tokens per step = global_batch_size x seq_len). Gradient accumulation follows: global_batch_size / (batch_size x processes). None: batch_size x processes x trainer.accumulate_grad_batches, or on resume the checkpoint's.
        val_fraction: Fraction of the token stream held out at its end for validation, in whole windows (at least one).
        max_val_windows: Validate on at most this many held-out windows (the first ones), so validation stays quick; None for all.
        num_workers: DataLoader worker processes per device; the batch order does not depend on it.
        seed: Seed of the training order; the order is a pure function of (seed, step).
        cache_dir: Cache root (default $SMOLLM_CACHE or ~/.cache/smollm); token caches go to its "tokens" folder. An object-storage URL (s3://bucket/prefix, or another fsspec URL) is a remote mirror: the cache is built once and uploaded there, and each node downloads it into its local cache ($SMOLLM_CACHE) instead of tokenizing. One built cache, named as the data line prints it (s3://bucket/prefix/tokens/KEY, or a local .../tokens/KEY or any folder holding an index.json), is used as it is, without its sources: files, dataset and the options that shape the cache are then ignored, with a note, and the tokenizer must be the one it was built with.
        encoding_errors: "strict" stops at bytes that are not UTF-8, naming the file and offset; "replace" turns them into U+FFFD.
    """

    def __init__(
        self,
        files: list[str] | str | None = None,
        text_key: str = "text",
        dataset: list[str] | str | None = None,
        subset: list[str | None] | str | None = None,
        split: list[str] | str = "train",
        revision: list[str | None] | str | None = None,
        max_tokens: list[int | None] | int | None = None,
        tokenizer: str = "smollm2",
        seq_len: int = 2048,
        batch_size: int = 8,
        global_batch_size: int | None = None,
        val_fraction: float = 0.005,
        max_val_windows: int | None = 128,
        num_workers: int = 2,
        seed: int = 1234,
        cache_dir: str | None = None,
        encoding_errors: str = "strict",
    ) -> None:
        super().__init__()
        named = names_one_cache(cache_dir)
        # With one cache named, what it was built from is its index's to say: the options that
        # shape a cache are ignored (said once, when the cache is opened).
        self._ignored = [f"--data.{k}" for k, v, default in (
            ("files", files, None), ("dataset", dataset, None), ("subset", subset, None), ("split", split, "train"),
            ("revision", revision, None), ("max_tokens", max_tokens, None), ("text_key", text_key, "text"),
            ("encoding_errors", encoding_errors, "strict")) if named and v != default]
        if named:
            files, dataset, max_tokens = [], None, None
        files = ([STDLIB] if dataset is None else []) if files is None else _as_list(files)
        datasets = self._dataset_specs(dataset, subset, split, revision)
        n_sources = (1 if files else 0) + len(datasets)
        caps = [None] * n_sources if max_tokens is None else _as_list(max_tokens)
        if len(caps) == 1:
            caps = caps * n_sources
        checks = [
            (named or len(files) > 0 or len(datasets) > 0,
             "files is empty; name at least one file, glob or folder, '@stdlib', or a --data.dataset"),
            (isinstance(text_key, str) and text_key != "", f"text_key must be a field name, got {text_key!r}"),
            (len(caps) == n_sources, f"max_tokens has {len(caps)} values for {n_sources} sources (files, then "
                                     "each dataset); give one value, or one per source"),
            (all(c is None or (isinstance(c, int) and c > 0) for c in caps),
             f"max_tokens must be positive integers or None, got {max_tokens!r}"),
            (isinstance(seq_len, int) and seq_len > 0, f"seq_len must be a positive integer, got {seq_len!r}"),
            (isinstance(batch_size, int) and batch_size > 0,
             f"batch_size must be a positive integer, got {batch_size!r}"),
            (global_batch_size is None or (isinstance(global_batch_size, int) and global_batch_size > 0),
             f"global_batch_size must be a positive integer (windows per optimizer step), got {global_batch_size!r}"),
            (0 < val_fraction < 1, f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}"),
            (max_val_windows is None or max_val_windows > 0,
             f"max_val_windows must be positive or None, got {max_val_windows!r}"),
            (isinstance(num_workers, int) and num_workers >= 0,
             f"num_workers must be 0 or more, got {num_workers!r}"),
            (encoding_errors in ("strict", "replace"),
             f"encoding_errors must be 'strict' or 'replace', got {encoding_errors!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DataError(message)
        self.save_hyperparameters()
        self.files, self.datasets, self.text_key, self.max_tokens = files, datasets, text_key, caps
        self.tokenizer_name, self.seq_len = tokenizer, seq_len
        self.batch_size, self.val_fraction, self.max_val_windows = batch_size, val_fraction, max_val_windows
        self.num_workers, self.seed, self.encoding_errors = num_workers, seed, encoding_errors
        self.global_batch_size = global_batch_size
        self.resumed: dict[str, Any] | None = None  # the checkpoint's data state, on resume
        self._plan: BatchPlan | None = None  # the batch plan smollm.fit hands over
        self.remote = Remote(cache_dir) if is_url(cache_dir) else None
        self.cache_dir = None if self.remote else cache_dir  # the local root
        self.named: str | None = cache_dir.rstrip("/") if named else None  # one built cache, as given
        self.named_folder: Path | None = None  # where it is read: in place, or the local copy of a URL
        if self.named and self.remote:
            root, name = self.named.rsplit("/tokens/", 1)
            self.remote = Remote(root)
            self.named_folder = assets.cache_dir_path(None) / "tokens" / name
        elif self.named:
            self.named_folder = Path(self.named).expanduser()
            if self.named_folder.parent.name == "tokens":  # the root it lies in holds the tokenizer, too
                self.cache_dir = str(self.named_folder.parent.parent)
        self.token_dir = assets.cache_dir_path(self.cache_dir) / "tokens"
        self._tokenizer: Any = None
        self._corpus: dict[str, Any] | None = None  # the sources and the cache's name, found once
        # Set by setup():
        self.token_cache: TokenCache | None = None
        self.n_tokens: int | None = None
        self.n_documents: int | None = None
        self.n_train_windows: int | None = None
        self.n_val_windows: int | None = None  # validated windows, all ranks together
        self.n_heldout_windows: int | None = None  # windows in the held-out tail (>= n_val_windows)
        self.val_start: int | None = None  # the first token of the held-out tail
        self.train_dataset: TokenWindows | None = None
        self.val_dataset: TokenWindows | None = None

    @staticmethod
    def _dataset_specs(dataset: Any, subset: Any, split: Any, revision: Any) -> list[tuple]:
        """(name, subset, split, revision) per dataset source: each option gives one value for
        all, or one per source."""
        if dataset is None:
            return []
        columns = {"dataset": _as_list(dataset), "subset": _as_list(subset), "split": _as_list(split),
                   "revision": _as_list(revision)}
        n = max(len(v) for v in columns.values())
        for option, values in columns.items():
            if len(values) not in (1, n):
                raise DataError(f"--data.{option} has {len(values)} values but another option has {n}; "
                                "give one value, or one per dataset source")
        return [tuple(values[i] if len(values) > 1 else values[0] for values in columns.values())
                for i in range(n)]

    # -- tokenizer, loaded on first use (no data work in __init__) --

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name, self.cache_dir)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    # -- Lightning hooks --

    def prepare_data(self) -> None:
        """Tokenize into the cache unless it is complete (one process). With several processes
        the cache is built in `setup`, where one builds and the others wait on a file lock: a
        long build would outlast the collective barrier that follows `prepare_data`."""
        if self._rank_world()[1] == 1:
            self._ensure_cache()

    def setup(self, stage: str | None = None) -> None:
        """Open the cache (every rank; built first if need be) and make the windows."""
        if self.train_dataset is not None:
            return
        corpus = self._ensure_cache()
        cache = TokenCache(corpus["folder"])
        L_ = self.seq_len
        n_train, n_heldout, val_start = split_windows(cache.n_tokens, L_, self.val_fraction)
        rank, world = self._rank_world()
        n_val = self._n_validated(n_heldout, world)
        if n_val == 0:
            raise DataError(f"the validation split has {n_heldout} window(s), fewer than the {world} "
                            "devices; raise --data.val_fraction or add text")
        self.token_cache, self.n_tokens, self.n_documents = cache, cache.n_tokens, cache.n_documents
        self.n_train_windows, self.n_heldout_windows, self.n_val_windows = n_train, n_heldout, n_val
        self.val_start = val_start
        self.train_dataset = TokenWindows(cache, L_, 0, range(n_train))
        self.val_dataset = TokenWindows(cache, L_, val_start, range(rank, n_val, world))

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is not None and getattr(getattr(trainer, "_accelerator_connector", None),
                                           "use_distributed_sampler", False) and trainer.world_size > 1:
            raise DataError("TextDataModule splits data across ranks itself; build the Trainer "
                            "with use_distributed_sampler=False")
        rank, world = self._rank_world()
        plan = self.plan
        if trainer is not None and plan.accumulation != trainer.accumulate_grad_batches:
            raise DataError(
                f"--data.global_batch_size {self.global_batch_size} needs {plan.accumulation} micro-batch(es) of "
                f"{self.batch_size} per step on {world} process(es), but the Trainer accumulates "
                f"{trainer.accumulate_grad_batches}; leave accumulate_grad_batches to smollm.fit, or set it to "
                f"{plan.accumulation}")
        # Resume: Lightning 2.6.6's Trainer._run restores the datamodule (load_state_dict) and then
        # the fit loop (hence global_step) before _run_stage() -> fit_loop.setup_data() ->
        # train_dataloader(), so here global_step is the restored optimizer step.
        sampler = ResumableSampler(self.n_train_windows, self.batch_size, self.seed, rank, world,
                                   plan.samples_at(self._step()))
        return self._loader(self.train_dataset, sampler)

    @property
    def plan(self) -> BatchPlan:
        """The batch plan (smollm.batch): the one smollm.fit hands over; without one (a Trainer built
        by hand), the options' on the Trainer's processes, with the Trainer's accumulation when no
        global batch is set, continued from the checkpoint's state on resume."""
        if self._plan is not None:
            return self._plan
        world, by_hand = self._rank_world()[1], getattr(self.trainer, "accumulate_grad_batches", 1)
        # A global batch that the Trainer's accumulation disagrees with: train_dataloader says so.
        plan = BatchPlan.from_options(self.global_batch_size, self.batch_size, world,
                                      by_hand if self.global_batch_size is None else 1)
        if self.resumed:
            plan.load_state_dict(self.resumed)
        return plan

    @plan.setter
    def plan(self, plan: BatchPlan) -> None:
        self._plan = plan

    def _step(self) -> int:
        return getattr(self.trainer, "global_step", 0) if self.trainer is not None else 0

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, None)

    # What the training order depends on: a resume with other values warns. The batch split
    # (micro-batch, processes, accumulation) is not among them: the order is per global sample.
    ORDER = ("seed", "seq_len", "n_train_windows", "cache_key")

    def state_dict(self) -> dict[str, Any]:
        """The order's settings, the global batch (windows and tokens per step), how this run split
        it, and how many global samples were trained on: a resume on any number of processes
        keeps the tokens per step and continues from that sample."""
        world = self._rank_world()[1]
        state = {"seed": self.seed, "seq_len": self.seq_len, "n_train_windows": self.n_train_windows,
                 "cache_key": self._corpus["key"] if self._corpus else None,
                 "batch_size": self.batch_size, "world_size": world}
        if self.trainer is not None:  # the batch plan's state, under the keys checkpoints have always had
            plan = self.plan
            state.update(plan.state_dict(self.trainer.global_step), tokens_per_step=plan.global_batch * self.seq_len)
            if validated := self._windows_validated(world):
                state["val_windows_validated"] = validated
        return state

    def _windows_validated(self, world: int) -> int | None:
        """How many held-out windows this run's validation took, the Trainer's limit_val_batches
        included (None before any validation): the first N of `val_windows`, as each rank takes
        every world-th window in order."""
        batches = getattr(self.trainer, "num_val_batches", None)
        if not batches or self.n_val_windows is None or batches[0] == float("inf"):
            return None
        per_rank = self._n_validated(self.n_heldout_windows, world) // world
        return world * min(per_rank, int(batches[0]) * self.batch_size)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resumed = dict(state)
        if self._plan is not None:
            self._plan.load_state_dict(state)
        now = self.state_dict()
        changed = [f"{k}: {v} -> {now[k]}" for k in self.ORDER
                   if (v := state.get(k)) is not None and now[k] is not None and v != now[k]]
        if changed:
            rank_zero_warn("data changed since the checkpoint (" + "; ".join(changed) + "); the "
                           "resumed run does not continue the same sample order")

    # -- what evaluation reads (after setup) --

    @property
    def cache_spec(self) -> dict[str, Any]:
        """What the token cache's key hashes (tokenizer, sources, options), for `cache.cache_key`."""
        self._need_setup()
        return self._corpus["spec"]

    def val_windows(self, world_size: int | None = None, limit: int | None = None) -> TokenWindows:
        """The windows that training validates on, all ranks' together, in order: the first
        `n_val_windows` windows of the held-out tail; with `world_size`, those that a run on that
        many processes validates (a multiple of it, so that every rank has as many); at most
        `limit` (what a run's Trainer limited its validation to)."""
        self._need_setup()
        n = self.n_val_windows if world_size is None else self._n_validated(self.n_heldout_windows, world_size)
        n = n if limit is None else min(n, limit)
        return TokenWindows(self.token_cache, self.seq_len, self.val_start, range(n))

    def heldout_windows(self) -> TokenWindows:
        """Every window of the held-out tail (training validates on the first `n_val_windows`)."""
        self._need_setup()
        return TokenWindows(self.token_cache, self.seq_len, self.val_start, range(self.n_heldout_windows))

    def corpus_windows(self, seq_len: int | None = None) -> TokenWindows:
        """Windows over every token of the sources: window k is tokens [k*L, k*L + L] (L = seq_len,
        default the module's), the last one shorter, so every token but the first is a target
        exactly once. Batch the last window alone (or pad it) since it may be shorter."""
        self._need_setup()
        L_ = seq_len or self.seq_len
        n = -(-(self.n_tokens - 1) // L_)  # ceil((n_tokens - 1) / L)
        return TokenWindows(self.token_cache, L_, 0, range(n), stop=self.n_tokens)

    def describe(self, windows: str | None = None) -> str:
        """The data line: sources, documents, tokens, shards, windows, passes, cache. `windows`
        replaces the part about training windows (evaluate says what it scores)."""
        c = self._corpus
        if c is None or self.n_tokens is None:
            return f"TextDataModule({self.named or ', '.join(self.files + [d[0] for d in self.datasets])}): not set up yet"
        if c["sources"] is None:  # a named cache: its sources as its index recorded them
            described = [s["source"] for s in c["index"]["sources"]]
            caps = c["spec"].get("max_tokens") or [None] * len(described)
        else:
            described, caps = [s.describe() for s in c["sources"]], self.max_tokens
        sources = "; ".join(d + (f" (first {cap:,} tokens)" if cap else "") for d, cap in zip(described, caps))
        skipped = f" ({len(c['empty'])} empty skipped)" if c["empty"] else ""
        shards = len(self.token_cache.shards)
        windows = windows or (f"seq_len {self.seq_len}: {self.n_train_windows:,} train windows, {self.n_val_windows} "
                              f"of {self.n_heldout_windows} held-out windows validated; {self._passes()}")
        return (f"data: {sources}{skipped}; {self.n_documents:,} documents, {self.n_tokens:,} tokens "
                f"({self.tokenizer_name}, vocab {self.vocab_size}) in {shards} shard{'s' * (shards != 1)}; "
                f"{windows}; cache {c['folder']}"
                + (f" (mirror of {self.remote.where(c['folder'].name)})" if self.remote else ""))

    # -- helpers --

    def _passes(self) -> str:
        """How many passes over the training windows the run's max_steps makes."""
        trainer = self.trainer
        max_steps = getattr(trainer, "max_steps", -1) if trainer is not None else -1
        if max_steps is None or max_steps < 0:
            return "no max_steps, so no count of passes"
        per_step = self.plan.global_batch
        return (f"max_steps {max_steps:,} x {per_step} windows = "
                f"{max_steps * per_step / self.n_train_windows:.3g} passes over the training windows")

    def describe_batch(self) -> str:
        """The batch line: windows and tokens per step, and how this run splits them; on a resume
        on another number of processes, that too."""
        return self.plan.describe(self.seq_len)

    def _need_setup(self) -> None:
        if self.token_cache is None:
            raise RuntimeError("TextDataModule.setup() must run first")

    def _n_validated(self, n_heldout: int, world: int) -> int:
        """Held-out windows validated on `world` processes: the first max_val_windows, fewer to a
        multiple of `world`, so that every rank validates as many."""
        n = min(n_heldout, self.max_val_windows or n_heldout)
        return n - n % world

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _find_corpus(self) -> dict[str, Any]:
        """Resolve and hash the sources, load the tokenizer, and name the cache (once per process)."""
        if self._corpus is not None:
            return self._corpus
        if self.named is not None:
            self._corpus = self._open_named()
            return self._corpus
        sources: list[Any] = []
        files = None
        if self.files:
            files = FileSource(self.files, self.text_key, self.encoding_errors)
            files.resolve()
            sources.append(files)
        fingerprint = tokenizer_fingerprint(self.tokenizer)  # fail fast, before reading files
        if files is not None:
            files.pieces = context_free(self.tokenizer)  # pieces tokenize as the whole file only then
            names = "\n".join(map(str, files.paths)).encode()
            files.scan(memo=self.token_dir / "file-hashes" / f"{hashlib.sha256(names).hexdigest()[:24]}.json")
            if files.empty:
                shown = ", ".join(str(p) for p in files.empty[:5])
                more = f" and {len(files.empty) - 5} more" if len(files.empty) > 5 else ""
                rank_zero_warn(f"skipping {len(files.empty)} empty file(s): {shown}{more}")
            if not files.docs:
                raise DataError(f"every file of --data.files {self.files} is empty; give files that hold text")
        for name, subset, split, revision in self.datasets:
            source = DatasetSource(name, subset, split, revision, self.text_key, self.encoding_errors)
            source.open()
            sources.append(source)
        for source, cap in zip(sources, self.max_tokens):
            if getattr(source, "streaming", False) and cap is None:
                rank_zero_warn(f"{source.describe()} is streamed without --data.max_tokens: all of it is "
                               "tokenized before training starts; set --data.max_tokens to take its first "
                               "N tokens")
        spec = {"tokenizer": fingerprint, "text_key": self.text_key, "encoding_errors": self.encoding_errors,
                "sources": [s.spec() for s in sources], "max_tokens": self.max_tokens}
        key = cache_key(spec)
        folder = self.token_dir / key[:24]
        self._corpus = {"key": key, "spec": spec, "sources": sources, "folder": folder,
                        "meta_path": folder / INDEX, "bin_path": folder / "shard-000000.bin",
                        "docs": files.docs if files else [], "empty": files.empty if files else []}
        return self._corpus

    def _open_named(self) -> dict[str, Any]:
        """The cache that `--data.cache_dir` names, as its index describes it: complete, of this
        smollm's format, built with this run's tokenizer. No source is read; a URL's index is read
        from the remote (its shards are downloaded by `_ensure_cache`)."""
        url, folder = self.named, self.named_folder
        assert url is not None and folder is not None
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
                            f"from those of --data.tokenizer {self.tokenizer_name!r}; pass --data.tokenizer "
                            f"{built_with!r} (or that tokenizer, copied to this node)")
        if self._ignored:
            built_from = "; ".join(s["source"] for s in index.get("sources", []))
            log.warning(f"note: {', '.join(self._ignored)} ignored: --data.cache_dir names one built cache, "
                        f"{url}, which is used as it is (built from {built_from})")
        return {"key": index["key"], "spec": index["spec"], "sources": None, "index": index, "folder": folder,
                "meta_path": folder / INDEX, "bin_path": folder / "shard-000000.bin",
                "docs": [Path(p) for p in index.get("files", [])], "empty": index.get("skipped_empty", [])}

    def _ensure_cache(self) -> dict[str, Any]:
        """The cache complete on disk and verified: found, or built (or resumed) by this process
        while it holds the cache's lock; a process that finds the lock taken waits for the one
        building or verifying. With a remote mirror, both copies end complete: downloaded,
        uploaded, or built and uploaded. A cache named by `--data.cache_dir` is never built: a
        URL's is downloaded, a local folder is read in place.

        Every shard is checked against its digest once per launch on each machine: the first
        process there to take the lock verifies (and rebuilds a damaged shard), the others find
        its stamp and read nothing. A new run verifies again. Shards built or downloaded here were
        hashed as they were written or fetched: nothing is read twice.
        """
        from filelock import FileLock, Timeout

        if self.remote is not None:
            self.remote.check()  # bad input in one line before any data work
        corpus = self._find_corpus()
        folder, named = corpus["folder"], corpus["sources"] is None
        if self._verified_here(folder) and (self.remote is None or named or self.remote.is_complete(folder.name)):
            return corpus
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:  # said once, by rank 0, not by every rank that waits
            if self._rank_world()[0] == 0:
                print(f"waiting for another process to finish tokenizing or verifying {folder}", file=sys.stderr,
                      flush=True)
            lock.acquire()
        try:
            began = time.time()
            was_complete = is_complete(folder)
            if was_complete and not self._verified_here(folder):
                self._verify(corpus)  # before anything reads it, or uploads it
            if named:  # a URL's cache is copied here; a local folder is read in place, as it is
                if self.remote is not None and not is_complete(folder):
                    self.remote.download(folder.name, folder, corpus["index"])
            elif self.remote is not None:
                self.remote.sync(folder, lambda on_commit: self._build(corpus, on_commit))
            elif not was_complete:
                self._build(corpus)  # each shard hashed as it is written: nothing to read again
            stamp_verified(folder, read_index(folder), began)
        finally:
            lock.release()
        return corpus

    @staticmethod
    def _verified_here(folder: Path) -> bool:
        index = read_index(folder)
        return bool(index and index.get("complete")) and verified_in_this_launch(folder, index)

    def _verify(self, corpus: dict[str, Any]) -> None:
        """Check every shard against its digest; rebuild the damaged ones from their sources. A
        named cache has no sources here: a damaged shard of a URL's copy is downloaded again (its
        index removed first, so that no reader takes the copy for complete), one of a folder read
        in place is one line."""
        folder = Path(corpus["folder"])
        index = read_index(folder)
        damaged = check_shards(folder, index)
        if damaged and corpus["sources"] is None:
            shard = folder / index["shards"][damaged[0]]["file"]
            if self.remote is None:
                raise DataError(f"token cache shard {shard} is damaged (its bytes do not match its digest), and "
                                f"--data.cache_dir names this cache without its sources; copy {folder} again from "
                                "where it was built")
            more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
            print(f"warning: token cache shard {shard}{more} is damaged (its bytes do not match its digest); "
                  f"downloading it again from {self.named}", file=sys.stderr, flush=True)
            (folder / INDEX).unlink()
            for k in damaged:
                (folder / index["shards"][k]["file"]).unlink(missing_ok=True)
            return
        for k in damaged:
            name = index["shards"][k]["file"]
            print(f"warning: token cache shard {folder / name} is damaged (its bytes do not match its digest); "
                  "rebuilding it from its sources", file=sys.stderr, flush=True)
            rebuild_shard(folder, index, k, corpus["sources"], self.tokenizer, self.max_tokens)

    def _build(self, corpus: dict[str, Any], on_commit: Any = None) -> None:
        tokenizer, sources = self.tokenizer, corpus["sources"]
        rank_zero_info(f"tokenizing {'; '.join(s.describe() for s in sources)} with {self.tokenizer_name} "
                       f"into {corpus['folder']}")
        meta = {"key": corpus["key"], "spec": corpus["spec"], "tokenizer": self.tokenizer_name,
                "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                "dtype": token_dtype(len(tokenizer)).name, "text_key": self.text_key,
                "files": [str(p) for p in corpus["docs"]],
                "skipped_empty": [str(p) for p in corpus["empty"]]}
        # The bar on rank 0 only: another node building its own copy would print its own bar.
        build_cache(Path(corpus["folder"]), sources, tokenizer, meta, self.max_tokens, on_commit=on_commit,
                    progress=self._rank_world()[0] == 0)
        cache = TokenCache(corpus["folder"])
        rank_zero_info(f"tokenized {cache.n_tokens:,} tokens, {cache.n_documents:,} documents, into "
                       f"{len(cache.shards)} shard(s) in {cache.index.get('seconds', 0):.1f} s")

    def _loader(self, dataset: TokenWindows | None, sampler: Sampler | None) -> DataLoader:
        if dataset is None:
            raise RuntimeError("TextDataModule.setup() must run before asking for a dataloader")
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, shuffle=False,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(),
                          worker_init_fn=_ignore_stop_signals if self.num_workers > 0 else None)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C and SIGTERM: a terminal signals the whole process group,
    a scheduler every process of the job, and the main process still needs its workers to finish
    the current step before it saves and stops (smollm.callbacks.StopAtStepEnd). Workers end with
    the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
