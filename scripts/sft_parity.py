"""SFT parity with TRL: smollm's fine-tuning and TRL's SFTTrainer, step by step, on the same weights,
conversations and hyper-parameters.

    python scripts/sft_parity.py [--model HF_DIR] [--steps 20] [--lr 1e-3] [--json FILE]

Both sides start from one Hugging Face folder (default: the real SmolLM2-135M-Instruct GGUF of
smollm.assets, converted as `python -m smollm.convert gguf` does), train on the conversations below
(or --conversations FILE.jsonl) with the loss on the assistant replies, and print each optimizer
step's training loss and their difference.

- smollm: `python -m smollm.fit` in-process, `--data.format chat`. Its packing puts a conversation
  into a window of seq_len + 1 tokens; with seq_len + 1 the longest conversation's length and every
  conversation longer than half of it, each window holds exactly one conversation (padded at its
  end, the padding its own document): one conversation per row, as TRL without packing.
- TRL: SFTTrainer with packing and padding_free off (and transformers' embedding without its
  padding_idx: see `run_trl`), assistant_only_loss, max_length seq_len + 1
  (nothing is truncated on either side), the micro-batches in the order smollm trained them
  (train_sampling_strategy "sequential" over those conversations). The loss on the replies needs
  {% generation %} markers, which SmolLM2's ChatML template lacks: `with_generation_markers` adds
  them around each reply and its <|im_end|> (the text rendered is unchanged), which are the tokens
  smollm puts loss on.
- Both: AdamW (betas, eps 1e-8, weight decay on matrices and the tied embedding, not on norms),
  cosine from the peak to 0 over the run without warmup, clipping at the same global norm, float32
  on CPU, micro-batches of `batch_size` rows and `accumulation` of them per step. Each step's loss
  is the mean over all its scored tokens (TRL: num_items_in_batch; smollm: LitSmolLM._step), so
  micro-batches that score different numbers of tokens are weighed by them on both sides.

`compare` also checks that the two trained the same tokens with loss on the same ones: each row's
ids and mask, and TRL's num_items_in_batch against smollm's scored tokens per step.
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

# Conversations of similar length (so that smollm packs one per window) whose replies are short or long,
# so that micro-batches score different numbers of tokens. Without a system message, ChatML adds its own.
CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France? I am planning a short trip there next spring "
                                 "and would like to know where most museums are."},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Sunlight is scattered by the molecules of the air, and blue light, with its "
                                      "short wavelength, is scattered much more than red light. So blue light "
                                      "reaches our eyes from every part of the sky."}],
    [{"role": "system", "content": "You are a concise assistant. You answer every question with a single word, "
                                   "and you never explain the answer unless you are asked to."},
     {"role": "user", "content": "Which planet is the largest in the solar system, counting its mass and its "
                                 "diameter, and not only its many moons?"},
     {"role": "assistant", "content": "Jupiter."}],
    [{"role": "user", "content": "Give me a tip for sleeping better."},
     {"role": "assistant", "content": "Go to bed at the same time every night, keep the room dark and cool, and "
                                      "put your phone away half an hour before sleeping."},
     {"role": "user", "content": "Thanks!"},
     {"role": "assistant", "content": "You are welcome. Sleep well."}],
    [{"role": "user", "content": "How many legs does a spider have? My daughter asked me this morning and I "
                                 "was not completely sure about the answer."},
     {"role": "assistant", "content": "Eight."}],
    [{"role": "user", "content": "Write a haiku about autumn."},
     {"role": "assistant", "content": "Red leaves drift and fall,\nthe cold wind hums through bare trees,\n"
                                      "the year breathes slowly."},
     {"role": "user", "content": "Another one, about rain."},
     {"role": "assistant", "content": "Soft rain on the roof,\npuddles hold the grey sky still,\nboots wait by the "
                                      "door."}],
    [{"role": "system", "content": "You are a patient math tutor who helps school children check their "
                                   "homework, one step at a time, and never makes them feel judged."},
     {"role": "user", "content": "What is 12 times 12? Please just give me the number, I want to check my "
                                 "homework."},
     {"role": "assistant", "content": "144."}],
    [{"role": "user", "content": "Explain what a hash table is."},
     {"role": "assistant", "content": "A hash table stores values under keys. A hash function turns each key "
                                      "into an index of an array, so looking a key up takes about the same time "
                                      "however many entries the table holds."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish. I am writing a card for my neighbour "
                                 "who comes from Madrid."},
     {"role": "assistant", "content": "Buenos días."}],
    [{"role": "user", "content": "What should I pack for a day of hiking?"},
     {"role": "assistant", "content": "Water, snacks, a map, sunscreen, a rain jacket, a small first aid kit and "
                                      "good shoes. Tell someone where you are going."},
     {"role": "user", "content": "And for the evening?"},
     {"role": "assistant", "content": "A warm layer and a torch."}],
    [{"role": "user", "content": "Is a tomato a fruit or a vegetable? My friends and I have been arguing "
                                 "about it over dinner for an hour."},
     {"role": "assistant", "content": "A fruit, botanically."}],
    [{"role": "user", "content": "Summarize the water cycle."},
     {"role": "assistant", "content": "Water evaporates from seas and lakes, condenses into clouds, falls as rain "
                                      "or snow, and flows back through rivers and the ground to the sea, where "
                                      "the cycle starts again."}],
]

# SmolLM2's ChatML writes every turn with this one expression; the training variant writes an
# assistant turn's content and <|im_end|> inside {% generation %} (the same text).
_TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
_MARKED = ("{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
           "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}" + _TURN + "{% endif %}")


def with_generation_markers(template: str) -> str:
    """SmolLM2's ChatML template with {% generation %} around each assistant reply and its
    <|im_end|>, as TRL's assistant_only_loss needs; the text it renders is the template's."""
    if template.count(_TURN) != 1:
        raise ValueError("not SmolLM2's ChatML template: its turn expression is not found once")
    return template.replace(_TURN, _MARKED)


@dataclass
class Hyper:
    """What both sides train with."""

    steps: int = 20
    batch_size: int = 2
    accumulation: int = 2
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1234


class StepRecorder(L.Callback):
    """smollm's side: for each micro-batch, the step it belongs to, its rows (ids, loss mask) and
    the conversations in them; for each step, its training loss. JSON lines at `path`."""

    def __init__(self, path: str) -> None:
        self.path, self.step = path, 0

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step = trainer.global_step + 1
        dataset = trainer.datamodule.train_dataset
        self._write({"step": self.step, "documents": [dataset.documents(int(w)).tolist() for w in batch["index"]],
                     "input_ids": batch["input_ids"].tolist(), "loss_mask": batch["loss_mask"].tolist()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:  # the step's last micro-batch: the optimizer has stepped
            self._write({"step": self.step, "loss": float(trainer.callback_metrics["train/loss"])})


def write_conversations(path: Path, conversations: list[list[dict[str, str]]]) -> Path:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return path


def seq_len_for(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> int:
    """The seq_len whose window (seq_len + 1 tokens) holds the longest conversation and no two of
    them: one conversation per row. Raises if the shortest is too short for that."""
    lengths = [len(tokenizer.apply_chat_template(m, tokenize=True)["input_ids"]) for m in conversations]
    if 2 * min(lengths) <= max(lengths):
        raise ValueError(f"conversations of {min(lengths)} to {max(lengths)} tokens: two of them would share a "
                         "window; give conversations within a factor of two in length")
    return max(lengths) - 1


def run_smollm(model_dir: Path, tokenizer_dir: Path, records: Path, seq_len: int, work: Path, hp: Hyper,
               preset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """smollm.fit in-process from `model_dir`: {"losses": per step, "micro": per micro-batch
    {step, documents, input_ids, loss_mask}}."""
    from smollm.fit import main as fit

    record = work / "smollm-steps.jsonl"
    record.unlink(missing_ok=True)
    big = str(10 ** 6)
    args = [
        "--seed_everything", str(hp.seed),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
        "--trainer.max_steps", str(hp.steps), "--trainer.default_root_dir", str(work / "smollm"),
        "--trainer.val_check_interval", big, "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
        "--checkpoint.every_n_train_steps", big,
        "--model.preset", preset, "--model.config_overrides", json.dumps(overrides or {}),
        "--model.init_from", str(model_dir),
        "--model.learning_rate", str(hp.lr), "--model.warmup_steps", "0", "--model.decay_steps", str(hp.steps),
        "--model.schedule", "cosine", "--model.min_lr_ratio", "0",
        "--model.betas", json.dumps(list(hp.betas)), "--model.weight_decay", str(hp.weight_decay),
        "--model.grad_clip", str(hp.grad_clip), "--model.sample_tokens", "1",
        "--data.format", "chat", "--data.files", json.dumps([str(records)]), "--data.tokenizer", str(tokenizer_dir),
        "--data.seq_len", str(seq_len), "--data.batch_size", str(hp.batch_size),
        "--data.global_batch_size", str(hp.batch_size * hp.accumulation), "--data.val_fraction", "0.05",
        "--data.max_val_windows", "1", "--data.num_workers", "0", "--data.seed", str(hp.seed),
        "--data.cache_dir", str(work / "cache"),
        "--trainer.callbacks+=" + json.dumps({"class_path": "sft_parity.StepRecorder",
                                              "init_args": {"path": str(record)}}),
    ]
    if fit(args) != 0:
        raise RuntimeError("smollm.fit failed (its error is above)")
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    return {"losses": [r["loss"] for r in lines if "loss" in r], "micro": [r for r in lines if "loss" not in r]}


def run_trl(model_dir: Path, tokenizer_dir: Path, rows: list[list[dict[str, str]]], seq_len: int, work: Path,
            hp: Hyper, mean_of_means: bool = False) -> dict[str, Any]:
    """TRL's SFTTrainer from `model_dir` on `rows` in this order: {"losses": per step as TRL logs
    them, "micro": per micro-batch {input_ids, labels, attention_mask, num_items_in_batch}}.
    `mean_of_means` withholds num_items_in_batch, so that each micro-batch's loss is its own mean
    and the step's the mean of those (transformers before 4.46): a test shows that the comparison
    tells this normalization from the right one."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    micro: list[dict[str, Any]] = []

    class Recording(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            micro.append({k: inputs[k].tolist() for k in ("input_ids", "labels", "attention_mask")}
                         | {"num_items_in_batch": None if num_items_in_batch is None else int(num_items_in_batch)})
            return super().training_step(model, inputs, num_items_in_batch)

        def _get_num_items_in_batch(self, batch_samples, device):
            return None if mean_of_means else super()._get_num_items_in_batch(batch_samples, device)

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = with_generation_markers(tokenizer.chat_template)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    # transformers' Llama builds its embedding with padding_idx = config.pad_token_id, whose row then
    # gets no gradient from the inputs. SmolLM2-Instruct pads with <|im_end|> (id 2), which every
    # conversation holds: TRL would never train that row as an input, smollm does (its embedding is
    # plain, the padding masked by the loss and attention instead). The same model on both sides:
    model.get_input_embeddings().padding_idx = None
    args = SFTConfig(
        output_dir=str(work / "trl"), max_steps=hp.steps, per_device_train_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.accumulation, learning_rate=hp.lr, lr_scheduler_type="cosine",
        warmup_steps=0, adam_beta1=hp.betas[0], adam_beta2=hp.betas[1], adam_epsilon=1e-8,
        weight_decay=hp.weight_decay, max_grad_norm=hp.grad_clip, optim="adamw_torch_fused",
        seed=hp.seed, train_sampling_strategy="sequential", dataloader_num_workers=0,
        assistant_only_loss=True, packing=False, padding_free=False, max_length=seq_len + 1,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    trainer = Recording(model=model, args=args, processing_class=tokenizer,
                        train_dataset=Dataset.from_list([{"messages": m} for m in rows]))
    trainer.train()
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "micro": micro}


def trained_rows(smollm: dict[str, Any], conversations: list[list[dict[str, str]]]) -> list[list[dict[str, str]]]:
    """The conversations smollm trained, row by row in its order (each window holds one)."""
    rows = []
    for m in smollm["micro"]:
        for docs in m["documents"]:
            if len(docs) != 1:
                raise AssertionError(f"a window holds conversations {docs}, not one: packing is not off")
            rows.append(conversations[docs[0]])
    return rows


def compare(smollm: dict[str, Any], trl: dict[str, Any]) -> dict[str, Any]:
    """The two runs side by side. Raises if they did not train the same tokens with loss on the
    same ones: each row's ids and its scored targets, and each step's count of scored tokens
    (TRL's num_items_in_batch). Returns per-step figures: the losses, their difference and the
    scored tokens of each micro-batch."""
    ours, theirs = smollm["micro"], trl["micro"]
    if len(ours) != len(theirs):
        raise AssertionError(f"smollm trained {len(ours)} micro-batches, TRL {len(theirs)}")
    scored: dict[int, list[int]] = {}
    for k, (a, b) in enumerate(zip(ours, theirs)):
        for r, (ids, mask) in enumerate(zip(a["input_ids"], a["loss_mask"])):
            n = sum(b["attention_mask"][r])
            labels = b["labels"][r]
            if ids[:n] != b["input_ids"][r][:n]:
                raise AssertionError(f"micro-batch {k} row {r}: the tokens differ")
            theirs_mask = [label != -100 for label in labels[1:n]] + [False] * (len(mask) - n + 1)
            if mask != theirs_mask or any(label != -100 for label in labels[n:]):
                raise AssertionError(f"micro-batch {k} row {r}: the tokens that carry loss differ")
        scored.setdefault(a["step"], []).append(sum(map(sum, a["loss_mask"])))
    steps = sorted(scored)
    for i, step in enumerate(steps):
        accumulated = theirs[i * len(scored[step])]["num_items_in_batch"]
        if accumulated != sum(scored[step]):
            raise AssertionError(f"step {step}: TRL normalizes by {accumulated} tokens, smollm scored "
                                 f"{sum(scored[step])}")
    rows = [{"step": s, "scored": scored[s], "smollm": a, "trl": b, "diff": abs(a - b)}
            for s, a, b in zip(steps, smollm["losses"], trl["losses"])]
    return {"steps": rows, "max_diff": max(r["diff"] for r in rows)}


def parity(model_dir: Path, tokenizer_dir: Path, conversations: list[list[dict[str, str]]], work: Path, hp: Hyper,
           preset: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Both runs and their comparison."""
    from transformers import AutoTokenizer

    seq_len = seq_len_for(AutoTokenizer.from_pretrained(str(tokenizer_dir)), conversations)
    records = write_conversations(work / "conversations.jsonl", conversations)
    start = time.perf_counter()
    smollm = run_smollm(model_dir, tokenizer_dir, records, seq_len, work, hp, preset, overrides)
    middle = time.perf_counter()
    trl = run_trl(model_dir, tokenizer_dir, trained_rows(smollm, conversations), seq_len, work, hp)
    seconds = {"smollm": middle - start, "trl": time.perf_counter() - middle}
    return {"seq_len": seq_len, **compare(smollm, trl), "seconds": seconds, "smollm": smollm, "trl": trl}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Hugging Face SmolLM2 folder (default: the real SmolLM2-135M-Instruct "
                                        "GGUF of smollm.assets, converted)")
    parser.add_argument("--preset", default="135m", help="smollm's preset of that model")
    parser.add_argument("--conversations", help="a .jsonl of {'messages': [...]} records (default: the script's)")
    parser.add_argument("--work", help="a folder for both runs (default: a temporary one)")
    parser.add_argument("--json", help="write the figures to this file")
    for field, value in asdict(Hyper()).items():
        if field != "betas":
            parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    a = parser.parse_args()
    hp = Hyper(steps=a.steps, batch_size=a.batch_size, accumulation=a.accumulation, lr=a.lr,
               weight_decay=a.weight_decay, grad_clip=a.grad_clip, seed=a.seed)
    conversations = (CONVERSATIONS if not a.conversations else
                     [json.loads(line)["messages"] for line in Path(a.conversations).read_text().splitlines()])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = Path(a.model) if a.model else convert_asset(work / "hf")
        result = parity(model_dir, model_dir, conversations, work, hp, a.preset)
    print(f"seq_len {result['seq_len']}, {hp}")
    print("step  scored tokens per micro-batch   smollm loss   TRL loss      |difference|")
    for r in result["steps"]:
        print(f"{r['step']:>4}  {str(r['scored']):<30}  {r['smollm']:.6f}      {r['trl']:.6f}      {r['diff']:.2e}")
    print(f"largest difference over {len(result['steps'])} steps: {result['max_diff']:.2e} (wall time: smollm "
          f"{result['seconds']['smollm']:.0f} s, TRL {result['seconds']['trl']:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps({k: result[k] for k in ("seq_len", "steps", "max_diff", "seconds")}
                                           | {"hyper": asdict(hp)}, indent=1) + "\n")
    return 0


def convert_asset(out: Path) -> Path:
    """The offline SmolLM2 GGUF as a Hugging Face folder (`python -m smollm.convert gguf`)."""
    from smollm.assets import smollm2_gguf
    from smollm.convert import main as convert

    if convert(["gguf", str(smollm2_gguf()), str(out)]) != 0:
        raise RuntimeError("smollm.convert gguf failed (its error is above)")
    return out


if __name__ == "__main__":
    sys.exit(main())
