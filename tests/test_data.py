"""TextDataModule: token cache, windows, held-out validation, resumable order, clear errors.

A small byte-level BPE trained here stands in for the real tokenizer; no hub, no network.
"""

from __future__ import annotations

import itertools
import json
import re
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import smollm.data as data
from smollm.batch import BatchPlan
from smollm.data import ResumableSampler, TextDataModule, TokenWindows, read_pieces, split_windows
from smollm.errors import DataError
from helpers_data import make_tokenizer, sentences, write_corpus

SEQ = 16
BATCH = 4


@pytest.fixture
def corpus(tmp_path) -> Path:
    write_corpus(tmp_path / "corpus")
    return tmp_path / "corpus"


@pytest.fixture
def make_dm(tmp_path, tok_dir, corpus):
    def make(**kw) -> TextDataModule:
        args = dict(files=[str(corpus)], tokenizer=tok_dir, seq_len=SEQ, batch_size=BATCH,
                    val_fraction=0.05, num_workers=0, cache_dir=str(tmp_path / "cache"))
        return TextDataModule(**{**args, **kw})
    return make


def ready(dm: TextDataModule, trainer=None) -> TextDataModule:
    dm.trainer = trainer
    dm.prepare_data()
    dm.setup("fit")
    return dm


def tokens_of(dm: TextDataModule) -> np.ndarray:
    return dm.token_cache.read(0, dm.n_tokens)


def fake_trainer(rank=0, world=1, step=0, accumulate=1):
    return SimpleNamespace(global_rank=rank, world_size=world, global_step=step,
                           accumulate_grad_batches=accumulate)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


# -- 1. no data work in __init__, simple values checked there --------------------------------------


def test_init_does_no_data_work(tmp_path):
    dm = TextDataModule(files=["/no/such/dir/*.txt"], tokenizer="/no/such/tokenizer",
                        cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()
    with pytest.raises(DataError, match="no file matches '/no/such/dir/\\*.txt'"):
        dm.prepare_data()


@pytest.mark.parametrize("kw, match", [
    (dict(seq_len=0), "seq_len"), (dict(batch_size=0), "batch_size"),
    (dict(val_fraction=0.0), "val_fraction"), (dict(val_fraction=1.0), "val_fraction"),
    (dict(max_val_windows=0), "max_val_windows"), (dict(num_workers=-1), "num_workers"),
    (dict(encoding_errors="ignore"), "encoding_errors"), (dict(files=[]), "files"),
])
def test_init_rejects_bad_values(kw, match):
    with pytest.raises(DataError, match=match):
        TextDataModule(**kw)


def test_cli_takes_one_entry_or_a_list_and_documents_every_argument():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TextDataModule, "data")
    for arg, files in (("a.txt", ["a.txt"]), ("corpus/**/*.md", ["corpus/**/*.md"]),
                       ("[a.txt, b/*.md]", ["a.txt", "b/*.md"])):
        dm = parser.instantiate_classes(parser.parse_args(["--data.files", arg])).data
        assert dm.files == files
    assert parser.instantiate_classes(parser.parse_args([])).data.files == ["@stdlib"]
    assert "Seed of the training order" in parser.format_help()


# -- 2. the token cache ---------------------------------------------------------------------------


def test_cache_holds_every_document_then_eos(make_dm, corpus, tokenizer):
    dm = ready(make_dm())
    eos = tokenizer.eos_token_id
    expected = []
    for path in sorted(corpus.glob("*.txt")):
        text = path.read_text()
        expected += tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [eos]
    tokens = tokens_of(dm)
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == expected
    meta = json.loads((dm.store.corpus.folder / "index.json").read_text())
    assert meta["n_tokens"] == dm.n_tokens == len(expected)
    assert meta["n_docs"] == 4 and len(meta["files"]) == 4 and meta["tokenizer"] == dm.tokenizer_name


def test_special_token_strings_in_a_document_are_text_not_boundaries(make_dm, tmp_path, tokenizer):
    # ML code and chat logs quote special tokens; only the EOS that we insert ends a document.
    text = 'print("<|endoftext|>")\nEOS = "<|endoftext|>" then more text\n'
    folder = tmp_path / "quoted"
    folder.mkdir()
    (folder / "a.txt").write_text(text)
    (folder / "b.txt").write_text(sentences(30))
    dm = ready(make_dm(files=[str(folder)], seq_len=8))
    eos = tokenizer.eos_token_id
    first = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    tokens = tokens_of(dm).tolist()
    assert eos not in first and tokens[:len(first) + 1] == first + [eos]
    assert tokenizer.decode(first) == text
    assert dm.n_documents == 2 and tokens.count(eos) == 2


def test_streaming_in_small_batches_gives_the_same_tokens(make_dm, monkeypatch):
    whole = tokens_of(ready(make_dm()))
    monkeypatch.setattr(data.build, "BATCH_BYTES", 300)  # many flushes, EOS placement across batches
    dm = ready(make_dm(cache_dir=str(Path(make_dm().store.cache_dir).parent / "cache2")))
    assert np.array_equal(tokens_of(dm), whole)


def test_unchanged_corpus_is_not_tokenized_again(make_dm, monkeypatch):
    first = ready(make_dm())
    before = (first.store.corpus.folder / "shard-000000.bin").stat()

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(data.store, "build_cache", fail)
    second = ready(make_dm())
    after = (second.store.corpus.folder / "shard-000000.bin").stat()
    assert second.store.corpus.folder / "shard-000000.bin" == first.store.corpus.folder / "shard-000000.bin"
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_changed_file_or_tokenizer_rebuilds(make_dm, corpus, tmp_path):
    base = ready(make_dm()).store.corpus.folder / "shard-000000.bin"
    (corpus / "doc1.txt").write_text(sentences(60, seed=7))
    changed = ready(make_dm()).store.corpus.folder / "shard-000000.bin"
    other_tok = make_tokenizer(tmp_path / "tok2", vocab_size=300, seed=1)
    retok = ready(make_dm(tokenizer=other_tok)).store.corpus.folder / "shard-000000.bin"
    assert len({base, changed, retok}) == 3
    assert all(p.exists() for p in (base, changed, retok))
    assert not list(base.parent.glob("*.tmp"))  # no temporary file left behind


def test_read_pieces_cut_at_line_ends_and_never_split_a_character(tmp_path):
    path = tmp_path / "big.txt"
    text = "short line\n" * 5 + "é€😀" * 40 + "\n" + "tail without newline é"
    raw = text.encode()
    path.write_bytes(raw)
    pieces = list(read_pieces(path, size=32))
    assert b"".join(p for _, p, _ in pieces) == raw
    assert [last for _, _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    for offset, piece, _ in pieces:
        assert raw[offset:offset + len(piece)] == piece
        piece.decode("utf-8")  # no character cut in two
        assert len(piece) <= 2 * 32 or piece.startswith("é€😀".encode())  # longer only where no cut is safe
    assert sum(p.endswith(b"\n") for _, p, _ in pieces) >= 3


def byte_level_tokenizers(tmp_path):
    """Byte-level BPEs with the pre-tokenizers in use: GPT-2's, SmolLM2's (digits apart first),
    Llama 3's split pattern."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
    kinds = [pre_tokenizers.ByteLevel(add_prefix_space=False),
             pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False)]),
             pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3), "isolated"),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])]
    for pre in kinds:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = pre, decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator([sentences(50)] + ["中文字符\n\n\n中文。  \t 中文\n\n  \n\n\t\t中"] * 20,
                                trainer=trainer)  # merges of CJK and of whitespace runs
        yield tok


def test_a_text_read_in_pieces_tokenizes_exactly_as_the_whole_text(tmp_path):
    # Every place a piece can end, at every size: CJK after runs of spaces, tabs and line breaks,
    # emoji, digits, CRLF, ideographic spaces, words.
    text = ("the model reads.\n\n\n中文字符在这里。  \t 中文\n\u3000中文 😀 emoji\r\n\r\n12345 numbers \n"
            "\n\n  中文。\n中 文\u3000\u3000字 x\n y  \n\n\t\t中文 done.\n ,.; \n\n'tis it's")
    path = tmp_path / "t.txt"
    path.write_text(text)
    for tok in byte_level_tokenizers(tmp_path):
        whole = tok.encode(text).ids
        for size in range(4, len(text.encode()) + 1):
            pieces = [p.decode() for _, p, _ in read_pieces(path, size=size)]
            assert "".join(pieces) == text
            assert [i for piece in pieces for i in tok.encode(piece).ids] == whole, (size, pieces)


# -- 3, 4. windows and the held-out split ---------------------------------------------------------


def test_windows_are_slices_of_the_token_stream(make_dm):
    dm = ready(make_dm())
    tokens = tokens_of(dm)
    for i in (0, 1, dm.n_train_windows - 1):
        item = dm.train_dataset[i]
        assert item["index"] == i
        assert item["input_ids"].dtype == torch.int64 and item["input_ids"].shape == (SEQ + 1,)
        assert item["input_ids"].tolist() == tokens[i * SEQ:i * SEQ + SEQ + 1].tolist()


def test_validation_windows_never_overlap_training_windows(make_dm):
    dm = ready(make_dm(max_val_windows=None))
    train = dm.train_dataset
    val = dm.val_dataset
    train_spans = [(i * SEQ, i * SEQ + SEQ) for i in train.ids]  # inclusive token positions
    val_spans = [(val.start + j * SEQ, val.start + j * SEQ + SEQ) for j in val.ids]
    assert len(val_spans) == dm.n_val_windows == dm.n_heldout_windows
    assert max(end for _, end in train_spans) < min(start for start, _ in val_spans)
    assert max(end for _, end in val_spans) == dm.n_tokens - 1  # validation is the tail
    assert dm.n_val_windows == round(0.05 * dm.n_tokens / SEQ)


def test_split_rules():
    assert split_windows(100, 10, 0.1) == (8, 1, 89)
    assert split_windows(22, 10, 0.01) == (1, 1, 11)  # the smallest corpus that fits
    with pytest.raises(DataError, match="the corpus has 21 tokens but 22 are needed"):
        split_windows(21, 10, 0.01)


def test_validation_is_capped_sequential_and_split_across_ranks(make_dm):
    full = ready(make_dm(max_val_windows=None))
    assert full.n_heldout_windows >= 6
    capped = ready(make_dm(max_val_windows=5))
    assert capped.n_val_windows == 5 and list(capped.val_dataset.ids) == [0, 1, 2, 3, 4]
    ranks = [ready(make_dm(max_val_windows=5), fake_trainer(rank=r, world=2)) for r in (0, 1)]
    assert [list(dm.val_dataset.ids) for dm in ranks] == [[0, 2], [1, 3]]  # 5 -> 4: equal shares
    batch = next(iter(ranks[1].val_dataloader()))
    assert batch["index"].tolist() == [1, 3]
    assert torch.equal(batch["input_ids"][0], full.val_dataset[1]["input_ids"])


# -- 5, 9. the order: a pure function of (seed, step) ---------------------------------------------


def ids(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_started_at_step_k_is_the_tail_of_the_one_started_at_zero():
    whole = ids(ResumableSampler(37, 4, seed=1), 4 * 50)
    for k in (1, 9, 10, 23):
        assert ids(ResumableSampler(37, 4, seed=1, start=4 * k), 4 * 10) == whole[4 * k:4 * k + 40]


def test_sampler_is_endless_without_len_and_each_epoch_is_a_permutation():
    sampler = ResumableSampler(37, 5, seed=3)
    assert not hasattr(sampler, "__len__")
    stream = ids(sampler, 37 * 3)
    epochs = [stream[i * 37:(i + 1) * 37] for i in range(3)]
    assert all(sorted(e) == list(range(37)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert ids(ResumableSampler(37, 5, seed=4), 37) != epochs[0]  # another seed, another order
    assert ids(ResumableSampler(37, 5, seed=3), 37 * 3) == stream  # and the same seed, the same


def test_ranks_are_disjoint_and_cover_what_one_rank_with_a_bigger_batch_sees():
    one = ids(ResumableSampler(50, 2 * 3, seed=5), 6 * 20)
    r0 = ids(ResumableSampler(50, 3, seed=5, rank=0, world_size=2), 3 * 20)
    r1 = ids(ResumableSampler(50, 3, seed=5, rank=1, world_size=2), 3 * 20)
    for s in range(20):
        a, b, both = r0[3 * s:3 * s + 3], r1[3 * s:3 * s + 3], one[6 * s:6 * s + 6]
        assert a + b == both
        if s * 6 % 50 <= 44:  # a step inside one epoch: no window twice
            assert not set(a) & set(b)


def test_any_split_of_the_global_batch_trains_the_same_samples_at_each_step():
    """12 windows per step as 1 x 12, 2 micro-batches of 6, 2 processes x 2 of 3, 3 x 2 of 2 and
    4 x 3 of 1: the same windows at every step, from the start and from sample 36 (a resume)."""
    def steps(batch, world, accumulate, start, n_steps):
        samplers = [iter(ResumableSampler(50, batch, seed=5, rank=r, world_size=world, start=start))
                    for r in range(world)]
        out = []
        for _ in range(n_steps):
            step = []
            for _ in range(accumulate):
                for sampler in samplers:
                    step += [next(sampler) for _ in range(batch)]
            out.append(sorted(step))
        return out

    for start in (0, 36):
        reference = steps(12, 1, 1, start, 8)
        for batch, world in ((6, 1), (3, 2), (2, 3), (1, 4)):
            accumulate = BatchPlan(12, batch, world).accumulation
            assert batch * world * accumulate == 12
            assert steps(batch, world, accumulate, start, 8) == reference, (batch, world)
    assert steps(12, 1, 1, 36, 5) == steps(12, 1, 1, 0, 8)[3:]  # a resume at step 3 continues the order


def test_loader_batches_do_not_depend_on_num_workers(make_dm):
    zero = take(ready(make_dm(num_workers=0)).train_dataloader(), 12)
    two = take(ready(make_dm(num_workers=2)).train_dataloader(), 12)
    for a, b in zip(zero, two, strict=True):
        assert set(a) == {"input_ids", "index", "n_bytes"}
        assert a["input_ids"].shape == (BATCH, SEQ + 1) and a["input_ids"].dtype == torch.int64
        assert a["index"].shape == (BATCH,) and a["index"].dtype == torch.int64
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["index"], b["index"])
        assert torch.equal(a["n_bytes"], b["n_bytes"])


def test_loader_starts_at_the_trainers_micro_batch(make_dm):
    fresh = take(ready(make_dm()).train_dataloader(), 8)
    resumed = ready(make_dm(), fake_trainer(step=3, accumulate=2)).train_dataloader()
    with pytest.raises(TypeError):
        len(resumed)  # endless: Lightning stops at max_steps
    assert [b["index"].tolist() for b in take(resumed, 2)] == [b["index"].tolist() for b in fresh[6:]]


def test_a_resume_continues_from_the_checkpoints_sample_whatever_the_split(make_dm):
    """The checkpoint records the global samples trained on; a resume starts there, on any
    number of processes and with any global batch."""
    fresh = [b["index"].tolist() for b in take(ready(make_dm()).train_dataloader(), 12)]  # 4 a step
    saved = ready(make_dm(global_batch_size=4), fake_trainer(step=3)).state_dict()
    assert (saved["global_batch_size"], saved["tokens_per_step"], saved["samples_seen"]) == (4, 4 * SEQ, 12)
    # the same 4 windows a step on 2 processes of 2 windows each: rank 1 takes the second half
    resumed = make_dm(global_batch_size=4, batch_size=2)
    resumed.resumed = saved
    rank1 = ready(resumed, fake_trainer(rank=1, world=2, step=3)).train_dataloader()
    assert [b["index"].tolist() for b in take(rank1, 2)] == [fresh[3][2:], fresh[4][2:]]
    # a larger global batch from step 3 on: 8 windows a step, from sample 12
    larger = make_dm(global_batch_size=8)
    larger.resumed = saved
    loader = ready(larger, fake_trainer(step=3, accumulate=2)).train_dataloader()
    assert [b["index"].tolist() for b in take(loader, 4)] == fresh[3:7]
    larger.trainer.global_step = 5
    assert larger.state_dict()["samples_seen"] == 12 + 2 * 8


def test_resume_with_other_order_settings_warns(make_dm, capsys):
    saved = ready(make_dm()).state_dict()
    capsys.readouterr()
    ready(make_dm()).load_state_dict(saved)  # same settings: silent
    assert "warning" not in capsys.readouterr().err
    ready(make_dm(seed=7)).load_state_dict(saved)
    assert re.search(r"^warning: data changed since the checkpoint \(seed: 1234 -> 7.*not continue the same sample "
                     r"order$", capsys.readouterr().err, re.M)


def test_distributed_sampler_replacement_is_refused(make_dm):
    trainer = fake_trainer(world=2)
    trainer._accelerator_connector = SimpleNamespace(use_distributed_sampler=True)
    with pytest.raises(DataError, match="use_distributed_sampler=False"):
        ready(make_dm(), trainer).train_dataloader()


def test_resume_with_lightning_neither_repeats_nor_skips_a_window(make_dm, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["index"].tolist())
            return (self.w * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps, ckpt_dir, ckpt_path=None):
        model = Recorder()
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=2,
            limit_val_batches=0, use_distributed_sampler=False, logger=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
            callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1,
                                       save_top_k=-1, filename="{step}")])
        trainer.fit(model, datamodule=make_dm(), ckpt_path=ckpt_path)
        return model.seen

    straight = fit(5, tmp_path / "a")
    assert len(straight) == 10  # 5 optimizer steps of 2 micro-batches
    resumed = fit(5, tmp_path / "b", ckpt_path=str(tmp_path / "a" / "step=2.ckpt"))
    assert resumed == straight[4:]


# -- 7. what the module and fit read --------------------------------------------------------------


def test_attributes_and_describe(make_dm, tokenizer):
    dm = ready(make_dm())
    assert dm.vocab_size == len(tokenizer) and dm.tokenizer.eos_token_id == tokenizer.eos_token_id
    assert dm.n_tokens > 2000 and dm.n_train_windows == (dm.n_tokens - dm.n_val_windows * SEQ - 2) // SEQ
    assert dm.tokenizer.decode(dm.train_dataset[0]["input_ids"][:3].tolist())
    line = dm.describe()
    assert "\n" not in line and "4 files" in line and f"{dm.n_tokens:,} tokens" in line
    assert f"{dm.n_train_windows:,} train windows" in line


# -- 8. bad input: one clear DataError each -------------------------------------------------------


def test_folder_rule_and_stdlib(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".hidden").mkdir()
    for name in ("a.txt", "sub/b.md", "sub/c.py", "e.bin", ".hidden/f.txt", "g.PNG"):
        (tmp_path / "d" / name).write_text("x\n")
    found = [p.relative_to((tmp_path / "d").resolve()).as_posix()
             for p in data.resolve_files([str(tmp_path / "d")])]
    assert found == ["a.txt", "sub/b.md", "sub/c.py"]
    assert len(data.resolve_files([str(tmp_path / "d" / "**" / "*.md"), str(tmp_path / "d")])) == 3
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.bin").write_bytes(b"\0")
    with pytest.raises(DataError, match="folder '.*bin' holds no text file"):
        data.resolve_files([str(tmp_path / "bin")])
    stdlib = data.stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(stdlib) > 300 and all(p.suffix == ".py" for p in stdlib)
    assert root / "os.py" in stdlib
    assert not any({"site-packages", "test", "tests"} & set(p.relative_to(root).parts[:-1])
                   for p in stdlib)


def test_empty_files_are_skipped_with_a_warning(make_dm, corpus, capsys):
    (corpus / "blank.txt").write_text("  \n\t\n")
    (corpus / "empty.md").write_text("")
    dm = ready(make_dm())
    assert re.search(r"^warning: skipping 2 empty file.*blank.txt.*empty.md", capsys.readouterr().err, re.M)
    assert len(dm.store.corpus.docs) == 4 and len(dm.store.corpus.empty) == 2


def test_all_empty_is_an_error(make_dm, tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "a.txt").write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        make_dm(files=[str(tmp_path / "e")]).prepare_data()


def test_bytes_that_are_not_utf8(make_dm, corpus):
    bad = corpus / "latin1.txt"
    bad.write_bytes("caf".encode() + b"\xe9 au lait\n")
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 at byte 3 .*encoding_errors replace"):
        make_dm().prepare_data()
    assert not list(Path(make_dm().store.token_dir).glob("*.tmp"))
    dm = ready(make_dm(encoding_errors="replace"))
    assert dm.n_tokens > 0 and len(dm.store.corpus.docs) == 5


def test_corpus_too_small(make_dm, tmp_path):
    (tmp_path / "small.txt").write_text("the model reads tokens.\n")
    with pytest.raises(DataError, match=r"the corpus has \d+ tokens but \d+ are needed .*seq_len 16"):
        ready(make_dm(files=[str(tmp_path / "small.txt")]))


def test_tokenizer_that_cannot_be_loaded(make_dm, tmp_path):
    with pytest.raises(DataError, match="cannot load tokenizer '.*nope'") as e:
        make_dm(tokenizer=str(tmp_path / "nope")).prepare_data()
    assert "\n" not in str(e.value)


def test_every_error_message_is_one_line(make_dm, tmp_path):
    (tmp_path / "nothing").mkdir()
    for files in (["/nope/*.txt"], [str(tmp_path / "nothing")]):
        with pytest.raises(DataError) as e:
            make_dm(files=files).prepare_data()
        assert "\n" not in str(e.value)


# -- 10. what evaluation reads, and the data line --------------------------------------------------


def test_evaluation_gets_the_validation_windows_and_windows_over_every_token(make_dm):
    dm = ready(make_dm(max_val_windows=3))
    val = dm.val_windows()
    assert len(val) == 3 == dm.n_val_windows
    batch = next(iter(dm.val_dataloader()))
    assert torch.equal(torch.stack([val[k]["input_ids"] for k in range(len(val))])[:BATCH], batch["input_ids"][:3])
    heldout = TokenWindows(dm.token_cache, dm.seq_len, dm.val_start, range(dm.n_heldout_windows))  # the whole tail
    assert len(heldout) == dm.n_heldout_windows > 3
    assert heldout[0]["input_ids"].tolist() == val[0]["input_ids"].tolist()

    tokens = tokens_of(dm)
    for L in (SEQ, 7):
        windows = dm.corpus_windows(L)
        rows = [windows[k]["input_ids"] for k in range(len(windows))]
        assert all(len(r) == L + 1 for r in rows[:-1]) and 2 <= len(rows[-1]) <= L + 1
        targets = torch.cat([r[1:] for r in rows])
        assert targets.tolist() == tokens[1:].tolist()  # every token but the first, once
        assert all(rows[k][0] == rows[k - 1][-1] for k in range(1, len(rows)))  # each starts where the last ended


def test_the_data_line_counts_the_passes_that_max_steps_makes(make_dm):
    trainer = fake_trainer(world=2, accumulate=3)
    trainer.max_steps = 50
    dm = ready(make_dm(), trainer)
    passes = 50 * 3 * BATCH * 2 / dm.n_train_windows
    line = dm.describe()
    assert f"max_steps 50 x 24 windows = {passes:.3g} passes over the training windows" in line
    assert f"{dm.n_documents:,} documents, {dm.n_tokens:,} tokens" in line and "in 1 shard;" in line
    assert line.startswith("data: 4 files (4 text) from ")
