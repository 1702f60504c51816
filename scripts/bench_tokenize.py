"""Tokenizing speed and memory: smollm's token cache against `datasets.Dataset.map`.

    python scripts/bench_tokenize.py                  # about 1 GB of jsonl, every core, SmolLM2 tokenizer
    python scripts/bench_tokenize.py --gb 0.1 --tokenizer DIR

Writes a corpus of about --gb GB of JSON Lines once (documents of 20 to 150 consecutive lines of
this Python's standard library: code, docstrings, comments), then tokenizes it, in one run and each
side in a fresh process:
- smollm: the sharded token cache build (`smollm.data.build_cache`), a worker per core, from
  hashing the files to the last shard on disk;
- datasets: `load_dataset("json")` (JSON -> Arrow), then `Dataset.map(batched=True,
  num_proc=<cores>)` with the same tokenizer (`tokenizer(batch["text"])`, EOS appended), writing
  its Arrow cache as it does.
It prints tokens/s and peak memory of each side's process tree (the parent and its workers, sampled
every 0.1 s until its tokens are on disk: RSS summed, which counts the pages a forked worker shares
with its parent in each, and PSS, which shares them out), the ratios, and checks that both
produced the same token ids.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(folder: Path, gb: float, seed: int = 0) -> list[Path]:
    """About `gb` GB of JSON Lines in files of about 128 MB, written once (kept between runs)."""
    import sysconfig

    marker = folder / f"done-{gb}-{seed}"
    if marker.exists():
        return sorted(folder.glob("part-*.jsonl"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for p in sorted(root.rglob("*.py")) + sorted(root.rglob("*.txt")) + sorted(root.rglob("*.rst")):
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue
        if len(lines) >= 20:
            sources.append(lines)
    rng = random.Random(seed)
    target, written, part, paths = int(gb * 1e9), 0, 0, []
    f = None
    while written < target:
        if f is None or f.tell() >= 128 << 20:
            if f is not None:
                f.close()
            paths.append(folder / f"part-{part:03d}.jsonl")
            f = open(paths[-1], "w", encoding="utf-8")
            part += 1
        lines = rng.choice(sources)
        n = rng.randint(20, 150)
        start = rng.randrange(max(1, len(lines) - n))
        line = json.dumps({"text": "\n".join(lines[start:start + n]) + "\n", "id": written}) + "\n"
        f.write(line)
        written += len(line.encode())
    f.close()
    marker.touch()
    return paths


# ------------------------------------------------------------------------------------------------
# The two sides, each run in its own process: a JSON line when the tokens are on disk (the parent
# stops measuring memory there), then one with a checksum of every token id


def done(result: dict) -> None:
    print(json.dumps(result), flush=True)


def side_smollm(files: list[Path], tokenizer: str, work: Path, workers: int) -> dict:
    import numpy as np

    from smollm.assets import load_tokenizer
    from smollm.data import FileSource, TokenCache, build_cache

    tok = load_tokenizer(tokenizer, for_cache=True)
    start = time.perf_counter()
    source = FileSource([str(p) for p in files])
    source.resolve()
    source.scan()
    build_cache(work / "cache", [source], tok, {"key": "bench"}, [None], workers=workers, progress=False)
    seconds = time.perf_counter() - start
    cache = TokenCache(work / "cache")
    done({"tokens": cache.n_tokens, "seconds": seconds, "shards": len(cache.shards)})
    sha = hashlib.sha256()
    for a in range(0, cache.n_tokens, 1 << 24):
        sha.update(cache.read(a, a + (1 << 24)).astype(np.uint32).tobytes())
    return {"sha256": sha.hexdigest(), "checked": cache.n_tokens}


def side_datasets(files: list[Path], tokenizer: str, work: Path, workers: int) -> dict:
    import datasets
    import numpy as np
    import pyarrow as pa

    from smollm.assets import load_tokenizer

    datasets.disable_progress_bars()
    tok = load_tokenizer(tokenizer)
    eos = tok.eos_token_id
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=[str(p) for p in files], split="train",
                               cache_dir=str(work / "hf"))
    loaded = time.perf_counter()

    def tokenize(batch):
        ids = tok(batch["text"], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    out = ds.map(tokenize, batched=True, num_proc=workers, remove_columns=ds.column_names)
    seconds = time.perf_counter() - start
    done({"tokens": sum(len(chunk.values) for chunk in out.data.column("input_ids").chunks), "seconds": seconds,
          "load_seconds": loaded - start, "map_seconds": seconds - (loaded - start)})
    sha, n = hashlib.sha256(), 0
    for table in out.with_format("arrow").iter(batch_size=100_000):
        values = pa.chunked_array(table.column("input_ids")).combine_chunks().values
        arr = values.to_numpy().astype(np.uint32)
        sha.update(arr.tobytes())
        n += len(arr)
    return {"sha256": sha.hexdigest(), "checked": n}


# ------------------------------------------------------------------------------------------------
# Measuring a process tree


def _pss(pid: int) -> int:
    """Proportional set size in bytes, from /proc (0 if gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_side(name: str, args: argparse.Namespace, files: list[Path], work: Path) -> dict:
    import psutil

    cmd = [sys.executable, __file__, "--side", name, "--tokenizer", args.tokenizer, "--work", str(work),
           "--workers", str(args.workers), "--files", *map(str, files)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    peak = {"rss": 0, "pss": 0}
    stop = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss = pss = 0
            for p in tree:
                try:
                    rss += p.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                pss += _pss(p.pid)
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    first = proc.stdout.readline()  # the tokens are on disk: what follows is only the check
    stop.set()
    sampler.join()
    rest, _ = proc.communicate()
    if proc.returncode != 0 or not first:
        raise SystemExit(f"{name} side failed with exit code {proc.returncode}")
    return {**json.loads(first), **json.loads(rest.strip().splitlines()[-1]), "peak_rss": peak["rss"],
            "peak_pss": peak["pss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="corpus size in GB of jsonl")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "smollm-bench-tokenize"),
                        help="where the corpus is kept between runs")
    parser.add_argument("--tokenizer", default="smollm2")
    parser.add_argument("--workers", type=int, default=0, help="processes per side (default: every core)")
    parser.add_argument("--order", default="smollm,datasets", help="which side runs first")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child: one side, one JSON line
        fn = {"smollm": side_smollm, "datasets": side_datasets}[args.side]
        done(fn([Path(f) for f in args.files], args.tokenizer, Path(args.work), args.workers))
        return

    from smollm.data.cache import cpu_count

    args.workers = args.workers or cpu_count()
    files = write_corpus(Path(args.dir) / "corpus", args.gb)
    size = sum(p.stat().st_size for p in files)
    print(f"corpus: {len(files)} jsonl files, {size / 1e9:.2f} GB; tokenizer {args.tokenizer}; "
          f"{args.workers} processes per side on {cpu_count()} cores; load average before "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    for name in args.order.split(","):
        with tempfile.TemporaryDirectory(dir=args.dir) as work:
            results[name] = run_side(name, args, files, Path(work))
        r = results[name]
        extra = (f" (load_dataset {r['load_seconds']:.1f} s + map {r['map_seconds']:.1f} s)"
                 if "map_seconds" in r else f" ({r['shards']} shards)")
        print(f"{name:9s} {r['tokens']:,} tokens in {r['seconds']:.1f} s{extra}: "
              f"{r['tokens'] / r['seconds']:,.0f} tokens/s; peak RSS {r['peak_rss'] / 2**30:.2f} GiB, "
              f"peak PSS {r['peak_pss'] / 2**30:.2f} GiB", flush=True)
    s, d = results["smollm"], results["datasets"]
    print(f"ratio smollm/datasets: speed {s['tokens'] / s['seconds'] / (d['tokens'] / d['seconds']):.2f}x "
          f"(against map alone: {s['tokens'] / s['seconds'] / (d['tokens'] / d['map_seconds']):.2f}x); "
          f"peak RSS {s['peak_rss'] / d['peak_rss']:.2f}x, peak PSS {s['peak_pss'] / d['peak_pss']:.2f}x")
    same = s["sha256"] == d["sha256"] and s["tokens"] == d["tokens"] == s["checked"] == d["checked"]
    print(f"same token ids on both sides: {'yes' if same else 'NO'}; load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
