"""LoRA (smollm.lora and `--model.lora_*`): adapters that start at zero and train alone over a frozen
base, PEFT's numbers exactly, checkpoints that hold the adapters and the base's identity (small,
verified, resumed bit for bit, for pretraining and for conversations), exports that merge them, two
processes as one, and every bad option or resume as one line.

The bases are tiny random SmolLMs written as Hugging Face folders with their tokenizer; the data
are fitutil's corpus and test_sft's conversations.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import fitutil
from smollm import ModelConfig, SmolLM
from smollm.fit import main
from smollm.lora import (TARGETS, LoRALinear, adapters_off, apply_lora, base_digest, lora_layers, merge_lora,
                         trainable_count)
from test_dpo import dpo_args, dpo_data  # noqa: F401  (dpo_data: a fixture)
from test_sft import final, one_line, sft_args, sft_data  # noqa: F401  (sft_data: a fixture)


def tiny(vocab: int = 320, seed: int = 0) -> SmolLM:
    torch.manual_seed(seed)
    return SmolLM(ModelConfig.from_name("tiny", vocab_size=vocab))


def save_base(model: SmolLM, folder: Path, tokenizer: str) -> Path:
    from transformers import AutoTokenizer

    from smollm.hf import save_hf

    return save_hf(model, folder, tokenizer=AutoTokenizer.from_pretrained(tokenizer))


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(a corpus, its 300-token tokenizer, a tiny base folder with that tokenizer)."""
    folder = tmp_path_factory.mktemp("lora_text")
    corpus = fitutil.write_corpus(folder / "corpus")
    tok = fitutil.build_tokenizer(folder / "tok", corpus)
    return corpus, tok, save_base(tiny(320), folder / "base", str(tok))


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory, sft_data) -> Path:  # noqa: F811
    return save_base(tiny(640, seed=1), tmp_path_factory.mktemp("lora_chat") / "base", sft_data[1])


def text_args(root: Path, data, steps: int, extra: list[str] = ()) -> list[str]:
    corpus, tok, base = data
    return fitutil.fit_args(root, corpus, tok, steps, extra=["--model.init_from", str(base), *extra])


LORA = ["--model.lora_rank", "4"]


def ckpt(root: Path, step: int | None = None) -> Path:
    folder = root / "checkpoints" / "tiny"
    return folder / ("last.ckpt" if step is None else f"step={step:06d}.ckpt")


# ---- the adapters themselves ----

def test_adapters_start_at_zero_train_alone_switch_off_to_the_base_and_merge():
    model = tiny()
    ids = torch.randint(0, 320, (2, 12))
    base_logits, digest = model(ids), base_digest(model)
    weights = {n: p.data_ptr() for n, p in model.named_parameters()}
    apply_lora(model, rank=4)
    layers = lora_layers(model)
    assert len(layers) == 2 * len(TARGETS)
    for layer in layers:  # PEFT's init: A kaiming-uniform (bound 1/sqrt(in)), B zero
        assert layer.lora_A.abs().max() <= 1 / math.sqrt(layer.in_features) and layer.lora_A.std() > 0
        assert not layer.lora_B.any() and layer.scaling == 2.0  # alpha null: 2 x rank
    assert torch.equal(model(ids), base_logits) and base_digest(model) == digest
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable_count(model.config, 4)
    assert {n: p.data_ptr() for n, p in model.named_parameters() if n in weights} == weights  # shared, not copied
    model.loss(ids[:, :-1], ids[:, 1:]).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.normal_()
    adapted = model(ids)
    assert not torch.allclose(adapted, base_logits)
    with adapters_off(model):  # DPO's reference: the base, no copy
        assert torch.equal(model(ids), base_logits)
    assert torch.equal(model(ids), adapted)  # switched back on
    merge_lora(model)
    assert not lora_layers(model) and not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(tiny().state_dict())
    torch.testing.assert_close(model(ids), adapted, rtol=0, atol=1e-4)


def test_forward_and_adapter_gradients_agree_with_peft(tmp_path):
    """The same base in transformers (through smollm.hf) with PEFT's LoRA on the same seven targets,
    rank 8, alpha 16, the same A and B: logits and every adapter's gradient within 1e-5."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from smollm.hf import save_hf

    ours = tiny(320)
    save_hf(ours, tmp_path / "base")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    theirs = get_peft_model(theirs, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS)))
    apply_lora(ours, rank=8, alpha=16)
    with torch.no_grad():  # B random too, so that A's gradients are not zero and the adapters act
        for name, layer in ours.named_modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.normal_(std=0.1)
                peft = theirs.get_submodule("base_model.model.model." + name)
                peft.lora_A["default"].weight.copy_(layer.lora_A)
                peft.lora_B["default"].weight.copy_(layer.lora_B)
    ids = torch.randint(0, 320, (2, 24))
    torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, rtol=0, atol=1e-5)
    ours.loss(ids[:, :-1], ids[:, 1:]).backward()
    theirs(input_ids=ids, labels=ids).loss.backward()
    checked = 0
    for name, layer in ours.named_modules():
        if isinstance(layer, LoRALinear):
            peft = theirs.get_submodule("base_model.model.model." + name)
            torch.testing.assert_close(layer.lora_A.grad, peft.lora_A["default"].weight.grad, rtol=0, atol=1e-5)
            torch.testing.assert_close(layer.lora_B.grad, peft.lora_B["default"].weight.grad, rtol=0, atol=1e-5)
            checked += 1
    assert checked == 14 and any(layer.lora_A.grad.abs().max() > 1e-3 for layer in lora_layers(ours))
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == trainable_count(ours.config, 8)


# ---- runs: pretraining text, and conversations ----

def test_a_lora_run_resumes_bit_exact_with_small_verified_checkpoints(tmp_path, text_data, capsys):
    """10 steps straight and 5 + 5: the same adapters, optimizer state and schedule, bit for bit. The
    checkpoint holds the adapters and the base's source and digest, a small fraction of a full
    fine-tuning's, with its digest beside it."""
    from smollm.checkpoint import check_digest

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(text_args(straight, text_data, 10, LORA)) == 0
    assert "LoRA: rank 4, alpha 8, dropout 0 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: " \
           "9,248 trainable parameters" in capsys.readouterr().err
    assert main(text_args(split, text_data, 5, LORA)) == 0
    assert main(text_args(split, text_data, 10, [*LORA, "--ckpt_path", "last"])) == 0
    a, b = torch.load(ckpt(straight, 10), weights_only=True), torch.load(ckpt(split, 10), weights_only=True)
    fitutil.assert_same_state(a, b, loops=True)
    record = a["smollm"]["lora"]
    assert record == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": list(TARGETS),
                      "base": {"init_from": str(text_data[2].resolve()), "digest": base_digest(tiny(320))}}
    assert {k for k in a["state_dict"] if k.startswith("model.")} == {
        f"model.{name}.{m}" for name, layer in apply_lora(tiny(320), 4).named_modules()
        if isinstance(layer, LoRALinear) for m in ("lora_A", "lora_B")}
    assert check_digest(ckpt(split, 10)) is True

    full = tmp_path / "full"  # the same model fine-tuned in full, one step
    assert main(text_args(full, text_data, 1)) == 0
    assert ckpt(split, 10).stat().st_size < 0.2 * ckpt(full, 1).stat().st_size
    capsys.readouterr()

    # LoRA switched off or on, or other adapters, at a resume: one line pointing to --model.init_from
    err = one_line(capsys, main(text_args(split, text_data, 12, ["--ckpt_path", "last"])))
    assert "holds LoRA adapters (rank 4) and this run trains every weight; resume with --model.lora_rank 4, or start " \
           f"a new run (another --name) with --model.init_from {ckpt(split, 10)}" in err
    err = one_line(capsys, main(text_args(full, text_data, 2, [*LORA, "--ckpt_path", "last"])))
    assert "trained every weight and this run asks for LoRA (--model.lora_rank 4); resume without --model.lora_rank, " \
           f"or start a new run (another --name) with --model.init_from {ckpt(full, 1)} --model.lora_rank 4" in err
    err = one_line(capsys, main(text_args(split, text_data, 12, ["--model.lora_rank", "8", "--ckpt_path", "last"])))
    assert "holds other LoRA adapters than this run asks for (--model.lora_rank 4 -> 8; --model.lora_alpha 8.0 -> " \
           "16.0); resume with the checkpoint's, or start a new run (another --name) with --model.init_from" in err

    # other base weights than those the adapters were trained on: refused at a resume
    other = save_base(tiny(320, seed=7), tmp_path / "other", str(text_data[1]))
    err = one_line(capsys, main(text_args(split, text_data, 12, [*LORA, "--ckpt_path", "last",
                                                                 "--model.init_from", str(other)])))
    assert f"the base weights from --model.init_from {other} are not those the adapters of {ckpt(split, 10)} " \
           "were trained on" in err


def test_a_chat_run_with_lora_resumes_bit_exact(tmp_path, sft_data, chat_base):  # noqa: F811
    """SFT with LoRA: two epochs straight, and stopped at step 5 and resumed: bit for bit."""
    lora = [*LORA, "--model.init_from", str(chat_base), "--trainer.max_epochs", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(sft_args(straight, sft_data, lora)) == 0
    assert final(straight)["global_step"] >= 8
    assert main(sft_args(split, sft_data, [*lora, "--trainer.max_steps", "5"])) == 0
    assert main(sft_args(split, sft_data, [*lora, "--ckpt_path", "last"])) == 0
    fitutil.assert_same_state(final(straight), final(split), loops=True)


def test_exports_merge_the_adapters(tmp_path, text_data, capsys):
    """`convert ckpt` and `convert to-gguf` of a LoRA checkpoint: plain models with the adapters
    merged, which transformers loads alone and whose logits are the adapted model's."""
    from transformers import AutoModelForCausalLM

    from smollm.checkpoint import load_model
    from smollm.convert import main as convert
    from smollm.gguf import load_gguf

    run = tmp_path / "run"
    assert main(text_args(run, text_data, 6, [*LORA, "--model.learning_rate", "0.05"])) == 0
    path = ckpt(run)
    merged = load_model(path).model
    assert not lora_layers(merged)
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        want = merged(ids)
        assert (want - tiny(320)(ids)).abs().max() > 1e-3  # the adapters trained, and are in it
    assert convert(["ckpt", str(path), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, want, rtol=0, atol=1e-5)
    assert convert(["to-gguf", str(path), str(tmp_path / "m.gguf")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_gguf(tmp_path / "m.gguf")[0](ids), want, rtol=0, atol=1e-5)

    # the base gone: the adapters alone are no model, said in one line
    moved = tmp_path / "moved"
    text_data[2].rename(moved)
    try:
        capsys.readouterr()
        err = one_line(capsys, convert(["ckpt", str(path), str(tmp_path / "hf2")]))
        assert f"holds LoRA adapters over the base weights {text_data[2].resolve()}, which cannot be loaded" in err
    finally:
        moved.rename(text_data[2])


def test_lora_on_a_random_init_trains_the_adapters_alone_resumes_exactly_and_keeps_its_base(tmp_path, text_data,
                                                                                           capsys):
    """Pretraining with adapters on a random init (no --model.init_from): only the adapters move, and
    the base, named nowhere else, is held in the checkpoint beside them; 4 steps = 2 + 2 bit for bit;
    whatever reads the checkpoint gets that base with the adapters merged; the checkpoint is refused
    in one line by a resume that gives a base of its own."""
    from smollm.checkpoint import load_model, read_checkpoint

    corpus, tok, base = text_data

    def args(root: Path, steps: int, extra: list[str] = ()) -> list[str]:
        return fitutil.fit_args(root, corpus, tok, steps, extra=[*LORA, *extra])

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(args(straight, 4)) == 0
    assert main(args(split, 2)) == 0
    first = read_checkpoint(ckpt(split, 2))
    assert main(args(split, 4, ["--ckpt_path", "last"])) == 0
    a, b = read_checkpoint(ckpt(straight, 4)), read_checkpoint(ckpt(split, 4))
    fitutil.assert_same_state(a, b, loops=True)
    assert a["smollm"]["lora"]["base"]["init_from"] is None
    moved = {k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], first["state_dict"][k])}
    assert moved and all(k.endswith((".lora_A", ".lora_B")) for k in moved)  # the base is frozen
    merged = load_model(ckpt(split, 4)).model
    plain = SmolLM(merged.config)
    state = {k[len("model."):]: v for k, v in a["state_dict"].items() if k.startswith("model.")}
    plain.load_state_dict({k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))})
    apply_lora(plain, 4)
    plain.load_state_dict(state)
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        assert torch.allclose(merged(ids), plain.eval()(ids), atol=1e-5)
    capsys.readouterr()
    err = one_line(capsys, main(args(split, 6, ["--ckpt_path", "last", "--model.init_from", str(base)])))
    assert "were trained on a random init that the checkpoint holds; resume without --model.init_from" in err


def test_a_configs_muon_default_trains_the_adapters_with_adamw(tmp_path, text_data, capsys):
    """The configs say Muon; under LoRA the hidden-layer matrices Muon takes are frozen, so the command
    line trains the adapters with AdamW, says so, and records AdamW (a resume finds the same)."""
    from smollm.checkpoint import read_checkpoint

    assert main(text_args(tmp_path, text_data, 1, [*LORA, "--model.optimizer", "muon"])) == 0
    assert "LoRA: the adapters train with AdamW (--model.optimizer muon takes whole hidden-layer matrices" \
        in capsys.readouterr().err
    saved = read_checkpoint(ckpt(tmp_path, 1))
    assert saved["hyper_parameters"]["optimizer"] == "adamw"
    assert [g["name"] for g in saved["optimizer_states"][0]["param_groups"]] == ["decay", "no_decay"]
    assert main(text_args(tmp_path, text_data, 2, [*LORA, "--model.optimizer", "muon", "--ckpt_path", "last"])) == 0


@pytest.mark.parametrize("extra, says", [
    (["--model.lora_rank", "0"], "--model.lora_rank 0: the rank of LoRA's adapters must be a positive whole number"),
    (["--model.lora_rank", "-4"], "--model.lora_rank -4: the rank of LoRA's adapters must be a positive whole number"),
    ([*LORA, "--model.lora_alpha", "0"], "--model.lora_alpha 0"),
    ([*LORA, "--model.lora_dropout", "1.0"], "--model.lora_dropout 1.0: a probability in [0, 1)"),
    ([*LORA, "--model.lora_targets", '["q_proj", "qproj"]'],
     "--model.lora_targets: 'qproj' names no linear layer of the model; the decoder layers' are q_proj, k_proj"),
    ([*LORA, "--model.lora_targets", '["lm_head"]'], "it shares the embedding's matrix: tied weights stay frozen"),
])
def test_bad_lora_options_are_one_line(tmp_path, text_data, capsys, extra, says):
    err = one_line(capsys, main(text_args(tmp_path, text_data, 2, extra)))
    assert says in err, err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_dpo_with_lora_scores_its_reference_with_the_adapters_off_and_resumes_bit_exact(tmp_path, dpo_data,  # noqa: F811
                                                                                         capsys):
    """DPO with LoRA holds one model: its reference log-probabilities are the base's (the adapters
    switched off), so a run starts at ln 2; 6 steps straight and 3 + 3 resumed: bit for bit."""
    from smollm.checkpoint import load_model
    from smollm.module import LitSmolLM

    data = dpo_data
    module = LitSmolLM(preset="tiny", config_overrides={"vocab_size": 640}, init_from=str(data[2]), objective="dpo",
                       lora_rank=4)
    assert module.reference.model is None and module.reference.adapters  # no second copy
    with torch.no_grad():
        for layer in lora_layers(module.model):
            layer.lora_B.normal_()
    ids, mask = torch.randint(0, 640, (4, 17)), torch.ones(4, 16, dtype=torch.bool)
    base = load_model(data[2]).model
    want = base.sequence_logps(ids[:, :-1], ids[:, 1:], mask)
    assert torch.equal(module.reference_logps({"input_ids": ids, "loss_mask": mask}), want)
    assert not torch.allclose(module.model.sequence_logps(ids[:, :-1], ids[:, 1:], mask), want)  # the policy moved

    lora = [*LORA, "--model.learning_rate", "0.01"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(dpo_args(straight, data, [*lora, "--trainer.max_steps", "6"])) == 0
    assert "validation at the start: loss 0.6931" in capsys.readouterr().err
    assert main(dpo_args(split, data, [*lora, "--trainer.max_steps", "3"])) == 0
    assert main(dpo_args(split, data, [*lora, "--trainer.max_steps", "6", "--ckpt_path", "last"])) == 0
    fitutil.assert_same_state(final(straight), final(split), loops=True)
    assert final(split)["smollm"]["dpo_reference"] == {"kind": "adapters off"}


# ---- two processes ----

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["text", "chat"])
def test_two_processes_train_the_adapters_as_one(tmp_path, text_data, sft_data, chat_base, kind):  # noqa: F811
    """The same global batch on one process and on two (DDP): the same adapters after 3 steps, to
    summation order; the base stays as it was."""
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    one, two = tmp_path / "one", tmp_path / "two"
    if kind == "text":
        def args(root, extra):
            return text_args(root, text_data, 3, [*LORA, "--data.global_batch_size", "8", *extra])
    else:
        def args(root, extra):
            return sft_args(root, sft_data, [*LORA, "--model.init_from", str(chat_base), "--trainer.max_steps", "3",
                                             *extra])
    assert main(args(one, [])) == 0
    result = fitutil.run_ranks(args(two, ddp))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = torch.load(ckpt(one), weights_only=True), torch.load(ckpt(two), weights_only=True)
    assert a["global_step"] == b["global_step"] == 3 and a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=2e-5, msg=key)
    assert a["smollm"]["lora"] == b["smollm"]["lora"]
    assert any(v.abs().max() > 0 for k, v in a["state_dict"].items() if k.endswith("lora_B"))  # B has trained


def test_lora_configs_parse_with_their_defaults(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(fitutil.ROOT / "configs" / "sft-135m.yaml"), "--model.lora_rank", "16",
              "--print_config"])
    assert exit.value.code in (0, None)
    out = capsys.readouterr().out
    assert "lora_rank: 16" in out and "lora_alpha: null" in out and "lora_dropout: 0.0" in out
    assert "- q_proj" in out and "- down_proj" in out

