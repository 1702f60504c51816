"""What `python -m smollm.fit` checks before the Trainer starts: a mistake costs one line, not a
run that dies an hour in, or a resume that quietly trains something else.

- the device: a GPU config on a machine without one; FSDP on the CPU; a model or a micro-batch
  that does not fit the memory there is (`check_size_fits` before anything is built,
  `check_memory` once the model and data are);
- the launcher: under torchrun or srun, the number of processes and nodes is theirs;
- a resume: the checkpoint to resume (`--ckpt_path last` finds the newest or stops), of this
  model configuration, optimizer, LoRA adapters (or none) and parameter groups, with steps left to train; a fresh run
  never writes into a folder that holds another run's checkpoints;
- the command line: an unquoted glob that the shell expanded.

Each check reads what it needs and raises a SmolLMError in one line; none reads a checkpoint
(fit reads it once, and hands it to these checks and to Lightning).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from smollm.checkpoint import check_config, find_last_checkpoint, step_files
from smollm.config import ModelConfig, estimate_memory
from smollm.errors import UsageError
from smollm.lora import apply_lora, trainable_count
from smollm.lora import check_resume as check_lora_resume
from smollm.model import SmolLM
from smollm.optim import check_same_groups, check_same_optimizer

GiB = 2**30


# ---- the device


def check_accelerator(trainer: Any) -> None:
    """A GPU config (135m.yaml) on a machine without CUDA: say what to use instead."""
    accelerator = str(trainer.accelerator)
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UsageError(f"trainer.accelerator is {accelerator!r} but this machine has no CUDA GPU; "
                         "use configs/tiny.yaml, or add --trainer.accelerator cpu --trainer.precision 32-true")


def check_size_fits(trainer, config: ModelConfig, optimizer: str = "adamw",
                    lora_options: dict[str, Any] | None = None) -> None:
    """Before anything is built: FSDP only with CUDA GPUs (Lightning refuses it on the CPU), and on
    the CPU enough free memory for float32 weights, gradients and the optimizer's state (16 bytes
    per parameter with AdamW, per process; with LoRA, gradients and state for the adapters alone;
    activations come on top). A CPU run that does not fit would otherwise be killed by the system
    without a word."""
    accelerator, strategy = str(trainer.accelerator), trainer.strategy
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if isinstance(strategy, str) and strategy.startswith("fsdp") and not on_gpu:
        raise UsageError(f"--trainer.strategy {strategy} needs CUDA GPUs (Lightning's FSDP does not run on the "
                         "CPU); on CPU use --trainer.strategy ddp")
    available = available_memory()
    if on_gpu or available is None:
        return
    processes = trainer.devices if isinstance(trainer.devices, int) and trainer.devices > 0 else 1
    trainable = trainable_count(config, lora_options["rank"], lora_options["targets"]) if lora_options else None
    needed = estimate_memory(config, optimizer=optimizer, trainable=trainable).model_and_optimizer * processes
    if needed > available:
        state = "Muon and AdamW" if optimizer == "muon" else "AdamW"
        raise UsageError(f"training {config.num_params / 1e6:,.0f}M parameters on the CPU in {processes} "
                         f"process(es) needs at least {needed / 1e9:.1f} GB for float32 weights, gradients and "
                         f"{state} state, and {available / 1e9:.1f} GB are free; use a smaller --model.preset "
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


def check_memory(model, datamodule, trainer) -> None:
    """Stop before training when the estimated peak memory exceeds what the device has free."""
    device = trainer.strategy.root_device
    bf16 = "bf16" in str(trainer.precision) or "16" in str(trainer.precision)
    lora = getattr(model, "lora_base", None) is not None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if lora else None
    need = estimate_memory(model.config, datamodule.batch_size, datamodule.seq_len, optimizer=model.hparams.optimizer,
                           bf16=bf16, loss_chunk_size=model.hparams.loss_chunk_size, trainable=trainable).total
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        free, where = available_memory(), "this machine's RAM"
    if free is not None and need > 0.9 * free:
        raise UsageError(
            f"training {model.hparams.preset} at micro-batch {datamodule.batch_size} x {datamodule.seq_len} "
            f"needs about {need / GiB:.1f} GiB, more than the {free / GiB:.1f} GiB free on {where}; lower "
            "--data.batch_size or --data.seq_len, or use a smaller --model.preset"
            + (" (on a CPU, start with --config configs/tiny.yaml)" if device.type == "cpu" else ""))


# ---- the launcher


def launcher() -> tuple[str, int, int] | None:
    """(name, processes per node, nodes) when torchrun or srun started this process, as
    Lightning's TorchElasticEnvironment and SLURMEnvironment detect them; else None."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
        return "torchrun", local, world // local
    if SLURMEnvironment.detect():
        nodes, tasks = int(os.environ.get("SLURM_NNODES", "1")), int(os.environ["SLURM_NTASKS"])
        return "srun", tasks // nodes, nodes
    return None


def take_processes_from_launcher(trainer, argv: list[str]) -> str | None:
    """Under torchrun or srun the launcher has started the processes: `--trainer.devices` and
    `--trainer.num_nodes` are its numbers (a config's one-GPU `devices: 1` gives way), so the
    same command runs on one GPU or many. A number given on the command line that disagrees is
    an error. Returns the launcher's name, or None."""
    found = launcher()
    if found is None:
        return None
    name, per_node, nodes = found
    for option, wanted in (("devices", per_node), ("num_nodes", nodes)):
        value = getattr(trainer, option)
        if str(value) == str(wanted):
            continue
        if any(a == f"--trainer.{option}" or a.startswith(f"--trainer.{option}=") for a in argv):
            raise UsageError(f"--trainer.{option} {value} but {name} started {wanted} "
                             f"{'processes per node' if option == 'devices' else 'nodes'}; drop "
                             f"--trainer.{option} (smollm takes it from {name}) or relaunch with matching numbers")
        setattr(trainer, option, wanted)
    return name


# ---- a resume, or a fresh run


def checkpoint_to_resume(ckpt_path: str, dirpath: str) -> str:
    """The checkpoint `--ckpt_path` names: `last` is the newest of the run's folder, or an error."""
    if ckpt_path != "last":
        return ckpt_path
    path = find_last_checkpoint(dirpath)
    if path is None:
        raise UsageError(f"--ckpt_path last: no checkpoint to resume in {dirpath}; "
                         "start without --ckpt_path, or give the checkpoint's path")
    return path


def check_resume(path: str, checkpoint: dict[str, Any], config: ModelConfig, optimizer: str,
                 lora_options: dict[str, Any] | None = None) -> None:
    """A checkpoint read from `path` resumes this run only with the same model configuration,
    optimizer, LoRA adapters (or none, as it had) and parameter groups. `lora_options`: the run's
    {"rank", "alpha", "targets"}, or None without LoRA."""
    check_config(path, checkpoint, config)
    lora_options = lora_options or {}
    check_lora_resume(path, checkpoint, lora_options.get("rank"), lora_options.get("alpha"),
                      lora_options.get("targets"))
    check_same_optimizer(path, checkpoint, optimizer)
    with torch.device("meta"):  # the parameter groups' sizes only: no memory, no init
        model = SmolLM(config)
        if lora_options:
            apply_lora(model, lora_options["rank"], lora_options["alpha"], targets=lora_options["targets"])
        check_same_groups(path, checkpoint, model, optimizer)


def check_run_length(trainer: Any) -> None:
    """A run needs an end: --trainer.max_steps or --trainer.max_epochs (passes over the training
    windows). Lightning would otherwise train 1000 epochs, which an endless loader never ends."""
    if trainer.max_steps in (None, -1) and trainer.max_epochs in (None, -1):
        raise UsageError("the run has no end: give --trainer.max_steps N (optimizer steps) or --trainer.max_epochs N "
                         "(passes over the training windows)")


def check_steps_left(path: str, step: int, max_steps: int | None) -> None:
    """A resume must have steps left to train."""
    if max_steps is not None and 0 <= max_steps <= step:
        raise UsageError(f"checkpoint {path} is at step {step} and --trainer.max_steps is "
                         f"{max_steps}: nothing to train; raise --trainer.max_steps to continue")


def check_fresh_folder(dirpath: str) -> None:
    """A fresh run would overwrite step files of the earlier run and mix the two."""
    if step_files(dirpath):
        raise UsageError(f"{dirpath} already holds checkpoints of an earlier run; resume it "
                         "with --ckpt_path last, or start a new run with another --name")


# ---- the command line


def check_unquoted_glob(args: list[str]) -> None:
    """`--data.files *.txt` unquoted: the shell hands over every match as its own argument."""
    for i, a in enumerate(args):
        if a == "--data.files":
            values = []
            for b in args[i + 1:]:
                if b.startswith("--"):
                    break
                values.append(b)
            if len(values) > 1:
                raise UsageError(f"--data.files got {len(values)} separate arguments ({values[0]} {values[1]} ...): "
                                 "the shell expanded a glob; quote it (--data.files 'data/*.txt') or give a "
                                 "list (--data.files '[a.txt, b.txt]')")


__all__ = ["available_memory", "check_accelerator", "check_fresh_folder", "check_memory", "check_resume",
           "check_run_length", "check_size_fits", "check_steps_left", "check_unquoted_glob", "checkpoint_to_resume",
           "launcher", "take_processes_from_launcher"]
