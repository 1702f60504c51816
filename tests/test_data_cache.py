"""The sharded token cache: shards of bounded size read as one stream, windows across shard
boundaries, the cache key (reused and rebuilt when it should be), a build killed with SIGKILL
resumed from its last complete shard, one process building while another waits, and a bad
record that harms nothing already saved."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fitutil
import forked
import smollm.data as data
from helpers_data import SOURCE_KINDS, documents, make_source, make_tokenizer, write_records
from smollm.data import TextDataModule, TokenCache
from smollm.errors import DataError

SEQ = 16
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A jsonl and a parquet file and a text file: about 9,000 tokens."""
    write_records(tmp_path / "corpus" / "a.jsonl", documents(60, seed=1))
    write_records(tmp_path / "corpus" / "b.parquet", documents(50, seed=2))
    (tmp_path / "corpus" / "c.txt").write_text("".join(documents(30, seed=3)))
    return tmp_path / "corpus"


def make(tmp_path, tok_dir, corpus, cache="cache", **kw) -> TextDataModule:
    args = dict(files=str(corpus), tokenizer=tok_dir, seq_len=SEQ, batch_size=4, val_fraction=0.05,
                num_workers=0, cache_dir=str(tmp_path / cache))
    return TextDataModule(**{**args, **kw})


def ready(dm: TextDataModule) -> TextDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def stream(dm: TextDataModule) -> np.ndarray:
    return dm.token_cache.read(0, dm.n_tokens)


def shard_files(dm: TextDataModule) -> dict[str, tuple[int, int]]:
    """Each shard's name -> (inode, modification time): what rewriting it would change."""
    folder = dm.store.corpus.folder
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.glob("shard-*.bin"))}


# -- shards, one stream ---------------------------------------------------------------------------


def test_shards_hold_the_same_stream_windows_and_order_as_one_file(tmp_path, tok_dir, corpus, monkeypatch):
    one = ready(make(tmp_path, tok_dir, corpus, cache="one"))
    monkeypatch.setattr(data.build, "SHARD_TOKENS", 100)
    monkeypatch.setattr(data.build, "BATCH_BYTES", 500)
    many = ready(make(tmp_path, tok_dir, corpus, cache="many"))
    assert len(one.token_cache.shards) == 1
    sizes = [n for _, n in many.token_cache.shards]
    assert len(sizes) == -(-one.n_tokens // 100) and set(sizes[:-1]) == {100} and 0 < sizes[-1] <= 100
    assert [p.stat().st_size for p in sorted(many.store.corpus.folder.glob("shard-*.bin"))] == [2 * n for n in sizes]
    whole = stream(one)
    assert np.array_equal(stream(many), whole)
    assert (many.n_documents, many.n_train_windows, many.n_val_windows, many.val_start) == \
           (one.n_documents, one.n_train_windows, one.n_val_windows, one.val_start)
    crossing = [i for i in range(many.n_train_windows) if (i * SEQ) // 100 != (i * SEQ + SEQ) // 100]
    assert len(crossing) > 10
    for i in crossing:
        assert many.train_dataset[i]["input_ids"].tolist() == whole[i * SEQ:i * SEQ + SEQ + 1].tolist()
    for j in range(len(many.val_dataset)):
        assert torch.equal(many.val_dataset[j]["input_ids"], one.val_dataset[j]["input_ids"])
    for a, b in zip(itertools.islice(one.train_dataloader(), 30), itertools.islice(many.train_dataloader(), 30)):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["index"], b["index"])
    cache = many.token_cache
    for start, stop in ((0, 0), (95, 105), (99, 301), (0, many.n_tokens), (many.n_tokens - 3, many.n_tokens + 9)):
        assert np.array_equal(cache.read(start, stop), whole[start:stop])


def test_a_damaged_shard_is_refused_in_one_line(tmp_path, tok_dir, corpus, monkeypatch):
    monkeypatch.setattr(data.build, "SHARD_TOKENS", 1000)
    dm = ready(make(tmp_path, tok_dir, corpus))
    shard = dm.store.corpus.folder / "shard-000001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"shard-000001.bin is missing or damaged; delete .* and run again"):
        TokenCache(dm.store.corpus.folder)


# -- bytes per token, in context ------------------------------------------------------------------

DOCUMENTS = ["The model reads tokens.", " starts with a space, and  two,   three.", "中文字符在这里。东京",
             "emoji 😀🙂 and naïve café ünïcödé\n\nnew paragraph\n", "\n\tdef f(x):\n        return x\n",
             'quotes "<|endoftext|>" and "</s>" and "<s>" as text', "a", "  ", "ü😀中 mixed at the start"]


def raw_bytes(tokenizer, ids, byte_level: bool) -> bytes:
    """The bytes that tokens spell on their own: a byte-level token's characters, a byte-fallback
    token's byte, another piece with "▁" as a space; with no document context."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    out = b""
    for piece in tokenizer.convert_ids_to_tokens(ids):
        if piece.startswith("<0x") and len(piece) == 6:
            out += bytes([int(piece[3:5], 16)])
        elif byte_level:
            out += bytes(byte_of[c] for c in piece)
        else:
            out += piece.replace("\u2581", " ").encode()
    return out


@pytest.mark.parametrize("kind", ["byte-level", "llama2", "metaspace", "unigram"])
def test_token_bytes_in_context_are_the_texts_utf8_bytes(tmp_path, tok_dir, kind):
    from helpers_tokenizers import sentencepiece_tokenizer

    tokenizer = tok_dir if kind == "byte-level" else sentencepiece_tokenizer(tmp_path / "tok", kind)
    write_records(tmp_path / "docs.jsonl", DOCUMENTS + documents(20, seed=5))
    dm = ready(make(tmp_path, tokenizer, tmp_path / "docs.jsonl", seq_len=4))
    cache, ids = dm.token_cache, stream(dm)
    texts = DOCUMENTS + documents(20, seed=5)
    ends = np.flatnonzero(ids == dm.tokenizer.eos_token_id)
    assert len(ends) == len(texts)
    assert cache.n_bytes(0, len(ids)) == sum(len(t.encode()) for t in texts)
    prepends = kind != "byte-level"  # a "▁" before the text, which stands for no byte of it
    for text, a, b in zip(texts, np.concatenate(([0], ends[:-1] + 1)), ends):
        assert cache.n_bytes(a, b) == cache.n_bytes(a, b + 1) == len(text.encode()), text
        if text in DOCUMENTS and not text.startswith(" "):  # every window: the bytes of the text it covers
            for i, j in itertools.combinations(range(a, b + 1), 2):
                spelled = raw_bytes(dm.tokenizer, ids[i:j].tolist(), not prepends)
                assert cache.n_bytes(i, j) == len(spelled) - (prepends and i == a), (text, i - a, j - a)
    # Windows carry the bytes of their targets: evaluate and val/bpb add these up.
    windows = dm.corpus_windows()
    assert sum(windows[k]["n_bytes"] for k in range(len(windows))) == cache.n_bytes(1, len(ids))


@pytest.mark.parametrize("kind", ["byte-level", "llama2", "metaspace"])
def test_a_text_file_read_in_pieces_gives_the_whole_files_tokens(tmp_path, tok_dir, kind, monkeypatch):
    # Pieces of 64 bytes: a SentencePiece-style tokenizer puts a "▁" before every text it is
    # given, so a file cut in pieces would gain a space at each cut; it is read whole instead.
    from helpers_tokenizers import sentencepiece_tokenizer

    monkeypatch.setattr(data.sources, "PIECE_BYTES", 64)
    tokenizer = tok_dir if kind == "byte-level" else sentencepiece_tokenizer(tmp_path / "tok", kind)
    text = " ".join(documents(40, seed=3)) + "\n\n中文字符在这里。  naïve\n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    dm = ready(make(tmp_path, tokenizer, tmp_path / "t.txt", seq_len=4))
    whole = dm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert stream(dm).tolist() == whole + [dm.tokenizer.eos_token_id]
    assert dm.token_cache.n_bytes(0, len(whole) + 1) == len(text.encode())


# -- the cache key --------------------------------------------------------------------------------


def test_the_cache_is_reused_or_rebuilt_as_its_key_says(tmp_path, tok_dir, corpus, monkeypatch):
    base = ready(make(tmp_path, tok_dir, corpus))
    before = shard_files(base)
    built = []
    real = data.store.build_cache
    monkeypatch.setattr(data.store, "build_cache", lambda *a, **k: (built.append(1), real(*a, **k)))

    (corpus / "c.txt").touch()  # a new modification time, the same content
    same = ready(make(tmp_path, tok_dir, corpus, num_workers=1, seed=3, seq_len=8, batch_size=2))
    assert not built and same.store.corpus.folder == base.store.corpus.folder and shard_files(same) == before

    folders = {base.store.corpus.folder}
    for kw in (dict(max_tokens=5000), dict(encoding_errors="replace"),
               dict(tokenizer=make_tokenizer(tmp_path / "tok2", vocab_size=300, seed=1))):
        folders.add(ready(make(tmp_path, tok_dir, corpus, **kw)).store.corpus.folder)
    assert len(built) == 3 and len(folders) == 4
    # The text key: the same text under two names is still two caches.
    (tmp_path / "both.jsonl").write_text("".join(json.dumps({"text": t, "body": t}) + "\n"
                                                 for t in documents(60, seed=1)))
    by_text = ready(make(tmp_path, tok_dir, tmp_path / "both.jsonl"))
    by_body = ready(make(tmp_path, tok_dir, tmp_path / "both.jsonl", text_key="body"))
    assert by_text.store.corpus.folder != by_body.store.corpus.folder
    assert np.array_equal(stream(by_text), stream(by_body))
    write_records(corpus / "a.jsonl", documents(61, seed=1))  # one more record
    assert ready(make(tmp_path, tok_dir, corpus)).store.corpus.folder not in folders
    assert shard_files(base) == before  # the earlier caches are untouched


def test_a_saved_dataset_is_keyed_by_its_fingerprint(tmp_path, tok_dir):
    import datasets

    datasets.Dataset.from_dict({"text": documents(40, seed=4)}).save_to_disk(str(tmp_path / "ds"))
    first = ready(make(tmp_path, tok_dir, None, files=None, dataset=str(tmp_path / "ds")))
    again = ready(make(tmp_path, tok_dir, None, files=None, dataset=str(tmp_path / "ds")))
    assert again.store.corpus.folder == first.store.corpus.folder
    datasets.Dataset.from_dict({"text": documents(40, seed=5)}).save_to_disk(str(tmp_path / "ds2"))
    os.rename(tmp_path / "ds", tmp_path / "old")
    os.rename(tmp_path / "ds2", tmp_path / "ds")  # other data at the same path
    changed = ready(make(tmp_path, tok_dir, None, files=None, dataset=str(tmp_path / "ds")))
    fingerprint = first.store.corpus.spec["sources"][0]["fingerprint"]
    assert changed.store.corpus.spec["sources"][0]["fingerprint"] != fingerprint
    assert changed.store.corpus.folder != first.store.corpus.folder
    assert not np.array_equal(stream(changed)[:50], stream(first)[:50])


def test_file_hashes_are_remembered_until_a_file_changes(tmp_path, tok_dir, corpus, monkeypatch):
    old = time.time() - 60
    for p in corpus.iterdir():
        os.utime(p, (old, old))  # written long enough ago to be remembered
    first = ready(make(tmp_path, tok_dir, corpus))
    read = []
    real = data.sources._scan
    monkeypatch.setattr(data.sources, "_scan", lambda p: (read.append(p.name), real(p))[1])
    assert ready(make(tmp_path, tok_dir, corpus)).store.corpus.folder == first.store.corpus.folder
    assert read == []  # nothing read again
    (corpus / "c.txt").write_text("other text\n" * 500)
    changed = ready(make(tmp_path, tok_dir, corpus))
    assert read == ["c.txt"] and changed.store.corpus.folder != first.store.corpus.folder


# -- interrupted builds ---------------------------------------------------------------------------


def build_process(spec: dict) -> forked.Forked:
    """`python tests/cachebuild.py SPEC` in a process of its own (forked, tests/forked.py)."""
    return forked.Forked([str(TESTS / "cachebuild.py"), json.dumps(spec)], fitutil.subprocess_env(), fitutil.ROOT)


def wait_for_shards(folder_parent: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """The cache folder once its index lists at least n shards."""
    deadline = time.time() + timeout
    while True:
        for index in folder_parent.glob("*/index.json"):
            with_shards = json.loads(index.read_text())
            if len(with_shards["shards"]) >= n:
                return index.parent
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the build never wrote its shards"
        time.sleep(0.05)


def test_a_build_killed_with_sigkill_resumes_from_its_last_complete_shard(tmp_path, tok_dir, monkeypatch):
    import psutil

    write_records(tmp_path / "corpus" / "a.jsonl.gz", documents(150, seed=6))
    write_records(tmp_path / "corpus" / "b.parquet", documents(150, seed=7))
    args = dict(files=str(tmp_path / "corpus"), tokenizer=tok_dir, seq_len=SEQ, val_fraction=0.05,
                cache_dir=str(tmp_path / "cache"))
    proc = build_process({**args, "shard_tokens": 500, "batch_bytes": 200, "delay": 0.05})
    try:
        folder = wait_for_shards(tmp_path / "cache" / "tokens", 3, proc)
        workers = psutil.Process(proc.pid).children()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert workers and psutil.wait_procs(workers, timeout=10)[1] == []  # the workers died with it
    index = json.loads((folder / "index.json").read_text())
    assert not index["complete"] and len(index["shards"]) >= 3
    done = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("shard-*.bin")}
    done = {s["file"]: done[s["file"]] for s in index["shards"]}
    committed = sum(s["tokens"] for s in index["shards"])

    monkeypatch.setattr(data.build, "SHARD_TOKENS", 500)
    appended = []
    real = data.build._ShardWriter.append
    monkeypatch.setattr(data.build._ShardWriter, "append",
                        lambda self, tokens, state_at, *rest: (appended.append(len(tokens)),
                                                               real(self, tokens, state_at, *rest)))
    resumed = ready(TextDataModule(**args, num_workers=0))
    assert resumed.store.corpus.folder == folder
    assert sum(appended) == resumed.n_tokens - committed  # only what was not in a complete shard
    assert all(((folder / p).stat().st_ino, (folder / p).stat().st_mtime_ns) == done[p] for p in done)
    assert not list(folder.glob("*.tmp"))

    straight = ready(TextDataModule(**{**args, "cache_dir": str(tmp_path / "straight")}, num_workers=0))
    assert np.array_equal(stream(resumed), stream(straight))
    a, b = resumed.token_cache.index, straight.token_cache.index
    assert (a["shards"], a["n_docs"], a["sources"]) == (b["shards"], b["n_docs"], b["sources"])


class Interrupted(Exception):
    """Stops a build right after it lists a shard, as a kill there would."""


# Each way of reading (test_data_sources resumes every kind at every unit): .ndjson, .bz2 and .xz
# read as .jsonl and .gz do.
@pytest.mark.parametrize("kind", [k for k in SOURCE_KINDS if k not in ("ndjson", "jsonl.bz2", "jsonl.xz")])
def test_a_build_interrupted_at_every_shard_resumes_to_the_clean_build(tmp_path, tokenizer, kind, monkeypatch):
    # Shards of 97 tokens end inside documents, pieces of a text file and row groups.
    monkeypatch.setattr(data.build, "SHARD_TOKENS", 97)
    monkeypatch.setattr(data.build, "BATCH_BYTES", 300)
    monkeypatch.setattr(data.sources, "PIECE_BYTES", 200)
    monkeypatch.setattr(data.sources, "PARQUET_BATCH_ROWS", 4)
    monkeypatch.setattr(data.sources, "DATASET_BATCH_ROWS", 4)
    source = make_source(tmp_path / "data", kind, documents(40, seed=21))

    def build(folder: Path, stop_at: int | None = None) -> None:
        def on_commit(index, shard):
            if shard is not None and len(index["shards"]) == stop_at:
                raise Interrupted
        with contextlib.suppress(Interrupted):
            data.build_cache(folder, [source], tokenizer, {"key": "k"}, [None], workers=1, progress=False,
                             on_commit=on_commit)

    build(tmp_path / "clean")
    clean = TokenCache(tmp_path / "clean")
    assert len(clean.shards) > 8
    for k in range(1, len(clean.shards)):  # stopped after each shard in turn, resumed each time
        build(tmp_path / "resumed", stop_at=k)
        assert len(json.loads((tmp_path / "resumed" / "index.json").read_text())["shards"]) == k
    build(tmp_path / "resumed")
    resumed = TokenCache(tmp_path / "resumed")
    assert np.array_equal(resumed.read(0, len(resumed)), clean.read(0, len(clean)))
    a, b = resumed.index, clean.index
    assert (a["shards"], a["n_docs"], a["sources"]) == (b["shards"], b["n_docs"], b["sources"])


def test_a_build_cut_by_max_tokens_resumes_to_the_clean_build(tmp_path, tokenizer, monkeypatch):
    # Two sources, each cut inside a document (with the EOS that ends it), shards across both cuts.
    monkeypatch.setattr(data.build, "SHARD_TOKENS", 61)
    monkeypatch.setattr(data.build, "BATCH_BYTES", 300)
    monkeypatch.setattr(data.sources, "PARQUET_BATCH_ROWS", 4)
    sources = [make_source(tmp_path / "a", "mixed-folder", documents(40, seed=25)),
               make_source(tmp_path / "b", "dataset", documents(40, seed=26))]
    eos = tokenizer.eos_token_id

    def build(folder: Path, stop_at: int | None = None) -> None:
        def on_commit(index, shard):
            if shard is not None and len(index["shards"]) == stop_at:
                raise Interrupted
        with contextlib.suppress(Interrupted):
            data.build_cache(folder, sources, tokenizer, {"key": "k"}, [503, 331], workers=1, progress=False,
                             on_commit=on_commit)

    build(tmp_path / "clean")
    clean = TokenCache(tmp_path / "clean")
    tokens = clean.read(0, len(clean)).tolist()
    assert len(tokens) == 503 + 331 and tokens[502] == eos and tokens[-1] == eos
    assert clean.index["n_docs"] == tokens.count(eos)
    for k in range(1, len(clean.shards)):
        build(tmp_path / "resumed", stop_at=k)
    build(tmp_path / "resumed")
    resumed = TokenCache(tmp_path / "resumed")
    assert np.array_equal(resumed.read(0, len(resumed)), clean.read(0, len(clean)))
    a, b = resumed.index, clean.index
    assert (a["shards"], a["n_docs"], a["sources"]) == (b["shards"], b["n_docs"], b["sources"])


def test_one_process_builds_while_another_waits_for_it(tmp_path, tok_dir):
    write_records(tmp_path / "corpus" / "a.jsonl", documents(150, seed=8))
    args = dict(files=str(tmp_path / "corpus"), tokenizer=tok_dir, seq_len=SEQ, val_fraction=0.05,
                cache_dir=str(tmp_path / "cache"), shard_tokens=500, batch_bytes=200)
    hold = tmp_path / "hold"
    hold.touch()
    builder = build_process({**args, "hold": str(hold)})  # stops after its first shard
    waiter = None
    try:
        wait_for_shards(tmp_path / "cache" / "tokens", 1, builder)
        waiter = build_process(args)
        # until it says it waits (it blocks there: the lock is taken)
        fitutil.wait_for(waiter, lambda: "waiting for another process" in waiter.stderr_so_far())
        seen = waiter.stderr_so_far().splitlines()
        hold.unlink()  # let the builder finish
        out_w, err_w = waiter.communicate(timeout=240)
        out_b, err_b = builder.communicate(timeout=240)
    finally:
        builder.kill()
        if waiter is not None:
            waiter.kill()
    assert builder.returncode == 0 and waiter.returncode == 0, err_b[-2000:] + err_w[-2000:]
    assert "waiting for another process" in seen[-1], "".join(seen)[-2000:]
    n_tokens = out_b.splitlines()[-1]
    assert out_w.splitlines() == ["built 0", n_tokens]  # it tokenized nothing and found the whole cache
    assert int(out_b.splitlines()[0].split()[1]) == int(n_tokens.split()[1])


def test_a_bad_record_mid_build_keeps_the_complete_shards(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setattr(data.build, "SHARD_TOKENS", 500)
    monkeypatch.setattr(data.build, "BATCH_BYTES", 300)
    texts = documents(120, seed=9)
    lines = [json.dumps({"text": t}) for t in texts]
    lines[100] = json.dumps({"text": None})
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    dm = make(tmp_path, tok_dir, tmp_path / "c.jsonl")
    with pytest.raises(DataError, match="c.jsonl line 101: field 'text' is null"):
        dm.prepare_data()
    folder = dm.store.corpus.folder
    index = json.loads((folder / "index.json").read_text())
    assert not index["complete"] and index["shards"] and not list(folder.glob("*.tmp"))
    kept = {p.name: p.read_bytes() for p in folder.glob("shard-*.bin")}
    assert sorted(kept) == [s["file"] for s in index["shards"]]
    with pytest.raises(DataError, match="line 101"):  # the same again: resumed, and stopped at the same record
        make(tmp_path, tok_dir, tmp_path / "c.jsonl").prepare_data()
    assert {p.name: p.read_bytes() for p in folder.glob("shard-*.bin")} == kept
