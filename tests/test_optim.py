"""Optimizers: Muon on the decoder matrices beside AdamW, one schedule for both, and everything a
run promises (exact resume, the non-finite guard, changed settings, checkpoint readers, DDP)
still holding with Muon."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import fitutil
import lightning as L
from smollm.config import ModelConfig
from smollm.fit import main
from smollm.model import SmolLM
from smollm.module import LitSmolLM
from smollm.optim import MuonWithAdamW, lr_lambda
from test_trust import DDP, checkpoint_at, one_line_error, run_args, small  # noqa: F401

MUON = ["--model.optimizer", "muon"]


class GroupRecorder(L.Callback):
    """Appends one JSON line per step: each named group's learning rate, and Muon's momentum."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        groups = trainer.optimizers[0].param_groups
        record = {"step": trainer.global_step, "lrs": {g["name"]: g["lr"] for g in groups},
                  "momentum": next(g["momentum"] for g in groups if g["name"] == "muon")}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def muon_module(**kwargs) -> LitSmolLM:
    return LitSmolLM(preset="tiny", optimizer="muon", learning_rate=1e-2, warmup_steps=3, decay_steps=20,
                     schedule="cosine", **kwargs)


def test_muon_takes_the_decoder_projections_and_adamw_the_embedding_and_norms():
    lit = muon_module()
    optimizer = lit.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): n for n, p in lit.model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert muon == {f"layers.{i}.{part}.{proj}.weight" for i in range(lit.config.num_hidden_layers)
                    for part, projs in (("self_attn", projections[:4]), ("mlp", projections[4:])) for proj in projs}
    assert adamw == set(names.values()) - muon
    assert "embed_tokens.weight" in adamw and "norm.weight" in adamw  # the head is tied to the embedding
    assert optimizer.adamw.defaults["fused"]  # AdamW keeps its fused kernel beside Muon


def test_one_schedule_scales_both_groups_and_each_has_its_own_rate():
    lit = muon_module(muon_lr=0.02)
    config = lit.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for step in range(6):
        factor = lr_lambda(step, 3, 20, 0.1, "cosine")
        rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
        assert rates == pytest.approx({"decay": 1e-2 * factor, "no_decay": 1e-2 * factor, "muon": 0.02 * factor})
        optimizer.step()
        scheduler.step()


def test_the_state_of_both_optimizers_round_trips_and_a_plain_adamw_state_is_refused():
    torch.manual_seed(0)
    lit = muon_module()
    optimizer = lit.configure_optimizers()["optimizer"]
    ids = torch.randint(0, 100, (2, 9))
    lit._step({"input_ids": ids}, "train").backward()
    optimizer.step()
    state = optimizer.state_dict()
    assert set(state) == {"adamw", "muon"}
    assert len(optimizer.state) == sum(1 for _ in lit.model.parameters())  # a live view of both
    again = muon_module().configure_optimizers()["optimizer"]
    again.load_state_dict(state)
    for a, b in zip(optimizer.state.values(), again.state.values()):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
    adamw_state = LitSmolLM(preset="tiny").configure_optimizers()["optimizer"].state_dict()
    with pytest.raises(Exception, match="not Muon beside AdamW"):
        again.load_state_dict(adamw_state)


def assert_same_muon_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for side in ("adamw", "muon"):
        sa, sb = a["optimizer_states"][0][side]["state"], b["optimizer_states"][0][side]["state"]
        assert sa.keys() == sb.keys() and sa
        for i in sa:
            for name in sa[i]:
                assert torch.equal(torch.as_tensor(sa[i][name]), torch.as_tensor(sb[i][name])), (side, i, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_muon_resume_is_bit_exact(tmp_path, small):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(run_args(straight, small, 10, every=5, extra=MUON)) == 0
    assert main(run_args(resumed, small, 5, every=5, extra=MUON)) == 0
    assert main(run_args(resumed, small, 10, every=5, extra=[*MUON, "--ckpt_path", "last"])) == 0
    assert_same_muon_state(checkpoint_at(straight, 10), checkpoint_at(resumed, 10))
    before = checkpoint_at(resumed, 5)["state_dict"]
    assert any(not torch.equal(before[k], v) for k, v in checkpoint_at(resumed, 10)["state_dict"].items())


def test_with_muon_a_nan_loss_stops_before_the_step_and_saves_nothing_non_finite(tmp_path, small, capsys):
    poison = "--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.PoisonWeights", "init_args": {"at_step": 4}})
    root = tmp_path / "run"
    err = one_line_error(capsys, main(run_args(root, small, 8, every=1, extra=[*MUON, poison])))
    assert err.startswith("error: step 4:") and "nan" in err
    saved = sorted(p.name for p in (root / "checkpoints" / "tiny").glob("step=*.ckpt"))
    assert saved == ["step=000001.ckpt", "step=000002.ckpt", "step=000003.ckpt"]
    for name in saved:
        state = torch.load(root / "checkpoints" / "tiny" / name, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["state_dict"].values())
        for side in ("adamw", "muon"):
            for values in state["optimizer_states"][0][side]["state"].values():
                assert all(torch.isfinite(torch.as_tensor(v)).all() for v in values.values())


def test_changed_muon_settings_on_resume_are_applied_and_announced(tmp_path, small, capsys):
    rec = tmp_path / "rec.jsonl"
    root = tmp_path / "run"
    assert main(run_args(root, small, 4, every=2, extra=MUON)) == 0
    capsys.readouterr()
    recorder = "--trainer.callbacks+=" + json.dumps({"class_path": "test_optim.GroupRecorder",
                                                      "init_args": {"path": str(rec)}})
    assert main(run_args(root, small, 6, every=2, extra=[*MUON, "--ckpt_path", "last", "--model.muon_lr", "0.03",
                                                         "--model.muon_momentum", "0.9", recorder])) == 0
    err = capsys.readouterr().err
    assert "resuming with changed settings, applied from step 5 on: muon_lr None -> 0.03, muon_momentum 0.95 -> 0.9" in err
    records = fitutil.read_records(rec)
    factor = lr_lambda(5, 3, 20, 0.1, "cosine")  # the rates after step 5's scheduler step
    assert records[0]["lrs"] == pytest.approx({"decay": 0.01 * factor, "no_decay": 0.01 * factor, "muon": 0.03 * factor})
    assert records[0]["momentum"] == 0.9


def test_switching_optimizer_on_resume_is_refused_in_one_line(tmp_path, small, capsys):
    root = tmp_path / "run"
    assert main(run_args(root, small, 2, every=2)) == 0
    capsys.readouterr()
    err = one_line_error(capsys, main(run_args(root, small, 4, extra=[*MUON, "--ckpt_path", "last"])))
    assert "trained with --model.optimizer adamw" in err and "--model.init_from" in err
    assert sorted(p.name for p in (root / "checkpoints" / "tiny").glob("step=*.ckpt")) == ["step=000002.ckpt"]


def test_muon_under_fsdp_is_refused_before_anything_is_built(tmp_path, small, capsys):
    err = one_line_error(capsys, main(run_args(tmp_path / "run", small, 2, extra=[*MUON, "--trainer.strategy", "fsdp"])))
    assert "--model.optimizer muon cannot run under --trainer.strategy fsdp" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_muon_checkpoint_generates_evaluates_converts_and_starts_a_run(tmp_path, small, capsys):
    from smollm import convert, evaluate, generate
    from smollm.checkpoint import load_model

    root = tmp_path / "run"
    assert main(run_args(root, small, 3, every=3, extra=MUON)) == 0
    ckpt = root / "checkpoints" / "tiny" / "last.ckpt"
    trained = torch.load(ckpt, weights_only=True)["state_dict"]
    capsys.readouterr()
    assert generate.main(["--checkpoint", str(ckpt), "--prompt", "the quick", "--max_new_tokens", "1"]) == 0
    assert capsys.readouterr().out.startswith("next token after 'the quick': ")
    assert evaluate.main(["--checkpoint", str(ckpt), "--json", str(tmp_path / "score.json")]) == 0
    assert math.isfinite(json.loads((tmp_path / "score.json").read_text())["loss"])
    assert convert.main(["ckpt", str(ckpt), str(tmp_path / "hf")]) == 0
    model, _ = load_model(str(tmp_path / "hf"))
    assert all(torch.equal(v, trained["model." + k]) for k, v in model.state_dict().items())
    # init_from a Muon checkpoint: its weights, a fresh optimizer (here AdamW), step 0
    start = tmp_path / "start.pt"
    assert main(run_args(tmp_path / "next", small, 1, extra=["--model.init_from", str(ckpt), "--trainer.callbacks+="
                         + json.dumps({"class_path": "fitutil.StartState", "init_args": {"path": str(start)}})])) == 0
    start = torch.load(start, weights_only=True)
    assert start["weights"].keys() == {k.removeprefix("model.") for k in trained}
    assert all(torch.equal(v, trained["model." + k]) for k, v in start["weights"].items())
    assert start["step"] == 0 and all(s["last_epoch"] == 0 for s in start["schedulers"])
    assert start["optimizer"] == "AdamW" and start["optimizer_state"]["state"] == {}


def test_tensorboard_logs_each_optimizers_learning_rate(tmp_path, small):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tmp_path / "run"
    assert main(run_args(root, small, 4, extra=[*MUON, "--model.muon_lr", "0.02", "--trainer.log_every_n_steps", "1"])) == 0
    events = EventAccumulator(str(root / "lightning_logs" / "tiny" / "version_0")).Reload()
    adamw, muon = events.Scalars("train/lr")[-1], events.Scalars("train/lr_muon")[-1]
    assert adamw.step == muon.step and muon.value == pytest.approx(2 * adamw.value)


def test_the_build_matches_the_model_for_every_preset_shape():
    """The split needs no model-specific list: it holds for a deeper, wider, untied shape too."""
    model = SmolLM(ModelConfig.from_name("tiny", num_hidden_layers=3, tie_word_embeddings=False))
    lit = muon_module()
    lit.model = model
    optimizer = lit.configure_optimizers()["optimizer"]
    assert sum(len(g["params"]) for g in optimizer.muon.param_groups) == 3 * 7
    assert {n for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith("layers.")} == {
        "embed_tokens.weight", "lm_head.weight"}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


@pytest.mark.slow
def test_muon_with_ddp_on_two_processes_resumes_exactly(tmp_path, small):
    straight = tmp_path / "straight"
    result = fitutil.run_fit(run_args(straight, small, 6, every=3, record=straight / "rec.jsonl", extra=[*DDP, *MUON]))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [fitutil.read_records(Path(f"{straight / 'rec.jsonl'}.rank{r}")) for r in (0, 1)]
    for a, b in zip(*ranks):
        assert a["step"] == b["step"] and not set(a["windows"]) & set(b["windows"])
        assert a["lr"] == b["lr"]
    run = tmp_path / "resumed"
    for steps, more in ((3, []), (6, ["--ckpt_path", "last"])):
        result = fitutil.run_fit(run_args(run, small, steps, every=3, record=run / "rec.jsonl", extra=[*DDP, *MUON, *more]))
        assert result.returncode == 0, result.stderr[-3000:]
    for r in (0, 1):
        resumed = fitutil.read_records(Path(f"{run / 'rec.jsonl'}.rank{r}"))
        assert [(x["windows"], x["loss"]) for x in resumed] == [(x["windows"], x["loss"]) for x in ranks[r]]
    assert_same_muon_state(checkpoint_at(run, 6), checkpoint_at(straight, 6))
