"""Evaluation: bits per byte counts the text's bytes, scores equal transformers', the command
scores a run's own validation windows or all of given files, and the lm-eval bridge."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fitutil
from smollm import ModelConfig, SmolLM
from smollm.evaluate import main, score, to_transformers
from smollm.fit import main as fit
from smollm.hf import save_hf


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    """A 6-step tiny run that validates 8 windows at its last step."""
    root = tmp_path_factory.mktemp("run")
    corpus, tok = data
    args = fitutil.fit_args(root, corpus, tok, 6, extra=[
        "--trainer.val_check_interval", "6", "--trainer.limit_val_batches", "1.0",
        "--data.max_val_windows", "8"])
    assert fit(args) == 0
    return root


def logged(root: Path, tag: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next((root / "lightning_logs").rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events))
    acc.Reload()
    return acc.Scalars(tag)[-1].value


def test_a_byte_level_tokenizers_bytes_per_id_add_up_to_the_texts_utf8_bytes(data):
    from transformers import AutoTokenizer

    from smollm.data.cache import byte_table

    tok = AutoTokenizer.from_pretrained(data[1])
    table = torch.from_numpy(byte_table(tok))
    for text in ["the quick brown fox", "naïve café — 東京 🙂 ünïcödé\n\tdef f(x): return x",
                 (Path(data[0]) / "doc0.txt").read_text()]:
        ids = tok.encode(text)
        assert int(table[ids].sum()) == len(text.encode("utf-8"))
    assert table[tok.eos_token_id] == 0  # the separator we insert stands for no text


def test_score_equals_transformers_on_the_same_windows(tiny_model):
    torch.manual_seed(0)
    windows = torch.randint(0, 49152, (6, 33))
    table = torch.randint(1, 5, (49152,))
    ours = score(tiny_model, [{"input_ids": w, "n_bytes": table[w[:, 1:]].sum(1)} for w in windows.split(4)])
    theirs = to_transformers(tiny_model)
    with torch.no_grad():
        logits = theirs(input_ids=windows[:, :-1]).logits
    nats = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum").item()
    n_bytes = int(table[windows[:, 1:]].sum())
    assert ours.tokens == 6 * 32 and ours.bytes == n_bytes and ours.windows == 6
    # the same float32 sums in another order: 6e-8 apart here; bf16 anywhere would be ~1e-3
    assert ours.loss == pytest.approx(nats / ours.tokens, rel=1e-5)
    assert ours.perplexity == pytest.approx(math.exp(nats / ours.tokens), rel=1e-5)
    assert ours.bits_per_byte == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)


def test_a_training_checkpoint_is_scored_on_its_own_validation_windows(run, tmp_path, capsys):
    ckpt = run / "checkpoints" / "tiny" / "step=000006.ckpt"
    out = tmp_path / "scores.json"
    assert main(["--checkpoint", str(ckpt), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"} <= report.keys()
    assert report["split"] == "validation" and report["held_out"] and report["windows"] == 8
    assert report["loss"] == pytest.approx(logged(run, "val/loss"), rel=1e-4)  # what training logged
    assert report["bits_per_byte"] == pytest.approx(logged(run, "val/bpb"), rel=1e-4)
    printed = capsys.readouterr().out
    assert "bits per byte" in printed and "perplexity" in printed


def test_given_files_are_scored_whole(run, data, tmp_path):
    corpus, tok = data
    ckpt = run / "checkpoints" / "tiny" / "last.ckpt"
    out = tmp_path / "s.json"
    assert main(["--checkpoint", str(ckpt), "--data.files", str(corpus / "doc1.txt"), "--data.seq_len", "16",
                 "--data.cache_dir", str(tmp_path / "cache"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    from transformers import AutoTokenizer

    n_tokens = len(AutoTokenizer.from_pretrained(tok).encode((corpus / "doc1.txt").read_text())) + 1  # + EOS
    assert report["split"] == "all" and report["windows"] == -(-(n_tokens - 1) // 16)
    assert report["tokens"] == n_tokens - 1  # every token but the first is scored, once


@pytest.mark.parametrize("kind", ["llama2", "metaspace"])
def test_bits_per_byte_counts_the_texts_bytes_with_a_sentencepiece_tokenizer(tmp_path, kind):
    # "▁the" is 4 bytes of text but " " only after the first word; byte-fallback tokens are one
    # byte each: the bytes scored are the text's, whatever the tokenizer.
    from transformers import AutoTokenizer

    from helpers_tokenizers import sentencepiece_tokenizer

    tok = AutoTokenizer.from_pretrained(sentencepiece_tokenizer(tmp_path / "tok", kind))
    torch.manual_seed(0)
    folder = save_hf(SmolLM(ModelConfig.from_name("tiny", vocab_size=1024)), tmp_path / "hf", tokenizer=tok)
    text = "The model reads 中文字符 and emoji 😀 naïve café.\n\n  Then <|endoftext|> </s> more.\n" * 3
    (tmp_path / "t.txt").write_text(text)
    out = tmp_path / "s.json"
    assert main(["--checkpoint", str(folder), "--data.files", str(tmp_path / "t.txt"), "--data.seq_len", "16",
                 "--data.cache_dir", str(tmp_path / "c"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    first = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"][0])  # "▁The", not scored
    assert report["bytes"] == len(text.encode()) - (len(first.replace("\u2581", " ").encode()) - 1)


def test_a_hugging_face_folder_scores_like_its_checkpoint(run, data, tmp_path):
    from smollm.checkpoint import model_from_checkpoint
    from transformers import AutoTokenizer

    corpus, tok = data
    ckpt = run / "checkpoints" / "tiny" / "last.ckpt"
    model, _ = model_from_checkpoint(ckpt)
    folder = save_hf(model, tmp_path / "hf", tokenizer=AutoTokenizer.from_pretrained(tok))
    common = ["--data.files", str(corpus), "--data.seq_len", "16", "--data.cache_dir", str(tmp_path / "c")]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["--checkpoint", str(ckpt), *common, "--json", str(a)]) == 0
    assert main(["--checkpoint", str(folder), *common, "--json", str(b)]) == 0
    assert json.loads(a.read_text())["loss"] == pytest.approx(json.loads(b.read_text())["loss"], rel=1e-6)


def test_a_hugging_face_folder_is_never_scored_past_its_positions(run, data, tmp_path):
    from dataclasses import replace

    from smollm.checkpoint import model_from_checkpoint
    from smollm.model import SmolLM
    from transformers import AutoTokenizer

    corpus, tok = data
    trained, _ = model_from_checkpoint(run / "checkpoints" / "tiny" / "last.ckpt")
    model = SmolLM(replace(trained.config, max_position_embeddings=24))
    model.load_state_dict(trained.state_dict())
    folder = save_hf(model, tmp_path / "hf", tokenizer=AutoTokenizer.from_pretrained(tok))
    out = tmp_path / "s.json"
    assert main(["--checkpoint", str(folder), "--data.files", str(corpus), "--data.cache_dir",
                 str(tmp_path / "c"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["seq_len"] == 24  # not the 2048 default


def edited(run: Path, tmp_path: Path, edit) -> Path:
    """A copy of the run's last checkpoint, changed by `edit(checkpoint)` and saved with its digest."""
    from smollm.checkpoint import save_atomic

    checkpoint = torch.load(run / "checkpoints" / "tiny" / "last.ckpt", weights_only=True)
    edit(checkpoint)
    save_atomic(checkpoint, tmp_path / "edited.ckpt")
    return tmp_path / "edited.ckpt"


def scores(tmp_path: Path, argv: list[str]) -> dict:
    out = tmp_path / "scores.json"
    assert main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()  # a tokenizing progress bar may come first
    assert code == 2 and err[-1].startswith("error: ") and "Traceback" not in "".join(err), err
    return err[-1]


def test_a_multi_process_runs_checkpoint_is_scored_on_the_windows_its_validation_scored(run, tmp_path):
    # A run on 2 processes validating at most 7 windows validates 6 (each rank as many): evaluate
    # scores those 6, as the first 6 windows of a 1-process run's split, not 7.
    def ran_on(world: int):
        def edit(checkpoint):
            checkpoint["TextDataModule"]["world_size"] = world
            checkpoint["datamodule_hyper_parameters"]["max_val_windows"] = 7
        return edit

    two = scores(tmp_path, ["--checkpoint", str(edited(run, tmp_path, ran_on(2)))])
    one = scores(tmp_path, ["--checkpoint", str(edited(run, tmp_path, ran_on(1))), "--max_windows", "6"])
    assert two["windows"] == 6 and two["held_out"]
    assert two["loss"] == one["loss"] and two["bits_per_byte"] == one["bits_per_byte"]


def test_a_checkpoint_of_an_earlier_cache_format_is_scored_on_its_split_not_called_held_out(run, tmp_path, capsys):
    # A checkpoint of an earlier smollm recorded its cache key under the format of its day: the
    # same corpus, tokenized by other rules (special-token strings, for one). Its split is scored,
    # as this version tokenizes it, and not called held-out, nor refused as another corpus.
    from smollm.data.cache import FORMAT_VERSION, cache_key

    now = scores(tmp_path, ["--checkpoint", str(run / "checkpoints" / "tiny" / "last.ckpt")])
    spec = json.loads((next((run / "cache" / "tokens").glob("*/index.json"))).read_text())["spec"]

    def earlier(checkpoint):
        checkpoint["TextDataModule"]["cache_key"] = cache_key(spec, FORMAT_VERSION - 1)

    capsys.readouterr()
    old = scores(tmp_path, ["--checkpoint", str(edited(run, tmp_path, earlier))])
    assert now["held_out"] and not old["held_out"]
    assert (old["windows"], old["loss"]) == (now["windows"], now["loss"])
    assert f"token cache format {FORMAT_VERSION - 1}, now {FORMAT_VERSION}" in capsys.readouterr().err


def test_a_run_whose_validation_the_trainer_limited_is_scored_on_the_windows_it_validated(data, tmp_path):
    # --trainer.limit_val_batches (360m.yaml and 1.7b.yaml set it) validates fewer windows than
    # max_val_windows: 1 batch of 4 here, of 8. evaluate scores those 4, so it gives the logged loss.
    corpus, tok = data
    assert fit(fitutil.fit_args(tmp_path, corpus, tok, 2, extra=[
        "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--data.max_val_windows", "8"])) == 0
    report = scores(tmp_path, ["--checkpoint", str(tmp_path / "checkpoints" / "tiny" / "last.ckpt")])
    assert report["windows"] == 4 and report["held_out"]
    assert report["loss"] == pytest.approx(logged(tmp_path, "val/loss"), rel=1e-6)
    assert report["bits_per_byte"] == pytest.approx(logged(tmp_path, "val/bpb"), rel=1e-6)


def test_only_the_checkpoints_own_validation_split_is_called_held_out(run, data, tmp_path, capsys):
    corpus, tok = data
    grown = tmp_path / "corpus"
    shutil.copytree(corpus, grown)
    (grown / "more.jsonl").write_text(json.dumps({"text": "a document added after training"}) + "\n")

    def elsewhere(checkpoint):  # its corpus, grown by one file since training
        checkpoint["datamodule_hyper_parameters"]["files"] = [str(grown)]

    key = torch.load(run / "checkpoints" / "tiny" / "last.ckpt", weights_only=True)["TextDataModule"]["cache_key"]
    path = edited(run, tmp_path, elsewhere)
    capsys.readouterr()
    err = one_line_error(capsys, main(["--checkpoint", str(path), "--data.cache_dir", str(tmp_path / "c")]))
    assert "another corpus" in err and key[:24] in err and "not held out" in err
    # The checkpoint's corpus, with a split that reaches into the windows it trained on
    err = one_line_error(capsys, main(["--checkpoint", str(run / "checkpoints" / "tiny" / "last.ckpt"),
                                       "--data.val_fraction", "0.3"]))
    assert "inside the windows" in err and "trained on" in err
    # A Hugging Face folder's training is unknown: its validation split is not called held-out
    from transformers import AutoTokenizer

    from smollm.checkpoint import model_from_checkpoint

    folder = save_hf(model_from_checkpoint(path)[0], tmp_path / "hf", tokenizer=AutoTokenizer.from_pretrained(tok))
    report = scores(tmp_path, ["--checkpoint", str(folder), "--data.tokenizer", str(tok), "--data.seq_len", "16",
                               "--data.cache_dir", str(tmp_path / "c"), "--max_windows", "2"])
    assert report["split"] == "validation" and not report["held_out"]
    assert "held-out" not in capsys.readouterr().out.replace("not known to be held out", "")


def test_a_window_longer_than_the_models_positions_is_refused_as_generate_refuses_it(run, data, tmp_path, capsys):
    ckpt = run / "checkpoints" / "tiny" / "last.ckpt"  # the tiny preset: 1024 positions
    capsys.readouterr()
    err = one_line_error(capsys, main(["--checkpoint", str(ckpt), "--data.files", str(data[0]),
                                       "--data.seq_len", "1025", "--data.cache_dir", str(tmp_path / "c")]))
    assert "--data.seq_len 1025 exceeds the model's max_position_embeddings 1024" in err
    corpus, tok = data  # nor does training take windows longer than its positions
    err = one_line_error(capsys, fit(fitutil.fit_args(tmp_path / "fit", corpus, tok, 1,
                                                      extra=["--data.seq_len", "1025"])))
    assert "--data.seq_len 1025 exceeds the model's max_position_embeddings 1024" in err
    assert not list((tmp_path / "fit").rglob("*.ckpt"))


def test_a_tokenizer_of_other_ids_than_the_models_is_refused(run, data, tmp_path, capsys):
    corpus, tok = data
    other = fitutil.build_tokenizer(tmp_path / "other", fitutil.write_corpus(tmp_path / "c2", seed=7))
    capsys.readouterr()
    err = one_line_error(capsys, main(["--checkpoint", str(run / "checkpoints" / "tiny" / "last.ckpt"),
                                       "--data.files", str(corpus), "--data.tokenizer", str(other),
                                       "--data.cache_dir", str(tmp_path / "c")]))
    assert f"trained with tokenizer {str(tok)!r}" in err and f"--data.tokenizer {str(other)!r}" in err


def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    assert main(["--checkpoint", str(tmp_path / "nope.ckpt")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ")
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # the extra not installed
    model = SmolLM(ModelConfig.from_name("tiny"))
    folder = save_hf(model, tmp_path / "hf")
    code = main(["--checkpoint", str(folder), "--tasks", "hellaswag", "--max_windows", "1",
                 "--data.seq_len", "16", "--data.files", str(Path(__file__)), "--data.tokenizer",
                 str(fitutil.build_tokenizer(tmp_path / "tok", fitutil.write_corpus(tmp_path / "c")))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == 'error: --tasks needs lm-evaluation-harness: pip install -e ".[eval]"'


# ---- lm-evaluation-harness on a local multiple-choice task ----

TASK = """task: smollm_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def choice_loglikelihoods(samples: list[dict]) -> list[float]:
    """Every question's per-choice log-likelihoods, in document order, from lm-eval's samples."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    return [float(resp[0]) for s in ordered for resp in s["filtered_resps"]]


def smollm_loglikelihood(model: SmolLM, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from our own model, on the token split lm-eval makes:
    the context's trailing spaces go to the continuation, the whole text is encoded at once."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, n_context = tokenizer.encode(context + continuation), len(tokenizer.encode(context))
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole[:-1]])).double(), dim=-1)[0]
    return sum(logp[i - 1, whole[i]].item() for i in range(n_context, len(whole)))


@pytest.mark.slow
def test_lm_eval_scores_equal_lm_evals_own_hf_model(run, data, tmp_path, capsys, monkeypatch):
    """Every choice's log-likelihood through our bridge equals lm-eval's own `hf` model's on the
    saved folder, and our model's own, to float32 summation order (not only the accuracy)."""
    lm_eval = pytest.importorskip("lm_eval", reason="the [eval] extra is not installed")
    from transformers import AutoTokenizer

    import smollm.evaluate
    from smollm.checkpoint import model_from_checkpoint

    rows = [{"question": f"the quick brown fox number {i} jumps over the", "choices":
             ["lazy dog", "seven wizards", "bright mountains", "cold winter"], "answer": i % 4} for i in range(12)]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks" / "mc.yaml").write_text(TASK.format(path=tmp_path / "tasks" / "mc.jsonl"))
    ckpt = run / "checkpoints" / "tiny" / "last.ckpt"
    out = tmp_path / "ours.json"
    bridged = {}
    run_tasks = smollm.evaluate.run_tasks
    monkeypatch.setattr(smollm.evaluate, "run_tasks", lambda *a, **k: bridged.setdefault("r", run_tasks(*a, **k)))
    assert main(["--checkpoint", str(ckpt), "--tasks", "smollm_local_mc", "--include_path", str(tmp_path / "tasks"),
                 "--max_windows", "1", "--json", str(out)]) == 0
    ours = json.loads(out.read_text())["lm_eval"]["results"]["smollm_local_mc"]
    assert "smollm_local_mc" in capsys.readouterr().out  # lm-eval's table
    ours_ll = choice_loglikelihoods(bridged["r"]["samples"]["smollm_local_mc"])

    model, _ = model_from_checkpoint(ckpt)
    tokenizer = AutoTokenizer.from_pretrained(data[1])
    folder = save_hf(model, tmp_path / "hf", tokenizer=tokenizer)
    from lm_eval.tasks import TaskManager

    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder}", tasks=["smollm_local_mc"],
                                     task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
                                     batch_size=8, device="cpu")
    theirs_ll = choice_loglikelihoods(theirs["samples"]["smollm_local_mc"])
    assert len(ours_ll) == 4 * len(rows)
    assert ours_ll == theirs_ll  # the same transformers model on the same weights: the same floats
    model.eval()
    samples = sorted(bridged["r"]["samples"]["smollm_local_mc"], key=lambda s: s["doc_id"])
    own = [smollm_loglikelihood(model, tokenizer, *args) for s in samples for args in s["arguments"]]
    assert ours_ll == pytest.approx(own, rel=1e-5)  # another implementation: float32 summation order
    for metric in ("acc,none", "acc_norm,none"):
        assert ours[metric] == theirs["results"]["smollm_local_mc"][metric]


def test_options_that_do_nothing_here_get_one_line(run, data, tmp_path, capsys):
    ckpt = str(run / "checkpoints" / "tiny" / "last.ckpt")
    capsys.readouterr()
    assert main(["--checkpoint", ckpt, "--max_windows", "1", "--limit", "3", "--num_fewshot", "2"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert said == ["note: --limit, --num_fewshot do nothing without --tasks (they are lm-evaluation-harness's)"]
    assert main(["--checkpoint", ckpt, "--data.files", str(data[0]), "--data.max_val_windows", "4",
                 "--data.cache_dir", str(tmp_path / "c"), "--max_windows", "1"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert said == ["note: --data.max_val_windows does nothing when data is given (all of it is scored: there is no "
                    "split)"]


@pytest.mark.slow
def test_a_two_process_runs_validation_score_is_reproduced(tmp_path, data):
    # 2 processes validate 6 of at most 7 held-out windows: evaluate scores those 6, so it gives
    # what training logged (a float32 figure), not the 7 windows' score.
    corpus, tok = data
    result = fitutil.run_ranks(fitutil.fit_args(tmp_path, corpus, tok, 2, extra=[
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1.0", "--data.max_val_windows", "7"]))
    assert result.returncode == 0, result.stderr[-3000:]
    report = scores(tmp_path, ["--checkpoint", str(tmp_path / "checkpoints" / "tiny" / "last.ckpt")])
    assert report["windows"] == 6 and report["held_out"]
    assert report["loss"] == pytest.approx(logged(tmp_path, "val/loss"), rel=1e-6)
    assert report["bits_per_byte"] == pytest.approx(logged(tmp_path, "val/bpb"), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Conversations: the loss on the assistant replies


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A 4-step tiny run on 30 conversations (--data.format chat), its last 3 held out and all
    of them validated at its last step: (run folder, tokenizer folder, conversations)."""
    from test_data_chat import chat_tokenizer, conversations, write_jsonl

    root = tmp_path_factory.mktemp("chat-run")
    tok = chat_tokenizer(root / "tok")
    convs = conversations(30, seed=5)
    records = write_jsonl(root / "chats.jsonl", [{"messages": m} for m in convs])
    assert fit(fitutil.fit_args(root, records, tok, 4, extra=[
        "--data.format", "chat", "--data.seq_len", str(CHAT_SEQ), "--model.config_overrides", '{"vocab_size": 640}',
        "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1.0",
        "--data.max_val_windows", "null"])) == 0
    return root, tok, convs


CHAT_SEQ = 400  # every conversation fits a window: none is truncated


def one_at_a_time(model: SmolLM, tok_dir: str, convs: list) -> tuple[float, int]:
    """(the mean loss over the reply tokens, their count) of the conversations, each run alone
    through SmolLM.loss with its tokens and loss mask as the chat template gives them."""
    from transformers import AutoTokenizer

    from smollm.data.chat import ChatTemplate, as_unit, encode

    tok = AutoTokenizer.from_pretrained(tok_dir)
    template = ChatTemplate(tok, "test")
    nats, scored = 0.0, 0
    for messages in convs:
        ids, mask, _, _ = encode(template, tok.backend_tokenizer, as_unit({"messages": messages}, "r"), "assistant")
        assert len(ids) <= CHAT_SEQ + 1
        ids, mask = torch.tensor([ids]), torch.from_numpy(mask[None, 1:])  # the mask over the targets ids[1:]
        with torch.no_grad():
            loss = model.eval().loss(ids[:, :-1], ids[:, 1:], mask)
        nats += loss.item() * int(mask.sum())
        scored += int(mask.sum())
    return nats / scored, scored


def test_a_chat_checkpoint_is_scored_on_its_held_out_conversations_as_its_validation_reported(chat_run, tmp_path,
                                                                                            capsys):
    from smollm.checkpoint import model_from_checkpoint

    root, tok, convs = chat_run
    ckpt = root / "checkpoints" / "tiny" / "last.ckpt"
    report = scores(tmp_path, ["--checkpoint", str(ckpt)])
    assert report["split"] == "validation" and report["held_out"] and report["format"] == "chat"
    assert report["scored"] == "the assistant replies"
    # what validation during fit reported for this checkpoint (float32 sums there)
    assert report["loss"] == pytest.approx(logged(root, "val/loss"), rel=1e-6)
    assert report["bits_per_byte"] == pytest.approx(logged(root, "val/bpb"), rel=1e-6)
    # the held-out conversations (the last 3 of 30), one at a time: the packed windows score the same
    loss, scored = one_at_a_time(model_from_checkpoint(ckpt)[0], tok, convs[-3:])
    assert report["tokens"] == scored
    assert report["loss"] == pytest.approx(loss, abs=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    printed = capsys.readouterr().out
    assert f"{scored:,} tokens scored, the assistant replies" in printed and "packed windows" in printed


def test_given_conversations_are_scored_whole_on_the_assistant_tokens(chat_run, tmp_path):
    from test_data_chat import conversations, write_jsonl

    from smollm.checkpoint import model_from_checkpoint

    root, tok, _ = chat_run
    ckpt = root / "checkpoints" / "tiny" / "last.ckpt"
    other = conversations(7, seed=11)
    records = write_jsonl(tmp_path / "other.jsonl", [{"messages": m} for m in other])
    report = scores(tmp_path, ["--checkpoint", str(ckpt), "--data.format", "chat", "--data.files", str(records),
                               "--data.seq_len", str(CHAT_SEQ), "--data.cache_dir", str(tmp_path / "c")])
    loss, scored = one_at_a_time(model_from_checkpoint(ckpt)[0], tok, other)
    assert report["split"] == "all" and not report["held_out"] and report["tokens"] == scored
    assert report["loss"] == pytest.approx(loss, abs=1e-5)
    assert report["windows"] < len(other)  # packed: several conversations share a window


def test_a_chat_split_that_reaches_into_the_trained_conversations_is_refused(chat_run, tmp_path, capsys):
    root, _, _ = chat_run
    code = main(["--checkpoint", str(root / "checkpoints" / "tiny" / "last.ckpt"), "--data.val_fraction", "0.3"])
    assert "among the conversations" in one_line_error(capsys, code)
