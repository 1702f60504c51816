"""Run as a subprocess by the cache tests: build a TextDataModule's token cache with small shards,
optionally slowly, so that a test can SIGKILL it mid-build or start a second process beside it.

    python tests/cachebuild.py '{"files": [...], "tokenizer": ..., "cache_dir": ..., "shard_tokens": 500,
                                 "batch_bytes": 200, "delay": 0.05, "hold": PATH}'

`delay` sleeps before each batch is written; with `hold`, the build stops after its first shard
while the file PATH exists (two minutes at most).

Prints `built N` (this process tokenized N tokens) and `n_tokens N` (the cache's size) on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time

from smollm.data import TextDataModule, build


def main() -> None:
    spec = json.loads(sys.argv[1])
    build.SHARD_TOKENS = spec.pop("shard_tokens")
    build.BATCH_BYTES = spec.pop("batch_bytes", build.BATCH_BYTES)
    delay, hold = spec.pop("delay", 0), spec.pop("hold", None)
    started = time.time()
    built = 0
    append = build._ShardWriter.append

    def counted(self, tokens, state_at, *rest):
        nonlocal built
        time.sleep(delay)
        while hold and self.index["shards"] and os.path.exists(hold) and time.time() < started + 120:
            time.sleep(0.05)
        built += len(tokens)
        return append(self, tokens, state_at, *rest)

    build._ShardWriter.append = counted
    dm = TextDataModule(**spec)
    dm.prepare_data()
    dm.setup()
    print(f"built {built}")
    print(f"n_tokens {dm.n_tokens}", flush=True)


if __name__ == "__main__":
    main()
