"""`python -m smollm.fit --config configs/tiny.yaml`: train SmolLM with Lightning.

LightningCLI (no subcommand) turns LitSmolLM's and TextDataModule's __init__ arguments into
`--model.*` and `--data.*`, the Trainer's into `--trainer.*`, and StepCheckpoint's into
`--checkpoint.*`. This file adds what Lightning leaves to us (see ../shared/DESIGN.md, traps):
- checkpoints named by step in checkpoints/NAME, shared by a run and its resumptions, all kept,
  written atomically, plus one at the end of every run and one on SIGTERM; a fresh run never
  writes into a folder that holds another run's checkpoints;
- `--ckpt_path last` finds the newest checkpoint of the earlier runs, or stops with an error;
- a resumed run logs into the same TensorBoard run; config.yaml is overwritten, not refused;
- every foreseeable failure is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import re
import sys
import warnings
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from smollm.config import ModelConfig
from smollm.data import DataError, TextDataModule
from smollm.module import CheckpointError, LitSmolLM, NonFiniteError, read_checkpoint

EXIT_ERROR = 2  # bad input or configuration
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect of a job they terminated
STEP_FILE = re.compile(r"^step=(\d+)\.ckpt$")


class FitError(Exception):
    """A problem with the command line or the run's folders, explained in one line."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file, fsync it, then rename it into place.

    A process killed mid-write (SIGKILL, power loss) or a full disk leaves at worst a stray
    `*.tmp` file, never a truncated `step=N.ckpt`; the checkpoints already saved are untouched.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str, storage_options: Any = None) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                self._write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            hint = "free some space" if e.errno == errno.ENOSPC else "check the folder"
            raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; {hint} "
                                  "and resume with --ckpt_path last (earlier checkpoints are intact)") from None


    def _write(self, checkpoint: dict[str, Any], f) -> None:
        torch.save(checkpoint, f)


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps every `step=NNNNNN.ckpt` and also saves at the end of a run
    and when the process receives SIGTERM (pre-emption), at the next step boundary."""

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 500,
                 filename: str = "step={step:06d}", save_top_k: int = -1, save_last: bool | str = "link",
                 save_on_train_end: bool = True) -> None:
        """
        Args:
            dirpath: Folder of the checkpoints; default <trainer.default_root_dir>/checkpoints/NAME,
                shared by a run and its resumptions.
            every_n_train_steps: Save every N optimizer steps.
            filename: Checkpoint name pattern (Lightning's format syntax).
            save_top_k: How many to keep; -1 keeps them all.
            save_last: Also keep last.ckpt ("link": a symlink to the newest; True: a copy).
            save_on_train_end: Save the final step of every run, whatever every_n_train_steps is.
        """
        super().__init__(dirpath=dirpath, filename=filename, every_n_train_steps=every_n_train_steps,
                         save_top_k=save_top_k, save_last=save_last, auto_insert_metric_name=False)
        self.save_on_train_end = save_on_train_end

    def _save_now(self, trainer) -> None:
        if self._last_global_step_saved == trainer.global_step or trainer.global_step == 0:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.received_sigterm:  # Lightning raises SIGTERMException right after this hook
            self._save_now(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_on_train_end:
            self._save_now(trainer)


def find_last_checkpoint(dirpath: str) -> str:
    """The newest complete `step=N.ckpt` in dirpath (temporary files are never considered)."""
    steps = []
    for path in glob.glob(os.path.join(glob.escape(dirpath), "step=*.ckpt")):
        m = STEP_FILE.match(os.path.basename(path))
        if m and os.path.isfile(path):
            steps.append((int(m.group(1)), path))
    if not steps:
        raise FitError(f"--ckpt_path last: no checkpoint to resume in {dirpath}; "
                       "start without --ckpt_path, or give the checkpoint's path")
    return max(steps)[1]


class SmolLMCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="Resume from this checkpoint, or 'last' for the newest one of earlier runs")
        parser.add_argument("--name", type=str | None, default=None,
                            help="Run name (default: the model preset): TensorBoard logs go to "
                                 "lightning_logs/NAME, checkpoints to checkpoints/NAME")
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")

    def before_instantiate_classes(self) -> None:
        cfg = self.config
        trainer = cfg.trainer
        accelerator = str(trainer.accelerator)
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise FitError(f"trainer.accelerator is {accelerator!r} but this machine has no CUDA GPU; "
                           "use configs/tiny.yaml, or add --trainer.accelerator cpu --trainer.precision 32-true")
        root = trainer.default_root_dir or os.getcwd()
        name = cfg.name or cfg.model.preset
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = os.path.join(root, "checkpoints", name)

        self.resume_from, version = None, None
        if cfg.ckpt_path:
            path = find_last_checkpoint(cfg.checkpoint.dirpath) if cfg.ckpt_path == "last" else cfg.ckpt_path
            checkpoint = read_checkpoint(path)
            expected = ModelConfig.from_name(cfg.model.preset, **(cfg.model.config_overrides or {}))
            saved = ModelConfig(**checkpoint["smollm"]["model_config"])
            differ = expected.diff(saved)
            if differ:
                raise CheckpointError(f"checkpoint {path} is of another model configuration: "
                                      + "; ".join(f"{d} (run != checkpoint)" for d in differ))
            self.resume_from = path
            version = checkpoint["smollm"].get("logger_version")
            del checkpoint
        elif _has_checkpoints(cfg.checkpoint.dirpath):
            # A fresh run would overwrite step files of the earlier run and mix the two.
            raise FitError(f"{cfg.checkpoint.dirpath} already holds checkpoints of an earlier run; resume it "
                           "with --ckpt_path last, or start a new run with another --name")
        if trainer.logger in (None, True):
            # lightning_logs/NAME/version_N; a resumed run keeps logging into its own version,
            # so its TensorBoard curve is continuous.
            trainer.logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                              "init_args": {"save_dir": os.path.join(root, "lightning_logs"), "name": name,
                                            "version": version}}


def _has_checkpoints(dirpath: str) -> bool:
    return any(STEP_FILE.match(p) for p in os.listdir(dirpath)) if os.path.isdir(dirpath) else False


def configure_trainer(trainer) -> None:
    """What the CLI cannot express as a default: atomic checkpoint writes (unless a subclass was
    given with --trainer.plugins) and a progress bar that refreshes only when metrics are
    logged, since each refresh reads the loss from the device (a per-step synchronization)."""
    if not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    for callback in trainer.callbacks:
        if isinstance(callback, TQDMProgressBar) and callback.refresh_rate == 1:
            callback._refresh_rate = trainer.log_every_n_steps


def print_next_token(model: LitSmolLM, datamodule: TextDataModule) -> None:
    from smollm.generate import generate

    tokenizer = datamodule.tokenizer
    prompt = model.hparams.sample_prompt
    ids = torch.tensor([tokenizer.encode(prompt)], device=model.device)
    next_id = generate(model.model, ids, max_new_tokens=1)[0, -1].item()
    print(f"next token after {prompt!r}: {tokenizer.decode([next_id])!r} (id {next_id})")


def main(args: list[str] | None = None) -> int:
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")  # Lightning's, not ours
    try:
        cli = SmolLMCLI(
            LitSmolLM, TextDataModule, run=False, args=args,
            auto_configure_optimizers=False,  # LitSmolLM's optimizer and schedule are its options
            seed_everything_default=1234,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites config.yaml
            trainer_defaults={"max_steps": 5000, "use_distributed_sampler": False,
                              "log_every_n_steps": 10, "val_check_interval": 500,
                              "check_val_every_n_epoch": None},
            parser_kwargs={"exit_on_error": False},
        )
        configure_trainer(cli.trainer)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resume_from)
        if cli.trainer.is_global_zero:
            print_next_token(cli.model, cli.datamodule)
        return 0
    except SIGTERMException:
        print(f"stopped by SIGTERM; a checkpoint of the last finished step was saved. "
              "Resume with --ckpt_path last", file=sys.stderr)
        return EXIT_PREEMPTED
    except (FitError, DataError, CheckpointError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:
        message = _known_error(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR


def _known_error(e: Exception) -> str | None:
    """One line for the errors of configuration that Lightning and jsonargparse raise."""
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(e, ArgumentError):
        return " ".join(str(e).split())[:500] + " (see --help)"
    if isinstance(e, (MisconfigurationException, ValueError)):
        return " ".join(str(e).split())
    return None


if __name__ == "__main__":
    # Run the module as imported, not this `__main__` copy, so that classes named by path on the
    # command line or in a saved config.yaml (smollm.fit.StepCheckpoint) are these very classes.
    from smollm.fit import main as _main

    sys.exit(_main())
