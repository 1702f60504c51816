"""Upload and download throughput of the remote token cache, against a LOCAL S3-compatible server.

    python scripts/bench_remote.py                    # 8 shards of 64 MB
    python scripts/bench_remote.py --shards 4 --shard-mb 256 --transfers 8

Starts moto's S3 server on 127.0.0.1 (a free port; nothing leaves this machine), writes a token cache
of random shards with their digests, then times the code paths that training uses
(`smollm.data.remote.Remote`): `upload` (the shards in parallel, then index.json) and `download` into
an empty local cache (in parallel, in ranged reads, each shard checked against its digest). It
prints MB/s for each. These figures measure smollm, s3fs and a Python S3 server sharing one machine,
with no network in between: an upper bound set by CPU, not what a real bucket over a real network
gives (that is bound by the link and the store; measure it with the same script by pointing
--url at a bucket, AWS_ENDPOINT_URL and credentials set).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np


def local_server() -> tuple[object, str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def write_cache(folder: Path, shards: int, shard_mb: int) -> dict:
    """A cache folder of random uint16 shards and its index (with digests), as a build leaves it."""
    from smollm.data.cache import INDEX
    from smollm.digest import file_digest

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tokens = shard_mb * (1 << 20) // 2
    entries = []
    for k in range(shards):
        path = folder / f"shard-{k:06d}.bin"
        rng.integers(0, 49152, tokens, dtype=np.uint16).tofile(path)
        entries.append({"file": path.name, "tokens": tokens, "digest": file_digest(path)})
    index = {"key": "bench", "dtype": "uint16", "shard_tokens": tokens, "shards": entries,
             "n_tokens": tokens * shards, "n_docs": 1, "complete": True}
    (folder / INDEX).write_text(json.dumps(index))
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-mb", type=int, default=64)
    parser.add_argument("--transfers", type=int, default=8, help="shards moved at once")
    parser.add_argument("--url", help="a real bucket (s3://bucket/prefix) instead of the local server")
    args = parser.parse_args()

    from smollm.data import remote as remote_mod

    remote_mod.TRANSFERS = args.transfers
    server = None
    if args.url is None:
        server, endpoint = local_server()
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        url = f"s3://{bucket}/cache"
    else:
        url = args.url.rstrip("/")
    tmp = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    try:
        index = write_cache(tmp / "built" / "bench", args.shards, args.shard_mb)
        remote = remote_mod.Remote(url)
        if server is not None:
            remote.fs.mkdir(bucket)
        remote.check()
        total = args.shards * args.shard_mb
        where = f"the local moto server at {os.environ['AWS_ENDPOINT_URL']}" if server else url
        print(f"{args.shards} shards x {args.shard_mb} MB = {total} MB, {args.transfers} transfers at once, "
              f"to and from {where}")

        started = time.perf_counter()
        remote.upload("bench", tmp / "built" / "bench", index, progress=False)
        up = time.perf_counter() - started
        started = time.perf_counter()
        remote.download("bench", tmp / "fresh" / "bench", index, progress=False)
        down = time.perf_counter() - started
        same = all((tmp / "fresh" / "bench" / e["file"]).read_bytes() == (tmp / "built" / "bench" / e["file"]).read_bytes()
                   for e in index["shards"])
        label = "LOCAL server, no network" if server else "this bucket"
        print(f"upload:   {total / up:8.1f} MB/s ({up:.1f} s)  [{label}]")
        print(f"download: {total / down:8.1f} MB/s ({down:.1f} s, digests checked)  [{label}]")
        print(f"downloaded copy identical: {same}")
        if server is None:
            remote.fs.rm(f"{remote.fs._strip_protocol(url)}/tokens/bench", recursive=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
