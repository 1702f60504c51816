"""Optimizers: parameter groups decided by what a parameter is, Muon on the decoder matrices beside
AdamW, one schedule for both, everything a run promises (exact resume, the non-finite guard,
changed settings, checkpoint readers, DDP) still holding with Muon; gradient clipping on the true
gradient under 16-mixed, and the Trainer's own clipping options refused."""

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
from smollm.optim import MuonWithAdamW, lr_lambda, parameter_groups
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


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_memory_estimate_counts_the_state_the_optimizer_keeps(optimizer):
    """smollm.config.estimate_memory's optimizer state is the bytes of the tensors the optimizer
    really holds after a step (besides its scalar step counts)."""
    from smollm.config import estimate_memory

    torch.manual_seed(0)
    lit = LitSmolLM(preset="tiny", optimizer=optimizer)
    opt = lit.configure_optimizers()["optimizer"]
    lit._step({"input_ids": torch.randint(0, 100, (2, 9))}, "train").backward()
    opt.step()
    held = sum(v.numel() * v.element_size() for state in opt.state.values() for v in state.values()
               if torch.is_tensor(v) and v.dim() > 0)
    assert estimate_memory(lit.config, optimizer=optimizer).optimizer == held


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
    model = load_model(str(tmp_path / "hf")).model
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
    result = fitutil.run_ranks(run_args(straight, small, 6, every=3, record=straight / "rec.jsonl", extra=[*DDP, *MUON]))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [fitutil.read_records(Path(f"{straight / 'rec.jsonl'}.rank{r}")) for r in (0, 1)]
    for a, b in zip(*ranks):
        assert a["step"] == b["step"] and not set(a["windows"]) & set(b["windows"])
        assert a["lr"] == b["lr"]
    # resumed from the straight run's step 3 (its first three steps are the same launch's)
    run = tmp_path / "resumed"
    result = fitutil.run_ranks(run_args(run, small, 6, every=3, record=run / "rec.jsonl",
                                        extra=[*DDP, *MUON, "--ckpt_path", str(straight / "checkpoints" / "tiny" / "step=000003.ckpt")]))
    assert result.returncode == 0, result.stderr[-3000:]
    for r in (0, 1):
        resumed = fitutil.read_records(Path(f"{run / 'rec.jsonl'}.rank{r}"))
        assert [x["step"] for x in resumed] == [4, 5, 6]
        assert [(x["windows"], x["loss"]) for x in resumed] == [(x["windows"], x["loss"]) for x in ranks[r][3:]]
    assert_same_muon_state(checkpoint_at(run, 6), checkpoint_at(straight, 6))


# ---- parameter groups: identity, not shape ----

def names_by_group(lit: LitSmolLM) -> dict[str, list[str]]:
    return fitutil.group_names(lit.configure_optimizers()["optimizer"], lit.model)


def test_groups_are_decided_by_what_a_parameter_is_not_by_its_shape():
    """FSDP shows every parameter as a 1-D shard: flattened parameters land in the same groups, for
    AdamW's decay split and for what Muon takes."""
    lit = LitSmolLM(preset="tiny")

    def plan() -> dict[str, list[str]]:
        return {k: sorted(n for n, _ in v) for k, v in parameter_groups(lit.model, muon=True).items()}

    expected, with_muon = names_by_group(lit), plan()
    layers = range(lit.config.num_hidden_layers)
    norms = ["norm.weight"] + [f"layers.{i}.{n}.weight" for i in layers
                               for n in ("input_layernorm", "post_attention_layernorm")]
    parts = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
    projections = [f"layers.{i}.{part}.{proj}.weight" for i in layers for part, projs in parts for proj in projs]
    assert expected == {"decay": sorted(["embed_tokens.weight", *projections]), "no_decay": sorted(norms)}
    assert with_muon == {"decay": ["embed_tokens.weight"], "no_decay": sorted(norms), "muon": sorted(projections)}
    with torch.no_grad():
        for p in lit.model.parameters():
            p.data = p.data.reshape(-1)  # what FSDP's use_orig_params leaves in the module
    assert names_by_group(lit) == expected
    assert plan() == with_muon


def test_under_fsdp_the_groups_are_one_process_groups_and_flat_parameters_are_refused(monkeypatch):
    """torch's FSDP on this one process (gloo): with use_orig_params (Lightning's default) the
    groups are the unwrapped model's; without it the optimizer would get each layer's flat
    parameter and nothing of the root unit (embedding, final norm): refused, not guessed at."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from smollm.errors import UsageError
    from smollm.model import DecoderLayer

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(fitutil.free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        expected = names_by_group(LitSmolLM(preset="tiny"))
        for use_orig_params in (True, False):
            lit = LitSmolLM(preset="tiny")
            FullyShardedDataParallel(lit, auto_wrap_policy=ModuleWrapPolicy({DecoderLayer}),
                                     device_id=torch.device("cpu"), use_orig_params=use_orig_params)
            if use_orig_params:
                assert names_by_group(lit) == expected
            else:
                with pytest.raises(UsageError, match="layers.0._flat_param .* keep use_orig_params true"):
                    lit.configure_optimizers()
    finally:
        dist.destroy_process_group()


def test_resuming_optimizer_state_of_other_groups_is_refused_in_one_line(tmp_path, small, capsys, monkeypatch):
    """A checkpoint written under FSDP before groups were decided by identity has every parameter
    in no_decay; its optimizer state does not fit this version's groups."""
    import smollm.optim

    root = tmp_path / "run"
    real = smollm.optim.parameter_groups
    with monkeypatch.context() as m:  # the old FSDP split: nothing decays
        m.setattr(smollm.optim, "parameter_groups", lambda model, muon=False: {
            "decay": [], "no_decay": [x for v in real(model).values() for x in v], "muon": []})
        assert main(run_args(root, small, 2, every=2)) == 0
    capsys.readouterr()
    err = one_line_error(capsys, main(run_args(root, small, 4, extra=["--ckpt_path", "last"])))
    assert "parameter groups of 0 decay, 20 no_decay parameters" in err and "15 decay, 5 no_decay" in err
    assert "--model.init_from" in err
    assert sorted(p.name for p in (root / "checkpoints" / "tiny").glob("step=*.ckpt")) == ["step=000002.ckpt"]


def test_a_resume_with_another_fused_adamw_uses_it_and_says_so(tmp_path, small, capsys):
    """The checkpoint's optimizer state carries each group's kernel choice; loading it must not
    keep the old kernel in silence."""
    root = tmp_path / "run"
    assert main(run_args(root, small, 2, every=1)) == 0
    assert {g["fused"] for g in checkpoint_at(root, 2)["optimizer_states"][0]["param_groups"]} == {True}
    capsys.readouterr()
    assert main(run_args(root, small, 3, every=1, extra=["--ckpt_path", "last", "--model.fused_adamw", "false"])) == 0
    err = capsys.readouterr().err
    assert "resuming with changed settings, applied from step 3 on: fused_adamw None -> False" in err
    assert {g["fused"] for g in checkpoint_at(root, 3)["optimizer_states"][0]["param_groups"]} == {False}


# ---- clipping ----

AMP16 = ["--trainer.precision", "null", "--trainer.plugins", json.dumps(  # 16-mixed with its GradScaler, on the CPU
    {"class_path": "lightning.pytorch.plugins.precision.MixedPrecision",
     "init_args": {"precision": "16-mixed", "device": "cpu"}})]


def test_16_mixed_with_the_fused_adamw_clips_and_logs_the_true_gradient_norm(tmp_path, small):
    """Lightning leaves the gradients scaled (x 65536) for an optimizer that unscales in its step;
    the clip and train/grad_norm must see them unscaled, as with the non-fused AdamW, which
    Lightning unscales itself."""
    runs = {}
    for fused in ("null", "false"):
        root = tmp_path / fused
        assert main(run_args(root, small, 3, record=root / "rec.jsonl",
                             extra=[*AMP16, "--model.fused_adamw", fused])) == 0
        runs[fused] = (fitutil.read_records(root / "rec.jsonl"), checkpoint_at(root, 3)["state_dict"])
    (fused, fused_weights), (plain, plain_weights) = runs["null"], runs["false"]
    assert plain[0]["grad_norm"] > 1.0  # above the clip (1.0): the clip acts
    assert [r["grad_norm"] for r in fused] == pytest.approx([r["grad_norm"] for r in plain], rel=1e-5)
    assert [r["loss"] for r in fused] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    for key in plain_weights:
        torch.testing.assert_close(fused_weights[key], plain_weights[key], rtol=1e-5, atol=1e-6, msg=key)


class InfGradient(L.Callback):
    """Makes one gradient element infinite before step `at_step`'s clipping: an fp16 overflow."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 == self.at_step:
            pl_module.model.norm.weight.grad[0] = float("inf")


def test_under_16_mixed_an_overflow_step_is_skipped_counted_and_the_run_goes_on(tmp_path, small):
    """GradScaler skips a step whose gradients overflow and lowers its scale: normal under 16-mixed,
    not fatal. The step counts (global step, schedule, data move on) but changes no weight and no
    AdamW step count; train/grad_norm logs it as inf."""
    root = tmp_path / "run"
    inject = "--trainer.callbacks+=" + json.dumps({"class_path": "test_optim.InfGradient", "init_args": {"at_step": 3}})
    assert main(run_args(root, small, 4, every=1, record=root / "rec.jsonl", extra=[*AMP16, inject])) == 0
    norms = [r["grad_norm"] for r in fitutil.read_records(root / "rec.jsonl")]
    assert math.isinf(norms[2]) and all(math.isfinite(n) for n in norms[:2] + norms[3:])
    before, skipped, after = (checkpoint_at(root, step) for step in (2, 3, 4))
    assert all(torch.equal(before["state_dict"][k], v) for k, v in skipped["state_dict"].items())
    assert any(not torch.equal(skipped["state_dict"][k], v) for k, v in after["state_dict"].items())
    steps = [float(c["optimizer_states"][0]["state"][0]["step"]) for c in (before, skipped, after)]
    assert steps == [2.0, 2.0, 3.0]


@pytest.mark.parametrize("option, value", [("trainer.gradient_clip_val", "0.05"),
                                           ("trainer.gradient_clip_algorithm", "value"), ("model.grad_clip", "-1")])
def test_every_clipping_option_that_would_not_apply_is_refused_naming_ours(tmp_path, small, capsys, option, value):
    extra = [] if option == "model.grad_clip" else ["--model.grad_clip", "0"]
    err = one_line_error(capsys, main(run_args(tmp_path / "run", small, 2, extra=[*extra, f"--{option}", value])))
    assert f"--{option} {value}" in err and "--model.grad_clip" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- precision ----

def test_half_precision_weights_are_refused_or_said(tmp_path, small, capsys):
    """16-true diverges (no loss scaling; eps 1e-8 is 0 in float16): refused. bf16-true trains
    with bfloat16 weights, which loses small updates: it runs, and says so."""
    err = one_line_error(capsys, main(run_args(tmp_path / "a", small, 1, extra=["--trainer.precision", "16-true"])))
    assert "--trainer.precision 16-true" in err and "16-mixed" in err
    assert not (tmp_path / "a" / "checkpoints").exists()
    assert main(run_args(tmp_path / "b", small, 1, extra=["--trainer.precision", "bf16-true"])) == 0
    assert "warning: --trainer.precision bf16-true keeps the weights in bfloat16" in capsys.readouterr().err
