"""Sources -> documents -> sharded token cache -> windows -> batches, one file per step:

- `sources.py`: files (text, .jsonl/.json/.ndjson, also .gz/.zst/.bz2/.xz, .parquet) and Hugging Face datasets
  -> documents, read as a resumable stream; `DataError`, the one-line error for bad input.
- `cache.py`: documents -> a sharded token cache on disk (built in parallel, atomic shards,
  resumed after a kill), read back as one token stream (`TokenCache`).
- `windows.py`: the stream -> fixed-length windows, the held-out validation tail, and the
  training order, a pure function of (seed, global sample index) (`ResumableSampler`); how a
  global batch splits into micro-batches on each process is smollm.batch's `BatchPlan`.
- `module.py`: `TextDataModule`, whose __init__ arguments are the `--data.*` options.
"""

from smollm.data.cache import (TokenCache, build_cache, cache_key, load_tokenizer, token_dtype,
                               tokenizer_fingerprint)
from smollm.data.module import TextDataModule
from smollm.data.sources import STDLIB, DatasetSource, FileSource, file_format, read_pieces, resolve_files, stdlib_files
from smollm.data.windows import ResumableSampler, TokenWindows, split_windows
from smollm.errors import DataError

__all__ = [
    "STDLIB", "DataError", "DatasetSource", "FileSource", "ResumableSampler", "TextDataModule",
    "TokenCache", "TokenWindows", "build_cache", "cache_key", "file_format", "load_tokenizer",
    "read_pieces", "resolve_files", "split_windows", "stdlib_files", "token_dtype",
    "tokenizer_fingerprint",
]
