"""The token cache's mirror on object storage: tokenize once, train on any node.

`--data.cache_dir s3://bucket/prefix` (or any fsspec URL: gs://, az://, ...) names a remote cache
root. The remote holds, for each cache, exactly what the local folder holds, under the same names:
`URL/tokens/<key>/shard-000000.bin ...` and `index.json`, which is written last. Nodes never read
the remote while training: a node downloads the shards into its local cache ($SMOLLM_CACHE/tokens/
<key>) and memory-maps them there as always; the remote is only ever downloaded from or uploaded to.

- Building: each shard is made durable locally, uploaded, and only then listed in the uploaded
  index, so a reader never sees a half-written cache and a build stopped at any point resumes from
  its last uploaded shard. One process builds per cache: it holds `URL/tokens/<key>.lock`, an
  object created with a conditional write (S3's If-None-Match; MinIO and R2 honour it too). Some
  servers ignore the condition; the first build checks it once, with a probe object
  (`Remote.exclusive_create`), and says in one line where the lock is only advisory.
- Reading: shards are downloaded in parallel into `.part` files that a later run continues, each
  checked against its digest where the index has one before it is renamed into place (a shard
  already there, of an earlier try, passes the same check or is downloaded again); the local
  index is written last.
- One cache named by its URL (`URL/tokens/<key>`, what the build prints when it ends) is read
  the same way by nodes that have no copy of the sources (smollm.data.module, `names_one_cache`).
- Bad input (an unreachable endpoint, no credentials, a missing bucket, no permission) is one line
  within seconds: the first request is made with one attempt and short timeouts.

fsspec and its backends do all the talking; endpoint and credentials are the backend's own
(for S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION or the
AWS config files).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from smollm.data.cache import INDEX, is_complete, read_index, shard_size
from smollm.data.verify import verify_shard
from smollm.digest import file_digest
from smollm.errors import RemoteError, first_line
from smollm.io import fsync_file, replace_durably, write_json_atomic
from smollm.output import say, warn

CHUNK = 1 << 24  # 16 MiB per ranged read of a download
TRANSFERS = 8  # shards downloaded or uploaded at once
POLL_S = 10.0  # how often a process waiting for another node's build looks again
# What the first request may cost: one attempt, short timeouts, so that bad input fails in seconds
# instead of after minutes of retries. Transfers use the backend's usual retries.
QUICK_S3 = {"connect_timeout": 3, "read_timeout": 10, "retries": {"max_attempts": 1, "mode": "standard"}}
S3 = {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 5, "mode": "standard"}}


def is_url(cache_dir: Any) -> bool:
    """Whether `--data.cache_dir` names a remote root (`scheme://...`) rather than a folder."""
    return isinstance(cache_dir, str) and "://" in cache_dir and not cache_dir.startswith("file://")


class Remote:
    """A remote cache root (`s3://bucket/prefix`): checks, transfers and the build lock."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.protocol = self.url.split("://", 1)[0]
        self._fs: Any = None
        self._checked = False
        self._exclusive: bool | None = None  # whether the store honours an exclusive create (checked once)

    def __getstate__(self) -> dict[str, Any]:  # a filesystem client is not sent to other processes
        return {**self.__dict__, "_fs": None, "_checked": False}

    # -- the filesystem and its errors --

    def _filesystem(self, quick: bool = False) -> Any:
        import fsspec

        # A fresh client (not fsspec's shared instance, made under other settings), and no cached
        # listings: other nodes change the remote while this one looks at it.
        options: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
        if self.protocol in ("s3", "s3a"):
            options["config_kwargs"] = QUICK_S3 if quick else S3
        try:
            fs, _ = fsspec.core.url_to_fs(self.url, **options)
        except ImportError as e:
            raise RemoteError(f"--data.cache_dir {self.url} needs fsspec's {self.protocol}:// backend "
                              f"({first_line(e)}); for s3:// run pip install s3fs (the [s3] extra)") from e
        except ValueError as e:
            raise RemoteError(f"--data.cache_dir {self.url}: {first_line(e)}; give s3://bucket/prefix or "
                              "another fsspec URL, or a local folder") from e
        if quick and hasattr(fs, "retries"):
            fs.retries = 1  # s3fs's own retry loop, around botocore's
        return fs

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs = self._filesystem()
        return self._fs

    def _path(self, *parts: str) -> str:
        """A path under the root as the filesystem names it (no scheme)."""
        root = self.fs._strip_protocol(self.url)
        return "/".join([root.rstrip("/"), *parts])

    def _endpoint(self) -> str:
        return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or "its default endpoint"

    def explain(self, e: BaseException, doing: str) -> RemoteError:
        """One line for a failed request: what failed, why, and what to do."""
        name, why = type(e).__name__, first_line(e)
        where = f"{self.url} ({self.protocol}:// at {self._endpoint()})" if self.protocol.startswith("s3") \
            else self.url
        if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
            return RemoteError(f"no credentials to {doing} {where}: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY, or a profile in ~/.aws/credentials")
        if isinstance(e, PermissionError):
            return RemoteError(f"access denied to {doing} {where} ({why}); check that the credentials may "
                               "read it (and, to build the cache, write it)")
        if isinstance(e, FileNotFoundError):
            return RemoteError(f"cannot {doing} {where}: not found ({why}); check the bucket's name, or "
                               "create it")
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                    "ReadTimeoutError", "FSTimeoutError") or isinstance(e, (ConnectionError, TimeoutError)):
            return RemoteError(f"cannot reach {where} to {doing} it ({why}); check AWS_ENDPOINT_URL and "
                               "the network")
        return RemoteError(f"cannot {doing} {where} ({name}: {why}); run again, or check the URL")

    def call(self, doing: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)`, its expected failures turned into one line (the original is the
        RemoteError's __cause__)."""
        try:
            return fn(*args, **kwargs)
        except _request_errors() as e:
            raise self.explain(e, doing) from e

    def check(self) -> None:
        """One quick request (no retries): the endpoint answers, the credentials are accepted and
        the bucket exists. Runs once per process, before any data work."""
        if self._checked:
            return
        fs = self._filesystem(quick=True)
        bucket = fs._strip_protocol(self.url).split("/")[0]
        try:
            self.call("read", fs.info, bucket)
        except RemoteError as e:
            if _missing(e):
                raise RemoteError(f"bucket {bucket!r} of --data.cache_dir {self.url} does not exist at "
                                  f"{self._endpoint()}; create it, or fix the URL") from e.__cause__
            raise
        self._checked = True

    def exclusive_create(self) -> bool:
        """Whether the store refuses a second exclusive create of one object (S3's If-None-Match),
        which makes the build lock exclusive. Checked once, with a probe object created twice under
        `tokens/` and removed; where the second create succeeds, one line says that the build lock
        is advisory on this store."""
        if self._exclusive is None:
            probe = self._path("tokens", f".exclusive-probe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}")
            self.call("write the lock probe to", self.fs.pipe_file, probe, b"1", mode="create")
            try:
                self.call("write the lock probe to", self.fs.pipe_file, probe, b"2", mode="create")
                self._exclusive = False
            except RemoteError as e:
                if not isinstance(e.__cause__, FileExistsError):
                    raise
                self._exclusive = True
            finally:
                try:
                    self.call("remove the lock probe from", self.fs.rm_file, probe)
                except RemoteError:
                    pass  # a stray probe object is harmless
            if not self._exclusive:
                warn(f"{self.url} does not refuse a second exclusive create of one object (S3's If-None-Match), so "
                     "the build lock is advisory there: nodes that start at once may each tokenize the cache (to "
                     "the same bytes); start one build first, the others after it", every_rank=True)
        return self._exclusive

    # -- one cache: <root>/tokens/<name>/ --

    def where(self, name: str) -> str:
        return f"{self.url}/tokens/{name}"

    def read_index(self, name: str) -> dict[str, Any] | None:
        path = self._path("tokens", name, INDEX)
        try:
            raw = self.call("read the index of", self.fs.cat_file, path)
        except RemoteError as e:
            if _missing(e):
                return None
            raise
        try:
            return json.loads(raw)
        except ValueError as e:
            raise RemoteError(f"{self.where(name)}/{INDEX} is not JSON; delete it (the build resumes from "
                              "its shards' local copies or starts again)") from e

    def is_complete(self, name: str) -> bool:
        index = self.read_index(name)
        return bool(index and index.get("complete"))

    def sync(self, folder: Path, build: Callable[[Callable[[dict, str | None], None]], None]) -> None:
        """Make both the local `folder` and its remote mirror complete: download a complete remote
        cache, upload a complete local one, or take the remote lock and `build(on_commit)`, where
        `on_commit(index, shard)` uploads each committed shard and then the index. The caller
        holds the local cache's lock."""
        name = folder.name
        index = self.read_index(name)
        if not (index and index.get("complete")):
            self.exclusive_create()  # said once where the lock below is only advisory
            lock = RemoteLock(self, name)
            if lock.acquire(until=lambda: self.is_complete(name)):
                try:
                    index = self.read_index(name)
                    if not (index and index.get("complete")):
                        self._build_or_upload(folder, index, build)
                        # What nodes without the sources give to train from this cache (said once, by
                        # the process that built or uploaded it).
                        say(f"GPU nodes: --data.cache_dir {self.where(name)} (this cache, complete; no "
                            "sources needed)", every_rank=True)
                        return
                finally:
                    lock.release()
            else:
                index = self.read_index(name)
        if not is_complete(folder):
            self.download(name, folder, index)

    def _build_or_upload(self, folder: Path, remote_index: dict | None,
                         build: Callable[[Callable[[dict, str | None], None]], None]) -> None:
        name = folder.name
        local = read_index(folder)
        if local and local.get("complete"):
            say(f"uploading the token cache {folder} to {self.where(name)}", every_rank=True)
            self.upload(name, folder, local)
            return
        if remote_index and remote_index.get("shards"):  # resume from the last uploaded shard
            say(f"resuming the build of {self.where(name)} after its {len(remote_index['shards'])} "
                "uploaded shard(s)", every_rank=True)
            self.download(name, folder, remote_index)
        elif (folder / INDEX).exists():  # nothing uploaded: start afresh, locally too
            (folder / INDEX).unlink()

        def on_commit(index: dict[str, Any], shard: str | None) -> None:
            if shard is not None:
                self.put(folder / shard, name, shard)
            self.put_index(name, index)

        build(on_commit)

    # -- transfers --

    def put(self, local: Path, name: str, file: str) -> None:
        self.call("upload to", self.fs.put_file, str(local), self._path("tokens", name, file))

    def put_index(self, name: str, index: dict[str, Any]) -> None:
        self.call("upload to", self.fs.pipe_file, self._path("tokens", name, INDEX),
                  json.dumps(index, indent=1).encode())

    def upload(self, name: str, folder: Path, index: dict[str, Any], progress: bool = True) -> int:
        """Upload the shards that the remote lacks (or holds at another size), in parallel, then
        the index. Returns the bytes uploaded."""
        from tqdm import tqdm

        try:
            listing = self.call("list", self.fs.ls, self._path("tokens", name), detail=True)
        except RemoteError as e:
            if not _missing(e):
                raise
            listing = []
        there = {Path(p["name"]).name: p.get("size") for p in listing}
        todo = [s for s in index["shards"] if there.get(s["file"]) != shard_size(index, s)]
        with tqdm(total=sum(shard_size(index, s) for s in todo), unit="B", unit_scale=True, desc="uploading",
                  file=sys.stderr, disable=not progress, mininterval=2.0) as bar:
            def one(entry: dict[str, Any]) -> int:
                self.put(folder / entry["file"], name, entry["file"])
                bar.update(shard_size(index, entry))
                return shard_size(index, entry)

            sent = sum(_parallel(one, todo))
        self.put_index(name, index)
        return sent

    def download(self, name: str, folder: Path, index: dict[str, Any], progress: bool = True) -> int:
        """Download the shards of `index` that `folder` lacks, in parallel, each resumed from its
        `.part` file and checked against its digest where it has one; then write the index (last).
        A shard already in `folder` is kept only if it passes the same check: this folder has no
        index yet, so nothing says what its files hold. Returns the bytes downloaded."""
        from tqdm import tqdm

        folder.mkdir(parents=True, exist_ok=True)
        todo = [s for s in _parallel_map(lambda s: None if verify_shard(folder, s, index) else s,
                                         index["shards"]) if s is not None]
        parts = [_part(folder / s["file"]) for s in todo]
        already = sum(p.stat().st_size for p in parts if p.is_file())  # stopped downloads, continued
        if todo:
            say(f"downloading {len(todo)} shard(s) of {self.where(name)} into {folder}", every_rank=True)
        with tqdm(total=sum(shard_size(index, s) for s in todo), initial=already, unit="B", unit_scale=True,
                  desc="downloading", file=sys.stderr, disable=not progress, mininterval=2.0) as bar:
            fetched = sum(_parallel(lambda entry: self._fetch(name, folder, entry, shard_size(index, entry),
                                                              bar.update), todo))
        write_json_atomic(folder / INDEX, index)
        return fetched

    def _fetch(self, name: str, folder: Path, entry: dict[str, Any], size: int,
               advance: Callable[[int], Any]) -> int:
        """One shard into `<file>.part` from where an earlier try stopped, checked, renamed."""
        target = folder / entry["file"]
        part = _part(target)
        offset = part.stat().st_size if part.is_file() else 0
        if offset > size:
            part.unlink()
            offset = 0
        resumed = offset > 0
        remote = self._path("tokens", name, entry["file"])
        fetched = 0
        with open(part, "ab") as out:
            while offset < size:
                end = min(offset + CHUNK, size)
                data = self.call("download from", self.fs.cat_file, remote, start=offset, end=end)
                if len(data) != end - offset:
                    raise RemoteError(f"{self.where(name)}/{entry['file']} is shorter than its index says; "
                                      "rebuild the remote cache (delete its index.json and run again)")
                out.write(data)
                offset, fetched = end, fetched + len(data)
                advance(len(data))
            fsync_file(out)
        expected = entry.get("digest")
        if expected is not None and file_digest(part) != expected:
            part.unlink()
            if resumed:  # the part file of an earlier try may be what is wrong: once more, afresh
                return self._fetch(name, folder, entry, size, advance)
            raise RemoteError(f"{self.where(name)}/{entry['file']} does not match its digest in index.json "
                              f"(damaged in storage or in transit); run again to download it afresh, and if "
                              f"it fails again rebuild the remote cache")
        replace_durably(part, target)
        return fetched


class RemoteLock:
    """`<root>/tokens/<name>.lock`: created only if absent (a conditional write), so one process
    in the world builds a cache. It names its holder; a lock left by a dead process of this host
    (a SIGKILLed build) is taken over, any other is waited for."""

    def __init__(self, remote: Remote, name: str) -> None:
        self.remote, self.name = remote, name
        self.path = remote._path("tokens", f"{name}.lock")
        self.url = f"{remote.where(name)}.lock"
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _create(self) -> bool:
        try:
            self.remote.call("write the lock", self.remote.fs.pipe_file, self.path,
                             json.dumps(self.me).encode(), mode="create")
            return True
        except RemoteError as e:
            if isinstance(e.__cause__, FileExistsError):  # taken
                return False
            raise

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.remote.call("read the lock", self.remote.fs.cat_file, self.path))
        except RemoteError as e:
            if _missing(e):
                return None
            raise
        except ValueError:  # not written by smollm: wait for it all the same
            return {}

    def acquire(self, until: Callable[[], bool]) -> bool:
        """Take the lock (True), or wait until `until()` is true, the cache built elsewhere (False)."""
        said = False
        while True:
            if self._create():
                return True
            holder = self._holder()
            if holder is not None and holder.get("host") == self.me["host"] and not _alive(holder.get("pid")):
                say(f"taking over {self.url}: its process {holder.get('pid')} on this host is gone", every_rank=True)
                self.remote.call("remove the lock", self.remote.fs.rm_file, self.path)
                continue
            if until():
                return False
            if not said and holder is not None:
                say(f"waiting for {holder.get('host')} pid {holder.get('pid')} (since {holder.get('since')}) to "
                    f"finish building {self.remote.where(self.name)}; if no process is building it, delete "
                    f"{self.url}", every_rank=True)
                said = True
            time.sleep(POLL_S)

    def release(self) -> None:
        try:
            self.remote.call("remove the lock", self.remote.fs.rm_file, self.path)
        except RemoteError as e:  # the build itself is done; say what is left behind
            warn(f"{e}; delete {self.url} by hand", every_rank=True)


def _request_errors() -> tuple[type[BaseException], ...]:
    """What a failed request raises: OSError and its kin (fsspec's translations: FileNotFoundError,
    PermissionError, FileExistsError, TimeoutError), and botocore's own (no credentials, no
    connection), which are not OSErrors."""
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError)


def _missing(e: RemoteError) -> bool:
    """Whether the request failed because the object (or bucket) does not exist."""
    return isinstance(e.__cause__, FileNotFoundError)


def _part(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parallel_map(fn: Callable[[Any], Any], items: list) -> list[Any]:
    """`fn` on each item, TRANSFERS at a time (reads and hashes release the GIL), in order."""
    with ThreadPoolExecutor(max(1, min(TRANSFERS, len(items)))) as pool:
        return list(pool.map(fn, items))


def _parallel(fn: Callable[[Any], int], items: list) -> list[int]:
    """`fn` on each item, TRANSFERS at a time, its results in order; the first error cancels what
    has not started and is raised."""
    if not items:
        return []
    with ThreadPoolExecutor(min(TRANSFERS, len(items))) as pool:
        futures = [pool.submit(fn, item) for item in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
