"""What checking for silent damage costs: writing and verifying a 135m checkpoint with its AdamW
state (about 1.6 GB) and a full 256 MB token shard, with and without the digest.

    python scripts/bench_integrity.py [--dir /tmp/bench-integrity] [--repeats 3]

For each file it prints the time and throughput of
- writing it plainly, and writing it through the digest (hashed in the same pass), to /dev/null
  (the digest's own cost) and to disk with fsync;
- verifying it from disk (the page cache dropped for the file first, with posix_fadvise) and from
  the page cache (what a resume right after a save, or a second reader, sees);
- for the checkpoint, what a reader does: `torch.load` (weights_only, mmap) and touching every
  tensor, alone (before) and after the verification (now), i.e. what a resume adds.
Medians of --repeats runs, before and now alternated; the files are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from smollm import ModelConfig, SmolLM
from smollm.checkpoint import read_checkpoint, save_atomic
from smollm.data.build import SHARD_TOKENS
from smollm.data.verify import scan_shard
from smollm.digest import HashingWriter, file_digest


def drop_from_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed(fn, repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pairs(a, b, repeats: int, before=None) -> tuple[float, float]:
    """Medians of `a` and `b` run alternately (a, b, a, b, ...), so a busy machine slows both alike."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(timed(a, 1, before))
        tb.append(timed(b, 1, before))
    return statistics.median(ta), statistics.median(tb)


def report(what: str, seconds: float, size: int) -> None:
    print(f"  {what:<64} {seconds:7.3f} s  {size / seconds / 1e9:6.2f} GB/s")


def checkpoint_135m() -> dict:
    """What LitSmolLM saves for 135m: float32 weights and AdamW's two moments per parameter."""
    torch.manual_seed(0)
    model = SmolLM(ModelConfig.from_name("135m"))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    params = list(model.parameters())
    moments = {i: {"step": torch.tensor(100.0), "exp_avg": torch.randn_like(p) * 1e-3,
                   "exp_avg_sq": torch.rand_like(p) * 1e-6} for i, p in enumerate(params)}
    return {"state_dict": state, "global_step": 100,
            "optimizer_states": [{"state": moments, "param_groups": [{"params": list(range(len(params))),
                                                                      "lr": 3e-3}]}],
            "smollm": {"model_config": model.config.to_dict()}}


def touch(checkpoint: dict) -> float:
    """Read every tensor's bytes (what loading into a model and optimizer does)."""
    total = 0.0
    for t in checkpoint["state_dict"].values():
        total += float(t.float().sum())
    for s in checkpoint["optimizer_states"][0]["state"].values():
        total += float(s["exp_avg"].sum()) + float(s["exp_avg_sq"].sum())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/bench-integrity")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, files in {folder}")
    try:
        # -- the checkpoint
        ckpt = checkpoint_135m()
        path = folder / "step=000100.ckpt"
        plain = folder / "plain.ckpt"

        def write_plain():  # save_atomic as it was before the digest: temporary file, fsync, rename
            tmp = f"{plain}.tmp"
            with open(tmp, "wb") as f:
                torch.save(ckpt, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, plain)

        def to_null(hashed: bool):
            with open(os.devnull, "wb") as f:
                torch.save(ckpt, HashingWriter(f) if hashed else f)

        save_atomic(ckpt, path)
        size = path.stat().st_size
        print(f"135m checkpoint with AdamW state: {size / 1e9:.2f} GB")
        t_plain, t_digest = pairs(lambda: to_null(False), lambda: to_null(True), args.repeats)
        report("torch.save to /dev/null (before)", t_plain, size)
        report("torch.save to /dev/null, hashed as written (now)", t_digest, size)
        t_plain, t_digest = pairs(write_plain, lambda: save_atomic(ckpt, path), args.repeats)
        report("write: torch.save to a temporary file, fsync, rename (before)", t_plain, size)
        report("write: the same, hashed as written, and the digest's sidecar (now)", t_digest, size)
        del ckpt
        report("verify from disk (file_digest, page cache dropped)",
               timed(lambda: file_digest(path), args.repeats, lambda: drop_from_page_cache(path)), size)
        report("verify from the page cache", timed(lambda: file_digest(path), args.repeats), size)

        def load_before():
            touch(torch.load(path, map_location="cpu", weights_only=True, mmap=True))

        def load_now():
            os.utime(path)  # a new modification time: verified again, not remembered from the last read
            touch(read_checkpoint(path))

        for cache in ("from disk", "from the page cache"):
            drop = (lambda: drop_from_page_cache(path)) if cache == "from disk" else None
            before, now = pairs(load_before, load_now, args.repeats, drop)
            report(f"read, {cache}: torch.load + every tensor (before)", before, size)
            report(f"read, {cache}: verify, torch.load + every tensor (now)", now, size)
            print(f"  {'now / before':<64} {100 * (now / before - 1):+6.1f} %")
        plain.unlink()

        # -- a full shard
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 49152, SHARD_TOKENS, dtype=np.uint16)
        shard = folder / "shard-000000.bin"

        def write_shard(hashed: bool):
            with open(shard, "wb") as f:
                out = HashingWriter(f) if hashed else f
                for start in range(0, len(tokens), 1 << 20):  # appended in pieces, as the build does
                    piece = tokens[start:start + (1 << 20)]
                    out.write(piece)
                    if hashed:
                        int(piece.max())
                f.flush()
                os.fsync(f.fileno())

        t_plain, t_digest = pairs(lambda: write_shard(False), lambda: write_shard(True), args.repeats)
        size = shard.stat().st_size
        print(f"token shard: {SHARD_TOKENS:,} tokens, {size / 1e6:.0f} MB")
        report("write (before)", t_plain, size)
        report("write, hashed and its largest id taken as written (now)", t_digest, size)
        dtype = np.dtype(np.uint16)
        report("verify from disk (digest and largest id, page cache dropped)",
               timed(lambda: scan_shard(shard, dtype), args.repeats, lambda: drop_from_page_cache(shard)), size)
        report("verify from the page cache", timed(lambda: scan_shard(shard, dtype), args.repeats), size)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
