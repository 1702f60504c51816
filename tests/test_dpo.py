"""DPO on preference pairs (`--model.objective dpo --data.format preference`): pairs in every form
become the chat template's tokens with the loss on the replies, the loss starts at ln 2 and the
rewards are logged, bad pairs and options are one line, a run resumes bit for bit (with a frozen
reference copy and with precomputed reference log-probabilities), and two processes train as one.

A tiny byte-level BPE with ChatML's template (tests/test_data_chat.py), made-up pairs and tiny
random weights (the reference) stand in for SmolLM2 and UltraFeedback; tests/test_dpo_parity.py
compares with TRL's DPOTrainer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import fitutil
from smollm.data.chat import preference_pair
from smollm.dpo import preference_loss
from smollm.errors import DataError
from smollm.fit import main
from test_data_chat import chat_tokenizer, conversations, write_jsonl
from test_sft import final, one_line

VOCAB = '{"vocab_size": 640}'


def make_pairs(n: int, seed: int = 7) -> list[dict]:
    """`n` pairs in the forms UltraFeedback-binarized and others use: a string prompt with whole
    conversations as replies, messages with string replies, and a system message."""
    convs = conversations(n + 1, seed=seed)
    out = []
    for i in range(n):
        user = next(m for m in convs[i] if m["role"] == "user")["content"]
        chosen = next(m for m in convs[i] if m["role"] == "assistant")["content"]
        rejected = next(m for m in convs[i + 1] if m["role"] == "assistant")["content"]
        if i % 3 == 0:  # UltraFeedback-binarized
            out.append({"prompt": user, "chosen": [{"role": "user", "content": user},
                                                   {"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "user", "content": user}, {"role": "assistant", "content": rejected}]})
        elif i % 3 == 1:
            out.append({"prompt": [{"role": "user", "content": user}], "chosen": chosen, "rejected": rejected})
        else:
            out.append({"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": user}],
                        "chosen": [{"role": "assistant", "content": chosen}], "rejected": rejected})
    return out


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory) -> tuple[Path, str, Path]:
    """(a jsonl of 40 pairs, a ChatML tokenizer folder, tiny random weights as a Hugging Face folder)."""
    from transformers import AutoTokenizer

    from smollm import ModelConfig, SmolLM
    from smollm.hf import save_hf

    folder = tmp_path_factory.mktemp("dpo")
    pairs = write_jsonl(folder / "pairs.jsonl", make_pairs(40))
    tok = chat_tokenizer(folder / "tok")
    torch.manual_seed(0)
    init = save_hf(SmolLM(ModelConfig.from_name("tiny", vocab_size=640)), folder / "init",
                   tokenizer=AutoTokenizer.from_pretrained(tok))
    return pairs, tok, Path(init)


def dpo_args(root: Path, data, extra: list[str] = ()) -> list[str]:
    """A tiny DPO run: 4 pairs a step in micro-batches of 2, beta 0.5, from tiny random weights."""
    pairs, tok, init = data
    return [
        "--config", str(fitutil.ROOT / "configs" / "tiny.yaml"),
        "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", "10",
        "--trainer.val_check_interval", "1000",
        "--trainer.limit_val_batches", "1",
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--model.config_overrides", VOCAB,
        "--model.init_from", str(init),
        "--model.objective", "dpo",
        "--model.dpo_beta", "0.5",
        "--model.learning_rate", "0.003",
        "--model.optimizer", "adamw",  # pinned, whatever tiny.yaml's demo uses (LoRA refuses Muon)
        "--model.schedule", "cosine",
        "--model.warmup_steps", "2",
        "--model.decay_steps", "10",
        "--model.sample_tokens", "2",
        "--data.format", "preference",
        "--data.files", json.dumps([str(pairs)]),
        "--data.tokenizer", tok,
        "--data.cache_dir", str(root.parent / "cache"),
        "--data.seq_len", "128",
        "--data.batch_size", "2",
        "--data.global_batch_size", "4",
        "--data.val_fraction", "0.1",
        "--checkpoint.every_n_train_steps", "1000",
        *extra,
    ]


# ---- pairs -> tokens ----

def test_a_pair_in_any_form_is_prompt_and_two_replies():
    user, system = {"role": "user", "content": "Q"}, {"role": "system", "content": "S"}
    a, b = {"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}
    want = ([user], [a], [b])
    assert preference_pair({"prompt": "Q", "chosen": "A", "rejected": "B"}, "r") == want
    assert preference_pair({"prompt": "Q", "chosen": [user, a], "rejected": [user, b]}, "r") == want  # UltraFeedback
    assert preference_pair({"prompt": [user], "chosen": [a], "rejected": "B"}, "r") == want
    assert preference_pair({"prompt": [system, user], "chosen": [system, user, a], "rejected": [b]}, "r") == (
        [system, user], [a], [b])


@pytest.mark.parametrize("record, says", [
    ({"prompt": "Q", "chosen": "A"}, "f.jsonl line 3 has no 'rejected' (its fields: 'prompt', 'chosen')"),
    ({"chosen": "A", "rejected": "B"}, "f.jsonl line 3 has no 'prompt'"),
    ({"prompt": "Q", "chosen": "A", "rejected": "A"}, "'chosen' and 'rejected' are the same reply"),
    ({"prompt": "Q", "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
      "rejected": "A"}, "'chosen' and 'rejected' are the same reply"),
    ({"prompt": "Q", "chosen": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "A"}],
      "rejected": "B"}, "'chosen' starts with a user message that is not the prompt's"),
    ({"prompt": "Q", "chosen": "A", "rejected": [{"role": "user", "content": "Q"}]}, "'rejected' holds no assistant"),
])
def test_a_bad_pair_is_one_line_naming_the_record(record, says):
    with pytest.raises(DataError, match=None) as e:
        preference_pair(record, "f.jsonl line 3")
    assert says in str(e.value) and "\n" not in str(e.value)


def test_each_side_is_the_chat_templates_tokens_with_loss_on_its_reply(tmp_path, dpo_data):
    from transformers import AutoTokenizer

    from smollm.data import TextDataModule

    pairs, tok, _ = dpo_data
    hf = AutoTokenizer.from_pretrained(tok)
    dm = TextDataModule(files=[str(pairs)], tokenizer=tok, cache_dir=str(tmp_path / "cache"), seq_len=256,
                        batch_size=3, format="preference", val_fraction=0.1, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    batch = dm._loader(dm.train_dataset, None).__iter__().__next__()
    P = len(batch["index"])
    assert batch["input_ids"].shape[0] == 2 * P and batch["loss_mask"].shape == (2 * P, batch["input_ids"].shape[1] - 1)
    for row in range(2 * P):
        k, side = int(batch["index"][row % P]), ("chosen", "rejected")[row // P]
        prompt, chosen, rejected = preference_pair(records[k], "r")
        reply = (chosen, rejected)[row // P]
        full = hf.apply_chat_template(prompt + reply, tokenize=True)["input_ids"]
        assert full[-1] == hf.convert_tokens_to_ids("\n") or hf.decode(full[-1:]) == "\n"  # ChatML's separator...
        ids = batch["input_ids"][row].tolist()
        n = len(full) - 1  # ...which the sequence leaves out: it ends with <|im_end|>
        assert ids[:n] == full[:n] and all(t == hf.eos_token_id for t in ids[n:]), (k, side)
        scored = [t for t, m in zip(ids[1:], batch["loss_mask"][row].tolist()) if m]
        assert hf.decode(scored) == reply[-1]["content"] + "<|im_end|>", (k, side)


# ---- bad input: one line ----

def test_bad_pairs_and_options_are_one_line(tmp_path, dpo_data, capsys):
    pairs, tok, init = dpo_data
    bad = write_jsonl(tmp_path / "bad.jsonl", make_pairs(5)[:2] + [{"prompt": "Q", "chosen": "A", "rejected": "A"}])
    args = dpo_args(tmp_path / "a", dpo_data, ["--data.files", json.dumps([str(bad)])])
    assert f"{bad} line 3: 'chosen' and 'rejected' are the same reply" in one_line(capsys, main(args))
    bad.write_text(json.dumps({"prompt": "Q", "chosen": "A"}) + "\n")
    assert f"{bad} line 1 has no 'rejected'" in one_line(capsys, main(args))
    err = one_line(capsys, main(dpo_args(tmp_path / "b", dpo_data, ["--data.format", "chat"])))
    assert "--model.objective dpo trains on preference pairs, but --data.format is chat" in err
    err = one_line(capsys, main(dpo_args(tmp_path / "c", dpo_data, ["--model.objective", "next_token"])))
    assert "--data.format preference holds pairs for DPO, but --model.objective is next_token" in err
    err = one_line(capsys, main(dpo_args(tmp_path / "d", dpo_data, ["--model.init_from", "null"])))
    assert "--model.objective dpo fine-tunes a model against its own starting point" in err
    assert main(dpo_args(tmp_path / "e", dpo_data, ["--model.dpo_loss", "sigmod"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.dpo_loss" in err[0] and "sigmoid" in err[0], err
    err = one_line(capsys, main(dpo_args(tmp_path / "f", dpo_data, ["--model.dpo_beta", "0"])))
    assert "--model.dpo_beta must be a positive number" in err


# ---- the objective ----

def test_the_losses_are_trls_formulas():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.5])
    rc, rr = torch.tensor([-3.5, -5.0]), torch.tensor([-4.0, -4.0])
    d = (pc - rc) - (pr - rr)
    loss, chosen, rejected = preference_loss(pc, pr, rc, rr, 0.5, "sigmoid")
    torch.testing.assert_close(loss, -torch.nn.functional.logsigmoid(0.5 * d))
    torch.testing.assert_close(chosen - rejected, 0.5 * d)
    torch.testing.assert_close(preference_loss(pc, pr, rc, rr, 0.5, "hinge")[0], torch.relu(1 - 0.5 * d))
    n_c, n_r = torch.tensor([2, 4]), torch.tensor([5, 1])
    ipo = ((pc - rc) / n_c - (pr - rr) / n_r - 1 / (2 * 0.5)) ** 2
    torch.testing.assert_close(preference_loss(pc, pr, rc, rr, 0.5, "ipo", n_c, n_r)[0], ipo)
    same = preference_loss(pc, pr, pc, pr, 0.1, "sigmoid")[0]
    torch.testing.assert_close(same, torch.full((2,), math.log(2)))  # the policy is the reference: ln 2


def test_a_dpo_run_starts_at_ln2_logs_rewards_and_resumes_bit_exact(tmp_path, dpo_data, capsys):
    """10 steps straight, and 5 + 5 resumed: the same weights, optimizer state and data position,
    bit for bit. The first step's loss is ln 2 (the policy is the reference) and TensorBoard gets
    TRL's reward metrics. The frozen reference is rebuilt from init_from on resume, and checked."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    rec = tmp_path / "steps.jsonl"
    recorder = ["--trainer.callbacks+=" + json.dumps({"class_path": "fitutil.MetricsRecorder",
                                                      "init_args": {"path": str(rec)}})]
    assert main(dpo_args(straight, dpo_data, recorder)) == 0
    err = capsys.readouterr().err
    assert "validation at the start: loss 0.6931, reward accuracy 0.00, margin 0.0000" in err
    records = fitutil.read_records(rec)
    steps = [r for r in records if r["at"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 11))
    assert steps[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["train/rewards/margins"] == 0 and steps[0]["train/rewards/accuracies"] == 0
    assert records[-1]["at"] == "val" and records[-1]["step"] == 10
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert f"train/{name}" in steps[-1] and f"val/{name}" in records[-1]
    assert steps[-1]["train/rewards/margins"] > 0  # it learns to prefer the chosen replies
    assert main(dpo_args(split, dpo_data, ["--trainer.max_steps", "5"])) == 0
    assert main(dpo_args(split, dpo_data, ["--ckpt_path", "last"])) == 0
    fitutil.assert_same_state(final(straight), final(split), loops=True)
    assert final(split)["smollm"]["dpo_reference"]["kind"] == "frozen"
    assert not any(k.startswith("reference") for k in final(split)["state_dict"])  # not trained, not saved
    from smollm.evaluate import main as evaluate
    capsys.readouterr()
    err = one_line(capsys, evaluate(["--checkpoint", str(split / "checkpoints" / "tiny" / "last.ckpt")]))
    assert "evaluate scores text and conversations, not preference pairs" in err
    # the reference's weights changed since the run began: one line
    _, _, init = dpo_data
    changed = tmp_path / "init"
    import shutil

    from safetensors.torch import load_file, save_file
    shutil.copytree(init, changed)
    weights = load_file(changed / "model.safetensors")
    weights["model.norm.weight"] += 1e-3
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    state = final(split)
    state["hyper_parameters"]["init_from"] = str(changed)
    torch.save(state, tmp_path / "moved.ckpt")
    capsys.readouterr()
    err = one_line(capsys, main(dpo_args(tmp_path / "moved", dpo_data, ["--ckpt_path", str(tmp_path / "moved.ckpt"),
                                                                         "--trainer.max_steps", "11"])))
    assert "the DPO reference rebuilt from --model.init_from is not the one the checkpoint's run started from" in err


def test_a_precomputed_reference_trains_as_the_frozen_copy_and_resumes_bit_exact(tmp_path, dpo_data, capsys):
    frozen, straight, split = tmp_path / "frozen", tmp_path / "straight", tmp_path / "split"
    pre = ["--model.dpo_precompute_reference", "true", "--trainer.max_steps", "6"]
    assert main(dpo_args(frozen, dpo_data, ["--trainer.max_steps", "6"])) == 0
    assert main(dpo_args(straight, dpo_data, pre)) == 0
    assert "log-probabilities precomputed under the initial weights" in capsys.readouterr().err
    a, b = final(frozen), final(straight)
    for key, value in a["state_dict"].items():  # the same training, to the padding's summation order
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-5, msg=key)
    table = b["smollm"]["dpo_reference"]["logps"]
    assert table.shape == (40, 2) and (table < 0).all()
    assert main(dpo_args(split, dpo_data, [*pre, "--trainer.max_steps", "3"])) == 0
    assert main(dpo_args(split, dpo_data, [*pre, "--ckpt_path", "last"])) == 0
    fitutil.assert_same_state(b, final(split), loops=True)
    assert torch.equal(final(split)["smollm"]["dpo_reference"]["logps"], table)


@pytest.mark.slow
def test_two_processes_train_a_dpo_run_as_one(tmp_path, dpo_data):
    """The same global batch of 4 pairs on one process (micro-batches of 2, accumulated) and on two
    (one micro-batch of 2 each), with the frozen reference and with the precomputed one (scored half
    by each process): the same weights after 3 steps, to summation order."""
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    for name, extra in (("frozen", []), ("precomputed", ["--model.dpo_precompute_reference", "true"])):
        one, two = tmp_path / f"{name}-one", tmp_path / f"{name}-two"
        assert main(dpo_args(one, dpo_data, ["--trainer.max_steps", "3", *extra])) == 0
        result = fitutil.run_ranks(dpo_args(two, dpo_data, ["--trainer.max_steps", "3", *extra, *ddp]))
        assert result.returncode == 0, result.stderr[-3000:]
        a, b = final(one), final(two)
        assert a["global_step"] == b["global_step"] == 3
        for key, value in a["state_dict"].items():
            torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=2e-5, msg=f"{name} {key}")


def test_the_recipe_config_parses(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(fitutil.ROOT / "configs" / "dpo-135m.yaml"), "--print_config"])
    assert exit.value.code in (0, None)
    out = capsys.readouterr().out
    for says in ("objective: dpo", "dpo_beta: 0.5", "learning_rate: 1.0e-06", "max_epochs: 2", "seq_len: 1023",
                 "format: preference", "init_from: smollm2", "global_batch_size: 128"):
        assert says in out, says
