"""What a person reads in the terminal while `python -m smollm.fit` runs, and nothing else.

- `Console`: the start block (model, data, device and precision, where checkpoints and logs go),
  progress (a bar on a terminal, a line per logging interval otherwise), a line per validation;
- `print_summary`: the end of a run (what was trained, a sample, the commands to continue,
  generate and look), and `resume_command`, the command line that continues a run;
- `setup_output`: Lightning's start-up lines that a user cannot act on filtered out, the
  `smollm` loggers and Python warnings said as our own one-line notes.

Every line goes through smollm.output (stderr, said once under many processes); the end
summary is the run's result, on stdout.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import sys
import time
import warnings
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from smollm.callbacks import StepCheckpoint, Throughput, is_chat
from smollm.checkpoint import find_last_checkpoint
from smollm.generate import complete
from smollm.output import global_rank, say


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Console(Callback):
    """What a person reads in the terminal: a short block at the start (model, data, device and
    precision, where checkpoints and logs go), progress while training, a line per validation,
    and `summary()` at the end.

    Progress is a bar (step / max_steps, loss, tokens/s, time left) on a terminal, and one line
    per logging interval (step, loss, lr, tokens/s, time left) when the output is a file or a
    pipe (nohup, a scheduler's log); a run that counts epochs also says how many it has made. It
    reads the metrics at logging steps only: each read is a host-device synchronization.
    """

    def __init__(self, show_progress: bool = True, interactive: bool | None = None,
                 throughput: Throughput | None = None) -> None:
        self.show_progress = show_progress
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = None
        self.start_step = 0
        self.start_time: float | None = None
        self.train_seconds = 0.0
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.last_accuracy: float | None = None  # DPO: the step's reward accuracy
        self.resume_step = 0  # the checkpoint's step when resuming (set by fit)
        self.val: list[tuple[int, float, float | None]] = []  # (step, loss, perplexity: None for DPO), the first at the start
        self._seen_step = 0  # the last optimizer step whose end was handled
        self.throughput = throughput if throughput is not None else Throughput()  # tokens/s, measured once

    # -- the start block

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        model, dm = pl_module, trainer.datamodule
        cfg = model.config
        ckpt = next((c for c in trainer.callbacks if isinstance(c, StepCheckpoint)), None)
        lines = [f"smollm: {model.hparams.preset} model, {cfg.num_params:,} parameters"
                 + (f", from {model.hparams.init_from}" if model.hparams.init_from else "")
                 + (f"; resuming at step {self.resume_step}" if self.resume_step else "")
                 + f"; training to step {trainer.max_steps}"]
        h = model.hparams
        if h.get("lora_rank") is not None:  # what trains: the adapters, the base frozen
            trainable = model.lora_trainable
            lines.append(f"  LoRA: rank {h.lora_rank}, alpha {h.lora_alpha or 2 * h.lora_rank:g}, dropout "
                         f"{h.lora_dropout:g} on {', '.join(h.lora_targets)}: {trainable:,} trainable parameters "
                         f"({trainable / cfg.num_params:.2%} of the frozen base's)")
        if dm is not None and hasattr(dm, "describe"):
            lines.append(f"  {dm.describe()}")
        if dm is not None and hasattr(dm, "describe_batch"):
            lines.append(f"  {dm.describe_batch()}")
        device = trainer.strategy.root_device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        nodes = f" on {trainer.num_nodes} nodes" if trainer.num_nodes > 1 else ""
        lines.append(f"  device: {trainer.world_size} x {device.type} ({name}){nodes}, precision "
                     f"{trainer.precision}{', torch.compile' if model.hparams.compile else ''}")
        if ckpt is not None:
            lines.append(f"  checkpoints: {ckpt.dirpath} (every {ckpt._every_n_train_steps} steps and at the end)")
        if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
            lines.append(f"  TensorBoard: {trainer.logger.log_dir}")
        say("\n".join(lines))

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step, self.start_time = trainer.global_step, time.perf_counter()
        self._seen_step = trainer.global_step
        self.throughput.start(trainer.global_step)
        if trainer.is_global_zero and self.show_progress and self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, unit="step",
                            dynamic_ncols=True, file=sys.stderr, smoothing=0.1,
                            bar_format="{n_fmt}/{total_fmt} steps |{bar}| {postfix} [{elapsed}<{remaining}]")

    # -- progress

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # a micro-batch inside an accumulated step: the step is not done
            return
        self._seen_step = step
        tokens_per_sec = self.throughput.measure(trainer, batch)  # at logging steps; the same figure TensorBoard gets
        at_log = step % trainer.log_every_n_steps == 0 or step >= trainer.max_steps
        if self.first_loss is None or at_log:  # the first step's loss too: where the run starts
            loss = trainer.callback_metrics.get("train/loss")
            accuracy = trainer.callback_metrics.get("train/rewards/accuracies")  # a DPO run's
            if accuracy is not None:
                self.last_accuracy = float(accuracy)
            if loss is not None:
                self.last_loss = float(loss)  # a device sync, at logging steps only
                if self.first_loss is None:
                    self.first_loss = self.last_loss
        if at_log and trainer.is_global_zero and self.show_progress:
            self._progress(trainer, step, tokens_per_sec, getattr(pl_module, "step_lrs", {}))

    def _progress(self, trainer, step: int, tps: float | None, lrs: dict[str, float]) -> None:
        # Tokens/s of this very step (Throughput's), and the rates the step used, as the module recorded them.
        loss = f"loss {self.last_loss:.4f}" if self.last_loss is not None else ""
        if self.last_accuracy is not None:
            loss += f" reward accuracy {self.last_accuracy:.2f}"
        speed = f"{float(tps):,.0f} tok/s" if tps is not None else ""
        dm = trainer.datamodule  # a run that counts epochs says where in them it is
        epoch = f"epoch {dm.epoch_at(step):.2f}" if getattr(dm, "epochs", None) else ""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(", ".join(x for x in (epoch, loss, speed) if x), refresh=True)
            return
        elapsed = time.perf_counter() - (self.start_time or time.perf_counter())
        done = step - self.start_step
        left = elapsed / done * (trainer.max_steps - step) if done else 0.0
        rates = [f"{'lr' if name == 'adamw' else 'lr_' + name} {lr:.3g}" for name, lr in lrs.items()]
        parts = [f"step {step}/{trainer.max_steps}", epoch, loss, *rates,
                 speed, f"{_fmt_time(elapsed)} elapsed, {_fmt_time(left)} left"]
        say("  ".join(p for p in parts if p))

    def on_validation_end(self, trainer, pl_module) -> None:
        value = getattr(pl_module, "last_val_loss", None)
        if value is None:
            return
        rewards = getattr(pl_module, "last_val_rewards", None)  # DPO: a perplexity of its loss means nothing
        perplexity = None if rewards else math.exp(min(value, 50.0))
        self.val.append((trainer.global_step, value, perplexity))
        if trainer.is_global_zero:
            when = "at the start" if trainer.sanity_checking else f"at step {trainer.global_step}"
            line = f"validation {when}: loss {value:.4f}, " + (
                f"perplexity {perplexity:,.2f}" if rewards is None else
                f"reward accuracy {rewards['rewards/accuracies']:.2f}, margin {rewards['rewards/margins']:.4f}")
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                say(line)

    def on_train_end(self, trainer, pl_module) -> None:
        self._close(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close(trainer)

    def _close(self, trainer) -> None:
        if self.start_time is not None:
            self.train_seconds = time.perf_counter() - self.start_time
        if self.bar is not None:
            self.bar.update(trainer.global_step - self.bar.n)
            self.bar.close()
            self.bar = None

    # -- the end

    def summary(self, trainer, tokens_per_step: int) -> list[str]:
        steps = trainer.global_step - self.start_step
        tokens = steps * tokens_per_step
        line = f"trained {steps:,} steps ({tokens:,} tokens) in {_fmt_time(self.train_seconds)}"
        if self.train_seconds > 0 and tokens:
            line += f", {tokens / self.train_seconds:,.0f} tokens/s"
        out = [line + f"; now at step {trainer.global_step}"]
        if self.first_loss is not None and self.last_loss is not None:
            out.append(f"train loss {self.first_loss:.4f} -> {self.last_loss:.4f}")
        if self.val:
            first, last = self.val[0], self.val[-1]
            change = f"{first[1]:.4f} (step {first[0]}) -> " if len(self.val) > 1 else ""
            out.append(f"validation loss {change}{last[1]:.4f} (step {last[0]})"
                       + (f", perplexity {last[2]:,.2f}" if last[2] is not None else ""))
        return out


def command_line(args: list[str], drop: tuple[str, ...], add: list[str]) -> str:
    """`python -m smollm.fit ARGS` with the options in `drop` (and their values) replaced by `add`."""
    kept, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in drop:
            skip = True
            continue
        if a.split("=", 1)[0] in drop:
            continue
        kept.append(a)
    return shlex.join(["python", "-m", "smollm.fit", *kept, *add])


def resume_command(cli: Any, args: list[str], add: list[str],
                   drop: tuple[str, ...] = ("--ckpt_path",)) -> str:
    """The command that continues the run: as it was started, with `add`. Under torchrun or srun,
    or on several nodes, it says to relaunch the same way, on every node."""
    plain = command_line(args, drop, add)
    name = getattr(cli, "launcher", None) if cli is not None else None
    nodes = getattr(getattr(cli, "trainer", None), "num_nodes", 1) if cli is not None else 1
    if name is not None:
        return f"relaunch the same way ({name}{', on every node' if nodes > 1 else ''}) with: {plain}"
    if nodes > 1:
        return f"relaunch the same way on every node with: {plain}"
    return plain


def _rel(path: str) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def print_summary(cli: Any, console: Console, args: list[str], show: bool = True) -> None:
    """The end of a run: what was trained, the model's next token and a greedy sample, and the
    commands to continue, generate and look. Under FSDP every rank generates; rank 0 prints."""
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    tokens_per_step = dm.plan.global_batch * dm.seq_len
    lines = ["", "done: " + "; ".join(console.summary(trainer, tokens_per_step))]
    ckpt = next((c for c in trainer.callbacks if isinstance(c, StepCheckpoint)), None)
    last = find_last_checkpoint(ckpt.dirpath) if ckpt is not None else None
    prompt, chat = model.hparams.sample_prompt, is_chat(dm)
    sample, new = complete(model.model, dm.tokenizer, prompt, max_new_tokens=max(1, model.hparams.sample_tokens),
                           chat=chat)
    if chat:  # a reply to the prompt as a user's message, as python -m smollm.chat gives it
        lines.append(f"greedy reply to {prompt!r}: {sample!r}")
    else:
        lines.append(f"next token after {prompt!r}: {dm.tokenizer.decode(new[:1])!r} (id {new[0]})")  # greedy: the same
        lines.append(f"greedy sample: {prompt + sample!r}")
    if last is not None:
        lines.append(f"checkpoint: {_rel(last)} (and {_rel(os.path.join(ckpt.dirpath, 'last.ckpt'))})")
        lines.append("continue:    " + resume_command(cli, args, *_continue(trainer, dm)))
        newest = _rel(os.path.join(ckpt.dirpath, "last.ckpt"))
        if chat:
            lines.append("chat:        " + shlex.join(["python", "-m", "smollm.chat", "--checkpoint", newest]))
        else:
            lines.append("generate:    " + shlex.join(["python", "-m", "smollm.generate", "--checkpoint", newest,
                                                       "--prompt", prompt]))
    lines.append("TensorBoard: " + shlex.join(["tensorboard", "--logdir", _rel(cli.logs_root)]))
    if show:
        print("\n".join(lines), flush=True)


def _continue(trainer: Any, dm: Any) -> tuple[list[str], tuple[str, ...]]:
    """The options that continue a run, and those they replace: twice the steps; for a run that counts
    epochs, the rest of its epochs if --trainer.max_steps stopped it early, else twice the epochs."""
    epochs = getattr(dm, "epochs", None)
    if not epochs:
        return (["--ckpt_path", "last", "--trainer.max_steps", str(2 * trainer.max_steps)],
                ("--ckpt_path", "--trainer.max_steps"))
    more = [] if trainer.global_step < dm.epoch_steps(epochs) else ["--trainer.max_epochs", str(2 * epochs)]
    return (["--ckpt_path", "last", "--trainer.max_steps", "-1", *more],
            ("--ckpt_path", "--trainer.max_steps", *more[:1]))


class _LightningNoise(logging.Filter):
    """Drop Lightning's start-up and end lines that the console block replaces or a user cannot
    act on (device availability, the litlogger tip, `Trainer.fit` stopped, each rank's
    process-group lines); a line that every rank says is kept on rank 0."""

    NOISE = ("GPU available", "TPU available", "HPU available", "LOCAL_RANK", "💡 Tip",
             "`Trainer.fit` stopped", "Using bfloat16", "Using 16bit", "Seed set to",
             "Detected KeyboardInterrupt", "Initializing distributed", "-" * 100 + "\ndistributed_backend=")

    ONCE = ("SLURM auto-requeueing",)  # said by every rank: rank 0 says it

    def filter(self, record: logging.LogRecord) -> bool:
        message = re.sub(r"^\[rank: \d+\] ", "", str(record.getMessage()).lstrip())  # once per rank
        if message.startswith(self.ONCE):
            return global_rank() == 0
        return not message.startswith(self.NOISE)


class _SayHandler(logging.Handler):
    """The `smollm` loggers' records, said through smollm.output (stderr, rank 0)."""

    def emit(self, record: logging.LogRecord) -> None:
        say(self.format(record))


def setup_output() -> None:
    """Filter Lightning's noise, say the `smollm` loggers' records once, and print a Python
    warning as one `warning:` line."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed", "lightning.fabric.utilities.distributed",
                 "lightning.pytorch.trainer.connectors.signal_connector"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _LightningNoise) for f in logger.filters):
            logger.addFilter(_LightningNoise())
    ours = logging.getLogger("smollm")
    if not ours.handlers:
        handler = _SayHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
    # Warnings a user cannot act on: Lightning's own deprecations, and the notice that a resumed
    # run's checkpoint folder is not empty (it is the run's own folder, by design).
    # Our warnings say what to do in one line; print them as one line, without a source location.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")  # main(args) in-process
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # A resume with another --checkpoint.every_n_train_steps: Lightning keys the callback's state
    # by its settings and says so; the new interval simply applies.
    warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create")
    # LoRA under FSDP: torch's FSDP warns, for every decoder layer on every process, that the unit holds
    # frozen and trainable weights; LitSmolLM.configure_model says what that costs once.
    warnings.filterwarnings("ignore", message=r".* has both parameters with requires_grad=True and False")


__all__ = ["Console", "command_line", "print_summary", "resume_command", "setup_output"]
