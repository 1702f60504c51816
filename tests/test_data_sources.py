"""Sources: every format alone and mixed gives each document's own tokens plus EOS; a bad record
stops with one line naming the file and line or row; Hugging Face datasets from a saved folder and
as a stream; a hub name fails at once offline; --data.max_tokens."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from pathlib import Path

import pytest

import smollm.data as data
from helpers_data import SOURCE_KINDS, compress, documents, make_source, sentences, write_records
from smollm.data import DatasetSource, FileSource, TextDataModule
from smollm.errors import DataError

SEQ = 16
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def ready(dm: TextDataModule) -> TextDataModule:
    dm.prepare_data()
    dm.setup("fit")
    return dm


def make(tmp_path, tok_dir, **kw) -> TextDataModule:
    args = dict(tokenizer=tok_dir, seq_len=SEQ, batch_size=2, val_fraction=0.05, num_workers=0,
                cache_dir=str(tmp_path / "cache"))
    return TextDataModule(**{**args, **kw})


def expected(tokenizer, texts: list[str]) -> list[int]:
    """Each document tokenized on its own, EOS after each: what the cache must hold."""
    out = []
    for text in texts:
        out += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


def stream(dm: TextDataModule) -> list[int]:
    return dm.token_cache.read(0, dm.n_tokens).tolist()


# -- each format, and a mix -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["c.jsonl", "c.json", "c.jsonl.gz", "c.json.zst", "c.parquet"])
def test_each_record_format_is_one_document_per_record(tmp_path, tok_dir, tokenizer, name):
    texts = documents(40, seed=1)
    path = write_records(tmp_path / name, texts)
    dm = ready(make(tmp_path, tok_dir, files=str(path)))
    assert stream(dm) == expected(tokenizer, texts)
    assert dm.n_documents == 40


def test_a_mix_of_formats_in_a_folder_and_globs_keeps_their_order(tmp_path, tok_dir, tokenizer):
    corpus = tmp_path / "corpus"
    a, b, c = documents(9, seed=2), documents(11, seed=3), documents(5, seed=4)
    write_records(corpus / "a.jsonl", a)
    write_records(corpus / "b.parquet", b)
    write_records(corpus / "sub" / "c.jsonl.zst", c)
    (corpus / "d.md").write_text(sentences(30, seed=5))
    (corpus / "notes.bin").write_bytes(b"\0\1")  # neither text nor data: a folder leaves it out
    dm = ready(make(tmp_path, tok_dir, files=str(corpus)))
    assert [p.name for p in dm.store.corpus.docs] == ["a.jsonl", "b.parquet", "d.md", "c.jsonl.zst"]
    text_doc = (corpus / "d.md").read_text()
    assert stream(dm) == expected(tokenizer, a + b + [text_doc] + c)
    assert dm.n_documents == 9 + 11 + 1 + 5
    assert "4 files (2 jsonl, 1 parquet, 1 text)" in dm.describe()

    again = ready(make(tmp_path, tok_dir, files=[str(corpus / "*.parquet"), str(corpus / "**" / "*.zst")]))
    assert stream(again) == expected(tokenizer, b + c)


def test_a_large_text_file_is_read_in_pieces_that_tokenize_as_the_whole(tmp_path, tok_dir, tokenizer, monkeypatch):
    # Indented lines, long lines without a break, trailing spaces: the cuts must change no token.
    lines = [("    " * (i % 4)) + sentences(1, seed=i).strip() + ("  " if i % 5 == 0 else "")
             for i in range(300)]
    text = "\n".join(lines) + "\n" + " ".join(sentences(40, seed=9).split()) + "\n"
    (tmp_path / "big.txt").write_text(text)
    monkeypatch.setattr(data.sources, "PIECE_BYTES", 256)
    pieces = list(data.read_pieces(tmp_path / "big.txt"))
    assert len(pieces) > 30
    dm = ready(make(tmp_path, tok_dir, files=str(tmp_path / "big.txt")))
    assert stream(dm) == expected(tokenizer, [text])


def test_text_key_names_the_field_or_column(tmp_path, tok_dir, tokenizer):
    texts = documents(20, seed=6)
    write_records(tmp_path / "c.jsonl", texts, key="content")
    write_records(tmp_path / "c.parquet", texts, key="content")
    for name in ("c.jsonl", "c.parquet"):
        dm = ready(make(tmp_path, tok_dir, files=str(tmp_path / name), text_key="content"))
        assert stream(dm) == expected(tokenizer, texts)


def test_blank_lines_and_an_empty_text_in_jsonl(tmp_path, tok_dir, tokenizer):
    texts = documents(20, seed=7)
    lines = [json.dumps({"text": t}) for t in texts[:10]] + ["", "   "] + [json.dumps({"text": ""})] + \
            [json.dumps({"text": t}) for t in texts[10:]]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    dm = ready(make(tmp_path, tok_dir, files=str(tmp_path / "c.jsonl")))
    assert stream(dm) == expected(tokenizer, texts[:10] + [""] + texts[10:])


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_every_source_kind_resumes_at_every_position_as_read_straight(tmp_path, kind, monkeypatch):
    # Small pieces, batches and uneven row groups: positions inside a text file, a later row group,
    # a later batch, a later file.
    monkeypatch.setattr(data.sources, "PIECE_BYTES", 200)
    monkeypatch.setattr(data.sources, "PARQUET_BATCH_ROWS", 4)
    monkeypatch.setattr(data.sources, "DATASET_BATCH_ROWS", 4)
    texts = documents(40, seed=20)
    source = make_source(tmp_path, kind, texts)
    units = list(source.units())
    assert "".join(text for _, text, _ in units) == "".join(texts)  # nothing lost, doubled or moved
    assert sum(eos for _, _, eos in units) == {"txt": 2, "mixed-folder": 13 + 1 + 14}.get(kind, 40)
    for k in range(len(units)):
        assert list(source.units(units[k][0])) == units[k:], f"resumed at unit {k}, {units[k][0]}"


def test_a_cut_at_max_tokens_ends_its_document_with_eos(tmp_path, tok_dir, tokenizer, monkeypatch):
    a, b = documents(40, seed=23), documents(40, seed=24)
    write_records(tmp_path / "a.jsonl", a)
    streamed(monkeypatch, b)
    whole_a, whole_b = expected(tokenizer, a), expected(tokenizer, b)
    eos = tokenizer.eos_token_id
    cap_a = next(n for n in range(300, 400) if whole_a[n - 1] != eos)  # inside a document
    cap_b = next(n for n in range(200, 300) if whole_b[n - 1] != eos and whole_b[n - 2] != eos)
    dm = ready(make(tmp_path, tok_dir, files=str(tmp_path / "a.jsonl"), dataset="someone/corpus",
                    max_tokens=[cap_a, cap_b]))
    # Each source is its first cap - 1 tokens and an EOS: the next source never continues its document.
    assert stream(dm) == whole_a[:cap_a - 1] + [eos] + whole_b[:cap_b - 1] + [eos]
    assert [s["tokens"] for s in dm.token_cache.index["sources"]] == [cap_a, cap_b]
    assert [s["documents"] for s in dm.token_cache.index["sources"]] == [
        whole_a[:cap_a].count(eos) + 1, whole_b[:cap_b].count(eos) + 1]
    assert dm.n_documents == stream(dm).count(eos)


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".bz2", ".xz"])
def test_a_truncated_compressed_file_is_an_error_naming_it(tmp_path, suffix):
    texts = documents(400, seed=22)
    whole = write_records(tmp_path / f"whole.jsonl{suffix}", texts).read_bytes()
    for fraction in (0.5, 0.9, 0.99):
        path = tmp_path / f"cut{int(fraction * 100)}.jsonl{suffix}"
        path.write_bytes(whole[:int(len(whole) * fraction)])
        source = FileSource([str(path)])
        source.scan()
        with pytest.raises(DataError, match=rf"cannot read {path} \(.*\); check or recompress the file") as e:
            list(source.units())
        assert "\n" not in str(e.value)
    # Several frames or members one after another are one file, read whole.
    raw = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    path = tmp_path / f"frames.jsonl{suffix}"
    path.write_bytes(compress(raw[:1000], suffix) + compress(raw[1000:], suffix))
    source = FileSource([str(path)])
    source.scan()
    assert [text for _, text, _ in source.units()] == texts


def test_ndjson_bz2_and_xz_are_json_lines_however_named(tmp_path, tok_dir, tokenizer):
    corpus = tmp_path / "corpus"
    parts = [documents(6, seed=30 + i) for i in range(4)]
    names = ["a.ndjson", "b.jsonl.bz2", "c.jsonl.xz", "d.ndjson.gz"]
    for name, texts in zip(names, parts):
        write_records(corpus / name, texts)
    want = expected(tokenizer, sum(parts, []))
    for files in (str(corpus), [str(corpus / n) for n in names], str(corpus / "*")):
        dm = ready(make(tmp_path, tok_dir, files=files))
        assert stream(dm) == want and dm.n_documents == 24
        assert "4 files (4 jsonl)" in dm.describe()


@pytest.mark.parametrize("errors", ["strict", "replace"])
def test_compressed_bytes_are_never_read_as_text(tmp_path, tok_dir, errors):
    corpus = tmp_path / "corpus"
    write_records(corpus / "a.jsonl", documents(5, seed=40))
    (corpus / "notes.txt.gz").write_bytes(compress(sentences(50).encode(), ".gz"))
    for files in (str(corpus), str(corpus / "notes.txt.gz"), str(corpus / "*.gz")):
        with pytest.raises(DataError, match=r"notes.txt.gz is compressed \(.gz\) but not JSON Lines; smollm reads "
                                            r"compressed .jsonl/.json/.ndjson files only") as e:
            make(tmp_path, tok_dir, files=files, encoding_errors=errors).prepare_data()
        assert "\n" not in str(e.value)
    # Compressed bytes under a text name: refused by what they are, not decoded.
    for suffix, what in ((".gz", "gzip"), (".zst", "zstd"), (".bz2", "bzip2"), (".xz", "xz")):
        path = tmp_path / f"plain{suffix.replace('.', '-')}.txt"
        path.write_bytes(compress(sentences(50).encode(), suffix))
        with pytest.raises(DataError, match=rf"{path} holds {what}-compressed data, not text; .*\.jsonl\{suffix}\)"):
            make(tmp_path, tok_dir, files=str(path), encoding_errors=errors).prepare_data()


@pytest.mark.parametrize("errors", ["strict", "replace"])
@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_files_are_refused_by_their_byte_order_mark(tmp_path, tok_dir, errors, encoding):
    text = sentences(20)
    bom = {"utf-16-be": b"\xfe\xff"}.get(encoding, b"")
    lines = "".join(json.dumps({"text": t}) + "\n" for t in text.splitlines())
    for name, content in (("a.txt", text), ("b.jsonl", lines), ("c.jsonl.gz", lines)):
        path = tmp_path / f"{encoding}-{name}"
        path.write_bytes(compress(bom + content.encode(encoding), path.suffix))
        with pytest.raises(DataError, match=rf"{path} is UTF-16 or UTF-32 text \(its byte-order mark says so\), "
                                            "not UTF-8; convert it to UTF-8"):
            ready(make(tmp_path, tok_dir, files=str(path), encoding_errors=errors))


def test_a_folder_and_its_glob_give_the_same_files_through_symlinked_folders(tmp_path):
    corpus, outside = tmp_path / "corpus", tmp_path / "outside"
    write_records(corpus / "a" / "x.jsonl", ["x"])
    (corpus / "b.txt").write_text("b")
    (outside / "real").mkdir(parents=True)
    (outside / "real" / "notes.bin").write_bytes(b"\0\1")  # no text suffix: a folder leaves it out
    write_records(outside / "real" / "y.jsonl", ["y"])
    (outside / "real" / "deeper").mkdir()
    (outside / "real" / "deeper" / "z.txt").write_text("z")
    (corpus / "linked").symlink_to(outside / "real", target_is_directory=True)
    (outside / "real" / "deeper" / "loop").symlink_to(outside / "real", target_is_directory=True)
    folder = data.resolve_files([str(corpus)])
    assert folder == [corpus / "a" / "x.jsonl", corpus / "b.txt", outside / "real" / "deeper" / "z.txt",
                      outside / "real" / "y.jsonl"]
    assert data.resolve_files([str(corpus / "**")]) == folder  # the folder, by another name
    assert data.resolve_files([str(corpus / "**" / "*")]) == folder + [outside / "real" / "notes.bin"]  # every file
    assert data.resolve_files([str(corpus / "**" / "*.jsonl")]) == [p for p in folder if p.suffix == ".jsonl"]
    # Two links back up the tree: glob.glob followed them 2**40 times over; both must end, and at once.
    (corpus / "self").symlink_to(corpus, target_is_directory=True)
    (outside / "real" / "deeper" / "up").symlink_to(corpus, target_is_directory=True)

    def too_long(*_):
        raise AssertionError("resolving the files never ended")  # not an OSError, which glob swallows
    signal.signal(signal.SIGALRM, too_long)
    signal.alarm(20)
    try:
        for entry in ("", "**"):
            assert data.resolve_files([str(corpus / entry)]) == folder, entry
        assert len(data.resolve_files([str(corpus / "**" / "*")])) == len(folder) + 1
    finally:
        signal.alarm(0)


def test_a_folder_that_cannot_be_read_is_an_error_naming_it(tmp_path, monkeypatch):
    write_records(tmp_path / "corpus" / "a.jsonl", ["a"])
    write_records(tmp_path / "corpus" / "locked" / "b.jsonl", ["b"])
    scandir = os.scandir

    def no_entry(path="."):  # what a folder without read permission gives (the tests run as root)
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", no_entry)
    for entry in ("", "**", "**/*.jsonl"):
        with pytest.raises(DataError, match=r"cannot read the folder .*locked \(Permission denied\)"):
            data.resolve_files([str(tmp_path / "corpus" / entry)])


def test_a_leading_byte_order_mark_is_an_encoding_mark_in_every_format(tmp_path, tok_dir, tokenizer):
    texts = documents(6, seed=41)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + lines)
    (tmp_path / "b.jsonl.gz").write_bytes(compress(b"\xef\xbb\xbf" + lines, ".gz"))
    (tmp_path / "c.txt").write_bytes(b"\xef\xbb\xbf" + texts[0].encode())
    for name, want in (("a.jsonl", texts), ("b.jsonl.gz", texts), ("c.txt", texts[:1])):
        dm = ready(make(tmp_path, tok_dir, files=str(tmp_path / name)))
        assert stream(dm) == expected(tokenizer, want), name
    (tmp_path / "d.txt").write_bytes(b"\xef\xbb\xbfcaf\xe9")  # bad bytes are still named by their offset in the file
    with pytest.raises(DataError, match=r"d.txt is not UTF-8 at byte 6 "):
        ready(make(tmp_path, tok_dir, files=str(tmp_path / "d.txt")))


def test_a_dictionary_encoded_parquet_column_is_read_as_strings(tmp_path, tok_dir, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = documents(20, seed=42)
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), tmp_path / "d.parquet",
                   row_group_size=7)
    dm = ready(make(tmp_path, tok_dir, files=str(tmp_path / "d.parquet")))
    assert stream(dm) == expected(tokenizer, texts)


def test_bad_bytes_in_a_parquet_or_dataset_string_column_name_the_row(tmp_path, tok_dir, tokenizer):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = documents(12, seed=44)
    raw = [t.encode() for t in texts]
    raw[9] = b"caf\xe9 au lait"  # Arrow writes and reads it as a string without checking
    table = pa.table({"text": pa.array(raw, pa.binary()).view(pa.string())})
    pq.write_table(table, tmp_path / "bad.parquet", row_group_size=5)
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    fixed = texts[:9] + ["caf\ufffd au lait"] + texts[10:]
    for where, option in ((r"bad.parquet row 9", dict(files=str(tmp_path / "bad.parquet"))),
                          (r"dataset .*saved \(train\) row 9", dict(dataset=str(tmp_path / "saved")))):
        with pytest.raises(DataError, match=where + r": the text is not UTF-8 at byte 3 .*encoding_errors replace"):
            ready(make(tmp_path, tok_dir, **option))
        dm = ready(make(tmp_path, tok_dir, **option, encoding_errors="replace"))
        assert stream(dm) == expected(tokenizer, fixed)


def test_a_lone_surrogate_escape_is_one_line_naming_the_record(tmp_path, tok_dir, tokenizer):
    path = bad_jsonl(tmp_path, '{"text": "half a pair \\ud83d here"}')
    with pytest.raises(DataError, match=r"bad.jsonl line 5: field 'text' holds \\ud83d, half of a UTF-16 pair, "
                                        r"which is not a character") as e:
        ready(make(tmp_path, tok_dir, files=str(path)))
    assert "\n" not in str(e.value)
    dm = ready(make(tmp_path, tok_dir, files=str(path), encoding_errors="replace"))
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    texts[4] = "half a pair \ufffd here"
    assert stream(dm) == expected(tokenizer, texts)


# -- a bad record: one line naming the file and the line or row -----------------------------------


def bad_jsonl(tmp_path, line: str, name: str = "bad.jsonl") -> Path:
    good = [json.dumps({"text": t}) for t in documents(30, seed=8)]
    path = tmp_path / name
    path.write_text("\n".join(good[:4] + [line] + good[4:]) + "\n")
    return path


@pytest.mark.parametrize("line, match", [
    ('{"txt": "no text field"}', r"bad.jsonl line 5 has no field 'text' \(its fields: 'txt'\); set --data.text_key"),
    ('{"text": 42}', r"bad.jsonl line 5: field 'text' is a number, not a string"),
    ('{"text": null}', r"bad.jsonl line 5: field 'text' is null, not a string"),
    ('{"text": ["a", "b"]}', r"bad.jsonl line 5: field 'text' is an array, not a string"),
    ('{"text": "unterminated', r"bad.jsonl line 5 is not valid JSON"),
    ('["text", "a list"]', r"bad.jsonl line 5 is a JSON list, not an object"),
])
def test_a_bad_jsonl_record_names_the_file_and_line(tmp_path, tok_dir, line, match):
    path = bad_jsonl(tmp_path, line)
    with pytest.raises(DataError, match=match) as e:
        ready(make(tmp_path, tok_dir, files=str(path)))
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_bad_record_in_a_compressed_file_names_its_line(tmp_path, tok_dir):
    texts = documents(12, seed=9)
    records = [{"text": t} for t in texts]
    records[8] = {"body": "x"}
    import zstandard

    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in records).encode()))
    with pytest.raises(DataError, match=r"c.jsonl.zst line 9 has no field 'text'"):
        ready(make(tmp_path, tok_dir, files=str(path)))
    (tmp_path / "broken.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    with pytest.raises(DataError, match=r"cannot read .*broken.jsonl.gz"):
        ready(make(tmp_path, tok_dir, files=str(tmp_path / "broken.jsonl.gz")))


def test_bad_parquet_records_name_the_file_and_row(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = documents(30, seed=10)
    write_records(tmp_path / "other.parquet", texts, key="body")
    with pytest.raises(DataError, match=r"other.parquet has no column 'text' \(its columns: 'body', 'id'\); "
                                        "set --data.text_key"):
        ready(make(tmp_path, tok_dir, files=str(tmp_path / "other.parquet")))
    with pytest.raises(DataError, match=r"other.parquet: column 'id' holds int64, not strings"):
        ready(make(tmp_path, tok_dir, files=str(tmp_path / "other.parquet"), text_key="id"))
    with_null = texts[:17] + [None] + texts[17:]
    pq.write_table(pa.table({"text": with_null}), tmp_path / "null.parquet", row_group_size=5)
    with pytest.raises(DataError, match=r"null.parquet row 17: 'text' is null, not a string.*rows count from 0"):
        ready(make(tmp_path, tok_dir, files=str(tmp_path / "null.parquet")))
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"fake.parquet is not a readable parquet file"):
        ready(make(tmp_path, tok_dir, files=str(tmp_path / "fake.parquet")))


def test_a_bad_record_through_the_command_line_is_one_line(tmp_path, tok_dir):
    import fitutil

    path = bad_jsonl(tmp_path, '{"text": 3.5}')
    args = fitutil.fit_args(tmp_path / "run", tmp_path, Path(tok_dir), 1) + ["--data.files", json.dumps([str(path)])]
    result = fitutil.run_fit(args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {path} line 5: field 'text' is a number, not a string; fix that record or set --data.text_key")


# -- Hugging Face datasets ------------------------------------------------------------------------


def test_a_saved_single_dataset_honours_or_refuses_the_split(tmp_path, tok_dir, tokenizer):
    import datasets

    texts = documents(30, seed=43)
    datasets.Dataset.from_dict({"text": texts}, split="test").save_to_disk(str(tmp_path / "test-split"))
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "no-split"))
    dm = ready(make(tmp_path, tok_dir, dataset=str(tmp_path / "test-split"), split="test", val_fraction=0.2))
    assert stream(dm) == expected(tokenizer, texts) and "(test)" in dm.describe()
    with pytest.raises(DataError, match=r"the saved dataset '.*test-split' is the split 'test', not 'train'; "
                                        "set --data.split test"):
        make(tmp_path, tok_dir, dataset=str(tmp_path / "test-split")).prepare_data()
    dm = ready(make(tmp_path, tok_dir, dataset=str(tmp_path / "no-split"), val_fraction=0.2))  # train: all of it
    assert stream(dm) == expected(tokenizer, texts)
    with pytest.raises(DataError, match=r"the saved dataset '.*no-split' is one dataset without splits, so it has "
                                        "no split 'valid'; leave --data.split at train"):
        make(tmp_path, tok_dir, dataset=str(tmp_path / "no-split"), split="valid").prepare_data()


def test_a_dataset_saved_with_datasets(tmp_path, tok_dir, tokenizer):
    import datasets

    train, test = documents(30, seed=11), documents(8, seed=12)
    datasets.Dataset.from_dict({"text": train, "n": list(range(30))}).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train}),
                          "test": datasets.Dataset.from_dict({"text": test})}).save_to_disk(str(tmp_path / "two"))
    dm = ready(make(tmp_path, tok_dir, dataset=str(tmp_path / "one")))
    assert dm.files == [] and stream(dm) == expected(tokenizer, train)
    dm = ready(make(tmp_path, tok_dir, dataset=str(tmp_path / "two"), split="test", val_fraction=0.2))
    assert stream(dm) == expected(tokenizer, test)
    with pytest.raises(DataError, match=r"has no split 'valid' \(its splits: train, test\); set --data.split"):
        make(tmp_path, tok_dir, dataset=str(tmp_path / "two"), split="valid").prepare_data()
    with pytest.raises(DataError, match=r"no column 'content'.*set --data.text_key"):
        make(tmp_path, tok_dir, dataset=str(tmp_path / "one"), text_key="content").prepare_data()
    with pytest.raises(DataError, match=r"is a folder but not one saved with datasets"):
        make(tmp_path, tok_dir, dataset=str(tmp_path)).prepare_data()
    with pytest.raises(DataError, match=r"no such folder"):
        make(tmp_path, tok_dir, dataset=str(tmp_path / "nope")).prepare_data()


def test_files_and_datasets_together_in_order(tmp_path, tok_dir, tokenizer):
    import datasets

    a, b = documents(10, seed=13), documents(12, seed=14)
    write_records(tmp_path / "a.jsonl", a)
    datasets.Dataset.from_dict({"text": b}).save_to_disk(str(tmp_path / "b"))
    dm = ready(make(tmp_path, tok_dir, files=str(tmp_path / "a.jsonl"), dataset=str(tmp_path / "b")))
    assert stream(dm) == expected(tokenizer, a + b)
    line = dm.describe()
    assert "1 files (1 jsonl)" in line and f"{tmp_path / 'b'} (train)" in line


def streamed(monkeypatch, texts: list, opened: list | None = None) -> None:
    """Make DatasetSource stream `texts` as an IterableDataset, as load_dataset(streaming=True)
    does for a hub name, without a hub; `opened` counts the streams opened."""
    import datasets

    def stream(self):
        if opened is not None:
            opened.append(self.name)
        return datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset(num_shards=3)
    monkeypatch.setattr(DatasetSource, "_ask_hub", lambda self: "c0ffee" * 6 + "c0ff")
    monkeypatch.setattr(DatasetSource, "_stream", stream)


def test_a_streamed_dataset_resumes_at_any_row(monkeypatch, tokenizer):
    texts = documents(25, seed=15)
    streamed(monkeypatch, texts)
    source = DatasetSource("someone/corpus", "sub", "train", None)
    units = list(source.units())
    assert [t for _, t, _ in units] == texts and all(eos for _, _, eos in units)
    for k in (1, 9, 24):
        again = list(DatasetSource("someone/corpus", "sub", "train", None).units(units[k][0]))
        assert again == units[k:]


def test_a_pinned_commit_finds_a_built_cache_without_the_hub(tmp_path, tok_dir, tokenizer, monkeypatch):
    texts, opened = documents(30, seed=19), []
    streamed(monkeypatch, texts, opened)

    def no_hub(self):
        raise AssertionError("asked the hub")
    sha = "0123456789abcdef" * 2 + "01234567"
    first = ready(make(tmp_path, tok_dir, dataset="someone/corpus", revision=sha, max_tokens=10_000))
    assert stream(first) == expected(tokenizer, texts) and opened == ["someone/corpus"]
    monkeypatch.setattr(DatasetSource, "_ask_hub", no_hub)
    again = ready(make(tmp_path, tok_dir, dataset="someone/corpus", revision=sha, max_tokens=10_000))
    assert again.store.corpus.folder == first.store.corpus.folder and opened == ["someone/corpus"]
    assert first.store.corpus.spec["sources"][0]["fingerprint"] == sha


def test_max_tokens_takes_the_first_n_tokens_of_each_source(tmp_path, tok_dir, tokenizer, monkeypatch):
    a, b = documents(40, seed=16), documents(40, seed=17)
    write_records(tmp_path / "a.parquet", a)
    streamed(monkeypatch, b)
    whole_a, whole_b = expected(tokenizer, a), expected(tokenizer, b)
    dm = ready(make(tmp_path, tok_dir, files=str(tmp_path / "a.parquet"), dataset="someone/corpus",
                    max_tokens=[301, 257]))
    eos = tokenizer.eos_token_id
    assert stream(dm) == whole_a[:300] + [eos] + whole_b[:256] + [eos]  # a cut document still ends with EOS
    index = dm.token_cache.index
    assert [s["tokens"] for s in index["sources"]] == [301, 257]
    assert dm.n_documents == stream(dm).count(eos)
    assert "(first 301 tokens)" in dm.describe()
    assert "someone/corpus (train @ " + "c0ffee" * 6 + "c0ff) (first 257 tokens)" in dm.describe()
    one = ready(make(tmp_path, tok_dir, files=str(tmp_path / "a.parquet"), dataset="someone/corpus",
                     max_tokens=200))
    assert stream(one) == whole_a[:199] + [eos] + whole_b[:199] + [eos]
    with pytest.raises(DataError, match="max_tokens has 3 values for 2 sources"):
        make(tmp_path, tok_dir, files="x.jsonl", dataset="someone/corpus", max_tokens=[1, 2, 3])


def test_a_streamed_dataset_without_max_tokens_warns(tmp_path, tok_dir, monkeypatch, capsys):
    streamed(monkeypatch, documents(40, seed=18))
    make(tmp_path, tok_dir, dataset="someone/corpus").prepare_data()
    assert re.search(r"^warning: .* is streamed without --data.max_tokens: all of it is tokenized", capsys.readouterr().err,
                     re.M)


def test_dataset_options_take_one_value_or_one_per_source():
    dm = TextDataModule(dataset="HuggingFaceTB/smollm-corpus", subset=["fineweb-edu-dedup", "cosmopedia-v2"],
                        max_tokens=[700, 300])
    assert dm.datasets == [("HuggingFaceTB/smollm-corpus", "fineweb-edu-dedup", "train", None),
                           ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2", "train", None)]
    assert dm.files == [] and dm.max_tokens == [700, 300]
    with pytest.raises(DataError, match="--data.split has 2 values but another option has 3"):
        TextDataModule(dataset=["a/b", "c/d", "e/f"], split=["train", "test"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `python -m smollm.fit ARGS`, timed from after its imports (half a minute on a loaded machine)
# to its exit: the time the refusal itself takes.
TIMED_FIT = ("import sys, time\nimport smollm.fit\nstarted = time.monotonic()\ncode = smollm.fit.main(sys.argv[1:])\n"
             "print(f'seconds {time.monotonic() - started:.2f}')\nsys.exit(code)")


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:{port}"}],
                         ids=["offline", "hub-unreachable"])
def test_a_hub_name_without_a_hub_fails_in_one_line_at_once(tmp_path, tok_dir, env):
    import subprocess
    import sys

    import fitutil

    env = {k: v.format(port=free_port()) for k, v in env.items()}
    args = fitutil.fit_args(tmp_path / "run", tmp_path, Path(tok_dir), 1) + [
        "--data.files", "null", "--data.dataset", "HuggingFaceTB/smollm-corpus", "--data.subset", "cosmopedia-v2",
        "--data.max_tokens", "1000"]
    result = subprocess.run([sys.executable, "-c", TIMED_FIT, *args], capture_output=True, text=True, timeout=240,
                            cwd=ROOT, env=fitutil.subprocess_env(env))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "Retrying" not in result.stderr  # no retry loop before the error
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot reach the Hugging Face hub for dataset 'HuggingFaceTB/smollm-corpus'")
    assert "save_to_disk" in last
    # About 3 s here (2 cores under a load of 5), a bad local option's time too; one retry loop
    # of the hub client (1 + 2 + 4 + 8 + 8 s) or a request left to time out (10 s) would not fit.
    assert float(result.stdout.split()[-1]) < 15
