"""Chat data: records -> conversations, the chat template's tokens and loss mask, packing into
windows (best-fit decreasing), the chat token cache, and the one-line errors.

A tiny byte-level BPE with SmolLM2's ChatML template attached stands in for the real tokenizer;
one test uses the real SmolLM2 tokenizer when it is cached locally.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from smollm.data import ResumableSampler, TextDataModule
from smollm.data.cache import LOSS, START
from smollm.data.chat import ChatTemplate, as_unit, conversation, encode, token_mask
from smollm.data.packing import fit_lengths, pack_bfd, pack_row
from smollm.errors import DataError
from helpers_data import make_tokenizer, sentences

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
REAL = Path("~/.cache/smollm/smollm2-tokenizer").expanduser()


def chat_tokenizer(directory: Path, template: str | None = CHATML) -> str:
    """The test tokenizer with ChatML's special tokens and `template` (None: no template)."""
    from transformers import AutoTokenizer

    make_tokenizer(directory)
    tok = AutoTokenizer.from_pretrained(str(directory))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory) -> str:
    return chat_tokenizer(tmp_path_factory.mktemp("chat-tok"))


@pytest.fixture(scope="module")
def hf_tok(chat_tok):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chat_tok)


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """`n` conversations of 1-3 exchanges, some with a system message: deterministic."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        messages = [{"role": "system", "content": "be brief"}] if i % 3 == 0 else []
        for t in range(rng.randint(1, 3)):
            messages.append({"role": "user", "content": sentences(1, seed=seed * 997 + i * 10 + t).strip()})
            messages.append({"role": "assistant",
                             "content": sentences(rng.randint(1, 2), seed=seed * 991 + i * 10 + t + 5).strip()})
        out.append(messages)
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def replies_of(tok, messages, ids, mask) -> list[str]:
    """The loss-carrying tokens decoded, one string per run of consecutive ones."""
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


# ------------------------------------------------------------------------------------------------
# Records -> conversations


def test_records_become_conversations():
    m = [{"role": "user", "content": "hi", "name": "x"}, {"role": "assistant", "content": "yo"}]
    assert conversation({"messages": m}, "f line 1") == ([{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "yo"}], 0)
    assert conversation({"prompt": "hi", "completion": "yo"}, "f line 1") == (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], 1)
    few_shot = {"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                           {"role": "user", "content": "c"}], "completion": [{"role": "assistant", "content": "d"}]}
    assert conversation(few_shot, "f")[1] == 3  # only the completion trains


@pytest.mark.parametrize("record, says", [
    ({"text": "hello"}, "has no 'messages'"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "has role 'tool'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}, "not a string"),
    ({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}, "not a string"),
    ({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}, "no assistant turn"),
    ({"prompt": "x", "completion": [{"role": "user", "content": "y"}]}, "no assistant turn"),
    ({"messages": "hi"}, "not a list of messages"),
])
def test_bad_records_are_one_line_naming_the_record(record, says):
    with pytest.raises(DataError, match=says) as e:
        conversation(record, "chats.jsonl line 7")
    assert str(e.value).startswith("chats.jsonl line 7") and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# The chat template's tokens and mask


def test_tokens_are_apply_chat_template_and_loss_is_on_the_replies(hf_tok):
    template = ChatTemplate(hf_tok, "tiny")
    assert (template.end_of_turn, template.separator) == ("<|im_end|>", "\n")
    for messages in conversations(12) + [[{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]]:
        ids, mask, _, _ = encode(template, hf_tok.backend_tokenizer, as_unit({"messages": messages}, "r"), "assistant")
        assert ids == list(hf_tok.apply_chat_template(messages, tokenize=True)["input_ids"])
        want = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert replies_of(hf_tok, messages, ids, mask) == want
        # the newline after each <|im_end|> carries none: the model stops at <|im_end|>
        end = hf_tok.convert_tokens_to_ids("<|im_end|>")
        closing = [j for j in range(len(ids)) if ids[j] == end and mask[j]]
        assert len(closing) == len(want) and not any(mask[j + 1] for j in closing if j + 1 < len(ids))
        all_ids, all_mask, _, _ = encode(template, hf_tok.backend_tokenizer, as_unit({"messages": messages}, "r"), "all")
        assert all_ids == ids and not all_mask[0] and all_mask[1:].all()


def test_prompt_completion_trains_on_the_completion_only(hf_tok):
    template = ChatTemplate(hf_tok, "tiny")
    record = {"prompt": [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "the model"},
                         {"role": "user", "content": "c"}], "completion": "reads tokens"}
    messages = conversation(record, "r")[0]
    ids, mask, _, _ = encode(template, hf_tok.backend_tokenizer, as_unit(record, "r"), "assistant")
    assert replies_of(hf_tok, messages, ids, mask) == ["reads tokens<|im_end|>"]


def test_a_token_joining_prompt_and_reply_carries_loss():
    # tokens by character spans; the reply is characters [5, 9)
    offsets = [(0, 3), (3, 6), (6, 9), (9, 10), (10, 10)]
    assert token_mask(offsets, [(5, 9)]).tolist() == [False, True, True, False, False]
    assert token_mask(offsets, [(9, 11)]).tolist() == [False, False, False, True, True]
    assert not token_mask([(0, 4)], [(0, 4)])[0]  # a conversation's first token is never a target


def test_the_real_smollm2_template(tmp_path):
    if not (REAL / "tokenizer.json").is_file():
        pytest.skip(f"the SmolLM2 tokenizer is not cached at {REAL} (smollm.assets.load_tokenizer('smollm2') makes it)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(REAL))
    template = ChatTemplate(tok, "smollm2")
    assert (template.end_of_turn, template.separator) == ("<|im_end|>", "\n")
    tricky = [{"role": "user", "content": "Hi  there\n\nyo"}, {"role": "assistant", "content": "\n  Hello 😀 !"},
              {"role": "user", "content": "x"}, {"role": "assistant", "content": "ok\n"}]
    for messages in conversations(6) + [tricky]:
        ids, mask, _, _ = encode(template, tok.backend_tokenizer, as_unit({"messages": messages}, "r"), "assistant")
        assert ids == list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])
        # the loss tokens are each reply and its <|im_end|>; a token joining the prompt's "\n" to a
        # reply's leading newline carries loss, so the decoded run may start with that "\n"
        got = replies_of(tok, messages, ids, mask)
        want = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert [g.removeprefix("\n") if w.startswith("\n") else g for g, w in zip(got, want)] == want


def test_a_tokenizer_without_a_template_is_one_line(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_tokenizer(tmp_path / "t", template=None))
    with pytest.raises(DataError, match="has no chat template"):
        ChatTemplate(tok, "plain")


def test_a_template_without_the_prefix_property_is_refused(hf_tok):
    # renders the conversation's turns newest first: no prefix of it is its beginning
    backwards = ("{% for message in messages | reverse %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    import copy

    tok = copy.deepcopy(hf_tok)
    tok.chat_template = backwards
    with pytest.raises(DataError, match="beginning of the whole"):
        ChatTemplate(tok, "backwards")


# ------------------------------------------------------------------------------------------------
# Packing


def _bfd_reference(lengths, capacity):
    """Best-fit decreasing written the slow, obvious way."""
    windows, spaces = [], []
    for d in sorted(range(len(lengths)), key=lambda d: (-lengths[d], d)):
        n = lengths[d]
        if n == 0:
            continue
        fits = [w for w, s in enumerate(spaces) if s >= n]
        if fits:
            w = min(fits, key=lambda w: spaces[w])
        else:
            w = len(windows)
            windows.append([])
            spaces.append(capacity)
        windows[w].append(d)
        spaces[w] -= n
    return windows, spaces


@pytest.mark.parametrize("seed", range(5))
def test_pack_bfd_places_every_document_once_best_fit(seed):
    rng = np.random.default_rng(seed)
    capacity = 33
    lengths = np.minimum(rng.geometric(0.08, size=300), capacity)
    lengths[::17] = 0  # left out
    order, bounds = pack_bfd(lengths, capacity)
    assert sorted(order.tolist()) == [d for d in range(len(lengths)) if lengths[d] > 0]
    loads = [int(lengths[order[a:b]].sum()) for a, b in zip(bounds[:-1], bounds[1:])]
    assert max(loads) <= capacity
    windows, spaces = _bfd_reference(lengths.tolist(), capacity)
    # the same loads (which window of equal space is taken may differ)
    assert sorted(loads) == sorted(capacity - s for s in spaces)
    assert len(loads) == len(windows)
    again = pack_bfd(lengths, capacity)
    assert np.array_equal(again[0], order) and np.array_equal(again[1], bounds)


def test_fit_lengths_truncates_or_drops_the_overlong():
    lengths = np.array([5, 12, 10, 11])
    used, over = fit_lengths(lengths, 10, "truncate")
    assert used.tolist() == [5, 10, 10, 10] and over.tolist() == [1, 3]
    assert fit_lengths(lengths, 10, "drop")[0].tolist() == [5, 0, 10, 0]


def test_pack_row_keeps_the_batch_contract():
    a = (np.array([1, 2, 3, 4]), np.array([False, False, True, True]))
    b = (np.array([5, 6, 7]), np.array([True, True, True]))  # its first token must lose its loss
    ids, loss, doc = pack_row([a, b], 10, pad_id=0)
    assert ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 0, 0, 0]
    assert loss.tolist() == [False, True, True, False, True, True, False, False, False]  # targets ids[1:]
    assert doc.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]  # inputs ids[:-1]; padding an id of its own
    assert ids.dtype == doc.dtype == torch.int64 and loss.dtype == torch.bool


# ------------------------------------------------------------------------------------------------
# The data module: cache, packed windows, order, errors


SEQ = 191


def make_dm(tmp_path, tok, files, **kw) -> TextDataModule:
    args = dict(files=[str(f) for f in files], tokenizer=tok, seq_len=SEQ, batch_size=2, val_fraction=0.1,
                num_workers=0, cache_dir=str(tmp_path / "cache"), format="chat", overlong="drop")
    return TextDataModule(**{**args, **kw})


def ready(dm, trainer=None):
    dm.trainer = trainer
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chats")
    convs = conversations(60, seed=3)
    write_jsonl(folder / "a.jsonl", [{"messages": m} for m in convs[:30]])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"messages": m} for m in convs[30:]]), folder / "b.parquet", row_group_size=7)
    return folder, convs


def test_packed_windows_hold_whole_conversations_as_apply_chat_template_gives_them(tmp_path, chat_tok, hf_tok, chats):
    folder, convs = chats
    dm = ready(make_dm(tmp_path, chat_tok, [folder / "a.jsonl", folder / "b.parquet"]))
    assert dm.n_documents == 60
    template = ChatTemplate(hf_tok, "tiny")
    want = [encode(template, hf_tok.backend_tokenizer, as_unit({"messages": m}, "r"), "assistant")[:2] for m in convs]
    assert [list(hf_tok.apply_chat_template(m, tokenize=True)["input_ids"]) for m in convs] == [w[0] for w in want]
    seen, loss_tokens = [], 0
    for ds in (dm.train_dataset, dm.val_windows()):
        for k in range(len(ds)):
            row = ds[k]
            ids, loss, doc = row["input_ids"], row["loss_mask"], row["document_ids"]
            assert ids.shape == (SEQ + 1,) and loss.shape == doc.shape == (SEQ,)
            assert (doc.diff() >= 0).all()
            at = 0
            for j, d in enumerate(ds.documents(ds.ids[k]).tolist()):
                tokens, mask = want[d]
                n = len(tokens)
                assert ids[at:at + n].tolist() == tokens  # whole, as apply_chat_template gives it
                assert (doc[at:min(at + n, SEQ)] == j).all()
                # its loss: the targets it carries, its first token never
                assert loss[max(at - 1, 0):at + n - 1].tolist() == ([False] if at else []) + mask[1:].tolist()
                at += n
                seen.append(d)
            if at <= SEQ:  # padding: no loss (as a target from at - 1 on), an id of its own
                assert not loss[at - 1:].any() and (doc[at:] == int(doc[at - 1]) + 1).all()
            loss_tokens += int(loss.sum())
    fits = [d for d in range(60) if len(want[d][0]) <= SEQ + 1]
    assert sorted(seen) == fits and len(fits) >= 40  # every conversation that fits, once
    assert loss_tokens == sum(int(want[d][1].sum()) for d in fits)
    assert "conversations" in dm.describe() and "carry loss" in dm.describe()


def test_the_order_resumes_exactly_and_splits_over_processes(tmp_path, chat_tok, chats):
    folder, _ = chats
    dm = ready(make_dm(tmp_path, chat_tok, [folder / "a.jsonl", folder / "b.parquet"]))
    n = dm.n_train_windows
    whole = list(itertools.islice(iter(ResumableSampler(n, 2, dm.seed)), 12))
    resumed = list(itertools.islice(iter(ResumableSampler(n, 2, dm.seed, start=6)), 6))
    assert resumed == whole[6:]
    ranks = [list(itertools.islice(iter(ResumableSampler(n, 1, dm.seed, r, 2)), 3)) for r in range(2)]
    assert [w for pair in zip(*ranks) for w in pair] == whole[:6]
    # a window's content is a function of its id: the same rows after a restart
    again = ready(make_dm(tmp_path, chat_tok, [folder / "a.jsonl", folder / "b.parquet"]))
    for k in whole[:4]:
        a, b = dm.train_dataset[k], again.train_dataset[k]
        assert all(torch.equal(a[key], b[key]) for key in ("input_ids", "loss_mask", "document_ids"))


def test_the_cache_key_follows_format_loss_on_and_template(tmp_path, chat_tok, chats):
    folder, _ = chats
    files = [folder / "a.jsonl"]
    keys = {}
    for loss_on in ("assistant", "all"):
        dm = make_dm(tmp_path, chat_tok, files, loss_on=loss_on)
        keys[loss_on] = dm.store.find().key
    other = chat_tokenizer(tmp_path / "other", template=CHATML.replace("'\n'}}", "'\n\n'}}"))
    keys["template"] = make_dm(tmp_path, other, files).store.find().key
    assert len(set(keys.values())) == 3
    dm = ready(make_dm(tmp_path, chat_tok, files, loss_on="all"))
    cache = dm.token_cache
    flags = cache.read(0, cache.n_tokens, flags=True)
    assert int((flags & START).astype(bool).sum()) == 30
    assert int((flags & LOSS).astype(bool).sum()) == cache.n_tokens - 30  # all but each conversation's first


def test_a_chat_cache_key_names_the_cache_format(tmp_path, chat_tok, chats):
    # as a text cache's key does: evaluate tells a checkpoint of an earlier cache format by it
    from smollm.data.cache import FORMAT_VERSION, cache_key

    folder, _ = chats
    corpus = make_dm(tmp_path, chat_tok, [folder / "a.jsonl"]).store.find()
    assert corpus.key == cache_key(corpus.spec)
    assert all(cache_key(corpus.spec, v) != corpus.key for v in range(1, FORMAT_VERSION))


def test_a_damaged_flag_is_caught_by_the_shard_digest(tmp_path, chat_tok, chats):
    from smollm.data.verify import check_shards

    folder, _ = chats
    dm = ready(make_dm(tmp_path, chat_tok, [folder / "a.jsonl"]))
    cache = dm.token_cache
    assert check_shards(cache.folder, cache.index) == []
    shard = cache.folder / cache.shards[0][0]
    data = bytearray(shard.read_bytes())
    assert len(data) == cache.n_tokens * (cache.dtype.itemsize + 1)  # tokens, then one byte of flags each
    data[-1] ^= LOSS
    shard.write_bytes(bytes(data))
    assert check_shards(cache.folder, cache.index) == [0]


@pytest.mark.parametrize("line, record, says", [
    (3, {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "role 'robot'"),
    (2, {"conversation": []}, "no 'messages'"),
    (4, {"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    (1, {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}, "not a string"),
])
def test_bad_records_name_file_and_line(tmp_path, chat_tok, line, record, says):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    records = [good] * 5
    records[line - 1] = record
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(DataError, match=says) as e:
        ready(make_dm(tmp_path, chat_tok, [path]))
    assert f"bad.jsonl line {line}" in str(e.value) and "\n" not in str(e.value)


def test_a_record_the_template_refuses_is_named(tmp_path, hf_tok):
    import copy

    tok = copy.deepcopy(hf_tok)
    tok.chat_template = ("{% for m in messages %}{% if m['content'] == 'forbidden' %}"
                         "{{ raise_exception('no forbidden words') }}{% endif %}{% endfor %}" + CHATML)
    tok.save_pretrained(str(tmp_path / "strict"))
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "user", "content": "forbidden"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [good, good, bad, good])
    with pytest.raises(DataError, match="no forbidden words") as e:
        ready(make_dm(tmp_path, str(tmp_path / "strict"), [path]))
    assert "c.jsonl line 3" in str(e.value)


def test_overlong_conversations(tmp_path, chat_tok, hf_tok, capsys):
    short = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    long = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": sentences(40).strip()}]}
    path = write_jsonl(tmp_path / "c.jsonl", [short] * 6 + [long] + [short] * 3)
    with pytest.raises(DataError, match="c.jsonl line 7: the conversation has .* tokens, more than a window"):
        ready(make_dm(tmp_path, chat_tok, [path], overlong="error"))
    dropped = ready(make_dm(tmp_path, chat_tok, [path], overlong="drop"))
    assert "1 of 10 conversations are longer than a window" in capsys.readouterr().err
    truncated = ready(make_dm(tmp_path, chat_tok, [path], overlong="truncate"))
    assert "truncated to their first 192" in capsys.readouterr().err
    count = lambda dm: sum(len(dm.train_dataset.documents(w)) for w in range(dm.n_train_windows))
    assert count(truncated) == count(dropped) + 1


def test_chat_options_are_checked(tmp_path, chat_tok):
    with pytest.raises(DataError, match="needs conversations"):
        TextDataModule(tokenizer=chat_tok, format="chat")
    with pytest.raises(DataError, match="max_tokens"):
        TextDataModule(files=["x.jsonl"], tokenizer=chat_tok, format="chat", max_tokens=100)
    with pytest.raises(DataError, match="loss_on"):
        TextDataModule(files=["x.jsonl"], tokenizer=chat_tok, format="chat", loss_on="user")
    (tmp_path / "a.txt").write_text("hello there")
    with pytest.raises(DataError, match="a.txt is a text file"):
        ready(make_dm(tmp_path, chat_tok, [tmp_path / "a.txt"]))


def test_a_tokenizer_without_a_template_is_refused_by_the_module(tmp_path, chats):
    folder, _ = chats
    plain = make_tokenizer(tmp_path / "plain")
    with pytest.raises(DataError, match="has no chat template"):
        ready(make_dm(tmp_path, plain, [folder / "a.jsonl"]))


def test_a_saved_dataset_of_prompt_completion_pairs(tmp_path, chat_tok, hf_tok):
    import datasets

    pairs = [{"prompt": sentences(1, seed=i).strip(), "completion": sentences(1, seed=50 + i).strip()}
             for i in range(20)]
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp_path / "pairs"))
    dm = ready(make_dm(tmp_path, chat_tok, [], dataset=str(tmp_path / "pairs")))
    assert dm.n_documents == 20
    row = dm.train_dataset[0]
    targets = row["input_ids"][1:][row["loss_mask"]].tolist()
    assert hf_tok.decode(targets).count("<|im_end|>") == len(dm.train_dataset.documents(0))


@pytest.mark.parametrize("k", [1, -1])  # a shard that starts inside a conversation; the last, of the second source
def test_a_damaged_chat_shard_is_rebuilt_from_its_sources(tmp_path, chat_tok, chats, monkeypatch, capfd, k):
    from smollm.data import build

    folder, _ = chats
    monkeypatch.setattr(build, "SHARD_TOKENS", 700)
    files = [folder / "a.jsonl", folder / "b.parquet"]
    dm = ready(make_dm(tmp_path, chat_tok, files))
    cache = dm.token_cache
    assert len(cache.shards) >= 3
    tokens, flags = cache.read(0, cache.n_tokens), cache.read(0, cache.n_tokens, flags=True)
    path = cache.folder / cache.shards[k][0]
    before = path.read_bytes()
    path.write_bytes(before[:-1] + bytes([before[-1] ^ LOSS]))  # one loss flag flipped
    for stamp in cache.folder.parent.glob(f"{cache.folder.name}.verified-*"):  # a new launch
        stamp.unlink()
    capfd.readouterr()
    again = ready(make_dm(tmp_path, chat_tok, files))
    assert "rebuilding" in capfd.readouterr().err
    assert path.read_bytes() == before
    assert np.array_equal(again.token_cache.read(0, cache.n_tokens), tokens)
    assert np.array_equal(again.token_cache.read(0, cache.n_tokens, flags=True), flags)
    # built in one go with other shard sizes, the stream is the same: shards are cut anywhere
    monkeypatch.setattr(build, "SHARD_TOKENS", 1 << 20)
    whole = ready(make_dm(tmp_path / "whole", chat_tok, files)).token_cache
    assert np.array_equal(whole.read(0, whole.n_tokens, flags=True), flags)
