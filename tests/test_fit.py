"""`python -m smollm.fit`: checkpoints, resume, the learning-rate rule, logging, options."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import fitutil
from smollm.fit import main
from smollm.checkpoint import model_from_checkpoint as load_checkpoint_model
from smollm.optim import lr_lambda


def args(tmp_path: Path, data, max_steps: int, every: int = 1000, extra=()) -> list[str]:
    corpus, tok = data
    return fitutil.fit_args(tmp_path / "run", corpus, tok, max_steps, every, list(extra))


def recorder(path: Path) -> list[str]:
    return ["--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.Recorder", "init_args": {"path": str(path)}})]


def start_state(path: Path) -> list[str]:
    return ["--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.StartState", "init_args": {"path": str(path)}})]


def steps_saved(root: Path) -> list[int]:
    return sorted(int(p.stem.split("=")[1]) for p in (root / "checkpoints" / "tiny").glob("step=*.ckpt"))


def test_checkpoints_every_n_steps_and_at_the_end(tmp_path, data, capsys):
    assert main(args(tmp_path, data, max_steps=7, every=3)) == 0
    root = tmp_path / "run"
    assert steps_saved(root) == [3, 6, 7]  # every 3, plus the final step
    last = root / "checkpoints" / "tiny" / "last.ckpt"
    assert os.path.realpath(last) == str(root / "checkpoints" / "tiny" / "step=000007.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 7
    out = capsys.readouterr().out
    assert "next token after 'The quick brown fox':" in out


def test_resume_extends_a_finished_run_and_logs_into_the_same_run(tmp_path, data):
    rec = tmp_path / "steps.jsonl"
    assert main(args(tmp_path, data, 5, every=2, extra=recorder(rec))) == 0
    # the same folder a second time: config.yaml is rewritten, not refused (Lightning trap 8)
    assert main(args(tmp_path, data, 8, every=2, extra=["--ckpt_path", "last", *recorder(rec)])) == 0
    root = tmp_path / "run"
    steps = [r["step"] for r in fitutil.read_records(rec)]
    assert steps == list(range(1, 9))  # 5 steps, then exactly 3 more
    assert steps_saved(root) == [2, 4, 5, 6, 8]
    assert sorted(p.name for p in (root / "lightning_logs" / "tiny").iterdir()) == ["version_0"]
    assert (root / "lightning_logs" / "tiny" / "version_0" / "config.yaml").exists()


def test_learning_rate_follows_the_rule_across_resume_and_extension(tmp_path, data):
    rec = tmp_path / "steps.jsonl"
    main(args(tmp_path, data, 4, every=2, extra=recorder(rec)))
    main(args(tmp_path, data, 6, extra=["--ckpt_path", "last", *recorder(rec)]))
    # extend past decay_steps=20: the rate settles at the floor, it never jumps back up
    main(args(tmp_path, data, 24, extra=["--ckpt_path", "last", *recorder(rec)]))
    records = fitutil.read_records(rec)
    assert [r["step"] for r in records] == list(range(1, 25))
    for r in records:
        # the recorder reads the rate after the scheduler stepped: the rate of the next step
        expected = 0.01 * lr_lambda(r["step"], warmup_steps=3, decay_steps=20, min_lr_ratio=0.1,
                                    schedule="cosine")
        assert math.isclose(r["lr"], expected, rel_tol=1e-9), r


def test_ckpt_path_last_with_nothing_to_resume_fails_clearly(tmp_path, data, capsys):
    assert main(args(tmp_path, data, 3, extra=["--ckpt_path", "last"])) == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume" in err and str(tmp_path / "run" / "checkpoints" / "tiny") in err
    assert not (tmp_path / "run" / "lightning_logs" / "tiny").exists()  # nothing was trained


def test_a_fresh_run_never_writes_over_an_earlier_runs_checkpoints(tmp_path, data, capsys):
    assert main(args(tmp_path, data, 4, every=2)) == 0
    folder = tmp_path / "run" / "checkpoints" / "tiny"
    before = {p.name: p.read_bytes() for p in folder.glob("step=*.ckpt")}
    capsys.readouterr()
    assert main(args(tmp_path, data, 2, every=2)) == 2  # no --ckpt_path: would overwrite step 2
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "--ckpt_path last" in err
    assert {p.name: p.read_bytes() for p in folder.glob("step=*.ckpt")} == before
    # another --name is another run, in its own folders
    assert main(args(tmp_path, data, 2, every=2, extra=["--name", "second"])) == 0
    assert (tmp_path / "run" / "checkpoints" / "second" / "step=000002.ckpt").exists()
    assert (tmp_path / "run" / "lightning_logs" / "second" / "version_0").is_dir()


def test_tensorboard_gets_losses_rates_throughput_and_a_sample(tmp_path, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(args(tmp_path, data, 6, extra=["--trainer.val_check_interval", "3"])) == 0
    events = EventAccumulator(str(tmp_path / "run" / "lightning_logs" / "tiny" / "version_0"),
                              size_guidance={"tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec",
            "val/loss", "val/perplexity"} <= scalars
    val = events.Scalars("val/loss")[-1].value
    ppl = events.Scalars("val/perplexity")[-1].value
    assert math.isclose(ppl, math.exp(val), rel_tol=1e-4)
    assert any("sample" in tag for tag in events.Tags()["tensors"])


def test_the_console_and_tensorboard_show_one_throughput_measurement(tmp_path, data, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(args(tmp_path, data, 6, extra=["--trainer.enable_progress_bar", "true"])) == 0
    lines = [line.split("  ") for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    console = [float(next(p for p in parts if p.endswith(" tok/s")).split()[0].replace(",", "")) for parts in lines]
    events = EventAccumulator(str(tmp_path / "run" / "lightning_logs" / "tiny" / "version_0")).Reload()
    logged = [e.value for e in events.Scalars("train/tokens_per_sec")]
    assert len(console) == len(logged) == 3  # steps 2, 4 and 6 (every 2)
    # the console prints whole tokens/s; TensorBoard keeps float32, so the same figure can round the other way
    assert all(abs(c - v) <= 0.5 + 1e-3 for c, v in zip(console, logged)), (console, logged)


def test_checkpoint_of_compiled_model_loads_into_plain_model(tmp_path, data):
    # nn.Module.compile keeps state-dict keys; a checkpoint of torch.compile(model), whose keys
    # carry `_orig_mod.`, loads as well.
    main(args(tmp_path, data, 2))
    path = tmp_path / "run" / "checkpoints" / "tiny" / "step=000002.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"] = {k.replace("model.", "model._orig_mod.", 1): v
                                for k, v in checkpoint["state_dict"].items()}
    torch.save(checkpoint, tmp_path / "compiled.ckpt")
    plain, _ = load_checkpoint_model(str(path))
    renamed, _ = load_checkpoint_model(str(tmp_path / "compiled.ckpt"))
    for (name, a), b in zip(plain.state_dict().items(), renamed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_compile_option_trains_and_its_checkpoint_loads_into_plain_model(tmp_path, data):
    import torch._dynamo

    torch._dynamo.reset()
    assert main(args(tmp_path, data, 2, extra=["--model.compile", "true"])) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # training went through it
    model, _ = load_checkpoint_model(str(tmp_path / "run" / "checkpoints" / "tiny" / "step=000002.ckpt"))
    assert not any("_orig_mod" in k for k in model.state_dict())


def test_bf16_mixed_with_fused_adamw_and_clipping_trains(tmp_path, data):
    # Lightning trap 6: its mixed-precision plugin refuses clipping with a fused optimizer.
    extra = ["--trainer.precision", "bf16-mixed", "--model.fused_adamw", "true", "--model.grad_clip", "1.0"]
    assert main(args(tmp_path, data, 2, extra=extra)) == 0
    assert steps_saved(tmp_path / "run") == [2]


def test_init_from_a_hugging_face_directory(tmp_path, data):
    from smollm import ModelConfig, SmolLM
    from smollm.hf import save_hf

    torch.manual_seed(3)
    source = SmolLM(ModelConfig.from_name("tiny", vocab_size=320))
    save_hf(source, tmp_path / "hf")
    assert main(args(tmp_path, data, 1, extra=["--model.init_from", str(tmp_path / "hf"),
                                                "--model.learning_rate", "1e-9", *start_state(tmp_path / "start.pt")])) == 0
    start = torch.load(tmp_path / "start.pt", weights_only=True)["weights"]
    assert start.keys() == source.state_dict().keys()
    assert all(torch.equal(start[k], v) for k, v in source.state_dict().items())  # every weight, exactly
    trained, _ = load_checkpoint_model(str(tmp_path / "run" / "checkpoints" / "tiny" / "step=000001.ckpt"))
    torch.testing.assert_close(trained.layers[0].mlp.up_proj.weight, source.layers[0].mlp.up_proj.weight,
                               atol=1e-6, rtol=0)


def test_init_from_a_directory_of_another_configuration_fails_clearly(tmp_path, data, capsys):
    from smollm import ModelConfig, SmolLM
    from smollm.hf import save_hf

    save_hf(SmolLM(ModelConfig.from_name("tiny", vocab_size=320, num_hidden_layers=3)), tmp_path / "hf")
    assert main(args(tmp_path, data, 1, extra=["--model.init_from", str(tmp_path / "hf")])) == 2
    err = capsys.readouterr().err
    assert "num_hidden_layers: 2 != 3" in err and len(err.strip().splitlines()) == 1


def test_print_config_shows_every_section(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(args(tmp_path, data, 1, extra=["--print_config"]))
    assert exit.value.code in (0, None)
    out = capsys.readouterr().out
    for key in ("model:", "preset: tiny", "data:", "seq_len: 16", "checkpoint:", "every_n_train_steps"):
        assert key in out


def test_real_config_without_a_gpu_stops_with_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["--config", str(fitutil.ROOT / "configs" / "135m.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no CUDA GPU" in err and len(err.splitlines()) == 1


def test_lr_rule_is_warmup_then_decay_to_the_floor():
    f = lambda s, kind="cosine": lr_lambda(s, warmup_steps=10, decay_steps=100, min_lr_ratio=0.1, schedule=kind)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55)
    assert f(100) == f(1000) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 200))
    # warmup-stable-decay: flat until 80% of decay_steps, then linear to the floor
    assert f(50, "wsd") == f(79, "wsd") == 1.0
    assert f(90, "wsd") == pytest.approx(0.55) and f(100, "wsd") == pytest.approx(0.1)


def test_a_training_checkpoint_generates_and_converts_to_transformers(tmp_path, data, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smollm import convert, generate

    assert main(args(tmp_path, data, 3)) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "tiny" / "last.ckpt"
    capsys.readouterr()
    assert generate.main(["--checkpoint", str(ckpt), "--prompt", "The quick brown fox",
                          "--max_new_tokens", "1"]) == 0
    assert capsys.readouterr().out.startswith("next token after 'The quick brown fox': ")

    assert convert.main(["ckpt", str(ckpt), str(tmp_path / "hf")]) == 0
    ours, _ = load_checkpoint_model(str(ckpt))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tok.encode("seven wizards quietly judge boxing")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-5, rtol=1e-5)


# ---- the console tells the story ----

def test_the_console_when_not_on_a_terminal(tmp_path, data, capsys):
    extra = ["--trainer.enable_progress_bar", "true", "--trainer.log_every_n_steps", "2",
             "--trainer.val_check_interval", "4"]
    assert main(args(tmp_path, data, 6, every=3, extra=extra)) == 0
    captured = capsys.readouterr()
    err, out = captured.err, captured.out
    start = err[err.index("smollm: tiny model"):]
    for needle in ("parameters", "training to step 6", "tokens", "device: 1 x cpu", "precision 32",
                   "checkpoints:", "TensorBoard:"):
        assert needle in start, needle
    steps = [line for line in err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["2/6", "4/6", "6/6"]  # a line per logging interval
    assert all("loss" in line and "left" in line for line in steps)
    assert "validation at the start: loss" in err and "validation at step 4: loss" in err
    for needle in ("done: trained 6 steps", "train loss", "validation loss", "next token after", "checkpoint:",
                   "continue:", "--ckpt_path last --trainer.max_steps 12", "generate:", "TensorBoard: tensorboard"):
        assert needle in out, needle
    for noise in ("Epoch", "v_num", "FLOPs", "litlogger", "GPU available", "Trainer.fit` stopped", "Warning"):
        assert noise not in err + out, noise


def test_the_console_prints_each_step_once_with_its_own_rate_when_it_accumulates(tmp_path, data, capsys):
    # 8 windows a step in micro-batches of 4: two micro-batches end per step, one line is due.
    extra = ["--trainer.enable_progress_bar", "true", "--data.global_batch_size", "8"]
    assert main(args(tmp_path, data, 6, extra=extra)) == 0
    steps = [line.split() for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [s[1] for s in steps] == ["2/6", "4/6", "6/6"]
    for s in steps:  # the rate this step used: update step - 1 of the schedule
        step, lr = int(s[1].split("/")[0]), float(s[s.index("lr") + 1])
        assert lr == pytest.approx(0.01 * lr_lambda(step - 1, 3, 20, 0.1, "cosine"), rel=5e-3)
    assert all("tok/s" in " ".join(s) for s in steps)


def test_help_is_smollms(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "smollm: pretrain" in out and "--data.files" in out and "--ckpt_path" in out


# ---- a careless user's mistakes: one line before any time is spent ----

def one_line(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and not any("Traceback" in line for line in err)
    return err[-1]


def test_a_run_too_large_for_the_device_stops_before_training(tmp_path, monkeypatch, capsys):
    import smollm.preflight as preflight

    monkeypatch.setattr(preflight, "available_memory", lambda: 24 * 2**30)
    monkeypatch.chdir(tmp_path)
    err = one_line(capsys, main([]))  # the built-in defaults: 135m at 8 x 2048 in float32 on a CPU
    assert "needs about" in err and "GiB" in err and "--data.batch_size" in err and "configs/tiny.yaml" in err
    assert not list((tmp_path / "checkpoints").rglob("*.ckpt"))


def test_resuming_applies_a_changed_learning_rate_and_records_it(tmp_path, data, capsys):
    rec = tmp_path / "rec.jsonl"
    assert main(args(tmp_path, data, 4, every=2, extra=recorder(rec))) == 0
    capsys.readouterr()
    assert main(args(tmp_path, data, 6, every=2, extra=["--ckpt_path", "last", "--model.learning_rate", "0.03",
                                                         *recorder(rec)])) == 0
    err = capsys.readouterr().err
    assert "resuming with changed settings, applied from step 5 on: learning_rate 0.01 -> 0.03" in err
    records = fitutil.read_records(rec)
    factor = lr_lambda(5, 3, 20, 0.1, "cosine")  # the lr after step 5's scheduler step
    assert records[4]["lr"] == pytest.approx(0.03 * factor)
    saved = (tmp_path / "run" / "lightning_logs" / "tiny" / "version_0" / "config.yaml").read_text()
    assert "learning_rate: 0.03" in saved


def test_resuming_without_steps_left_says_so(tmp_path, data, capsys):
    assert main(args(tmp_path, data, 3)) == 0
    capsys.readouterr()
    err = one_line(capsys, main(args(tmp_path, data, 3, extra=["--ckpt_path", "last"])))
    assert "is at step 3 and --trainer.max_steps is 3: nothing to train" in err


def test_an_unwritable_output_folder_is_reported_before_training(tmp_path, data, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    corpus, tok = data
    argv = fitutil.fit_args(blocker / "run", corpus, tok, 2)
    err = one_line(capsys, main(argv))
    assert "cannot write to" in err and str(blocker) in err


def test_init_from_a_missing_folder_or_a_checkpoint(tmp_path, data, capsys):
    err = one_line(capsys, main(args(tmp_path, data, 1, extra=["--model.init_from", str(tmp_path / "nope")])))
    assert "--model.init_from" in err and "no such file or folder" in err
    assert main(args(tmp_path / "a", data, 2)) == 0
    ckpt = tmp_path / "a" / "run" / "checkpoints" / "tiny" / "step=000002.ckpt"
    rec = tmp_path / "rec.jsonl"
    assert main(args(tmp_path / "b", data, 1, extra=["--model.init_from", str(ckpt), *recorder(rec),
                                                      *start_state(tmp_path / "start.pt")])) == 0
    start, saved = torch.load(tmp_path / "start.pt", weights_only=True), torch.load(ckpt, weights_only=True)
    assert start["weights"].keys() == {k.removeprefix("model.") for k in saved["state_dict"]}
    assert all(torch.equal(v, saved["state_dict"]["model." + k]) for k, v in start["weights"].items())
    assert start["step"] == 0 and start["optimizer_state"]["state"] == {}  # the weights only: a fresh start
    assert all(s["last_epoch"] == 0 for s in start["schedulers"])
    first_loss = fitutil.read_records(rec)[0]["loss"]
    fresh = tmp_path / "fresh.jsonl"
    assert main(args(tmp_path / "c", data, 1, extra=recorder(fresh))) == 0
    assert first_loss < fitutil.read_records(fresh)[0]["loss"]  # it started from the trained weights


def test_a_tokenizer_typo_fails_at_once(tmp_path, data, capsys):
    t0 = __import__("time").perf_counter()
    err = one_line(capsys, main(args(tmp_path, data, 1, extra=["--data.tokenizer", "smolm2"])))
    assert "did you mean 'smollm2'" in err and __import__("time").perf_counter() - t0 < 30


def test_an_unquoted_glob_gets_a_hint(tmp_path, data, capsys):
    corpus, _ = data
    files = [str(p) for p in sorted(corpus.glob("*.txt"))]
    err = one_line(capsys, main(args(tmp_path, data, 1) + ["--data.files", *files]))
    assert "quote it" in err


def test_a_genuine_bug_keeps_its_traceback(tmp_path, data, monkeypatch):
    from smollm.module import LitSmolLM

    def broken(self, batch, batch_idx):
        raise ValueError("a bug, not a user's mistake")
    monkeypatch.setattr(LitSmolLM, "training_step", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(args(tmp_path, data, 1))


def test_a_tokenizer_far_smaller_than_the_vocabulary_gets_a_warning(tmp_path, data, capsys):
    corpus, tok = data
    argv = [a for a in args(tmp_path, data, 1)]
    i = argv.index("--model.config_overrides")
    del argv[i:i + 2]  # the tiny preset's 49,152-token vocabulary for a 300-token tokenizer
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "has 300 tokens but the model's vocabulary is 49,152" in err


def test_the_global_batch_sets_the_accumulation_and_a_bad_split_is_one_line(tmp_path, data, capsys):
    rec = tmp_path / "rec.jsonl"
    # 8 windows per step in micro-batches of 4 on one process: 2 micro-batches per optimizer step;
    # validation every 2 optimizer steps (Lightning alone would count micro-batches)
    extra = ["--data.global_batch_size", "8", "--trainer.val_check_interval", "2", *recorder(rec)]
    assert main(args(tmp_path, data, 2, extra=extra)) == 0
    captured = capsys.readouterr()
    assert "batch: 8 windows x 16 = 128 tokens per step = 2 micro-batches of 4 x 1 process" in captured.err
    assert "validation at step 2" in captured.err and "validation at step 1" not in captured.err
    assert "done: trained 2 steps (256 tokens)" in captured.out
    assert [r["step"] for r in fitutil.read_records(rec)] == [0, 1, 1, 2]  # two micro-batches a step
    config = (tmp_path / "run" / "lightning_logs" / "tiny" / "version_0" / "config.yaml").read_text()
    assert "global_batch_size: 8" in config  # the recipe is recorded

    err = one_line(capsys, main(args(tmp_path / "b", data, 1, extra=["--data.global_batch_size", "6"])))
    assert err == ("error: --data.global_batch_size 6 windows per step cannot be split into micro-batches of 4 on "
                   "1 process (4 windows per micro-step); use --data.batch_size 3, or --data.global_batch_size 4 or 8")
    err = one_line(capsys, main(args(tmp_path / "b", data, 1, extra=["--data.global_batch_size", "8",
                                                                      "--trainer.accumulate_grad_batches", "4"])))
    assert err.startswith("error: --trainer.accumulate_grad_batches 4 disagrees with --data.global_batch_size 8 = "
                          "2 micro-batch(es) of 4 on 1 process(es)")
    assert not (tmp_path / "b" / "run" / "checkpoints").exists() or not list((tmp_path / "b").rglob("*.ckpt"))


def test_under_torchrun_or_srun_the_launcher_sets_the_processes(tmp_path, data, capsys, monkeypatch):
    """torchrun (TORCHELASTIC_RUN_ID, as torch's is_torchelastic_launched reads it) with 2 x 2
    processes: a disagreeing --trainer.devices on the command line is one line, said by rank 0
    only; srun's 3 nodes against --trainer.num_nodes 2 likewise. Nothing is built first."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    err = one_line(capsys, main(args(tmp_path, data, 1, extra=["--trainer.devices", "1"])))
    assert err == ("error: --trainer.devices 1 but torchrun started 2 processes per node; drop --trainer.devices "
                   "(smollm takes it from torchrun) or relaunch with matching numbers")
    monkeypatch.setenv("RANK", "1")  # every rank finds the same mistake; rank 0 says it
    assert main(args(tmp_path, data, 1, extra=["--trainer.devices", "1"])) == 2
    assert capsys.readouterr().err == ""
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name)

    monkeypatch.setenv("SLURM_NTASKS", "3")
    monkeypatch.setenv("SLURM_NNODES", "3")
    monkeypatch.setenv("SLURM_JOB_NAME", "smollm")
    err = one_line(capsys, main(args(tmp_path, data, 1, extra=["--trainer.num_nodes", "2"])))
    assert err.startswith("error: --trainer.num_nodes 2 but srun started 3 nodes")
    assert not (tmp_path / "run" / "lightning_logs").exists()
