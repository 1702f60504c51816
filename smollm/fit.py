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
- the console (smollm.callbacks.Console); Ctrl-C and SIGTERM finish the current step, save it, and stop;
- every foreseeable failure is one line on stderr and a non-zero exit; a bug keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import warnings

import torch
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from smollm.batch import BatchPlan, resumed_global_batch
from smollm.callbacks import (AtomicCheckpointIO, BindData, Console, Interrupted, KeepGlobalBatch, StepCheckpoint,
                              StopAtStepEnd, Throughput, ValidateAtEnd, ValidationSample)
from smollm.checkpoint import RunLock, check_config, find_last_checkpoint, read_checkpoint, step_files
from smollm.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_PREEMPTED, fail, fail_on
from smollm.config import ModelConfig, estimate_memory
from smollm.data import TextDataModule
from smollm.errors import SmolLMError, UsageError
from smollm.generate import complete
from smollm.io import check_writable
from smollm.model import SmolLM
from smollm.module import LitSmolLM
from smollm.optim import (check_clipping, check_precision, check_same_groups, check_same_optimizer,
                          check_strategy)
from smollm.sharding import full_model, is_fsdp

GiB = 2**30


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
        accelerator = str(trainer.accelerator)
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise UsageError(f"trainer.accelerator is {accelerator!r} but this machine has no CUDA GPU; "
                             "use configs/tiny.yaml, or add --trainer.accelerator cpu --trainer.precision 32-true")
        model_config = ModelConfig.from_name(cfg.model.preset, **(cfg.model.config_overrides or {}))
        self.launcher = take_processes_from_launcher(trainer, self.argv)
        check_strategy(cfg.model.optimizer, trainer.strategy)
        check_clipping(cfg.model.grad_clip, trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
        warning = check_precision(trainer.precision)
        if warning:
            logging.getLogger("smollm").warning(warning)
        check_size_fits(trainer, model_config, cfg.model.optimizer)
        root = trainer.default_root_dir or os.getcwd()
        name = cfg.name or cfg.model.preset
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = os.path.join(root, "checkpoints", name)
        self.logs_root = os.path.join(root, "lightning_logs")

        self.resume_from, version, self.resume_step, self.data_state = None, None, 0, None
        if cfg.ckpt_path:
            path = cfg.ckpt_path
            if path == "last":
                path = find_last_checkpoint(cfg.checkpoint.dirpath)
                if path is None:
                    raise UsageError(f"--ckpt_path last: no checkpoint to resume in {cfg.checkpoint.dirpath}; "
                                     "start without --ckpt_path, or give the checkpoint's path")
            # A damaged file (also the newest, under `last`) stops the run with one line naming it and
            # the newest intact checkpoint of the run: resuming from an older step is the user's call.
            checkpoint = read_checkpoint(path)
            check_config(path, checkpoint, model_config)
            check_same_optimizer(path, checkpoint, cfg.model.optimizer)
            with torch.device("meta"):  # the parameter groups' sizes only: no memory, no init
                check_same_groups(path, checkpoint, SmolLM(model_config), cfg.model.optimizer)
            self.resume_from, self.resume_step = path, int(checkpoint.get("global_step", 0))
            version = checkpoint["smollm"].get("logger_version")
            self.data_state = checkpoint.get(TextDataModule.__qualname__)
            # the checkpoint's global batch, unless --data.global_batch_size sets another
            cfg.data.global_batch_size = resumed_global_batch(cfg.data.global_batch_size, self.data_state,
                                                              self.resume_step)
            del checkpoint
            if trainer.max_steps is not None and 0 <= trainer.max_steps <= self.resume_step:
                raise UsageError(f"checkpoint {path} is at step {self.resume_step} and --trainer.max_steps is "
                                 f"{trainer.max_steps}: nothing to train; raise --trainer.max_steps to continue")
            if cfg.model.init_from:  # the weights come from the checkpoint: record what the run uses
                logging.getLogger("smollm").warning(
                    f"warning: --model.init_from {cfg.model.init_from} is ignored when resuming: the weights "
                    f"come from {path}")
                cfg.model.init_from = None
        elif step_files(cfg.checkpoint.dirpath):
            # A fresh run would overwrite step files of the earlier run and mix the two.
            raise UsageError(f"{cfg.checkpoint.dirpath} already holds checkpoints of an earlier run; resume it "
                             "with --ckpt_path last, or start a new run with another --name")
        check_writable(self.logs_root, "the log folder")
        check_writable(cfg.checkpoint.dirpath, "the checkpoint folder")
        if trainer.logger in (None, True):
            # lightning_logs/NAME/version_N; a resumed run keeps logging into its own version,
            # so its TensorBoard curve is continuous.
            trainer.logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                              "init_args": {"save_dir": self.logs_root, "name": name, "version": version}}


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


def check_size_fits(trainer, config: ModelConfig, optimizer: str = "adamw") -> None:
    """Before anything is built: FSDP only with CUDA GPUs (Lightning refuses it on the CPU), and on
    the CPU enough free memory for float32 weights, gradients and the optimizer's state (16 bytes
    per parameter with AdamW, per process; activations come on top). A CPU run that does not fit would otherwise
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
    needed = estimate_memory(config, optimizer=optimizer).model_and_optimizer * processes
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


def configure_trainer(trainer) -> tuple[Console, StopAtStepEnd]:
    """What the CLI cannot express as a default: atomic, safe checkpoint IO (unless a subclass
    was given with --trainer.plugins), our console in place of Lightning's progress bar, Ctrl-C
    and SIGTERM stopping at a step end, a validation at the last step, the data handed to the
    module, and the throughput and validation sample for TensorBoard."""
    if not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    bars = [c for c in trainer.callbacks if isinstance(c, ProgressBar)]
    for bar in bars:
        trainer.callbacks.remove(bar)
    checkpoint = next((c for c in trainer.callbacks if isinstance(c, StepCheckpoint)), None)
    throughput = Throughput()  # one measurement: the console's tokens/s is TensorBoard's
    console, stop = Console(show_progress=bool(bars), throughput=throughput), StopAtStepEnd(checkpoint)
    trainer.callbacks.extend([BindData(), throughput, console, stop, ValidateAtEnd(),
                              ValidationSample()])  # KeepGlobalBatch: apply_global_batch
    return console, stop


def check_memory(model: LitSmolLM, datamodule: TextDataModule, trainer) -> None:
    """Stop before training when the estimated peak memory exceeds what the device has free."""
    device = trainer.strategy.root_device
    bf16 = "bf16" in str(trainer.precision) or "16" in str(trainer.precision)
    need = estimate_memory(model.config, datamodule.batch_size, datamodule.seq_len, optimizer=model.hparams.optimizer,
                           bf16=bf16, loss_chunk_size=model.hparams.loss_chunk_size).total
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


def command(args: list[str], drop: tuple[str, ...], add: list[str]) -> str:
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


def resume_command(cli: SmolLMCLI | None, args: list[str], add: list[str],
                   drop: tuple[str, ...] = ("--ckpt_path",)) -> str:
    """The command that continues the run: as it was started, with `add`. Under torchrun or srun,
    or on several nodes, it says to relaunch the same way, on every node."""
    plain = command(args, drop, add)
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


def print_summary(cli: SmolLMCLI, console: Console, args: list[str], show: bool = True) -> None:
    """The end of a run: what was trained, the model's next token and a greedy sample, and the
    commands to continue, generate and look. Under FSDP every rank generates; rank 0 prints."""
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    tokens_per_step = dm.plan.global_batch * dm.seq_len
    lines = ["", "done: " + "; ".join(console.summary(trainer, tokens_per_step))]
    ckpt = next((c for c in trainer.callbacks if isinstance(c, StepCheckpoint)), None)
    last = find_last_checkpoint(ckpt.dirpath) if ckpt is not None else None
    prompt = model.hparams.sample_prompt
    sample, new = complete(model.model, dm.tokenizer, prompt, max_new_tokens=max(1, model.hparams.sample_tokens))
    lines.append(f"next token after {prompt!r}: {dm.tokenizer.decode(new[:1])!r} (id {new[0]})")  # greedy: the same
    lines.append(f"greedy sample: {prompt + sample!r}")
    if last is not None:
        lines.append(f"checkpoint: {_rel(last)} (and {_rel(os.path.join(ckpt.dirpath, 'last.ckpt'))})")
        lines.append("continue:    " + resume_command(cli, args, ["--ckpt_path", "last", "--trainer.max_steps",
                                                                  str(2 * trainer.max_steps)],
                                                      ("--ckpt_path", "--trainer.max_steps")))
        lines.append("generate:    " + shlex.join(["python", "-m", "smollm.generate", "--checkpoint",
                                                   _rel(os.path.join(ckpt.dirpath, "last.ckpt")), "--prompt", prompt]))
    lines.append("TensorBoard: " + shlex.join(["tensorboard", "--logdir", _rel(cli.logs_root)]))
    if show:
        print("\n".join(lines), flush=True)


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
            return _launched_rank() == 0
        return not message.startswith(self.NOISE)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message comes (main may run many times in one
    process, each with its own stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _setup_output() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed", "lightning.fabric.utilities.distributed",
                 "lightning.pytorch.trainer.connectors.signal_connector"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _LightningNoise) for f in logger.filters):
            logger.addFilter(_LightningNoise())
    ours = logging.getLogger("smollm")
    if not ours.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(lambda record: _launched_rank() == 0)  # under torchrun or srun: once, not per rank
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
    if torch.cuda.is_available():  # TF32 for the float32 matmuls left under bf16 autocast
        torch.set_float32_matmul_precision("high")


def main(args: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if args is None else args)
    _setup_output()
    lock, stop, cli, started = None, None, None, False
    try:
        _check_unquoted_glob(args)
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
        console, stop = configure_trainer(cli.trainer)
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
        print(f"stopped by {e.signal_name}; step {e.step} is saved. Resume with:\n  "
              + resume_command(cli, args, ["--ckpt_path", "last"]), file=sys.stderr)
        return EXIT_PREEMPTED if e.signal_name == "SIGTERM" else EXIT_INTERRUPTED
    except SIGTERMException:  # Lightning's own, before training began: nothing new to save
        print("stopped by SIGTERM before training; the newest checkpoint is kept. Resume with --ckpt_path last",
              file=sys.stderr)
        return EXIT_PREEMPTED
    except (KeyboardInterrupt, SystemExit) as e:
        # Lightning turns a KeyboardInterrupt inside fit into sys.exit(1); ours is the second Ctrl-C.
        if isinstance(e, SystemExit) and not (stop is not None and stop.stopped_at_once):
            raise
        print("stopped at once by a second Ctrl-C; the newest checkpoint is kept. Resume with:\n  "
              + resume_command(cli, args, ["--ckpt_path", "last"]), file=sys.stderr)
        return EXIT_INTERRUPTED
    except (SmolLMError, ArgumentError, MisconfigurationException) as e:
        if not started and _launched_rank() > 0:  # every rank found the same mistake: rank 0 says it
            return EXIT_ERROR
        if isinstance(e, SmolLMError):
            return fail_on(e)
        return fail(str(e)[:500] + " (see --help)" if isinstance(e, ArgumentError) else str(e))
    finally:
        if stop is not None:
            stop.restore()
        if lock is not None:
            lock.release()


def _launched_rank() -> int:
    """This process's global rank when torchrun or srun started it (0 otherwise)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def _check_unquoted_glob(args: list[str]) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
