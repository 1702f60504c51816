"""The token cache on object storage, against a real S3-compatible server started here (moto's
server mode on 127.0.0.1, never another address): two nodes with their own local caches train from
one remote cache and the second never tokenizes; the remote mirrors the local folder; downloads
resume and are checked against their digests; a build stopped part way resumes from its last
uploaded shard; one process builds per cache; bad input is one line within seconds."""

from __future__ import annotations

import itertools
import json
import logging
import re
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fitutil
import smollm.data as data
from helpers_data import documents, write_records
from smollm.data import TextDataModule
from smollm.data import remote as remote_mod
from smollm.data.remote import Remote
from smollm.digest import file_digest
from smollm.errors import RemoteError

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

SEQ = 16
TESTS = Path(__file__).resolve().parent
SHARD = 400  # tokens per shard: the corpus below (3,193 tokens) makes eight


def recorder(path: Path) -> list[str]:
    """fit's option that records each step's windows and loss (fitutil.Recorder) into `path`."""
    return ["--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.Recorder", "init_args": {"path": str(path)}})]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """A local S3-compatible server for this module's tests."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    srv.start()
    yield f"http://127.0.0.1:{port}"
    srv.stop()


def aws_env(endpoint: str, home: Path) -> dict[str, str]:
    """Endpoint and credentials as a user sets them; no config files, no instance metadata."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(home / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-creds")}


@pytest.fixture
def s3(server, tmp_path, monkeypatch):
    """A fresh bucket; the standard variables point at the local server."""
    import s3fs

    env = aws_env(server, tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"smollm-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(bucket)
    return SimpleNamespace(url=f"s3://{bucket}/runs", bucket=bucket, env=env, endpoint=server, fs=fs)


@pytest.fixture
def corpus(tmp_path) -> Path:
    write_records(tmp_path / "corpus" / "a.jsonl", documents(60, seed=1))
    (tmp_path / "corpus" / "c.txt").write_text("".join(documents(30, seed=3)))
    return tmp_path / "corpus"


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(data.build, "SHARD_TOKENS", SHARD)
    monkeypatch.setattr(data.build, "BATCH_BYTES", 500)


def node(tmp_path, monkeypatch, name, tok_dir, corpus, cache_dir, **kw) -> TextDataModule:
    """A TextDataModule as a node runs it: its own local cache ($SMOLLM_CACHE), the shared URL."""
    monkeypatch.setenv("SMOLLM_CACHE", str(tmp_path / name))
    return TextDataModule(files=str(corpus), tokenizer=tok_dir, seq_len=SEQ, batch_size=4, val_fraction=0.05,
                          num_workers=0, cache_dir=cache_dir, **kw)


def ready(dm: TextDataModule) -> TextDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def no_tokenizing(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("this node tokenized")

    monkeypatch.setattr(data.store, "build_cache", refuse)


def counted_tokens(monkeypatch) -> list[int]:
    """Tokens that this process tokenizes from now on (appended to shards)."""
    counted = [0]
    append = data.build._ShardWriter.append

    def counting(self, tokens, state_at, *rest):
        counted[0] += len(tokens)
        return append(self, tokens, state_at, *rest)

    monkeypatch.setattr(data.build._ShardWriter, "append", counting)
    return counted


def mirrored(folder: Path) -> dict[str, bytes]:
    """A local cache folder's files that the remote mirrors: its shards and index.json, not this
    host's verification stamp (.verified-HOST.json)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")}


def remote_files(s3, key: str) -> dict[str, bytes]:
    prefix = f"{s3.bucket}/runs/tokens/{key}"
    return {Path(p).name: s3.fs.cat_file(p) for p in s3.fs.ls(prefix, detail=False, refresh=True)}


# -- two nodes, one remote cache ------------------------------------------------------------------


def test_two_nodes_train_from_one_remote_cache_and_the_second_never_tokenizes(
        tmp_path, tok_dir, corpus, s3, small_shards, monkeypatch, capsys):
    one = ready(node(tmp_path, monkeypatch, "node1", tok_dir, corpus, s3.url))
    folder1 = one.store.corpus.folder
    assert folder1.parent == tmp_path / "node1" / "tokens"  # the local copy is where it always is
    local = mirrored(folder1)
    assert len([n for n in local if n.startswith("shard-")]) >= 5
    assert remote_files(s3, folder1.name) == local  # the mirror: same files, same index.json
    s3.fs.invalidate_cache()
    assert not s3.fs.exists(f"{s3.bucket}/runs/tokens/{folder1.name}.lock")  # released

    no_tokenizing(monkeypatch)
    two = ready(node(tmp_path, monkeypatch, "node2", tok_dir, corpus, s3.url))
    folder2 = two.store.corpus.folder
    assert folder2 == tmp_path / "node2" / "tokens" / folder1.name
    assert mirrored(folder2) == local
    assert isinstance(two.token_cache._shard(0), np.memmap)  # training reads the local copy
    assert np.array_equal(two.token_cache.read(0, two.n_tokens), one.token_cache.read(0, one.n_tokens))
    for a, b in zip(itertools.islice(one.train_dataloader(), 20), itertools.islice(two.train_dataloader(), 20)):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["index"], b["index"])
    assert "downloading" in capsys.readouterr().err
    assert f"(mirror of {s3.url}/tokens/{folder1.name})" in two.describe()

    # A node whose local cache is complete uploads it to an empty remote without tokenizing.
    other = f"s3://{s3.bucket}/elsewhere"
    three = ready(node(tmp_path, monkeypatch, "node2", tok_dir, corpus, other))
    assert Remote(other).read_index(folder1.name) == json.loads(local["index.json"])
    assert three.n_tokens == one.n_tokens


# -- nodes without the sources: one cache named by its URL -----------------------------------------


def gpu_node(tmp_path, monkeypatch, name, tok_dir, cache_dir, **kw) -> TextDataModule:
    """A node with its own empty local cache and no copy of the sources."""
    monkeypatch.setenv("SMOLLM_CACHE", str(tmp_path / name))
    return TextDataModule(tokenizer=tok_dir, seq_len=SEQ, batch_size=4, val_fraction=0.05, num_workers=0,
                          cache_dir=cache_dir, **kw)


def test_a_node_without_the_sources_trains_from_the_url_the_build_prints_and_never_tokenizes(
        tmp_path, tok_dir, corpus, s3, small_shards, monkeypatch, capsys):
    one = ready(node(tmp_path, monkeypatch, "node1", tok_dir, corpus, s3.url))
    said = re.findall(r"GPU nodes: --data.cache_dir (\S+)", capsys.readouterr().err)
    url = f"{s3.url}/tokens/{one.store.corpus.folder.name}"
    assert said == [url]  # the build says once which URL the GPU nodes take

    no_tokenizing(monkeypatch)
    monkeypatch.setattr(data.sources.FileSource, "resolve", lambda self: pytest.fail("a source was read"))
    two = ready(gpu_node(tmp_path, monkeypatch, "node2", tok_dir, url))  # no --data.files at all
    folder = tmp_path / "node2" / "tokens" / one.store.corpus.folder.name
    assert two.store.corpus.folder == folder and isinstance(two.token_cache._shard(0), np.memmap)
    assert "downloading" in capsys.readouterr().err
    assert mirrored(folder) == mirrored(one.store.corpus.folder)
    for a, b in zip(itertools.islice(one.train_dataloader(), 20), itertools.islice(two.train_dataloader(), 20)):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["index"], b["index"])
    assert two.state_dict()["cache_key"] == one.state_dict()["cache_key"]  # a resume sees the same data
    assert two.describe().split("; cache ")[0] == one.describe().split("; cache ")[0]  # the sources, from the index
    assert two.describe().endswith(f"cache {folder} (mirror of {url})")

    # --data.files naming files this node lacks: ignored, in one note.
    capsys.readouterr()
    three = ready(gpu_node(tmp_path, monkeypatch, "node2", tok_dir, url, files=str(tmp_path / "not-here")))
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith(f"note: --data.files ignored: --data.cache_dir names one built "
                                                   f"cache, {url}")
    assert three.n_tokens == one.n_tokens

    # The local copy damaged: the next launch downloads that shard again.
    shard = folder / "shard-000002.bin"
    raw = bytearray(shard.read_bytes())
    raw[5] ^= 1
    shard.write_bytes(bytes(raw))
    for stamp in folder.glob(".verified-*"):
        stamp.unlink()  # as a new launch finds it
    four = ready(gpu_node(tmp_path, monkeypatch, "node2", tok_dir, url + "/"))
    assert f"token cache shard {shard} is damaged" in capsys.readouterr().err
    assert np.array_equal(four.token_cache.read(0, four.n_tokens), one.token_cache.read(0, one.n_tokens))

    # A local cache folder is named the same way, and read in place.
    five = ready(gpu_node(tmp_path, monkeypatch, "node5", tok_dir, str(one.store.corpus.folder)))
    assert five.token_cache.folder == one.store.corpus.folder and not (tmp_path / "node5" / "tokens").exists()
    assert np.array_equal(five.token_cache.read(0, five.n_tokens), one.token_cache.read(0, one.n_tokens))


def test_names_one_cache_tells_a_cache_from_a_root(tmp_path):
    from smollm.data.store import names_one_cache

    key = "0123456789abcdef01234567"
    assert names_one_cache(f"s3://b/p/tokens/{key}") and names_one_cache(f"s3://b/p/tokens/{key}/")
    assert names_one_cache(f"{tmp_path}/tokens/{key}")  # even before it exists: then it is one line
    assert not names_one_cache("s3://b/p") and not names_one_cache(f"s3://b/p/{key}")
    assert not names_one_cache(f"s3://b/p/tokens/{key[:-1]}") and not names_one_cache(str(tmp_path))
    (tmp_path / "copied").mkdir()
    (tmp_path / "copied" / "index.json").write_text("{}")
    assert names_one_cache(str(tmp_path / "copied")) and not names_one_cache(None)


def test_a_wrong_tokenizer_or_a_url_without_a_complete_cache_is_one_line_and_harms_nothing(
        tmp_path, tok_dir, corpus, s3, small_shards, monkeypatch):
    from helpers_data import make_tokenizer

    remote, name, index, built = built_remote(tmp_path, monkeypatch, tok_dir, corpus, s3)
    url = f"{s3.url}/tokens/{name}"
    other_tok = make_tokenizer(tmp_path / "other-tok", seed=7)
    missing = f"{s3.url}/tokens/{'0' * 24}"
    remote.put_index("f" * 24, {**index, "complete": False, "shards": index["shards"][:2]})
    partial = f"{s3.url}/tokens/{'f' * 24}"
    remote.put_index("e" * 24, index)  # another cache's index under this name
    cases = [
        (url, other_tok, rf"--data.cache_dir {url} was built with tokenizer '{re.escape(tok_dir)}', whose token ids "
                         rf"differ from those of --data.tokenizer '{re.escape(other_tok)}'; pass --data.tokenizer "
                         rf"'{re.escape(tok_dir)}'"),
        (missing, tok_dir, rf"--data.cache_dir {missing} holds no token cache \(no readable index.json\); give the "
                           r"cache that the building run's data line names"),
        (partial, tok_dir, rf"--data.cache_dir {partial} is not complete \(2 shard\(s\) listed so far\)"),
        (f"{s3.url}/tokens/{'e' * 24}", tok_dir, r"its index.json is that of another cache"),
        (str(tmp_path / "nowhere" / "tokens" / name), tok_dir, r"holds no token cache"),
    ]
    for cache_dir, tokenizer, expected in cases:
        dm = gpu_node(tmp_path, monkeypatch, "gpu", tokenizer, cache_dir)
        with pytest.raises(data.DataError) as caught:
            dm.prepare_data()
        message = str(caught.value)
        assert re.search(expected, message) and "\n" not in message, message
        assert not (tmp_path / "gpu" / "tokens").exists()  # nothing downloaded, nothing written


# -- downloads ------------------------------------------------------------------------------------


def built_remote(tmp_path, monkeypatch, tok_dir, corpus, s3) -> tuple[Remote, str, dict, Path]:
    """A remote cache built by node 1, its index given a digest per shard; (remote, name, index,
    node 1's folder)."""
    dm = ready(node(tmp_path, monkeypatch, "node1", tok_dir, corpus, s3.url))
    folder = dm.store.corpus.folder
    remote = Remote(s3.url)
    index = remote.read_index(folder.name)
    for entry in index["shards"]:
        entry["digest"] = file_digest(folder / entry["file"])
    remote.put_index(folder.name, index)
    return remote, folder.name, index, folder


def test_a_download_resumes_its_part_files_and_writes_the_index_last(
        tmp_path, tok_dir, corpus, s3, small_shards, monkeypatch):
    remote, name, index, built = built_remote(tmp_path, monkeypatch, tok_dir, corpus, s3)
    target = tmp_path / "fresh" / name
    target.mkdir(parents=True)
    whole = (built / "shard-000001.bin").read_bytes()
    (target / "shard-000001.bin.part").write_bytes(whole[:300])  # an earlier download, stopped
    total = sum(s["tokens"] * 2 for s in index["shards"])
    assert remote.download(name, target, index, progress=False) == total - 300
    assert json.loads((target / "index.json").read_text()) == index
    assert sorted(p.name for p in target.iterdir()) == sorted([s["file"] for s in index["shards"]] + ["index.json"])
    for entry in index["shards"]:
        assert (target / entry["file"]).read_bytes() == (built / entry["file"]).read_bytes()
    assert remote.download(name, target, index, progress=False) == 0  # complete: nothing fetched


def test_a_shard_damaged_in_storage_is_refused_and_fetched_afresh_once_mended(
        tmp_path, tok_dir, corpus, s3, small_shards, monkeypatch):
    remote, name, index, built = built_remote(tmp_path, monkeypatch, tok_dir, corpus, s3)
    path = f"{s3.bucket}/runs/tokens/{name}/shard-000003.bin"
    good = s3.fs.cat_file(path)
    s3.fs.pipe_file(path, bytes([good[0] ^ 1]) + good[1:])  # same size, one bit flipped
    target = tmp_path / "fresh" / name
    with pytest.raises(RemoteError, match=r"shard-000003.bin does not match its digest in index.json .*run "
                                          r"again to download it afresh"):
        remote.download(name, target, index, progress=False)
    assert not (target / "index.json").exists()  # no reader takes it for a complete cache
    assert not (target / "shard-000003.bin").exists() and not (target / "shard-000003.bin.part").exists()
    present = sum(s["tokens"] * 2 for s in index["shards"] if (target / s["file"]).is_file())

    s3.fs.pipe_file(path, good)
    total = sum(s["tokens"] * 2 for s in index["shards"])
    assert remote.download(name, target, index, progress=False) == total - present
    for entry in index["shards"]:
        assert file_digest(target / entry["file"]) == entry["digest"]


@pytest.fixture(params=["memory", "s3"])
def store(request, tmp_path):
    """A remote root on fsspec's in-memory filesystem or on the local S3 server."""
    if request.param == "s3":
        return request.getfixturevalue("s3").url
    return f"memory://smollm-{uuid.uuid4().hex[:12]}/runs"


def test_a_local_shard_of_the_right_size_but_wrong_bytes_is_fetched_again_before_the_stamp(
        tmp_path, tok_dir, corpus, store, small_shards, monkeypatch):
    one = ready(node(tmp_path, monkeypatch, "node1", tok_dir, corpus, store))
    name = one.store.corpus.folder.name
    url = f"{store}/tokens/{name}"
    folder = tmp_path / "node2" / "tokens" / name
    folder.mkdir(parents=True)
    zeros = folder / "shard-000001.bin"  # an earlier copy of the right size, wrong bytes
    zeros.write_bytes(bytes((one.store.corpus.folder / zeros.name).stat().st_size))
    part = folder / "shard-000002.bin.part"  # a download stopped at its last byte, wrong bytes
    part.write_bytes(bytes((one.store.corpus.folder / "shard-000002.bin").stat().st_size))
    two = ready(gpu_node(tmp_path, monkeypatch, "node2", tok_dir, url))
    assert np.array_equal(two.token_cache.read(0, two.n_tokens), one.token_cache.read(0, one.n_tokens))
    for entry in two.token_cache.index["shards"]:
        assert file_digest(folder / entry["file"]) == entry["digest"]


# -- building -------------------------------------------------------------------------------------
# -- building -------------------------------------------------------------------------------------


def test_a_build_stopped_part_way_resumes_from_its_last_uploaded_shard(
        tmp_path, tok_dir, corpus, s3, small_shards, monkeypatch, capsys):
    reference = ready(node(tmp_path, monkeypatch, "alone", tok_dir, corpus, str(tmp_path / "alone")))
    uploads = []
    put = Remote.put

    def stop_at_the_fourth_shard(self, local, name, file):
        if len(uploads) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C or a kill would stop it, between two uploads
        uploads.append(file)
        return put(self, local, name, file)

    monkeypatch.setattr(Remote, "put", stop_at_the_fourth_shard)
    with pytest.raises(KeyboardInterrupt):
        ready(node(tmp_path, monkeypatch, "node1", tok_dir, corpus, s3.url))
    name = reference.store.corpus.folder.name
    partial = Remote(s3.url).read_index(name)
    assert not partial["complete"] and [s["file"] for s in partial["shards"]] == uploads
    s3.fs.invalidate_cache()
    assert not s3.fs.exists(f"{s3.bucket}/runs/tokens/{name}.lock")  # released

    monkeypatch.setattr(Remote, "put", put)
    tokenized = counted_tokens(monkeypatch)
    capsys.readouterr()
    two = ready(node(tmp_path, monkeypatch, "node2", tok_dir, corpus, s3.url))  # another node resumes it
    assert "after its 3 uploaded shard(s)" in capsys.readouterr().err
    assert tokenized[0] == reference.n_tokens - 3 * SHARD
    assert np.array_equal(two.token_cache.read(0, two.n_tokens), reference.token_cache.read(0, reference.n_tokens))
    assert remote_files(s3, name)["index.json"] == (two.store.corpus.folder / "index.json").read_bytes()


def test_a_build_killed_with_sigkill_is_resumed_by_another_node_after_its_last_uploaded_shard(
        tmp_path, tok_dir, corpus, s3, small_shards, monkeypatch, capsys):
    monkeypatch.setenv("SMOLLM_CACHE", str(tmp_path / "node1"))
    spec = dict(files=str(corpus), tokenizer=tok_dir, seq_len=SEQ, val_fraction=0.05, cache_dir=s3.url,
                shard_tokens=SHARD, batch_bytes=200, delay=0.1)
    proc = fitutil.start_python([str(TESTS / "cachebuild.py"), json.dumps(spec)])  # $SMOLLM_CACHE: node1
    name = node(tmp_path, monkeypatch, "node2", tok_dir, corpus, s3.url).store.find().folder.name
    remote = Remote(s3.url)
    try:
        fitutil.wait_for(proc, lambda: len((remote.read_index(name) or {"shards": []})["shards"]) >= 3, timeout=120)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    uploaded = remote.read_index(name)
    assert not uploaded["complete"] and s3.fs.exists(f"{s3.bucket}/runs/tokens/{name}.lock")  # left behind

    tokenized = counted_tokens(monkeypatch)
    two = ready(node(tmp_path, monkeypatch, "node2", tok_dir, corpus, s3.url))
    err = capsys.readouterr().err
    assert f"its process {proc.pid} on this host is gone" in err  # the dead builder's lock, taken over
    assert f"after its {len(uploaded['shards'])} uploaded shard(s)" in err
    assert tokenized[0] == two.n_tokens - sum(s["tokens"] for s in uploaded["shards"])
    straight = ready(node(tmp_path, monkeypatch, "straight", tok_dir, corpus, str(tmp_path / "straight")))
    assert np.array_equal(two.token_cache.read(0, two.n_tokens), straight.token_cache.read(0, straight.n_tokens))
    assert remote.is_complete(name)


def test_a_lock_left_by_a_dead_build_on_this_host_is_taken_over(
        tmp_path, tok_dir, corpus, s3, small_shards, monkeypatch, capsys):
    dm = node(tmp_path, monkeypatch, "node1", tok_dir, corpus, s3.url)
    name = dm.store.find().folder.name
    dead = 2 ** 22 + 12345  # above any pid this machine hands out
    s3.fs.pipe_file(f"{s3.bucket}/runs/tokens/{name}.lock",
                    json.dumps({"host": socket.gethostname(), "pid": dead, "since": "then"}).encode())
    ready(dm)
    assert f"its process {dead} on this host is gone" in capsys.readouterr().err
    assert Remote(s3.url).is_complete(name)


def test_one_process_builds_and_a_node_that_finds_the_lock_taken_waits_then_downloads(
        tmp_path, tok_dir, corpus, s3, small_shards, monkeypatch, capsys):
    built = ready(node(tmp_path, monkeypatch, "node1", tok_dir, corpus, s3.url))
    name = built.store.corpus.folder.name
    other = f"{s3.bucket}/other/tokens"
    for file, raw in remote_files(s3, name).items():  # another node's build, under way: no index yet
        if file != "index.json":
            s3.fs.pipe_file(f"{other}/{name}/{file}", raw)
    s3.fs.pipe_file(f"{other}/{name}.lock", json.dumps({"host": "gpu-node-7", "pid": 1, "since": "now"}).encode())
    monkeypatch.setattr(remote_mod, "POLL_S", 0.05)
    no_tokenizing(monkeypatch)
    waiting = node(tmp_path, monkeypatch, "node2", tok_dir, corpus, f"s3://{s3.bucket}/other")
    finished = []
    thread = threading.Thread(target=lambda: finished.append(ready(waiting)))
    thread.start()
    said, deadline = "", time.time() + 60
    while "waiting for gpu-node-7 pid 1 (since now) to finish building" not in said:
        assert thread.is_alive() and time.time() < deadline, said
        time.sleep(0.05)
        said += capsys.readouterr().err
    time.sleep(0.3)  # it keeps waiting
    assert thread.is_alive() and not (tmp_path / "node2" / "tokens" / name / "index.json").exists()
    s3.fs.pipe_file(f"{other}/{name}/index.json", remote_files(s3, name)["index.json"])  # the build ends
    thread.join(60)
    assert not thread.is_alive() and finished == [waiting]  # it ended without an error
    assert waiting.n_tokens == built.n_tokens


def test_the_store_checks_once_whether_exclusive_create_is_honoured_and_says_where_the_lock_is_advisory(
        monkeypatch, capsys):
    from fsspec.implementations.memory import MemoryFileSystem

    creates = []
    honest = MemoryFileSystem.pipe_file

    def counted(self, path, value, mode="overwrite", **kwargs):
        creates.append(mode)
        return honest(self, path, value, mode=mode, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "pipe_file", counted)
    remote = Remote(f"memory://honours-{uuid.uuid4().hex[:8]}/runs")
    assert remote.exclusive_create() and remote.exclusive_create()
    assert creates == ["create", "create"]  # one probe, made twice, on the first ask only
    assert not remote.fs.find(remote._path("tokens"))  # the probe object is removed
    assert "advisory" not in capsys.readouterr().err

    # A store that takes the second exclusive create as an overwrite (s3rver ignores If-None-Match).
    monkeypatch.setattr(MemoryFileSystem, "pipe_file", lambda self, path, value, mode="overwrite", **kw:
                        counted(self, path, value, **kw))
    lax = Remote(f"memory://ignores-{uuid.uuid4().hex[:8]}/runs")
    assert not lax.exclusive_create() and not lax.exclusive_create()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {lax.url} does not refuse a second exclusive create")
    assert "the build lock is advisory there" in err[0]
    assert not lax.fs.find(lax._path("tokens"))


def test_the_s3_server_of_these_tests_honours_exclusive_create(s3, capsys):
    assert Remote(s3.url).exclusive_create()
    assert "advisory" not in capsys.readouterr().err


# -- bad input ------------------------------------------------------------------------------------


def iam_user_without_permissions(s3) -> dict[str, str]:
    import boto3

    iam = boto3.client("iam", endpoint_url=s3.endpoint)
    user = f"nobody-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@pytest.mark.parametrize("case", ["unreachable endpoint", "missing credentials", "missing bucket",
                                  "no permission", "unknown scheme"])
def test_bad_input_is_one_line_within_seconds_and_harms_nothing(tmp_path, tok_dir, corpus, s3, monkeypatch, case):
    import contextlib

    from moto.core.authorization import enable_iam_authentication

    url, auth = s3.url, contextlib.nullcontext()
    if case == "unreachable endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        expected = r"cannot reach s3://.* at http://127\.0\.0\.1:\d+\) to read it .*check AWS_ENDPOINT_URL"
    elif case == "missing credentials":
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        expected = r"no credentials to read s3://.*set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    elif case == "missing bucket":
        url = "s3://no-such-bucket-here/runs"
        expected = r"bucket 'no-such-bucket-here' of --data.cache_dir s3://no-such-bucket-here/runs does not exist"
    elif case == "no permission":
        for k, v in iam_user_without_permissions(s3).items():
            monkeypatch.setenv(k, v)
        auth = enable_iam_authentication()
        expected = r"access denied to read s3://.*check that the credentials may read it"
    else:
        url = "nosuchscheme://bucket/runs"
        expected = r"--data.cache_dir nosuchscheme://bucket/runs"
    dm = node(tmp_path, monkeypatch, "node", tok_dir, corpus, url)
    started = time.perf_counter()
    with auth, pytest.raises(RemoteError) as caught:
        dm.prepare_data()
    assert time.perf_counter() - started < 15  # one attempt, not minutes of retries
    message = str(caught.value)
    assert re.search(expected, message) and "\n" not in message, message
    assert not (tmp_path / "node" / "tokens").exists()  # stopped before any data work


# -- end to end, as users run it ------------------------------------------------------------------


@pytest.mark.slow
def test_fit_on_two_nodes_from_one_bucket_and_a_missing_bucket_in_one_line(tmp_path, data, s3, capsys):
    """Each node's run in this process in turn (fitutil.run_here), its own $SMOLLM_CACHE as its disk."""
    import fitutil

    corpus, tokenizer = data
    runs = {}
    for name in ("node1", "node2"):
        args = fitutil.fit_args(tmp_path / name, corpus, tokenizer, max_steps=4,
                                extra=["--data.cache_dir", s3.url, *recorder(tmp_path / f"{name}.jsonl")])
        runs[name] = fitutil.run_here(args, capsys, env={"SMOLLM_CACHE": str(tmp_path / name / "local")})
        assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    assert "tokenizing" in runs["node1"].stderr and "tokenizing" not in runs["node2"].stderr
    assert "downloading" in runs["node2"].stderr

    def trained(run):
        return re.search(r"train loss [\d.]+ -> [\d.]+", run.stdout + run.stderr).group(0)

    assert trained(runs["node1"]) == trained(runs["node2"])  # the same tokens, the same order

    # A GPU node with no copy of the sources trains from the URL the build printed, stopped after
    # 2 steps and resumed: the same windows and losses as node 1's straight run.
    (url,) = re.findall(r"GPU nodes: --data.cache_dir (\S+)", runs["node1"].stderr)
    gone = tmp_path / "not-on-this-node"
    env3 = {"SMOLLM_CACHE": str(tmp_path / "node3" / "local")}
    for steps, resume in ((2, []), (4, ["--ckpt_path", "last"])):
        args = fitutil.fit_args(tmp_path / "node3", gone, tokenizer, max_steps=steps, extra=[
            "--data.cache_dir", url, *resume, *recorder(tmp_path / "node3.jsonl")])
        run = fitutil.run_here(args, capsys, env=env3)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "tokenizing" not in run.stderr and "note: --data.files ignored" in run.stderr
        assert ("downloading" in run.stderr) == (not resume)  # once; the resumed run finds its copy
        assert f"(mirror of {url})" in run.stdout + run.stderr  # the data line
    straight, resumed = fitutil.read_records(tmp_path / "node1.jsonl"), fitutil.read_records(tmp_path / "node3.jsonl")
    assert [r["windows"] for r in resumed] == [r["windows"] for r in straight]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], abs=1e-4)

    # Evaluate that run on a fourth node, also without the sources: from the checkpoint's data options.
    ckpt = tmp_path / "node3" / "checkpoints" / "tiny" / "last.ckpt"
    scored = fitutil.run_here(["--checkpoint", str(ckpt)], capsys, env={"SMOLLM_CACHE": str(tmp_path / "node4")},
                              command="evaluate")
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "downloading" in scored.stderr and "tokenizing" not in scored.stderr
    assert f"(mirror of {url})" in scored.stdout and re.search(r"perplexity [\d.,]+", scored.stdout)

    args = fitutil.fit_args(tmp_path / "bad", corpus, tokenizer, max_steps=4,
                            extra=["--data.cache_dir", "s3://no-such-bucket-here/runs"])
    bad = fitutil.run_here(args, capsys, env={"SMOLLM_CACHE": str(tmp_path / "bad" / "local")})
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: bucket 'no-such-bucket-here' of --data.cache_dir")
