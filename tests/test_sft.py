"""Fine-tuning runs of `python -m smollm.fit --data.format chat`: epochs as passes over the packed
windows, the warmup as a fraction of the run, an exact resume, two processes as one, and
`--model.init_from` with every kind of weights (and a one-line error for anything else).

A tiny byte-level BPE with ChatML's template (tests/test_data_chat.py) and a few dozen made-up
conversations stand in for SmolLM2's tokenizer and smol-smoltalk; one slow test starts
configs/sft-135m.yaml from the real SmolLM2 weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import fitutil
from smollm.fit import main
from smollm.optim import lr_lambda
from test_data_chat import chat_tokenizer, conversations, write_jsonl

VOCAB = '{"vocab_size": 640}'  # the chat tokenizer's tokens, rounded up


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> tuple[Path, str]:
    """(a jsonl of 40 conversations, a ChatML tokenizer folder)."""
    folder = tmp_path_factory.mktemp("sft")
    corpus = write_jsonl(folder / "chats.jsonl", [{"messages": m} for m in conversations(40, seed=5)])
    return corpus, chat_tokenizer(folder / "tok")


def sft_args(root: Path, data, extra: list[str] = ()) -> list[str]:
    """A tiny chat run: conversations packed into windows of 128 tokens, 4 windows a step in micro-batches
    of 2, the warmup a fraction of the run, a cosine decay that ends with it; its length is `extra`'s."""
    corpus, tok = data
    return [
        "--config", str(fitutil.ROOT / "configs" / "tiny.yaml"),
        "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", "-1",
        "--trainer.val_check_interval", "1000",
        "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--model.config_overrides", VOCAB,
        "--model.learning_rate", "0.01",
        "--model.optimizer", "adamw",  # pinned, whatever tiny.yaml's demo uses
        "--model.schedule", "cosine",
        "--model.warmup_steps", "0.25",
        "--model.decay_steps", "null",
        "--model.min_lr_ratio", "0.0",
        "--model.sample_tokens", "2",
        "--data.format", "chat",
        "--data.files", json.dumps([str(corpus)]),
        "--data.tokenizer", tok,
        "--data.cache_dir", str(root / "cache"),
        "--data.seq_len", "128",
        "--data.batch_size", "2",
        "--data.global_batch_size", "4",
        "--data.val_fraction", "0.1",
        "--checkpoint.every_n_train_steps", "1000",
        *extra,
    ]


def recorder(path: Path) -> list[str]:
    return ["--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.Recorder", "init_args": {"path": str(path)}})]


def one_line(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and not any("Traceback" in line for line in err), err
    return err[-1]


def final(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "tiny" / "last.ckpt", weights_only=True)


def test_epochs_are_passes_over_the_packed_windows_and_the_schedule_spans_them(tmp_path, sft_data, capsys):
    rec = tmp_path / "steps.jsonl"
    assert main(sft_args(tmp_path / "run", sft_data, ["--trainer.max_epochs", "2", *recorder(rec)])) == 0
    err = capsys.readouterr().err
    windows = int(err.split(" train windows packed")[0].rsplit(" ", 1)[1])
    steps = math.ceil(2 * windows / 4)  # 2 passes over the windows, 4 a step, the last one topped up
    assert f"2 epochs = {steps} steps of 4 windows" in err and f"training to step {steps}" in err
    records = fitutil.read_records(rec)  # one per micro-batch
    assert [r["step"] for r in records[1::2]] == list(range(1, steps + 1))
    seen = [w for r in records for w in r["windows"]]
    first, second = sorted(seen[:windows]), sorted(seen[windows:2 * windows])
    assert first == second == list(range(windows))  # every window once per epoch
    warmup = math.ceil(0.25 * steps)
    for r in records[1::2]:  # the rate after each step: warmup a quarter of the run, cosine to 0 at its end
        assert r["lr"] == pytest.approx(0.01 * lr_lambda(r["step"], warmup, steps, 0.0, "cosine"), rel=1e-6, abs=1e-12)
    state = final(tmp_path / "run")
    assert state["global_step"] == steps
    assert state["smollm"]["schedule"] == {"warmup_steps": warmup, "decay_steps": steps}


def test_a_chat_run_resumes_bit_exact_and_max_steps_only_stops_it(tmp_path, sft_data, capsys):
    """Two epochs straight, and the same two epochs stopped at step 5 by --trainer.max_steps and
    resumed: the same weights, optimizer state and schedule, bit for bit."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(sft_args(straight, sft_data, ["--trainer.max_epochs", "2"])) == 0
    steps = final(straight)["global_step"]
    assert steps >= 8
    capsys.readouterr()
    assert main(sft_args(split, sft_data, ["--trainer.max_epochs", "2", "--trainer.max_steps", "5"])) == 0
    err = capsys.readouterr().err
    assert f"--trainer.max_steps 5 stops the run before its 2 epoch(s) end at step {steps}" in err
    assert final(split)["global_step"] == 5
    assert main(sft_args(split, sft_data, ["--trainer.max_epochs", "2", "--ckpt_path", "last"])) == 0
    assert "resuming with changed settings" not in capsys.readouterr().err  # the same schedule throughout
    fitutil.assert_same_state(final(straight), final(split), loops=True)
    # nothing left to train: one line
    err = one_line(capsys, main(sft_args(split, sft_data, ["--trainer.max_epochs", "2", "--ckpt_path", "last"])))
    assert f"resumes at step {steps} and --trainer.max_epochs 2 ends at step {steps}: nothing to train" in err


def test_run_length_and_warmup_options_are_checked(tmp_path, sft_data, capsys):
    err = one_line(capsys, main(sft_args(tmp_path / "a", sft_data)))  # max_steps -1 and no epochs
    assert "the run has no end: give --trainer.max_steps N" in err
    err = one_line(capsys, main(sft_args(tmp_path / "b", sft_data, ["--trainer.max_epochs", "1",
                                                                     "--model.warmup_steps", "1.5"])))
    assert "--model.warmup_steps must be whole steps (0 or more) or a fraction of the run below 1" in err
    err = one_line(capsys, main(sft_args(tmp_path / "c", sft_data, ["--trainer.max_epochs", "1",
                                                                     "--model.decay_steps", "0"])))
    assert "--model.decay_steps must be a positive number of steps, or null" in err


def test_a_warmup_fraction_and_decay_null_follow_max_steps_without_epochs():
    from smollm.module import LitSmolLM

    module = LitSmolLM(preset="tiny", warmup_steps=0.1, decay_steps=None)
    module.run_steps = 95
    settings = module.schedule_settings()
    assert (settings["warmup_steps"], settings["decay_steps"]) == (10, 95)  # rounded up, as transformers does
    module.run_steps = None
    with pytest.raises(Exception, match="a fraction of the run\\) needs the run's length"):
        module.schedule_settings()
    assert LitSmolLM(preset="tiny", warmup_steps=0).schedule_settings()["warmup_steps"] == 0


@pytest.mark.slow
def test_two_processes_train_a_chat_run_as_one(tmp_path, sft_data):
    """The same global batch of 4 packed windows on one process (micro-batches of 2, accumulated) and
    on two (one micro-batch of 2 each): the same weights after 3 steps, to summation order."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(sft_args(one, sft_data, ["--trainer.max_steps", "3"])) == 0
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    result = fitutil.run_ranks(sft_args(two, sft_data, ["--trainer.max_steps", "3", *ddp]))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = final(one), final(two)
    assert a["global_step"] == b["global_step"] == 3
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=2e-5, msg=key)


# ---- --model.init_from: a folder, a .ckpt, a GGUF, "smollm2"; anything else in one line ----

def test_init_from_a_gguf_whatever_its_name(tmp_path):
    from transformers import AutoTokenizer

    from smollm import ModelConfig, SmolLM
    from smollm.gguf import save_gguf
    from smollm.module import LitSmolLM
    from helpers_data import make_tokenizer

    torch.manual_seed(0)
    source = SmolLM(ModelConfig.from_name("tiny", vocab_size=640))
    save_gguf(source, tmp_path / "weights", AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok")))
    module = LitSmolLM(preset="tiny", config_overrides={"vocab_size": 640}, init_from=str(tmp_path / "weights"))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(module.model.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("given, says", [
    ("smolm2", "no such file or folder; did you mean 'smollm2'?"),
    ("absent", "no such file or folder; give a Hugging Face model folder, a .ckpt of smollm.fit, a .gguf file, or 'smollm2'"),
    ("folder", "a folder without config.json, so not a Hugging Face model folder"),
    ("notes.txt", "neither a .ckpt nor a GGUF file; give a Hugging Face model folder"),
    ("model.safetensors", "a file of a Hugging Face model folder; give the folder that holds it"),
])
def test_init_from_anything_else_is_one_line(tmp_path, sft_data, capsys, given, says):
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 16)
    path = given if given == "smolm2" else str(tmp_path / given)
    err = one_line(capsys, main(sft_args(tmp_path / "run", sft_data, ["--trainer.max_epochs", "1",
                                                                       "--model.init_from", path])))
    assert err == f"error: --model.init_from {path}: {says}" or (err.startswith(f"error: --model.init_from {path}: ")
                                                                  and says in err), err
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run").rglob("*.ckpt"))


# ---- the configs: SmolLM2's SFT recipe, and the CPU demo with its conversations ----

@pytest.mark.parametrize("config, says", [
    ("sft-135m.yaml", ["preset: 135m", "init_from: smollm2", "learning_rate: 0.001", "warmup_steps: 0.1",
                       "decay_steps: null", "schedule: cosine", "max_epochs: 2", "seq_len: 8192", "format: chat"]),
    ("sft-demo.yaml", ["preset: 135m", "init_from: smollm2", "max_epochs: 3", "format: chat",
                       "files: configs/sft-demo-chats.jsonl"]),
])
def test_the_fine_tuning_configs_parse(capsys, config, says):
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(fitutil.ROOT / "configs" / config), "--print_config"])
    assert exit.value.code in (0, None)
    out = capsys.readouterr().out
    assert all(s in out for s in says), out


def test_the_demo_conversations_are_the_scripts_output(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "chats.jsonl"
    subprocess.run([sys.executable, str(fitutil.ROOT / "scripts" / "demo_chats.py"), str(out)], check=True, timeout=60)
    assert out.read_bytes() == (fitutil.ROOT / "configs" / "sft-demo-chats.jsonl").read_bytes()


@pytest.mark.slow
def test_the_recipe_config_fine_tunes_the_real_weights(tmp_path):
    """configs/sft-135m.yaml on a CPU, shrunk to one step of one 256-token window of the demo's
    conversations: it starts from the real SmolLM2-135M-Instruct weights exactly, with their tokenizer."""
    from smollm.checkpoint import load_model
    from smollm.errors import DownloadError

    try:
        want = load_model("smollm2").model.state_dict()
    except DownloadError as e:
        pytest.skip(f"SmolLM2 GGUF not available: {e}")
    start = tmp_path / "start.pt"
    result = fitutil.run_fit([
        "--config", str(fitutil.ROOT / "configs" / "sft-135m.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.compile", "false",
        "--trainer.default_root_dir", str(tmp_path), "--data.cache_dir", str(tmp_path / "cache"),
        "--data.files", str(fitutil.ROOT / "configs" / "sft-demo-chats.jsonl"), "--data.seq_len", "256",
        "--data.batch_size", "1", "--data.global_batch_size", "1", "--data.num_workers", "0",
        "--data.val_fraction", "0.05", "--data.max_val_windows", "1", "--trainer.max_steps", "1",
        "--model.sample_tokens", "4",
        "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.StartState", "init_args": {"path": str(start)}}),
    ], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "smollm: 135m model, 134,515,008 parameters, from smollm2" in result.stderr
    assert "(smollm2, vocab 49152, its chat template)" in result.stderr and "2 epochs = " in result.stderr
    weights = torch.load(start, weights_only=True)["weights"]
    assert weights.keys() == want.keys() and all(torch.equal(weights[k], v) for k, v in want.items())
    assert (tmp_path / "checkpoints" / "sft-135m" / "step=000001.ckpt").is_file()
