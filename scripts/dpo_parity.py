"""DPO parity with TRL: smollm's DPO and TRL's DPOTrainer, step by step, on the same weights, preference
pairs and hyper-parameters.

    python scripts/dpo_parity.py [--model HF_DIR] [--steps 10] [--lr 1e-6] [--beta 0.5] [--json FILE]

Both sides start from one Hugging Face folder (default: the real SmolLM2-135M-Instruct GGUF of
smollm.assets, converted as `python -m smollm.convert gguf` does), train on the pairs below (or
--pairs FILE.jsonl of {prompt, chosen, rejected} records) with the sigmoid loss (or --loss ipo|hinge),
and print each optimizer step's loss and rewards (chosen, rejected, margin, accuracy) and their
differences.

- smollm: `python -m smollm.fit` in-process, `--model.objective dpo --data.format preference`; its
  reference is the frozen initial weights (or, with --precompute, their log-probabilities scored
  before training).
- TRL: DPOTrainer with its reference made from the same folder (or precompute_ref_log_probs), the
  pairs in the order smollm trained them (train_sampling_strategy "sequential"), no truncation
  (max_length above the longest sequence), and transformers' embedding without its padding_idx
  (scripts/sft_parity.py tells why: SmolLM2-Instruct pads with <|im_end|>, which every reply holds).
- The tokens: TRL renders prompt + reply with the chat template and scores everything after the
  prompt, which with SmolLM2's ChatML is the reply, its <|im_end|> and the newline ChatML writes after
  every turn. smollm ends each side with the reply's <|im_end|> (the model never generates what comes
  after it; smollm.data.chat). `without_final_separator` gives TRL the template that writes no newline
  after a conversation's last assistant turn (every other turn and the prompt render as before), so
  both score exactly the reply and its <|im_end|>; `compare` checks each row's ids and scored targets.
- Both: AdamW (betas, eps 1e-8, weight decay on matrices and the tied embedding, not on norms), cosine
  from the peak to 0 over the run without warmup, clipping at the same global norm, float32 on CPU,
  micro-batches of `batch_size` pairs and `accumulation` of them per step. A step's loss and rewards
  are means over its pairs (TRL: the mean of its micro-batches' means; they hold equal numbers of pairs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [p for p in (str(ROOT), str(Path(__file__).resolve().parent)) if p not in sys.path]

from sft_parity import convert_asset  # noqa: E402

# Pairs in UltraFeedback-binarized's forms (a string prompt with whole conversations as replies, and
# messages), replies of different lengths, some pairs sharing their prompt.
PAIRS: list[dict[str, Any]] = [
    {"prompt": "What is the capital of France?",
     "chosen": [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."}],
     "rejected": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "France is a country in Europe with many cities."}]},
    {"prompt": "Why is the sky blue?",
     "chosen": "Sunlight is scattered by the air, and blue light, with its short wavelength, is scattered most.",
     "rejected": "Because it reflects the ocean."},
    {"prompt": [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Which planet is the largest in the solar system?"}],
     "chosen": "Jupiter.", "rejected": "Saturn, because of its rings."},
    {"prompt": "Give me a tip for sleeping better.",
     "chosen": "Go to bed at the same time every night and keep the room dark and cool.",
     "rejected": "Drink a strong coffee before bed."},
    {"prompt": "How many legs does a spider have?", "chosen": "Eight.", "rejected": "Six, like every insect."},
    {"prompt": "Write a haiku about autumn.",
     "chosen": "Red leaves drift and fall,\nthe cold wind hums through bare trees,\nthe year breathes slowly.",
     "rejected": "Autumn is a season. Leaves fall. It is cold."},
    {"prompt": "What is 12 times 12?", "chosen": "144.", "rejected": "124."},
    {"prompt": "Explain what a hash table is.",
     "chosen": "A hash table stores values under keys; a hash function turns each key into an index of an array, "
               "so a look-up takes about the same time however many entries it holds.",
     "rejected": "It is a table where you put hashes."},
    {"prompt": "Translate 'good morning' into Spanish.", "chosen": "Buenos días.", "rejected": "Buenas noches."},
    {"prompt": "What should I pack for a day of hiking?",
     "chosen": "Water, snacks, a map, sunscreen, a rain jacket and good shoes.",
     "rejected": "Nothing, hiking is easy."},
    {"prompt": "Is a tomato a fruit or a vegetable?", "chosen": "Botanically, a fruit.",
     "rejected": "A vegetable, always."},
    {"prompt": "Summarize the water cycle.",
     "chosen": "Water evaporates, condenses into clouds, falls as rain or snow and flows back to the sea.",
     "rejected": "Water is wet."},
]

# SmolLM2's ChatML writes every turn with this one expression; TRL's variant writes no newline after a
# conversation's last turn when that turn is the assistant's (the reply's end, where smollm stops).
_TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
_ENDS = ("{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'}}"
         "{% if not (loop.last and message['role'] == 'assistant') %}{{ '\n' }}{% endif %}")


def without_final_separator(template: str) -> str:
    """SmolLM2's ChatML template without the newline after a conversation's last assistant turn."""
    if template.count(_TURN) != 1:
        raise ValueError("not SmolLM2's ChatML template: its turn expression is not found once")
    return template.replace(_TURN, _ENDS)


@dataclass
class Hyper:
    """What both sides train with."""

    steps: int = 10
    batch_size: int = 2
    accumulation: int = 2
    lr: float = 1e-6
    beta: float = 0.5
    loss: str = "sigmoid"
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 1234
    precompute: bool = False


METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


class StepRecorder(L.Callback):
    """smollm's side: for each micro-batch, the step, its pairs and rows (ids, loss mask); for each
    step, its loss and rewards. JSON lines at `path`."""

    def __init__(self, path: str) -> None:
        self.path, self.step = path, 0

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step + 1
        self._write({"step": self.step, "pairs": batch["index"].tolist(), "input_ids": batch["input_ids"].tolist(),
                     "loss_mask": batch["loss_mask"].tolist()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:  # the step's last micro-batch: the optimizer has stepped
            self._write({"step": self.step, **{m: float(trainer.callback_metrics[f"train/{m}"]) for m in METRICS}})


def write_pairs(path: Path, pairs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def run_smollm(model_dir: Path, tokenizer_dir: Path, records: Path, seq_len: int, work: Path, hp: Hyper,
               preset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """smollm.fit in-process from `model_dir`: {"steps": per step {loss, rewards...}, "micro": per
    micro-batch {step, pairs, input_ids, loss_mask}}."""
    from smollm.fit import main as fit

    record = work / "smollm-steps.jsonl"
    record.unlink(missing_ok=True)
    big = str(10 ** 6)
    args = [
        "--seed_everything", str(hp.seed),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
        "--trainer.max_steps", str(hp.steps), "--trainer.default_root_dir", str(work / "smollm"),
        "--trainer.val_check_interval", big, "--trainer.num_sanity_val_steps", "0",
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
        "--checkpoint.every_n_train_steps", big,
        "--model.preset", preset, "--model.config_overrides", json.dumps(overrides or {}),
        "--model.init_from", str(model_dir),
        "--model.objective", "dpo", "--model.dpo_beta", str(hp.beta), "--model.dpo_loss", hp.loss,
        "--model.dpo_precompute_reference", str(hp.precompute).lower(),
        "--model.learning_rate", str(hp.lr), "--model.warmup_steps", "0", "--model.decay_steps", str(hp.steps),
        "--model.schedule", "cosine", "--model.min_lr_ratio", "0",
        "--model.betas", json.dumps(list(hp.betas)), "--model.weight_decay", str(hp.weight_decay),
        "--model.grad_clip", str(hp.grad_clip), "--model.sample_tokens", "1",
        "--data.format", "preference", "--data.files", json.dumps([str(records)]),
        "--data.tokenizer", str(tokenizer_dir), "--data.overlong", "error",
        "--data.seq_len", str(seq_len), "--data.batch_size", str(hp.batch_size),
        "--data.global_batch_size", str(hp.batch_size * hp.accumulation), "--data.val_fraction", "0.05",
        "--data.num_workers", "0", "--data.seed", str(hp.seed),
        "--data.cache_dir", str(work / "cache"),
        "--trainer.callbacks+=" + json.dumps({"class_path": "dpo_parity.StepRecorder",
                                              "init_args": {"path": str(record)}}),
    ]
    if fit(args) != 0:
        raise RuntimeError("smollm.fit failed (its error is above)")
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    return {"steps": [r for r in lines if "loss" in r], "micro": [r for r in lines if "loss" not in r]}


def run_trl(model_dir: Path, tokenizer_dir: Path, rows: list[dict[str, Any]], max_length: int, work: Path,
            hp: Hyper) -> dict[str, Any]:
    """TRL's DPOTrainer from `model_dir` on the pairs `rows` in this order: {"steps": per step {loss,
    rewards...} as TRL logs them, "micro": per micro-batch {input_ids, completion_mask, attention_mask}}."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    micro: list[dict[str, Any]] = []

    class Recording(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            micro.append({k: inputs[k].tolist() for k in ("input_ids", "completion_mask", "attention_mask")})
            return super().training_step(model, inputs, num_items_in_batch)

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = without_final_separator(tokenizer.chat_template)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.get_input_embeddings().padding_idx = None  # the same model as smollm's (see the module's docstring)
    args = DPOConfig(
        output_dir=str(work / "trl"), max_steps=hp.steps, per_device_train_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.accumulation, learning_rate=hp.lr, lr_scheduler_type="cosine",
        warmup_steps=0, adam_beta1=hp.betas[0], adam_beta2=hp.betas[1], adam_epsilon=1e-8,
        weight_decay=hp.weight_decay, max_grad_norm=hp.grad_clip, optim="adamw_torch_fused",
        seed=hp.seed, train_sampling_strategy="sequential", dataloader_num_workers=0,
        beta=hp.beta, loss_type=[hp.loss], max_length=max_length, precompute_ref_log_probs=hp.precompute,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    # One form for every row (a dataset's column holds one type): the prompt's messages and each reply's,
    # which TRL renders as prompt + reply, as smollm does.
    from smollm.data.chat import preference_pair

    uniform = [dict(zip(("prompt", "chosen", "rejected"), preference_pair(row, f"pair {i}"))) for i, row in enumerate(rows)]
    trainer = Recording(model=model, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(uniform))
    trainer.train()
    steps = [{m: h[m] for m in METRICS} for h in trainer.state.log_history if "loss" in h]
    return {"steps": steps, "micro": micro}


def trained_rows(smollm: dict[str, Any], pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pairs smollm trained, in its order."""
    return [pairs[k] for m in smollm["micro"] for k in m["pairs"]]


def compare(smollm: dict[str, Any], trl: dict[str, Any]) -> dict[str, Any]:
    """The two runs side by side. Raises unless every row of every micro-batch has the same tokens and
    the same scored targets on both sides. Returns per-step figures and the largest difference of each."""
    ours, theirs = smollm["micro"], trl["micro"]
    if len(ours) != len(theirs):
        raise AssertionError(f"smollm trained {len(ours)} micro-batches, TRL {len(theirs)}")
    for k, (a, b) in enumerate(zip(ours, theirs)):
        for r, (ids, mask) in enumerate(zip(a["input_ids"], a["loss_mask"])):
            n = sum(b["attention_mask"][r])
            if ids[:n] != b["input_ids"][r][:n] or any(mask[n - 1:]):
                raise AssertionError(f"micro-batch {k} row {r}: the tokens differ")
            if mask[:n - 1] != [bool(c) for c in b["completion_mask"][r][1:n]]:
                raise AssertionError(f"micro-batch {k} row {r}: the tokens scored differ")
    rows = []
    for a, b in zip(smollm["steps"], trl["steps"]):
        rows.append({"step": a["step"], **{f"smollm {m}": a[m] for m in METRICS}, **{f"trl {m}": b[m] for m in METRICS},
                     **{f"diff {m}": abs(a[m] - b[m]) for m in METRICS}})
    return {"steps": rows, "max_diff": {m: max(r[f"diff {m}"] for r in rows) for m in METRICS}}


def longest(tokenizer_dir: Path, pairs: list[dict[str, Any]]) -> int:
    """The most tokens of any side of the pairs (prompt + reply through the chat template)."""
    from transformers import AutoTokenizer

    from smollm.data.chat import preference_pair

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    prompts = [preference_pair(p, f"pair {i}") for i, p in enumerate(pairs)]
    return max(len(tok.apply_chat_template(prompt + reply, tokenize=True)["input_ids"])
               for prompt, *replies in prompts for reply in replies)


def parity(model_dir: Path, tokenizer_dir: Path, pairs: list[dict[str, Any]], work: Path, hp: Hyper, preset: str,
           overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Both runs and their comparison."""
    seq_len = longest(tokenizer_dir, pairs)  # a window holds every side whole: nothing truncated on either side
    work.mkdir(parents=True, exist_ok=True)
    records = write_pairs(work / "pairs.jsonl", pairs)
    start = time.perf_counter()
    smollm = run_smollm(model_dir, tokenizer_dir, records, seq_len, work, hp, preset, overrides)
    middle = time.perf_counter()
    trl = run_trl(model_dir, tokenizer_dir, trained_rows(smollm, pairs), seq_len + 1, work, hp)
    seconds = {"smollm": middle - start, "trl": time.perf_counter() - middle}
    return {"seq_len": seq_len, **compare(smollm, trl), "seconds": seconds, "smollm": smollm, "trl": trl}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Hugging Face SmolLM2 folder (default: the real SmolLM2-135M-Instruct "
                                        "GGUF of smollm.assets, converted)")
    parser.add_argument("--preset", default="135m", help="smollm's preset of that model")
    parser.add_argument("--pairs", help="a .jsonl of {prompt, chosen, rejected} records (default: the script's)")
    parser.add_argument("--work", help="a folder for both runs (default: a temporary one)")
    parser.add_argument("--json", help="write the figures to this file")
    for field, value in asdict(Hyper()).items():
        if field == "precompute":
            parser.add_argument("--precompute", action="store_true", help="precompute the reference log-probabilities")
        elif field != "betas":
            parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    a = parser.parse_args()
    hp = Hyper(steps=a.steps, batch_size=a.batch_size, accumulation=a.accumulation, lr=a.lr, beta=a.beta,
               loss=a.loss, weight_decay=a.weight_decay, grad_clip=a.grad_clip, seed=a.seed, precompute=a.precompute)
    pairs = PAIRS if not a.pairs else [json.loads(line) for line in Path(a.pairs).read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = Path(a.model) if a.model else convert_asset(work / "hf")
        result = parity(model_dir, model_dir, pairs, work, hp, a.preset)
    print(f"seq_len {result['seq_len']}, {hp}")
    print("step  loss (smollm / TRL / |diff|)          margin (smollm / TRL / |diff|)       accuracy (smollm / TRL)")
    for r in result["steps"]:
        print(f"{r['step']:>4}  {r['smollm loss']:.6f} {r['trl loss']:.6f} {r['diff loss']:.1e}    "
              f"{r['smollm rewards/margins']:+.6f} {r['trl rewards/margins']:+.6f} {r['diff rewards/margins']:.1e}    "
              f"{r['smollm rewards/accuracies']:.2f} {r['trl rewards/accuracies']:.2f}")
    print("largest differences over {} steps: {} (wall time: smollm {:.0f} s, TRL {:.0f} s)".format(
        len(result["steps"]), ", ".join(f"{m} {v:.1e}" for m, v in result["max_diff"].items()),
        result["seconds"]["smollm"], result["seconds"]["trl"]))
    if a.json:
        Path(a.json).write_text(json.dumps({k: result[k] for k in ("seq_len", "steps", "max_diff", "seconds")}
                                           | {"hyper": asdict(hp)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
