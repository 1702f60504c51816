"""`python -m smollm.fit --config configs/tiny.yaml`: train SmolLM with Lightning.

LightningCLI (no subcommand) turns LitSmolLM's and TextDataModule's __init__ arguments into
`--model.*` and `--data.*`, the Trainer's into `--trainer.*`, and StepCheckpoint's into
`--checkpoint.*`. This file wires what Lightning leaves to us (see ../shared/DESIGN.md, traps):
- checkpoints in checkpoints/NAME (smollm.callbacks), shared by a run and its resumptions; a fresh
  run never writes into a folder that holds another run's checkpoints;
- `--ckpt_path last` finds the newest checkpoint of the earlier runs, or stops with an error;
- a resumed run logs into the same TensorBoard run; config.yaml is overwritten, not refused;
- every foreseeable failure is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from smollm.callbacks import AtomicCheckpointIO, StepCheckpoint
from smollm.checkpoint import check_config, find_last_checkpoint, read_checkpoint, step_files
from smollm.cli import EXIT_PREEMPTED, fail, fail_on
from smollm.config import ModelConfig
from smollm.data import TextDataModule
from smollm.errors import SmolLMError, UsageError
from smollm.generate import complete
from smollm.module import LitSmolLM
from smollm.sharding import full_model, is_fsdp


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
            raise UsageError(f"trainer.accelerator is {accelerator!r} but this machine has no CUDA GPU; "
                           "use configs/tiny.yaml, or add --trainer.accelerator cpu --trainer.precision 32-true")
        model_config = ModelConfig.from_name(cfg.model.preset, **(cfg.model.config_overrides or {}))
        check_size_fits(trainer, model_config)
        root = trainer.default_root_dir or os.getcwd()
        name = cfg.name or cfg.model.preset
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = os.path.join(root, "checkpoints", name)

        self.resume_from, version = None, None
        if cfg.ckpt_path:
            path = cfg.ckpt_path
            if path == "last":
                path = find_last_checkpoint(cfg.checkpoint.dirpath)
                if path is None:
                    raise UsageError(f"--ckpt_path last: no checkpoint to resume in {cfg.checkpoint.dirpath}; "
                                     "start without --ckpt_path, or give the checkpoint's path")
            checkpoint = read_checkpoint(path)
            check_config(path, checkpoint, model_config)
            self.resume_from = path
            version = checkpoint["smollm"].get("logger_version")
            del checkpoint
        elif step_files(cfg.checkpoint.dirpath):
            # A fresh run would overwrite step files of the earlier run and mix the two.
            raise UsageError(f"{cfg.checkpoint.dirpath} already holds checkpoints of an earlier run; resume it "
                           "with --ckpt_path last, or start a new run with another --name")
        if trainer.logger in (None, True):
            # lightning_logs/NAME/version_N; a resumed run keeps logging into its own version,
            # so its TensorBoard curve is continuous.
            trainer.logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                              "init_args": {"save_dir": os.path.join(root, "lightning_logs"), "name": name,
                                            "version": version}}


def check_size_fits(trainer, config: ModelConfig) -> None:
    """Before anything is built: FSDP only with CUDA GPUs (Lightning refuses it on the CPU), and on
    the CPU enough free memory for float32 weights, gradients and AdamW state (16 bytes per
    parameter, per process; activations come on top). A CPU run that does not fit would otherwise
    be killed by the system without a word."""
    accelerator, strategy = str(trainer.accelerator), trainer.strategy
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if isinstance(strategy, str) and strategy.startswith("fsdp") and not on_gpu:
        raise UsageError(f"--trainer.strategy {strategy} needs CUDA GPUs (Lightning's FSDP does not run on the "
                         "CPU); on CPU use --trainer.strategy ddp")
    available = available_memory()
    if on_gpu or available is None:
        return
    processes = trainer.devices if isinstance(trainer.devices, int) and trainer.devices > 0 else 1
    needed = 16 * config.num_params * processes
    if needed > available:
        raise UsageError(f"training {config.num_params / 1e6:,.0f}M parameters on the CPU in {processes} "
                         f"process(es) needs at least {needed / 1e9:.1f} GB for float32 weights, gradients and "
                         f"AdamW state, and {available / 1e9:.1f} GB are free; use a smaller --model.preset "
                         "or a machine with more memory")


def available_memory() -> int | None:
    """Bytes of memory the system can still give (Linux's MemAvailable plus free swap), or None."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
    except (OSError, ValueError, IndexError):
        return None
    if "MemAvailable" not in info:
        return None
    return info["MemAvailable"] + info.get("SwapFree", 0)


def configure_trainer(trainer) -> None:
    """What the CLI cannot express as a default: atomic checkpoint writes (unless a subclass was
    given with --trainer.plugins) and a progress bar that refreshes only when metrics are
    logged, since each refresh reads the loss from the device (a per-step synchronization)."""
    if not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    for callback in trainer.callbacks:
        if isinstance(callback, TQDMProgressBar) and callback.refresh_rate == 1:
            callback._refresh_rate = trainer.log_every_n_steps


def print_next_token(model: LitSmolLM, datamodule: TextDataModule, show: bool = True) -> None:
    prompt = model.hparams.sample_prompt
    _, new = complete(model.model, datamodule.tokenizer, prompt, max_new_tokens=1)
    if show:
        print(f"next token after {prompt!r}: {datamodule.tokenizer.decode(new)!r} (id {new[0]})")


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
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resume_from, weights_only=True)
        if cli.trainer.is_global_zero or is_fsdp(cli.trainer):  # FSDP: every rank runs the model
            with full_model(cli.trainer):
                print_next_token(cli.model, cli.datamodule, show=cli.trainer.is_global_zero)
        return 0
    except SIGTERMException:
        print("stopped by SIGTERM; a checkpoint of the last finished step was saved. "
              "Resume with --ckpt_path last", file=sys.stderr)
        return EXIT_PREEMPTED
    except SmolLMError as e:
        return fail_on(e)
    except ArgumentError as e:
        return fail(str(e)[:500] + " (see --help)")
    except MisconfigurationException as e:
        return fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
