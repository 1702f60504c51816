"""A small local tokenizer and corpus for tests: no hub, no network, built in about a second."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
from pathlib import Path

WORDS = ("the model reads tokens and predicts the next one while a cache keeps keys values "
         "attention heads share projections across layers def return class import self for in "
         "if else while print len range sum numpy torch lightning window batch seed step").split()


def sentences(n: int, seed: int = 0) -> str:
    """`n` lines of random words: deterministic text for a given seed."""
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + ".\n"
                   for _ in range(n))


def make_tokenizer(directory: str | Path, vocab_size: int = 600, seed: int = 0,
                   texts: list[str] | None = None) -> str:
    """Train a byte-level BPE on `texts` (default: `sentences`), save it as a Hugging Face
    tokenizer dir, return it.

    EOS (and BOS, UNK) is "<|endoftext|>", as in the SmolLM2 base tokenizer. Different `seed` or
    `vocab_size` give a different tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts or [sentences(400, seed)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.save_pretrained(str(directory))
    return str(directory)


def write_corpus(directory: str | Path, n_files: int = 4, lines: int = 60) -> list[Path]:
    """`n_files` text files of `lines` lines each under `directory`; returns their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_files):
        path = directory / f"doc{i}.txt"
        path.write_text(sentences(lines, seed=100 + i), encoding="utf-8")
        paths.append(path)
    return paths


def write_records(path: str | Path, texts: list, key: str = "text") -> Path:
    """`texts` as one record each, in the format that `path`'s suffix names: .jsonl/.json (also
    .gz/.zst) one JSON object per line, or .parquet. A record is {key: text, "id": i}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{key: text, "id": i} for i, text in enumerate(texts)]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=7)
        return path
    raw = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(compress(raw, path.suffix))
    return path


def compress(raw: bytes, suffix: str) -> bytes:
    """`raw` compressed as the suffix (.gz, .zst, .bz2, .xz) says; other suffixes: as it is."""
    if suffix == ".gz":
        return gzip.compress(raw)
    if suffix == ".zst":
        import zstandard

        return zstandard.ZstdCompressor().compress(raw)
    if suffix == ".bz2":
        return bz2.compress(raw)
    if suffix == ".xz":
        return lzma.compress(raw)
    return raw


def write_parquet_groups(path: str | Path, texts: list, sizes: list[int], key: str = "text") -> Path:
    """`texts` as a parquet file whose row groups hold `sizes` rows each, in order (the last
    groups of real files are often smaller)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert sum(sizes) == len(texts)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, pa.schema([(key, pa.string())])) as writer:
        start = 0
        for n in sizes:
            writer.write_table(pa.table({key: texts[start:start + n]}))
            start += n
    assert pq.ParquetFile(path).metadata.num_row_groups == len(sizes)
    return path


# Every kind of source, for the properties that must hold for each (see `make_source`).
SOURCE_KINDS = ["parquet-uneven", "txt", "jsonl", "ndjson", "jsonl.gz", "jsonl.zst", "jsonl.bz2", "jsonl.xz",
                "dataset", "datasetdict", "mixed-folder"]


def make_source(folder: Path, kind: str, texts: list[str]):
    """A source of kind `kind` (see SOURCE_KINDS) under `folder` holding `texts` (a text file holds
    several of them, so it is read in pieces), opened and ready for `units`."""
    from smollm.data import DatasetSource, FileSource

    folder.mkdir(parents=True, exist_ok=True)
    third = len(texts) // 3
    if kind == "parquet-uneven":
        sizes = [10, 10, 1, 7, 3, len(texts) - 32, 1]
        files = [write_parquet_groups(folder / "a.parquet", texts, sizes)]
    elif kind == "txt":
        (folder / "a.txt").write_text("".join(texts[:third]))
        (folder / "b.txt").write_text("".join(texts[third:]))
        files = [folder / "a.txt", folder / "b.txt"]
    elif kind.startswith(("jsonl", "ndjson")):
        files = [write_records(folder / f"a.{kind}", texts)]
    elif kind in ("dataset", "datasetdict"):
        import datasets

        one = datasets.Dataset.from_dict({"text": texts})
        saved = one if kind == "dataset" else datasets.DatasetDict({"other": one.select(range(3)), "train": one})
        saved.save_to_disk(str(folder / kind))
        source = DatasetSource(str(folder / kind), None, "train", None)
        source.open()
        return source
    else:  # a folder of several kinds, one file each
        write_parquet_groups(folder / "a.parquet", texts[:third], [5, 5, third - 11, 1])
        (folder / "b.txt").write_text("".join(texts[third:2 * third]))
        write_records(folder / "c.jsonl.zst", texts[2 * third:])
        files = [folder]
    source = FileSource([str(f) for f in files])
    source.scan()
    return source


def documents(n: int, seed: int = 0) -> list[str]:
    """`n` documents of a few lines of `sentences` each, different lengths."""
    rng = random.Random(seed)
    return [sentences(rng.randint(1, 6), seed=seed * 1000 + i) for i in range(n)]
