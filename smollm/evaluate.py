"""How good is a model: held-out loss, perplexity and bits per byte, and lm-evaluation-harness.

    python -m smollm.evaluate --checkpoint PATH [--data.files ... | --data.dataset ...]
        [--data.seq_len N] [--data.batch_size N] [--max_windows N] [--json FILE]
        [--tasks hellaswag,arc_easy,... [--include_path DIR] [--limit N]]

PATH is a `.ckpt` of smollm.fit or a Hugging Face directory. With no data given, it scores the
held-out validation split: a training checkpoint's own (the same windows its validation used),
or the default corpus's for a Hugging Face directory. With data given, it scores all of it. The
`--data.*` options are smollm.fit's, so every source fit reads is accepted.

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

from smollm.errors import SmolLMError, UsageError
from smollm.model import SmolLM, chunked_cross_entropy


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
def score(model: SmolLM, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], max_windows: int | None = None,
          chunk_size: int = 4096) -> Score:
    """Score batches (windows, their bytes): windows (B, T + 1) of token ids, inputs [:, :-1] and
    targets [:, 1:]; bytes (B,), the UTF-8 bytes of text that each window's targets stand for."""
    device = next(model.parameters()).device
    model.eval()
    nats, tokens, n_bytes, windows = 0.0, 0, 0, 0
    for batch, batch_bytes in batches:
        if max_windows is not None and windows >= max_windows:
            break
        if max_windows is not None:
            batch, batch_bytes = batch[:max_windows - windows], batch_bytes[:max_windows - windows]
        batch = batch.to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = model.hidden_states(inputs)
            mean = chunked_cross_entropy(hidden, model.lm_head.weight, targets, chunk_size)
        nats += mean.item() * targets.numel()
        tokens += targets.numel()
        n_bytes += int(batch_bytes.sum())
        windows += batch.shape[0]
    if tokens == 0:
        raise UsageError("no window to score: the data holds fewer tokens than one window; lower --data.seq_len")
    loss = nats / tokens
    return Score(loss=loss, perplexity=math.exp(min(loss, 700.0)),
                 bits_per_byte=nats / math.log(2) / max(n_bytes, 1), tokens=tokens, bytes=n_bytes,
                 windows=windows)


def batches(windows: Any, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Stack windows into (B, T + 1) batches, with their bytes (B,); a window of another length
    (the corpus's last, shorter one) starts a batch of its own."""
    pending: list[dict[str, Any]] = []

    def stacked() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([w["input_ids"] for w in pending]), torch.tensor([w["n_bytes"] for w in pending])

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

    manager = TaskManager(include_path=include_path)
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


def load_model(path: str) -> tuple[SmolLM, dict[str, Any] | None, str | None]:
    """(model, the training run's data settings or None, a tokenizer name or folder or None)."""
    from smollm.checkpoint import load_model, read_checkpoint

    model, tokenizer = load_model(path)
    data = read_checkpoint(path).get("datamodule_hyper_parameters") if Path(path).is_file() else None
    return model, dict(data) if data else None, tokenizer


def _given(argv: list[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in argv)


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
    from smollm.data import TextDataModule

    cfg = build_parser().parse_args(argv)
    if cfg.tasks:
        _require_lm_eval()  # before any time is spent
    model, run_data, tokenizer_name = load_model(cfg.checkpoint)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    model.to(device)
    data_given = _given(argv, "--data.files") or _given(argv, "--data.dataset")
    options = {k: v for k, v in vars(cfg.data).items()}
    if not data_given and run_data:  # the run's own validation split: its data settings...
        options.update({k: v for k, v in run_data.items() if k in options})
        for name in options:  # ...unless given on this command line
            if _given(argv, f"--data.{name}"):
                options[name] = getattr(cfg.data, name)
    if run_data and run_data.get("seq_len") and not _given(argv, "--data.seq_len"):
        options["seq_len"] = run_data["seq_len"]  # the context the model was trained on, on any text
    elif not _given(argv, "--data.seq_len"):  # a Hugging Face folder: never past the positions it has
        options["seq_len"] = min(options["seq_len"], model.config.max_position_embeddings)
    if not _given(argv, "--data.tokenizer") and not (run_data and not data_given) and tokenizer_name:
        options["tokenizer"] = tokenizer_name
    dm = TextDataModule(**options)
    dm.prepare_data()
    dm.setup("validate")
    split = "all" if data_given else "validation"
    windows = dm.corpus_windows() if data_given else dm.val_windows()
    dm.token_cache.check_ids(model.config.vocab_size)
    result = score(model, batches(windows, dm.batch_size), cfg.max_windows)
    scored = (f"scoring all of its text: {result.windows:,} windows of {dm.seq_len} tokens" if data_given else
              f"scoring the held-out validation split: {result.windows:,} of its {dm.n_heldout_windows:,} windows "
              f"of {dm.seq_len} tokens")
    report: dict[str, Any] = {"checkpoint": cfg.checkpoint, "split": split, "seq_len": dm.seq_len,
                              "data": dm.describe(scored), **asdict(result)}
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


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import ArgumentError

    from smollm.cli import fail, fail_on

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        report, json_path = evaluate(argv)
    except SmolLMError as e:
        return fail_on(e)
    except ArgumentError as e:
        return fail(str(e)[:500] + " (see --help)")
    print(report["data"])
    what = "all of the text" if report["split"] == "all" else f"{report['split']} split"
    print(f"{report['checkpoint']}: {what}, {report['windows']:,} windows of {report['seq_len']} "
          f"tokens ({report['tokens']:,} tokens, {report['bytes']:,} bytes)")
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
