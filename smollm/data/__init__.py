"""Sources -> documents -> sharded token cache -> windows -> batches, one file per step:

- `sources.py`: files (text, .jsonl/.json/.ndjson, also .gz/.zst/.bz2/.xz, .parquet) and Hugging Face datasets
  -> documents, read as a resumable stream; `DataError`, the one-line error for bad input.
- `cache.py`: the token cache's format (a folder of shards and index.json, named by `cache_key`), read
  back as one token stream (`TokenCache`).
- `build.py`: documents -> the shards on disk (built in parallel, atomic shards, resumed after a kill;
  one damaged shard rebuilt). `verify.py`: every shard against its digest, once per launch.
- `store.py`: `--data.cache_dir` -> a token store (local, remote mirror, or one named cache) that finds the
  corpus (`Corpus`) and opens its cache: lock, verify, rebuild, download, build. `remote.py`: the mirror
  on object storage.
- `windows.py`: the stream -> fixed-length windows, the held-out validation tail, and the
  training order, a pure function of (seed, global sample index) (`ResumableSampler`); how a
  global batch splits into micro-batches on each process is smollm.batch's `BatchPlan`.
- `chat.py`: records -> conversations, rendered by the tokenizer's chat template into tokens and a
  loss mask (`--data.format chat`); `packing.py`: conversations -> packed windows (best-fit
  decreasing) with `loss_mask` and `document_ids`.
- `module.py`: `TextDataModule`, whose __init__ arguments are the `--data.*` options.
"""

from smollm.data.build import build_cache
from smollm.data.cache import TokenCache, cache_key, token_dtype, tokenizer_fingerprint
from smollm.data.module import TextDataModule
from smollm.data.sources import STDLIB, DatasetSource, FileSource, file_format, read_pieces, resolve_files, stdlib_files
from smollm.data.store import Corpus, CorpusOptions, TokenStore, open_store
from smollm.data.windows import ResumableSampler, TokenWindows, split_windows
from smollm.errors import DataError

__all__ = [
    "STDLIB", "Corpus", "CorpusOptions", "DataError", "DatasetSource", "FileSource", "ResumableSampler",
    "TextDataModule", "TokenCache", "TokenStore", "TokenWindows", "build_cache", "cache_key",
    "file_format", "open_store", "read_pieces", "resolve_files", "split_windows", "stdlib_files", "token_dtype",
    "tokenizer_fingerprint",
]
