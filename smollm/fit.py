"""`python -m smollm.fit --config configs/tiny.yaml`: train SmolLM with Lightning.

LightningCLI (no subcommand) turns LitSmolLM's and TextDataModule's __init__ arguments into
`--model.*` and `--data.*`, the Trainer's into `--trainer.*`, and StepCheckpoint's into
`--checkpoint.*`. This file wires what Lightning leaves to us (see ../shared/DESIGN.md, traps):
- before any step: the run's folders are writable, no other run trains into them (a lock), a
  fresh run never writes into a folder that holds another run's checkpoints, `--ckpt_path last`
  finds the newest checkpoint or stops, and the estimated memory fits the device;
- a resumed run logs into the same TensorBoard run; config.yaml is rewritten, not refused;
- the global batch (`--data.global_batch_size`) is the recipe: gradient accumulation is derived
  from it and the number of processes, so a run resumes on any number of them with the same
  tokens per step and the same samples at each step;
- under torchrun or srun, the launcher says how many processes and nodes (Lightning's
  TorchElasticEnvironment and SLURMEnvironment do the rest);
- a resume reads its checkpoint once: here, to check it (smollm.preflight), and Lightning takes
  the same dict (AtomicCheckpointIO.hand_over);
- the console (smollm.console); Ctrl-C and SIGTERM finish the current step, save it, and stop;
- every foreseeable failure is one line on stderr and a non-zero exit (smollm.cli.command); a bug
  keeps its traceback.
The checks made before the Trainer starts are smollm.preflight's.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from smollm import lora
from smollm.batch import BatchPlan, resumed_global_batch
from smollm.callbacks import (AtomicCheckpointIO, BindData, Interrupted, KeepGlobalBatch, RunLength, StepCheckpoint,
                              StopAtStepEnd, Throughput, ValidateAtEnd, ValidationSample)
from smollm.checkpoint import RunLock, read_checkpoint
from smollm.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_PREEMPTED, command
from smollm.config import ModelConfig
from smollm.console import Console, print_summary, resume_command, setup_output
from smollm.data import TextDataModule
from smollm.errors import SmolLMError, UsageError
from smollm.io import check_writable
from smollm.dpo import check_objective
from smollm.module import LitSmolLM
from smollm.optim import check_clipping, check_precision, check_strategy
from smollm.output import global_rank, say, warn
from smollm.preflight import (check_accelerator, check_fresh_folder, check_memory, check_resume, check_run_length,
                              check_size_fits, check_steps_left, check_unquoted_glob, checkpoint_to_resume,
                              take_processes_from_launcher)
from smollm.sharding import full_model, is_fsdp


class SmolLMCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        self.argv = list(kwargs.get("args") or [])  # what was given on the command line
        super().__init__(*args, **kwargs)

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
        check_accelerator(trainer)
        check_run_length(trainer)
        model_config = ModelConfig.from_name(cfg.model.preset, **(cfg.model.config_overrides or {}))
        self.launcher = take_processes_from_launcher(trainer, self.argv)
        if cfg.model.lora_rank is not None and cfg.model.optimizer == "muon":
            # Muon orthogonalizes whole hidden-layer matrices, and under LoRA those are frozen: what
            # trains (the adapters) is AdamW's either way, so a config's Muon default does not stop LoRA.
            say("LoRA: the adapters train with AdamW (--model.optimizer muon takes whole hidden-layer matrices, and "
                "those stay frozen)")
            cfg.model.optimizer = "adamw"
        check_strategy(cfg.model.optimizer, trainer.strategy)
        check_clipping(cfg.model.grad_clip, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
        warning = check_precision(trainer.precision)
        if warning:
            say(warning)
        lora.check_options(cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_dropout, cfg.model.lora_targets,
                           cfg.model.optimizer)
        check_size_fits(trainer, model_config, cfg.model.optimizer, lora_options(cfg.model))
        check_objective(cfg.model.objective, cfg.data.format)
        root = trainer.default_root_dir or os.getcwd()
        name = cfg.name or cfg.model.preset
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = os.path.join(root, "checkpoints", name)
        self.logs_root = os.path.join(root, "lightning_logs")

        self.resume_from, version, self.resume_step, self.data_state = None, None, 0, None
        self.checkpoint = None  # the checkpoint to resume, read once: checked here, then Lightning's
        if cfg.ckpt_path:
            path = checkpoint_to_resume(cfg.ckpt_path, cfg.checkpoint.dirpath)
            # A damaged file (also the newest, under `last`) stops the run with one line naming it and
            # the newest intact checkpoint of the run: resuming from an older step is the user's call.
            checkpoint = self.checkpoint = read_checkpoint(path)
            check_resume(path, checkpoint, model_config, cfg.model.optimizer, lora_options(cfg.model))
            self.resume_from, self.resume_step = path, int(checkpoint.get("global_step", 0))
            version = checkpoint["smollm"].get("logger_version")
            self.data_state = checkpoint.get(TextDataModule.__qualname__)
            # the checkpoint's global batch, unless --data.global_batch_size sets another
            cfg.data.global_batch_size = resumed_global_batch(cfg.data.global_batch_size, self.data_state,
                                                              self.resume_step)
            check_steps_left(path, self.resume_step, trainer.max_steps)
            adapted = (checkpoint["smollm"].get("lora") or {}).get("base")
            if adapted:  # LoRA: the checkpoint holds the adapters; the frozen base comes from its source again
                cfg.model.init_from = cfg.model.init_from or adapted["init_from"]  # its digest is checked
            else:
                # A DPO run's frozen reference is its initial weights, rebuilt from the checkpoint's run's
                # init_from (its digest, in the checkpoint, is checked): the weights still come from the checkpoint.
                reference = dpo_reference_source(checkpoint)
                if cfg.model.init_from and cfg.model.init_from != reference:  # the weights come from the checkpoint
                    warn(f"--model.init_from {cfg.model.init_from} is ignored when resuming: the weights "
                         f"come from {path}" + (f" (and DPO's reference from {reference}, as the run began)"
                                                if reference else ""))
                cfg.model.init_from = reference
        else:
            check_fresh_folder(cfg.checkpoint.dirpath)
            if cfg.model.objective == "dpo" and not cfg.model.init_from:
                raise UsageError("--model.objective dpo fine-tunes a model against its own starting point: give the "
                                 "weights to start from with --model.init_from (smollm2, a folder, a .ckpt or a GGUF)")
        check_writable(self.logs_root, "the log folder")
        check_writable(cfg.checkpoint.dirpath, "the checkpoint folder")
        if trainer.logger in (None, True):
            # lightning_logs/NAME/version_N; a resumed run keeps logging into its own version,
            # so its TensorBoard curve is continuous.
            trainer.logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                              "init_args": {"save_dir": self.logs_root, "name": name, "version": version}}


def dpo_reference_source(checkpoint: dict) -> str | None:
    """The weights a DPO checkpoint's frozen reference was copied from (its run's --model.init_from), or
    None: not a DPO run, or one whose reference was precomputed (the checkpoint holds it)."""
    reference = checkpoint.get("smollm", {}).get("dpo_reference") or {}
    if reference.get("kind") != "frozen":
        return None
    return (checkpoint.get("hyper_parameters") or {}).get("init_from")


def lora_options(model: Any) -> dict[str, Any] | None:
    """The run's LoRA options as smollm.preflight takes them, or None without LoRA."""
    if model.lora_rank is None:
        return None
    return {"rank": model.lora_rank, "alpha": model.lora_alpha, "targets": list(model.lora_targets)}


def apply_global_batch(cli: SmolLMCLI) -> BatchPlan:
    """The run's BatchPlan, made once from the options and the number of processes (one line if
    the global batch does not divide or disagrees with a hand-set --trainer.accumulate_grad_batches),
    continued from the checkpoint's state on resume, and handed to the data module, the Trainer
    (its accumulation) and KeepGlobalBatch. `--trainer.val_check_interval` counts optimizer steps
    (Lightning counts micro-batches), so validation keeps its place whatever the split."""
    trainer, dm = cli.trainer, cli.datamodule
    plan = BatchPlan.from_options(dm.global_batch_size, dm.batch_size, trainer.world_size,
                                  trainer.accumulate_grad_batches)
    if cli.data_state:  # before the start block, which says what the checkpoint's split was
        plan.load_state_dict(cli.data_state)
    cli.config.data.global_batch_size = dm.global_batch_size = plan.global_batch  # config.yaml records the recipe
    trainer.accumulate_grad_batches = plan.accumulation
    if isinstance(trainer.val_check_interval, int):
        trainer.val_check_interval *= plan.accumulation
    dm.plan = plan
    trainer.callbacks.append(KeepGlobalBatch(plan))
    return plan


def configure_trainer(trainer, resume_from: str | None = None, resumed: dict | None = None
                      ) -> tuple[Console, StopAtStepEnd]:
    """What the CLI cannot express as a default: atomic, safe checkpoint IO (unless a subclass
    was given with --trainer.plugins) that takes `resumed`, the checkpoint read from
    `resume_from`, our console in place of Lightning's progress bar, Ctrl-C and SIGTERM stopping
    at a step end, a validation at the last step, the data handed to the module, and the
    throughput and validation sample for TensorBoard."""
    if not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    if resumed is not None and not is_fsdp(trainer):  # Lightning's FSDP loads a checkpoint its own way
        trainer.strategy.checkpoint_io.hand_over(resume_from, resumed)
    bars = [c for c in trainer.callbacks if isinstance(c, ProgressBar)]
    for bar in bars:
        trainer.callbacks.remove(bar)
    checkpoint = next((c for c in trainer.callbacks if isinstance(c, StepCheckpoint)), None)
    throughput = Throughput()  # one measurement: the console's tokens/s is TensorBoard's
    console, stop = Console(show_progress=bool(bars), throughput=throughput), StopAtStepEnd(checkpoint)
    trainer.callbacks.extend([BindData(), RunLength(), throughput, console, stop, ValidateAtEnd(),
                              ValidationSample()])  # KeepGlobalBatch: apply_global_batch
    return console, stop


@command
def main(args: list[str]) -> int:
    setup_output()
    if torch.cuda.is_available():  # TF32 for the float32 matmuls left under bf16 autocast
        torch.set_float32_matmul_precision("high")
    lock, stop, cli, started = None, None, None, False
    try:
        check_unquoted_glob(args)
        cli = SmolLMCLI(
            LitSmolLM, TextDataModule, run=False, args=args,
            auto_configure_optimizers=False,  # LitSmolLM's optimizer and schedule are its options
            seed_everything_default=1234,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites config.yaml
            trainer_defaults={"max_steps": 5000, "use_distributed_sampler": False,
                              "log_every_n_steps": 10, "val_check_interval": 500,
                              "check_val_every_n_epoch": None, "enable_model_summary": False,
                              "num_sanity_val_steps": -1},  # validate fully at the start: where the run starts
            parser_kwargs={"exit_on_error": False, "prog": "python -m smollm.fit",
                           "description": "smollm: pretrain a SmolLM2-style model with PyTorch Lightning. "
                                          "Start with --config configs/tiny.yaml (CPU) or configs/135m.yaml (GPU)."},
        )
        console, stop = configure_trainer(cli.trainer, cli.resume_from, cli.checkpoint)
        console.resume_step = cli.resume_step  # the start block says it: Lightning restores the step later
        if cli.checkpoint is not None:  # with LoRA: the base just loaded is the one the adapters were trained on
            cli.model.check_lora_resume(cli.resume_from, cli.checkpoint)
        cli.checkpoint = None  # Lightning's now: freed once it has restored it
        apply_global_batch(cli)
        if cli.trainer.global_rank == 0:
            lock = RunLock(cli.config.checkpoint.dirpath)
            lock.acquire()
        check_memory(cli.model, cli.datamodule, cli.trainer)
        started = True
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.resume_from, weights_only=True)
        if cli.trainer.is_global_zero or is_fsdp(cli.trainer):  # FSDP: every rank runs the model
            with full_model(cli.trainer):
                print_summary(cli, console, args, show=cli.trainer.is_global_zero)
        return 0
    except Interrupted as e:
        say(f"stopped by {e.signal_name}; step {e.step} is saved. Resume with:\n  "
            + resume_command(cli, args, ["--ckpt_path", "last"]))
        return EXIT_PREEMPTED if e.signal_name == "SIGTERM" else EXIT_INTERRUPTED
    except SIGTERMException:  # Lightning's own, before training began: nothing new to save
        say("stopped by SIGTERM before training; the newest checkpoint is kept. Resume with --ckpt_path last")
        return EXIT_PREEMPTED
    except (KeyboardInterrupt, SystemExit) as e:
        # Lightning turns a KeyboardInterrupt inside fit into sys.exit(1); ours is the second Ctrl-C.
        if isinstance(e, SystemExit) and not (stop is not None and stop.stopped_at_once):
            raise
        say("stopped at once by a second Ctrl-C; the newest checkpoint is kept. Resume with:\n  "
            + resume_command(cli, args, ["--ckpt_path", "last"]))
        return EXIT_INTERRUPTED
    except (SmolLMError, ArgumentError, MisconfigurationException):
        if not started and global_rank() > 0:  # every rank found the same mistake: rank 0 says it
            return EXIT_ERROR
        raise  # one line (smollm.cli.command)
    finally:
        if stop is not None:
            stop.restore()
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
