"""How good is a model: held-out loss, perplexity and bits per byte, and lm-evaluation-harness.

    python -m smollm.evaluate --checkpoint PATH [--data.files ... | --data.dataset ...]
        [--data.seq_len N] [--data.batch_size N] [--max_windows N] [--json FILE]
        [--tasks hellaswag,arc_easy,... [--include_path DIR] [--limit N]]

PATH is a `.ckpt` of smollm.fit or a Hugging Face directory. With no data given, it scores a
training checkpoint's held-out validation split: the windows its validation scored, on as many
processes as its run had; a corpus or split that is not the checkpoint's own is refused (its
"validation" windows could be ones it trained on). A Hugging Face directory is scored on the
default corpus's validation split, not called held-out. With data given, it scores all of it. The
`--data.*` options are smollm.fit's, so every source fit reads is accepted; the tokenizer's ids and
`--data.seq_len` must be the model's (at most its positions).

With `--data.format chat` (or a checkpoint of a chat run) the data are conversations, packed into
windows as training packs them, each attended to on its own; the loss, perplexity and bits per
byte are over the tokens that carry loss (the assistant replies and their end-of-turn tokens, as
`--data.loss_on` says), each token weighing the same: what validation during fit reports. A chat
run's held-out split is its last conversations (`--data.val_fraction` of them).

Bits per byte is the total loss in bits over the UTF-8 bytes of the text scored, each token's
bytes measured in context when the cache was built (`smollm.data.cache`; the end-of-document
tokens we insert stand for none): unlike perplexity it compares models with different tokenizers. `--tasks` runs lm-evaluation-harness (the optional extra
`pip install -e ".[eval]"`) on the model converted to transformers in memory, so its scores are
lm-eval's own.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from smollm.cli import command
from smollm.errors import UsageError
from smollm.model import SmolLM
from smollm.output import note


@dataclass
class Score:
    """Held-out figures: mean loss per token (nats), its exp, and bits per UTF-8 byte."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    windows: int


@torch.no_grad()
def score(model: SmolLM, batches: Iterable[dict[str, torch.Tensor]], max_windows: int | None = None,
          chunk_size: int = 4096) -> Score:
    """Score batches of the batch contract (`batches`): "input_ids" (B, T + 1), inputs [:, :-1] and
    targets [:, 1:]; "n_bytes" (B,), the UTF-8 bytes of text that each window's scored targets
    stand for; and for packed conversations "loss_mask" (B, T), the targets scored (the assistant
    replies), and "document_ids" (B, T), each conversation attended to on its own. The loss is the
    mean over all scored tokens, each weighing the same (as validation during fit weighs them)."""
    device = next(model.parameters()).device
    model.eval()
    nats, tokens, n_bytes, windows = 0.0, 0, 0, 0
    for batch in batches:
        if max_windows is not None and windows >= max_windows:
            break
        if max_windows is not None:
            batch = {k: v[:max_windows - windows] for k, v in batch.items()}
        ids = batch["input_ids"].to(device)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        loss_mask, document_ids = (batch[k].to(device) if k in batch else None for k in ("loss_mask", "document_ids"))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            mean = model.loss(inputs, targets, loss_mask, document_ids=document_ids,
                              chunk_size=chunk_size)  # as training scores validation
        scored = targets.numel() if loss_mask is None else int(loss_mask.sum())
        nats += mean.item() * scored
        tokens += scored
        n_bytes += int(batch["n_bytes"].sum())
        windows += ids.shape[0]
    if tokens == 0:
        raise UsageError("no token to score: the data holds fewer tokens than one window (lower --data.seq_len), "
                         "or no token of it carries loss")
    loss = nats / tokens
    return Score(loss=loss, perplexity=math.exp(min(loss, 700.0)),
                 bits_per_byte=nats / math.log(2) / max(n_bytes, 1), tokens=tokens, bytes=n_bytes,
                 windows=windows)


BATCH_KEYS = ("input_ids", "n_bytes", "loss_mask", "document_ids")


def batches(windows: Any, batch_size: int) -> Iterable[dict[str, torch.Tensor]]:
    """Stack windows into batches of up to `batch_size`: their "input_ids" (B, T + 1) and "n_bytes"
    (B,), and the "loss_mask" and "document_ids" (B, T) of packed conversations. A window of
    another length (the corpus's last, shorter one) starts a batch of its own."""
    pending: list[dict[str, Any]] = []

    def stacked() -> dict[str, torch.Tensor]:
        return {k: torch.stack([w[k] for w in pending]) if k != "n_bytes" else
                torch.tensor([w[k] for w in pending]) for k in BATCH_KEYS if k in pending[0]}

    for i in range(len(windows)):
        window = windows[i]
        if pending and (len(pending) == batch_size or window["input_ids"].shape[0] != pending[0]["input_ids"].shape[0]):
            yield stacked()
            pending = []
        pending.append(window)
    if pending:
        yield stacked()


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness


def to_transformers(model: SmolLM, tokenizer: Any = None):
    """The same weights as a transformers LlamaForCausalLM, in memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from smollm.hf import config_to_hf, hf_state_dict

    hf = LlamaForCausalLM(LlamaConfig(**config_to_hf(model.config, tokenizer)))
    hf.load_state_dict(hf_state_dict(model), strict=not model.config.tie_word_embeddings)
    hf.tie_weights()
    return hf.to(next(model.parameters()).device).eval()


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UsageError("--tasks needs lm-evaluation-harness: pip install -e \".[eval]\"") from None


def run_tasks(model: SmolLM, tokenizer: Any, tasks: list[str], include_path: str | None = None,
              batch_size: int = 8, limit: float | None = None, num_fewshot: int | None = None) -> dict[str, Any]:
    """lm-evaluation-harness's `simple_evaluate` on the model: its results dict."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path:  # lm-eval's own tasks take half a minute to index: skipped when the folder holds every task
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_subtasks for t in tasks):
            manager = local
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown lm-eval task(s) {', '.join(unknown)}; `lm_eval --tasks list` lists them, "
                         "and --include_path adds a folder of task YAML files")
    device = next(model.parameters()).device
    lm = HFLM(pretrained=to_transformers(model, tokenizer), tokenizer=tokenizer, batch_size=batch_size,
              device=str(device))
    return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot)


# ---------------------------------------------------------------------------------------------
# Command line


def run_data(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The training run's data, from a checkpoint's record (`smollm.checkpoint.load_model`), or
    None (a Hugging Face folder): {"hparams": its --data.* settings, "state": what its data module
    saved (cache key, seq_len, training windows, world size)}."""
    from smollm.data import TextDataModule

    if record is None:
        return None
    return {"hparams": dict(record.get("datamodule_hyper_parameters") or {}),
            "state": dict(record.get(TextDataModule.__qualname__) or {})}


def validation_windows(dm: Any, path: str, state: dict[str, Any] | None) -> tuple[Any, bool]:
    """(the validation windows to score, whether they are known to be held out). A checkpoint's
    are those its run validated on; a corpus or split other than its own is refused, since its
    "validation" windows could be ones it trained on. A Hugging Face folder's (or a checkpoint's
    that recorded no corpus) are the corpus's, not known to be held out."""
    if not state or not state.get("cache_key"):
        return dm.val_windows(), False
    from smollm.data.cache import FORMAT_VERSION, cache_key

    key = dm.state_dict()["cache_key"]
    earlier = [v for v in range(1, FORMAT_VERSION) if cache_key(dm.cache_spec, v) == state["cache_key"]]
    if earlier:  # the same corpus, tokenized by an earlier smollm's rules: its split, but not its tokens
        note(f"{path} was trained on this corpus as an earlier smollm tokenized it (token cache format "
             f"{earlier[0]}, now {FORMAT_VERSION}); its validation split is scored as this version tokenizes it, "
             "not called held-out")
        return dm.val_windows(state.get("world_size", 1), state.get("val_windows_validated")), False
    if key != state["cache_key"]:
        raise UsageError(f"{path} was trained on another corpus than its data options give now (token cache "
                         f"{key[:24]}, the checkpoint's {state['cache_key'][:24]}), so that validation split is not "
                         "held out; restore the checkpoint's corpus, or score text with --data.files (all of it, "
                         "not called held-out)")
    if dm.packing is not None:  # conversations: the run held out those from its val_start on
        return _held_out_conversations(dm, path, state)
    trained_to = state["n_train_windows"] * state["seq_len"]  # the last token of its last training window
    if dm.val_start <= trained_to:
        raise UsageError(f"with --data.seq_len {dm.seq_len} and --data.val_fraction {dm.val_fraction} the validation "
                         f"split starts at token {dm.val_start:,}, inside the windows {path} trained on (tokens 0 to "
                         f"{trained_to:,}); leave them as the checkpoint's")
    return dm.val_windows(state.get("world_size", 1), state.get("val_windows_validated")), True


def _held_out_conversations(dm: Any, path: str, state: dict[str, Any]) -> tuple[Any, bool]:
    """A chat run's validation windows, and whether they are held out: the run held out its last
    conversations, from the token `val_start` of its cache on; the split scored now must start
    there or later (another --data.val_fraction moves it)."""
    windows = dm.val_windows(state.get("world_size", 1), state.get("val_windows_validated"))
    if state.get("val_start") is None:  # recorded since evaluate scores conversations
        note(f"{path} does not record where its held-out conversations start; its validation split is scored, "
             "not called held-out")
        return windows, False
    if dm.val_start < state["val_start"]:
        raise UsageError(f"with --data.val_fraction {dm.val_fraction} the validation split starts at token "
                         f"{dm.val_start:,}, among the conversations {path} trained on (its held-out ones start at "
                         f"token {state['val_start']:,}); leave --data.val_fraction as the checkpoint's")
    return windows, True


def _given(argv: list[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in argv)


def note_unused(argv: list[str], tasks: bool, data_given: bool) -> None:
    """One line for each group of options given that do nothing in this mode."""
    for unused, options, why in (
            (not tasks, ("--include_path", "--limit", "--num_fewshot", "--eval_batch_size"),
             "without --tasks (they are lm-evaluation-harness's)"),
            (data_given, ("--data.val_fraction", "--data.max_val_windows"),
             "when data is given (all of it is scored: there is no split)")):
        given = [o for o in options if _given(argv, o)]
        if unused and given:
            note(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} nothing {why}")


def build_parser():
    from jsonargparse import ArgumentParser

    from smollm.data import TextDataModule

    parser = ArgumentParser(prog="python -m smollm.evaluate", exit_on_error=False,
                            description="smollm: score a model on held-out text (loss, perplexity, bits per "
                                        "byte) and on lm-evaluation-harness tasks.")
    parser.add_argument("--checkpoint", required=True, help="a .ckpt of smollm.fit or a Hugging Face model folder")
    parser.add_class_arguments(TextDataModule, "data")
    parser.add_argument("--max_windows", type=int | None, default=None, help="score at most this many windows")
    parser.add_argument("--json", type=str | None, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--device", type=str, default="auto", help="auto (a GPU if there is one), cpu or cuda")
    parser.add_argument("--tasks", type=str | None, default=None,
                        help="comma-separated lm-evaluation-harness tasks, e.g. hellaswag,arc_easy,piqa")
    parser.add_argument("--include_path", type=str | None, default=None, help="a folder of lm-eval task YAML files")
    parser.add_argument("--limit", type=float | None, default=None, help="lm-eval: examples per task (testing)")
    parser.add_argument("--num_fewshot", type=int | None, default=None, help="lm-eval: few-shot examples")
    parser.add_argument("--eval_batch_size", type=int, default=8, help="lm-eval: batch size")
    return parser


def evaluate(argv: list[str]) -> tuple[dict[str, Any], str | None]:
    """Run the command line's evaluation: (the report, the --json path or None)."""
    from smollm.checkpoint import check_tokenizer, load_model
    from smollm.data import TextDataModule

    cfg = build_parser().parse_args(argv)
    if cfg.tasks:
        _require_lm_eval()  # before any time is spent
    loaded = load_model(cfg.checkpoint)
    model, tokenizer_name, run = loaded.model, loaded.tokenizer, run_data(loaded.record)
    trained_on = run["hparams"] if run else None
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    model.to(device)
    data_given = _given(argv, "--data.files") or _given(argv, "--data.dataset")
    note_unused(argv, bool(cfg.tasks), data_given)
    options = {k: v for k, v in vars(cfg.data).items()}
    if not data_given and trained_on:  # the run's own validation split: its data settings...
        options.update({k: v for k, v in trained_on.items() if k in options})
        for name in options:  # ...unless given on this command line
            if _given(argv, f"--data.{name}"):
                options[name] = getattr(cfg.data, name)
    if trained_on and trained_on.get("seq_len") and not _given(argv, "--data.seq_len"):
        options["seq_len"] = trained_on["seq_len"]  # the context the model was trained on, on any text
    elif not _given(argv, "--data.seq_len"):  # a Hugging Face folder: never past the positions it has
        options["seq_len"] = min(options["seq_len"], model.config.max_position_embeddings)
    if options["seq_len"] > model.config.max_position_embeddings:
        raise UsageError(f"--data.seq_len {options['seq_len']} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}; lower --data.seq_len")
    if not _given(argv, "--data.tokenizer") and not (trained_on and not data_given) and tokenizer_name:
        options["tokenizer"] = tokenizer_name
    if options.get("format") == "preference":  # a DPO run's own data, or asked for
        raise UsageError("evaluate scores text and conversations, not preference pairs (a DPO run's rewards on its "
                         "held-out pairs are its validation's: val/rewards/* in TensorBoard); give --data.files with "
                         "--data.format chat or text")
    dm = TextDataModule(**options)
    check_tokenizer(cfg.checkpoint, loaded, dm.tokenizer,
                    f"--data.tokenizer {dm.tokenizer_name!r}" if dm.tokenizer_name != tokenizer_name else None)
    dm.prepare_data()
    dm.setup("validate")
    if data_given:
        windows, held_out = dm.corpus_windows(), False
    else:
        windows, held_out = validation_windows(dm, cfg.checkpoint, run["state"] if run else None)
    dm.token_cache.check_ids(model.config.vocab_size)
    result = score(model, batches(windows, dm.batch_size), cfg.max_windows)
    chat = dm.packing is not None
    kind = "packed windows" if chat else "windows"
    of = f"{result.windows:,} of its {dm.n_heldout_windows:,} {kind} of {dm.seq_len} tokens"
    scored = (f"scoring all of its {'conversations' if chat else 'text'}: {result.windows:,} {kind} of {dm.seq_len} "
              "tokens" if data_given else
              f"scoring the held-out validation split: {of}" if held_out else
              f"scoring the validation split, not known to be held out from the model's training: {of}")
    on = ("the assistant replies" if dm.loss_on == "assistant" else "every token but each conversation's first"
          ) if chat else "every token"
    report: dict[str, Any] = {"checkpoint": cfg.checkpoint, "split": "all" if data_given else "validation",
                              "held_out": held_out, "seq_len": dm.seq_len, "data": dm.describe(scored),
                              "format": dm.format, "scored": on, **asdict(result)}
    if cfg.tasks:
        tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()]
        results = run_tasks(model, dm.tokenizer, tasks, cfg.include_path, cfg.eval_batch_size, cfg.limit,
                            cfg.num_fewshot)
        report["lm_eval"] = {"results": results["results"], "versions": results.get("versions"),
                             "n-shot": results.get("n-shot")}
        report["lm_eval_table"] = _lm_eval_table(results)
    return report, cfg.json


def _lm_eval_table(results: dict[str, Any]) -> str:
    from lm_eval.utils import make_table

    return make_table(results)


@command
def main(argv: list[str]) -> int:
    report, json_path = evaluate(argv)
    print(report["data"])
    chat = report["format"] == "chat"
    what = (f"all of the {'conversations' if chat else 'text'}" if report["split"] == "all" else
            "held-out validation split" if report["held_out"] else "validation split (not known to be held out)")
    tokens = (f"{report['tokens']:,} tokens scored, {report['scored']}" if chat else f"{report['tokens']:,} tokens")
    print(f"{report['checkpoint']}: {what}, {report['windows']:,} {'packed ' * chat}windows of {report['seq_len']} "
          f"tokens ({tokens}, {report['bytes']:,} bytes)")
    print(f"loss {report['loss']:.4f} nats/token   perplexity {report['perplexity']:,.3f}   "
          f"bits per byte {report['bits_per_byte']:.4f}")
    if "lm_eval_table" in report:
        print(report.pop("lm_eval_table"))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1, default=str) + "\n")
        print(f"figures written to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
