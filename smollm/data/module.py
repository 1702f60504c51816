"""TextDataModule: the LightningDataModule whose typed, documented __init__ arguments are the
`--data.*` options. It reads in one sitting: the options are checked (`__init__`), a token store
opens the cache (smollm.data.store), the cache is cut into windows (`setup`), and the windows are
served by loaders; and it says in one line what it trains on.

With `format="chat"` the records are conversations (smollm.data.chat): each is rendered by the
tokenizer's chat template into the cache with its loss mask, and `setup` packs whole conversations
into windows (smollm.data.packing), so a batch also holds `loss_mask` and `document_ids`; the
training order, its split over processes and its resume are those of text windows.

With `format="preference"` the records are preference pairs (prompt, chosen, rejected; DPO): each
side is rendered by the chat template into the cache with its reply's loss mask, and a training
"window" is a pair: a batch of P pairs holds 2P right-padded rows, the chosen sides then the rejected
ones (smollm.data.pairs), with the same order, split over processes and resume as windows.
"""

from __future__ import annotations

import signal
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, default_collate

from smollm.batch import BatchPlan
from smollm.data.cache import TokenCache
from smollm.data.chat import LOSS_ON
from smollm.data.packing import OVERLONG, PackedWindows, fit_lengths, pack_bfd
from smollm.data.pairs import PadPairs, PreferencePairs, fit_pairs, pair_table
from smollm.data.sources import STDLIB
from smollm.data.store import CorpusOptions, TokenStore, names_one_cache, open_store
from smollm.data.windows import ResumableSampler, TokenWindows, split_windows
from smollm.errors import DataError
from smollm.output import note, warn


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


class TextDataModule(L.LightningDataModule):
    """Text tokenized once into a sharded disk cache, served as seq_len + 1 token windows.

    The sources are the files of `files` (one source, in order), then each dataset of `dataset`;
    their documents, each followed by EOS, make one token stream. A batch is
    {"input_ids": LongTensor (B, seq_len + 1), "index": LongTensor (B,)}: inputs are
    input_ids[:, :-1], targets input_ids[:, 1:], and index holds the window ids (to check that a
    resume neither repeats nor skips a window); with document_mask, also "document_ids" (B, seq_len).
    Training batches come in an endless order that is a
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
    `val_windows()` and `corpus_windows()`; `store.corpus` describes the cache.

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
        document_mask: Confine attention to each document within a window and restart positions at each one (training and validation batches carry "document_ids": a new document after each end-of-document token); false attends across documents, as SmolLM2 was pretrained.
        format: "text": documents of text, cut into windows (pretraining). "chat": conversations, records holding "messages" (a list of {role, content}, roles system, user and assistant) or "prompt" and "completion"; each is rendered by the tokenizer's chat template, and whole conversations are packed into windows with a loss mask and per-conversation document ids. "preference": preference pairs for DPO (--model.objective dpo), records holding "prompt", "chosen" and "rejected", each a string or a list of messages (the replies may be whole conversations starting with the prompt, as UltraFeedback-binarized has them); each side is rendered as prompt + reply by the chat template, one pair per training sample (a batch holds its chosen and rejected sequences, padded).
        loss_on: With format chat, the tokens that carry loss: "assistant" (each assistant reply and its end-of-turn token) or "all" (every token of the conversation). With format preference, the reply's tokens are scored: "assistant" only.
        overlong: With format chat, a conversation longer than a window (seq_len + 1 tokens) is "truncate"d to its first seq_len + 1 tokens (dropped if none of those carries loss), "drop"ped, or refused ("error"), in one line naming its record. With format preference, the same for each side of a pair (a pair with a side truncated to no reply token, or a side too long with drop, is dropped whole).
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
        document_mask: bool = False,
        format: str = "text",
        loss_on: str = "assistant",
        overlong: str = "truncate",
    ) -> None:
        super().__init__()
        named = names_one_cache(cache_dir)
        # With one cache named, what it was built from is its index's to say: the options that
        # shape a cache are ignored (said once, when the cache is opened).
        ignored = [f"--data.{k}" for k, v, default in (
            ("files", files, None), ("dataset", dataset, None), ("subset", subset, None), ("split", split, "train"),
            ("revision", revision, None), ("max_tokens", max_tokens, None), ("text_key", text_key, "text"),
            ("encoding_errors", encoding_errors, "strict"), ("loss_on", loss_on, "assistant"))
            if named and v != default]
        if named:
            files, dataset, max_tokens = [], None, None
        chat = format in ("chat", "preference")  # records rendered by the chat template
        if chat and not named and files is None and dataset is None:
            held = "'messages'" if format == "chat" else "'prompt', 'chosen' and 'rejected'"
            raise DataError(f"--data.format {format} needs {'conversations' if format == 'chat' else 'preference pairs'}: "
                            f"give --data.files (JSON Lines or parquet records holding {held}) or --data.dataset")
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
            (isinstance(document_mask, bool), f"document_mask must be true or false, got {document_mask!r}"),
            (not (chat and document_mask), f"--data.document_mask is for text; with --data.format {format} attention "
             "always stays within each conversation: leave it out"),
            (format in ("text", "chat", "preference"), f"format must be 'text', 'chat' or 'preference', got {format!r}"),
            (format != "preference" or loss_on == "assistant", "--data.loss_on all does not apply to --data.format "
             "preference: DPO scores each pair's replies; leave it out"),
            (loss_on in LOSS_ON, f"loss_on must be {' or '.join(map(repr, LOSS_ON))}, got {loss_on!r}"),
            (overlong in OVERLONG, f"overlong must be {', '.join(map(repr, OVERLONG))}, got {overlong!r}"),
            (not chat or all(c is None for c in caps),
             "--data.max_tokens takes the first N tokens of text and does not cut conversations; leave it out "
             f"with --data.format {format}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DataError(message)
        self.save_hyperparameters()
        self.files, self.datasets, self.text_key, self.max_tokens = files, datasets, text_key, caps
        self.seq_len = seq_len
        self.batch_size, self.val_fraction, self.max_val_windows = batch_size, val_fraction, max_val_windows
        self.num_workers, self.seed, self.encoding_errors = num_workers, seed, encoding_errors
        self.global_batch_size = global_batch_size
        self.document_mask = document_mask
        self.format, self.loss_on, self.overlong = format, loss_on, overlong
        self.resumed: dict[str, Any] | None = None  # the checkpoint's data state, on resume
        # Where the cache lives and its life; no data work until prepare_data / setup.
        self.store: TokenStore = open_store(cache_dir, CorpusOptions(tokenizer, files, datasets, text_key,
                                                                     encoding_errors, caps, format, loss_on), ignored)
        self._plan: BatchPlan | None = None  # the batch plan smollm.fit hands over
        # Set by setup():
        self.token_cache: TokenCache | None = None
        self.n_tokens: int | None = None
        self.n_documents: int | None = None
        self.n_train_windows: int | None = None
        self.n_val_windows: int | None = None  # validated windows, all ranks together
        self.n_heldout_windows: int | None = None  # windows in the held-out tail (>= n_val_windows)
        self.val_start: int | None = None  # the first token of the held-out tail
        self.train_dataset: TokenWindows | PackedWindows | None = None
        self.val_dataset: TokenWindows | PackedWindows | None = None
        self.packing: dict[str, Any] | None = None  # chat: the conversations and their packing (`_setup_chat`)
        self.pairs: dict[str, Any] | None = None  # preference: the pairs and which of them are used (`_setup_preference`)
        self.epochs: int | None = None  # passes over the training windows the run makes, when it counts them

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
        return self.store.tokenizer

    @property
    def tokenizer_name(self) -> str:
        return self.store.options.tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    # -- Lightning hooks --

    def prepare_data(self) -> None:
        """Tokenize into the cache unless it is complete (one process). With several processes
        the cache is built in `setup`, where one builds and the others wait on a file lock: a
        long build would outlast the collective barrier that follows `prepare_data`."""
        if self._rank_world()[1] == 1:
            self.store.open()

    def setup(self, stage: str | None = None) -> None:
        """Open the cache (every rank; built first if need be) and make the windows."""
        if self.train_dataset is not None:
            return
        cache = self.store.open()
        if cache.data_format != self.format:
            what = {"text": "text", "chat": "conversations", "preference": "preference pairs"}
            raise DataError(f"the token cache {cache.folder} holds {what[cache.data_format]}, but --data.format "
                            f"{self.format} asks for {what[self.format]}; set --data.format {cache.data_format}")
        if cache.data_format == "preference":
            return self._setup_preference(cache)
        if cache.is_chat:
            return self._setup_chat(cache)
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

    def _setup_chat(self, cache: TokenCache) -> None:
        """Conversations -> packed windows: the last val_fraction of the conversations (at least
        one) are held out; each part is packed on its own (best-fit decreasing); a conversation
        longer than a window is truncated, dropped or refused (`overlong`), counted in one line."""
        capacity = self.seq_len + 1
        starts, loss = cache.documents()
        n_docs = len(starts)
        lengths = np.diff(np.append(starts, cache.n_tokens))
        n_heldout_docs = max(1, round(self.val_fraction * n_docs))
        if n_docs - n_heldout_docs < 1:
            raise DataError(f"the corpus has {n_docs} conversation(s): too few for one to train on and "
                            f"{n_heldout_docs} held out; add conversations or lower --data.val_fraction")
        used, over = fit_lengths(lengths, capacity, self.overlong)
        if self.overlong == "error" and len(over):
            d = int(over[0])
            raise DataError(f"{self.store.locate(cache, d)}: the conversation has {int(lengths[d]):,} tokens, more than a "
                            f"window's {capacity:,} (seq_len + 1), and --data.overlong is error; raise --data.seq_len, "
                            "or set --data.overlong truncate or drop")
        used_loss = loss.copy()
        used_loss[over] = 0
        emptied = 0
        if self.overlong == "truncate":
            for d in over.tolist():
                used_loss[d] = int(cache.loss_mask(int(starts[d]), int(starts[d]) + capacity).sum())
                if used_loss[d] == 0:  # nothing left to train on
                    used[d], emptied = 0, emptied + 1
        if len(over):
            what = ("dropped (--data.overlong drop)" if self.overlong == "drop" else
                    f"truncated to their first {capacity:,} (--data.overlong truncate)" +
                    (f", {emptied:,} of them dropped for want of a token that carries loss" if emptied else ""))
            note(f"{len(over):,} of {n_docs:,} conversations are longer than a window of seq_len + 1 = {capacity:,} "
                 f"tokens: {what}")
        first_val = n_docs - n_heldout_docs
        train, heldout = used.copy(), used.copy()
        train[first_val:], heldout[:first_val] = 0, 0
        order_t, bounds_t = pack_bfd(train, capacity)
        order_v, bounds_v = pack_bfd(heldout, capacity)
        n_train, n_heldout = len(bounds_t) - 1, len(bounds_v) - 1
        if n_train == 0 or n_heldout == 0:
            raise DataError(f"no conversation is left to {'train on' if n_train == 0 else 'validate on'} with "
                            f"seq_len {self.seq_len} and --data.overlong {self.overlong}; raise --data.seq_len or set "
                            "--data.overlong truncate")
        rank, world = self._rank_world()
        n_val = self._n_validated(n_heldout, world)
        if n_val == 0:
            raise DataError(f"the validation split has {n_heldout} window(s), fewer than the {world} "
                            "devices; raise --data.val_fraction or add conversations")
        pad = int(cache.index.get("eos_token_id") or 0)
        self.token_cache, self.n_tokens, self.n_documents = cache, cache.n_tokens, n_docs
        self.n_train_windows, self.n_heldout_windows, self.n_val_windows = n_train, n_heldout, n_val
        self.val_start = int(starts[first_val])
        self.train_dataset = PackedWindows(cache, self.seq_len, starts, used, order_t, bounds_t, range(n_train), pad)
        self.val_dataset = PackedWindows(cache, self.seq_len, starts, used, order_v, bounds_v,
                                         range(rank, n_val, world), pad)
        self.packing = {"starts": starts, "lengths": used, "heldout": (order_v, bounds_v), "pad": pad,
                        "n_overlong": len(over), "loss_tokens": int(loss.sum()),
                        "train_tokens": int(train.sum()), "train_loss_tokens": int(used_loss[:first_val][train[:first_val] > 0].sum())}

    def _setup_preference(self, cache: TokenCache) -> None:
        """Pairs -> samples: the last val_fraction of the pairs (at least one) are held out; a side
        longer than a window is truncated, or its pair dropped or refused (`overlong`), counted in
        one line. A training "window" is a pair."""
        capacity = self.seq_len + 1
        table = pair_table(cache)
        n_pairs = len(table)
        n_heldout_pairs = max(1, round(self.val_fraction * n_pairs))
        if n_pairs - n_heldout_pairs < 1:
            raise DataError(f"the corpus has {n_pairs} preference pair(s): too few for one to train on and "
                            f"{n_heldout_pairs} held out; add pairs or lower --data.val_fraction")
        lengths, over, emptied = fit_pairs(cache, table, capacity, self.overlong)
        if self.overlong == "error" and len(over):
            k = int(over[0])
            raise DataError(f"{self.store.locate(cache, k)}: a side of the pair has {int(table[k, :, 1].max()):,} tokens, "
                            f"more than a window's {capacity:,} (seq_len + 1), and --data.overlong is error; raise "
                            "--data.seq_len, or set --data.overlong truncate or drop")
        if len(over):
            what = ("dropped (--data.overlong drop)" if self.overlong == "drop" else
                    f"truncated to their first {capacity:,} tokens (--data.overlong truncate)" +
                    (f", {emptied:,} pairs of them dropped for want of a reply token" if emptied else ""))
            note(f"{len(over):,} of {n_pairs:,} preference pairs have a side longer than a window of seq_len + 1 = "
                 f"{capacity:,} tokens: {what}")
        first_val = n_pairs - n_heldout_pairs
        kept = (lengths > 0).all(axis=1)
        train, heldout = np.flatnonzero(kept[:first_val]), first_val + np.flatnonzero(kept[first_val:])
        if len(train) == 0 or len(heldout) == 0:
            raise DataError(f"no preference pair is left to {'train on' if len(train) == 0 else 'validate on'} with "
                            f"seq_len {self.seq_len} and --data.overlong {self.overlong}; raise --data.seq_len or set "
                            "--data.overlong truncate")
        rank, world = self._rank_world()
        n_val = self._n_validated(len(heldout), world)
        if n_val == 0:
            raise DataError(f"the validation split has {len(heldout)} pair(s), fewer than the {world} "
                            "devices; raise --data.val_fraction or add pairs")
        self.token_cache, self.n_tokens, self.n_documents = cache, cache.n_tokens, n_pairs
        self.n_train_windows, self.n_heldout_windows, self.n_val_windows = len(train), len(heldout), n_val
        self.val_start = int(table[first_val, 0, 0])
        self.train_dataset = PreferencePairs(cache, table, lengths, train)
        self.val_dataset = PreferencePairs(cache, table, lengths, heldout[rank:n_val:world])
        self.pairs = {"table": table, "lengths": lengths, "used": np.flatnonzero(kept), "n_over": len(over),
                      "pad": int(cache.index.get("eos_token_id") or 0)}

    def reference_pairs(self, rank: int = 0, world: int = 1) -> DataLoader:
        """Every pair used (trained or validated on), this process's share (rank::world), in batches
        of batch_size as training makes them: what `--model.dpo_precompute_reference` scores once."""
        self._need_setup()
        p = self.pairs
        dataset = PreferencePairs(self.token_cache, p["table"], p["lengths"], p["used"][rank::world])
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=PadPairs(p["pad"]),
                          num_workers=0)

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
    ORDER = ("seed", "seq_len", "n_train_windows", "cache_key", "overlong")

    def state_dict(self) -> dict[str, Any]:
        """The order's settings, the global batch (windows and tokens per step), how this run split
        it, and how many global samples were trained on: a resume on any number of processes
        keeps the tokens per step and continues from that sample."""
        world = self._rank_world()[1]
        state = {"seed": self.seed, "seq_len": self.seq_len, "n_train_windows": self.n_train_windows,
                 "cache_key": self.store.corpus.key if self.store.corpus else None,
                 "batch_size": self.batch_size, "world_size": world, "document_mask": self.document_mask}
        if self.format in ("chat", "preference"):  # what else decides the windows or pairs (a text run's as it was)
            state["overlong"] = self.overlong
            state["val_start"] = self.val_start  # the first held-out conversation's first token (evaluate)
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
                   if (v := state.get(k)) is not None and now.get(k) is not None and v != now[k]]
        if changed:
            warn("data changed since the checkpoint (" + "; ".join(changed) + "); the "
                 "resumed run does not continue the same sample order")
        before = bool(state.get("document_mask", False))  # a checkpoint from before the option had none
        if before != self.document_mask:
            warn(f"--data.document_mask {str(before).lower()} -> {str(self.document_mask).lower()} since the "
                 f"checkpoint: from the resumed step on, attention "
                 + ("stays within each document" if self.document_mask else "crosses document boundaries"))

    # -- what evaluation reads (after setup) --

    @property
    def cache_spec(self) -> dict[str, Any]:
        """What the token cache's key hashes (tokenizer, sources, options), for `cache.cache_key`."""
        self._need_setup()
        return self.store.corpus.spec

    def val_windows(self, world_size: int | None = None, limit: int | None = None) -> TokenWindows:
        """The windows that training validates on, all ranks' together, in order: the first
        `n_val_windows` windows of the held-out tail; with `world_size`, those that a run on that
        many processes validates (a multiple of it, so that every rank has as many); at most
        `limit` (what a run's Trainer limited its validation to)."""
        self._need_setup()
        n = self.n_val_windows if world_size is None else self._n_validated(self.n_heldout_windows, world_size)
        n = n if limit is None else min(n, limit)
        if self.packing is not None:
            p = self.packing
            return PackedWindows(self.token_cache, self.seq_len, p["starts"], p["lengths"], *p["heldout"], range(n),
                                 p["pad"])
        return TokenWindows(self.token_cache, self.seq_len, self.val_start, range(n))

    def corpus_windows(self, seq_len: int | None = None) -> TokenWindows:
        """Windows over every token of the sources: window k is tokens [k*L, k*L + L] (L = seq_len,
        default the module's), the last one shorter, so every token but the first is a target
        exactly once. Batch the last window alone (or pad it) since it may be shorter."""
        self._need_setup()
        L_ = seq_len or self.seq_len
        if self.packing is not None:  # every conversation once, packed as training packs them
            p = self.packing
            lengths = np.diff(np.append(p["starts"], self.n_tokens))
            used = fit_lengths(lengths, L_ + 1, "truncate" if self.overlong == "error" else self.overlong)[0]
            order, bounds = pack_bfd(used, L_ + 1)
            return PackedWindows(self.token_cache, L_, p["starts"], used, order, bounds, range(len(bounds) - 1),
                                 p["pad"])
        n = -(-(self.n_tokens - 1) // L_)  # ceil((n_tokens - 1) / L)
        return TokenWindows(self.token_cache, L_, 0, range(n), stop=self.n_tokens)

    def describe(self, windows: str | None = None) -> str:
        """The data line: sources, documents, tokens, shards, windows, passes, cache. `windows`
        replaces the part about training windows (evaluate says what it scores)."""
        c = self.store.corpus
        if c is None or self.n_tokens is None:
            named = self.store.named
            return f"TextDataModule({named or ', '.join(self.files + [d[0] for d in self.datasets])}): not set up yet"
        described = c.described()  # a named cache's sources as its index recorded them
        caps = c.spec.get("max_tokens") or [None] * len(described)
        sources = "; ".join(d + (f" (first {cap:,} tokens)" if cap else "") for d, cap in zip(described, caps))
        skipped = f" ({len(c.empty)} empty skipped)" if c.empty else ""
        shards = len(self.token_cache.shards)
        if self.packing is not None:
            return self._describe_chat(sources, skipped, shards, windows, c)
        if self.pairs is not None:
            return self._describe_pairs(sources, skipped, shards, windows, c)
        masked = ", attention within documents" if self.document_mask else ""
        windows = windows or (f"seq_len {self.seq_len}{masked}: {self.n_train_windows:,} train windows, "
                              f"{self.n_val_windows} of {self.n_heldout_windows} held-out windows validated; "
                              f"{self._passes()}")
        return (f"data: {sources}{skipped}; {self.n_documents:,} documents, {self.n_tokens:,} tokens "
                f"({self.tokenizer_name}, vocab {self.vocab_size}) in {shards} shard{'s' * (shards != 1)}; "
                f"{windows}; cache {self.store.where(c)}")

    def _describe_chat(self, sources: str, skipped: str, shards: int, windows: str | None, c: Any) -> str:
        """The data line of conversations: how many tokens carry loss, and how full the packed windows are."""
        p = self.packing
        on = "the assistant replies" if self.loss_on == "assistant" else "every token"
        capacity = self.seq_len + 1
        fill = p["train_tokens"] / (self.n_train_windows * capacity)
        done = {"truncate": "truncated", "drop": "dropped"}.get(self.overlong, "")
        overlong = f", {p['n_overlong']:,} overlong conversations {done}" if p["n_overlong"] else ""
        windows = windows or (f"seq_len {self.seq_len}: {self.n_train_windows:,} train windows packed {fill:.1%} full"
                              f"{overlong}, {p['train_loss_tokens']:,} of their tokens carry loss; {self.n_val_windows} of "
                              f"{self.n_heldout_windows} held-out windows validated; {self._passes()}")
        return (f"data: {sources}{skipped}; {self.n_documents:,} conversations, {self.n_tokens:,} tokens "
                f"({self.tokenizer_name}, vocab {self.vocab_size}, its chat template) in {shards} "
                f"shard{'s' * (shards != 1)}, {p['loss_tokens']:,} of them carrying loss (loss on {on}); {windows}; "
                f"cache {self.store.where(c)}")

    def _describe_pairs(self, sources: str, skipped: str, shards: int, windows: str | None, c: Any) -> str:
        """The data line of preference pairs."""
        p = self.pairs
        done = {"truncate": "truncated", "drop": "dropped"}.get(self.overlong, "")
        overlong = f", {p['n_over']:,} pairs with an overlong side {done}" if p["n_over"] else ""
        windows = windows or (f"seq_len {self.seq_len}: {self.n_train_windows:,} train pairs{overlong}; {self.n_val_windows} "
                              f"of {self.n_heldout_windows} held-out pairs validated; {self._passes()}")
        return (f"data: {sources}{skipped}; {self.n_documents:,} preference pairs, {self.n_tokens:,} tokens "
                f"({self.tokenizer_name}, vocab {self.vocab_size}, its chat template; chosen and rejected sides, loss on "
                f"the replies) in {shards} shard{'s' * (shards != 1)}; {windows}; cache {self.store.where(c)}")

    # -- helpers --

    def epoch_steps(self, epochs: int) -> int:
        """The optimizer step at which `epochs` passes over the training windows end: epochs x the
        training windows, in global batches (smollm.batch's `step_after`: a resume on another global
        batch counts from the samples already seen). An epoch is a pass in the training order (every
        window once, shuffled anew each pass), so the last step may take the first windows of the next."""
        self._need_setup()
        return self.plan.step_after(epochs * self.n_train_windows)

    def epoch_at(self, step: int) -> float:
        """Passes over the training windows made after optimizer step `step` (2.5: halfway through the third)."""
        self._need_setup()
        return self.plan.samples_at(step) / self.n_train_windows

    def _passes(self) -> str:
        """How many passes over the training windows the run makes: its epochs, or what its max_steps make."""
        trainer = self.trainer
        max_steps = getattr(trainer, "max_steps", -1) if trainer is not None else -1
        per_step = self.plan.global_batch
        unit = "pairs" if self.pairs is not None else "windows"  # a preference run's samples are pairs
        if self.epochs:
            steps = self.epoch_steps(self.epochs)
            stop = f", stopping at step {max_steps:,} (--trainer.max_steps)" if 0 <= max_steps < steps else ""
            return (f"{self.epochs} epoch{'s' * (self.epochs != 1)} = {steps:,} steps of {per_step} {unit}"
                    f"{stop}")
        if max_steps is None or max_steps < 0:
            return "no max_steps, so no count of passes"
        return (f"max_steps {max_steps:,} x {per_step} {unit} = "
                f"{max_steps * per_step / self.n_train_windows:.3g} passes over the training {unit}")

    def describe_batch(self) -> str:
        """The batch line: windows and tokens per step, and how this run splits them; on a resume
        on another number of processes, that too. Preference pairs: pairs per step, each two rows of at
        most seq_len + 1 tokens."""
        line = self.plan.describe(self.seq_len)
        if self.pairs is not None:
            G = self.plan.global_batch
            line = line.replace(f"{G} windows x {self.seq_len} = {G * self.seq_len:,} tokens per step",
                                f"{G} pairs per step (chosen and rejected rows of at most {self.seq_len + 1:,} tokens)")
        return line

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

    def _loader(self, dataset: TokenWindows | None, sampler: Sampler | None) -> DataLoader:
        if dataset is None:
            raise RuntimeError("TextDataModule.setup() must run before asking for a dataloader")
        collate = DocumentIds(self.tokenizer.eos_token_id) if self.document_mask else None
        if self.pairs is not None:
            collate = PadPairs(self.pairs["pad"])
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, shuffle=False, collate_fn=collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(),
                          worker_init_fn=_ignore_stop_signals if self.num_workers > 0 else None)


class DocumentIds:
    """The collate of --data.document_mask: the default batch, plus "document_ids" (B, seq_len) over the
    inputs input_ids[:, :-1]: the number of end-of-document tokens strictly before each position, so a
    new document starts after each EOS (the EOS itself closes its document)."""

    def __init__(self, eos_token_id: int) -> None:
        self.eos_token_id = eos_token_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = default_collate(items)
        eos = batch["input_ids"][:, :-1] == self.eos_token_id  # (B, seq_len)
        batch["document_ids"] = eos.cumsum(dim=1) - eos.long()
        return batch


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C and SIGTERM: a terminal signals the whole process group,
    a scheduler every process of the job, and the main process still needs its workers to finish
    the current step before it saves and stops (smollm.callbacks.StopAtStepEnd). Workers end with
    the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
