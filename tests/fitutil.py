"""Helpers for the training tests: a small local corpus and tokenizer, fit runs in-process or in a
fresh subprocess, and callbacks that record what was trained or inject faults.

The callbacks are passed on the command line as `--trainer.callbacks+=fitutil.Recorder`, exactly
as a user would pass their own, so the tests drive the real CLI.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy

import forked
from helpers_data import make_tokenizer
from smollm.callbacks import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
         "matches near old rivers and bright mountains under cold winter skies full of stars").split()


def write_corpus(folder: Path, n_files: int = 4, words_per_file: int = 1500, seed: int = 0) -> Path:
    """A few documents of pseudo-random English words: real text for a tokenizer, made here."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = []
        for _ in range(words_per_file // 12):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(12)) + ".")
        (folder / f"doc{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def build_tokenizer(folder: Path, corpus: Path) -> Path:
    """A byte-level BPE tokenizer of 300 tokens trained on the corpus, saved as a Hugging Face
    tokenizer directory (what AutoTokenizer loads)."""
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.txt"))]
    return Path(make_tokenizer(folder, vocab_size=300, texts=texts))


def fit_args(root: Path, corpus: Path, tokenizer: Path, max_steps: int, every: int = 1000,
             extra: list[str] | None = None) -> list[str]:
    """Command-line arguments of a tiny CPU run: ~300-token vocabulary, 16-token windows. The
    global batch is not set (tiny.yaml's is), so it is batch_size x processes unless `extra`
    sets it. The optimizer and schedule are pinned (AdamW, cosine: what the tests' expected
    rates and optimizer states are written for, and what FSDP takes), whatever tiny.yaml's demo uses."""
    return [
        "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", "1000",
        "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "2",
        "--trainer.enable_progress_bar", "false",
        "--model.config_overrides", '{"vocab_size": 320}',
        "--model.warmup_steps", "3",
        "--model.decay_steps", "20",
        "--model.learning_rate", "0.01",
        "--model.optimizer", "adamw",
        "--model.schedule", "cosine",
        "--model.sample_tokens", "4",
        "--data.files", json.dumps([str(corpus)]),
        "--data.tokenizer", str(tokenizer),
        "--data.cache_dir", str(root / "cache"),
        "--data.seq_len", "16",
        "--data.batch_size", "4",
        "--data.global_batch_size", "null",  # micro-batch x processes: the tests set the split
        "--data.val_fraction", "0.1",
        "--checkpoint.every_n_train_steps", str(every),
        *(extra or []),
    ]


def run_fit(args: list[str], timeout: float = 300, env: dict | None = None,
            fresh: bool = False) -> subprocess.CompletedProcess:
    """`python -m smollm.fit ARGS` in a new process, as a user runs it: forked from one that has
    imported torch and Lightning already (tests/forked.py), or, with `fresh` or an environment that
    changes what an import reads, a fresh interpreter (what a test of the process's start needs)."""
    return run_python(["-m", "smollm.fit", *args], timeout, env, fresh)


def run_python(argv: list[str], timeout: float = 300, env: dict | None = None,
               fresh: bool = False) -> subprocess.CompletedProcess:
    """`python ARGV` (`-m MODULE ARGS`, `-c CODE ARGS` or `SCRIPT ARGS`) in a new process, to its end, as
    run_fit: what subprocess.run(capture_output=True, text=True) gives."""
    proc = start_python(argv, env, fresh)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess([sys.executable, *argv], proc.returncode, out, err)


def run_ranks(args: list[str], processes: int = 2, timeout: float = 300,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m smollm.fit ARGS --trainer.devices N` on N CPU processes, each started as Lightning's DDP
    launcher starts its children (MASTER_ADDR/PORT, NODE_RANK, LOCAL_RANK and WORLD_SIZE set), but forked
    (tests/forked.py) rather than a fresh interpreter: for the tests whose subject is what the
    processes train, not how they start (the `ddp_straight` run of test_processes.py goes through
    Lightning's own launcher). What comes back is one run's: the first failing exit code, and every
    rank's output, in rank order."""
    assert "--trainer.devices" in args and args[args.index("--trainer.devices") + 1] == str(processes), args
    port = free_port()
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0", "WORLD_SIZE": str(processes)}
    ranks = [start_fit(args, {**(env or {}), **common, "LOCAL_RANK": str(rank)}) for rank in range(processes)]
    deadline, failed = time.time() + timeout, None
    try:  # until all have ended; once one has failed, the others get a minute (they may wait for it forever)
        while any(proc.poll() is None for proc in ranks) and time.time() < deadline:
            if failed is None and any(proc.poll() for proc in ranks):
                failed = next(proc.poll() for proc in ranks if proc.poll())
                deadline = min(deadline, time.time() + 60)
            time.sleep(0.1)
    finally:
        for proc in ranks:
            proc.kill()
    outputs = [proc.communicate(timeout=30) for proc in ranks]
    if failed is None and any(proc.returncode for proc in ranks) and time.time() >= deadline:
        raise subprocess.TimeoutExpired(ranks[0].args, timeout)
    code = next((proc.returncode for proc in ranks if proc.returncode), 0)
    return subprocess.CompletedProcess(ranks[0].args, code, "".join(out for out, _ in outputs),
                                       "".join(err for _, err in outputs))


def run_here(args: list[str], capsys, env: dict | None = None, command: str = "fit") -> subprocess.CompletedProcess:
    """`python -m smollm.<command> ARGS` run in this process, `env` set for the run: what run_fit gives
    (exit code, stdout, stderr), without a fresh process's import of torch and Lightning (most of a
    tiny run's time). For sequential single-process runs; signals, DDP and clean-exit checks need run_fit."""
    import importlib

    main = importlib.import_module(f"smollm.{command}").main
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    capsys.readouterr()
    try:
        code = main(args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    out = capsys.readouterr()
    return subprocess.CompletedProcess([command, *args], code, out.out, out.err)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(commands: list[tuple[list[str], dict]], timeout: float = 400) -> list[subprocess.CompletedProcess]:
    """Start every (argv, environment) at once, as a cluster starts its nodes, and wait for all. A
    `python -m smollm.*` command is forked (tests/forked.py) where its environment allows."""
    procs = []
    for argv, env in commands:
        if argv[0] == sys.executable and argv[1] == "-m" and argv[2].startswith("smollm."):
            procs.append(start_python(argv[1:], env))
        else:
            procs.append(subprocess.Popen(argv, cwd=ROOT, env=subprocess_env(env), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    results = []
    for (argv, _), proc in zip(commands, procs):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    return results


def torchrun(args: list[str], caches: list[Path], rendezvous: str = "static") -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes N --nproc_per_node 1 ... -m smollm.fit ARGS` once per "node" on this
    machine, node i with $SMOLLM_CACHE caches[i] (its local disk, or a shared one). "static" is
    the rendezvous of --node_rank with --master_addr/--master_port; "c10d" that of --rdzv_endpoint."""
    port, nodes = free_port(), len(caches)
    commands = []
    for node, cache in enumerate(caches):
        if rendezvous == "static":
            where = ["--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
        else:
            where = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "smollm-test"]
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", "1",
                *where, "-m", "smollm.fit", *args]
        # torchrun sets 1 thread (and says so) unless told: the threads of a run started without it
        commands.append((argv, {"SMOLLM_CACHE": str(cache), "OMP_NUM_THREADS": str(torch.get_num_threads())}))
    return launch(commands)


def srun(args: list[str], nodes: int) -> list[subprocess.CompletedProcess]:
    """`python -m smollm.fit ARGS` as `srun --nodes N --ntasks-per-node 1` starts it: one process
    per "node" with SLURM's variables, which Lightning's SLURMEnvironment reads (no SLURM here)."""
    port = free_port()
    commands = []
    for rank in range(nodes):
        env = {"SLURM_NTASKS": str(nodes), "SLURM_NNODES": str(nodes), "SLURM_NTASKS_PER_NODE": "1",
               "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank),
               "SLURM_JOB_NAME": "smollm", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "127.0.0.1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        commands.append(([sys.executable, "-m", "smollm.fit", *args], env))
    return launch(commands)


def start_fit(args: list[str], env: dict | None = None) -> subprocess.Popen | forked.Forked:
    """`python -m smollm.fit ARGS` started in the background (forked where it can be, as run_fit), to
    be signalled by a test."""
    return start_python(["-m", "smollm.fit", *args], env)


def start_python(argv: list[str], env: dict | None = None, fresh: bool = False) -> subprocess.Popen | forked.Forked:
    """`python ARGV` started in the background: forked (tests/forked.py), or, with `fresh` or an
    environment that changes what an import reads, a fresh interpreter. What comes back has the
    parts of subprocess.Popen that the tests use (pid, poll, wait, communicate, signals); its output
    is read with communicate."""
    environment = subprocess_env(env)
    if not fresh and forked.can_fork(SESSION_ENVIRONMENT, env):
        return forked.Forked(argv, environment, ROOT)
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    """Poll `ready()` until it is true; fail if the process ends first or time runs out."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def subprocess_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


# The environment the test session started with, which the processes forked by tests/forked.py import
# under: a run whose environment differs from it in what an import reads gets a fresh interpreter.
SESSION_ENVIRONMENT = subprocess_env()


def checkpoint_at(root: Path, step: int) -> dict:
    """The step's checkpoint of the tiny run under `root`, read safely."""
    return torch.load(root / "checkpoints" / "tiny" / f"step={step:06d}.ckpt", weights_only=True)


def assert_same_state(a: dict, b: dict, loops: bool = False) -> None:
    """Two checkpoints hold the same training state, bit for bit: step, weights, every optimizer
    state tensor, the schedule and, with `loops`, Lightning's batch counters and the data position."""
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys(), i
        for name in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][name]), torch.as_tensor(sb[i][name])), (i, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    if loops:
        progress = "epoch_loop.batch_progress"
        assert a["loops"]["fit_loop"][progress] == b["loops"]["fit_loop"][progress]
        assert a["TextDataModule"]["samples_seen"] == b["TextDataModule"]["samples_seen"]


def read_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Recorder(L.Callback):
    """Appends one JSON line per optimizer step: step, loss, learning rate, window ids, rank, and
    the gradient norm."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = {
            "step": trainer.global_step,
            "rank": trainer.global_rank,
            "loss": float(outputs["loss"].item()) if isinstance(outputs, dict) else float(outputs.item()),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "windows": batch["index"].tolist(),
        }
        if "train/grad_norm" in trainer.callback_metrics:  # this step's, before clipping
            record["grad_norm"] = float(trainer.callback_metrics["train/grad_norm"])
        path = self.path if trainer.world_size == 1 else f"{self.path}.rank{trainer.global_rank}"
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


class MetricsRecorder(L.Callback):
    """Appends one JSON line of the logged metrics (`trainer.callback_metrics`) at each optimizer step's
    end and after each validation but the sanity check: {"step", "at": "train" or "val", metric: value}."""

    def __init__(self, path: str) -> None:
        self.path, self.seen = path, 0

    def _write(self, trainer, at: str) -> None:
        record = {"step": trainer.global_step, "at": at,
                  **{k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.seen and trainer.is_global_zero:
            self.seen = trainer.global_step
            self._write(trainer, "train")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.is_global_zero:
            self._write(trainer, "val")


class StartState(L.Callback):
    """Saves what training starts from, once it starts (a checkpoint resumed, weights loaded):
    the step, the model's weights, the optimizer's class and state dict, and the schedulers'
    state dicts, as a torch file at `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            optimizer = trainer.optimizers[0]
            torch.save({"step": trainer.global_step, "weights": pl_module.model.state_dict(),
                        "optimizer": type(optimizer).__name__, "optimizer_state": optimizer.state_dict(),
                        "schedulers": [c.scheduler.state_dict() for c in trainer.lr_scheduler_configs]}, self.path)


class PoisonWeights(L.Callback):
    """Sets one weight to NaN before step `at_step` trains: the loss of that step is NaN."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.at_step:
            with torch.no_grad():
                pl_module.model.norm.weight[0] = float("nan")


class SlowStep(L.Callback):
    """Sleeps after each step so that a test can signal the process between steps."""

    def __init__(self, seconds: float = 0.3) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


class SignalAt(L.Callback):
    """Sends `signal` (a name: "SIGTERM", "SIGINT") to this process as micro-batch `micro` (0-based)
    of optimizer step `step` starts, once: an interrupt that lands inside gradient accumulation.
    With `rank`, only that process is signalled."""

    def __init__(self, step: int, micro: int = 0, signal: str = "SIGTERM", rank: int | None = None) -> None:
        self.step, self.micro, self.signal, self.rank = step, micro, signal, rank  # rank None: every rank
        self._micro, self._last_step, self._sent = 0, None, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import signal

        if trainer.global_step != self._last_step:  # the first micro-batch of a new step
            self._micro, self._last_step = 0, trainer.global_step
        else:
            self._micro += 1
        if self.rank not in (None, trainer.global_rank):
            return
        if not self._sent and trainer.global_step + 1 == self.step and self._micro == self.micro:
            self._sent = True
            os.kill(os.getpid(), getattr(signal, self.signal))


class SlowValidation(L.Callback):
    """Sleeps after each validation batch (not in the sanity check) and touches `marker` when a
    validation starts, so that a test can signal the process in the middle of one."""

    def __init__(self, marker: str, seconds: float = 0.5) -> None:
        self.marker, self.seconds = marker, seconds

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            Path(self.marker).touch()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            time.sleep(self.seconds)


class HangingCheckpointIO(AtomicCheckpointIO):
    """Writes of step >= 4 write half a file and then hang, so that a test can SIGKILL the
    process in the middle of writing a checkpoint. The file named by $SMOLLM_TEST_SIGNAL
    appears once the half-written file is on disk."""

    def _write(self, checkpoint, f) -> None:
        if checkpoint.get("global_step", 0) < 4:
            return super()._write(checkpoint, f)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        Path(os.environ["SMOLLM_TEST_SIGNAL"]).write_text("writing")
        time.sleep(600)


class CountingCheckpointIO(AtomicCheckpointIO):
    """Writes checkpoints as fit does and appends "<rank> <pid> <file name>" to `path` for each
    one: a test counts the writes of every process."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open(self.path, "a") as f:
            f.write(f"{rank} {os.getpid()} {Path(path).name}\n")


class CountBuilds(L.Callback):
    """Appends "<pid>" to `path` each time this process builds (tokenizes) a token cache: a test
    counts the builds of every process. The CLI makes its callbacks before the data is prepared;
    this one wraps TokenStore._build then, for the whole process (use it in subprocesses)."""

    def __init__(self, path: str) -> None:
        from smollm.data.store import TokenStore

        build = TokenStore._build

        def counted(store, *args, **kwargs):
            with open(path, "a") as f:
                f.write(f"{os.getpid()}\n")
            return build(store, *args, **kwargs)

        TokenStore._build = counted


class SyncDetector(L.Callback):
    """Records every host-device synchronization torch reports (set_sync_debug_mode) from the
    start of step `first` to the start of step `last`: the steady steps, all of the loop between
    them included. The messages go to `SyncDetector.found` (the test runs fit in-process)."""

    found: list[str] = []

    def __init__(self, first: int = 3, last: int = 7) -> None:
        self.first, self.last, self._catch = first, last, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import warnings

        step = trainer.global_step + 1
        if step == self.first:
            self._catch = warnings.catch_warnings(record=True)
            self._records = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif step == self.last and self._catch is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(None, None, None)
            SyncDetector.found.extend(f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}"
                                      for w in self._records if "called a synchronizing" in str(w.message))
            self._catch = None


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1, `--trainer.strategy fsdp`) on CPU processes over gloo,
    for tests only.

    Lightning refuses `fsdp` without CUDA (its accelerator check refuses the name and exact
    FSDPStrategy instances, not subclasses), and two of its choices assume a GPU, which this
    class changes and nothing else:
    - it hands FSDP no device on the CPU, and torch's FSDP then refuses to build ("FSDP needs a
      non-CPU accelerator device"); here FSDP is given device_id=cpu;
    - it gathers full state dicts with offload_to_cpu=True, which crashes torch's FSDP (SIGSEGV)
      when the model already lives on the CPU; here the gather stays where it is.
    Wrapping, sharding, the optimizer, checkpoint contents and resume are Lightning's own.
    """

    def setup_environment(self) -> None:
        import lightning.fabric.strategies.fsdp as fabric_fsdp
        import lightning.fabric.strategies.model_parallel as fabric_model_parallel
        import lightning.pytorch.strategies.fsdp as pytorch_fsdp

        for module in (fabric_fsdp, fabric_model_parallel, pytorch_fsdp):
            if hasattr(module, "_get_full_state_dict_context"):
                module._get_full_state_dict_context = _full_state_dict_context_in_place
        super().setup_environment()

    def _setup_model(self, model):
        from unittest import mock

        import torch.distributed.fsdp as fsdp

        class OnCPU(fsdp.FullyShardedDataParallel):
            def __init__(self, module, *args, device_id=None, **kwargs):
                super().__init__(module, *args, device_id=torch.device("cpu"), **kwargs)

        with mock.patch.object(fsdp, "FullyShardedDataParallel", OnCPU):
            return super()._setup_model(model)


def _full_state_dict_context_in_place(module, world_size: int, rank0_only: bool = True):
    """Lightning's `_get_full_state_dict_context`, without offload_to_cpu."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.state_dict_type(
        module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


class FSDPUnits(L.Callback):
    """Writes, at the start of training, the names of the modules FSDP wraps as units (JSON)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if trainer.is_global_zero:
            units = [name.replace("_fsdp_wrapped_module.", "") for name, m in trainer.strategy.model.named_modules()
                     if isinstance(m, FullyShardedDataParallel)]
            Path(self.path).write_text(json.dumps(units))


def group_names(optimizer, model) -> dict[str, list[str]]:
    """{group name: sorted plain names of its parameters} of an optimizer over `model`."""
    from smollm.optim import plain_name

    names = {id(p): plain_name(n) for n, p in model.named_parameters()}
    out: dict[str, list[str]] = {}
    for group in optimizer.param_groups:
        out.setdefault(group["name"], []).extend(names[id(p)] for p in group["params"])
    return {k: sorted(v) for k, v in out.items()}


class GroupNames(L.Callback):
    """Writes, at the start of training, each rank's parameter groups by name (JSON): the
    optimizer's own ("groups"), and the split Muon would get ("with_muon"), as the model is
    wrapped at that point (FSDP: flat 1-D shards)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer, pl_module) -> None:
        from smollm.optim import parameter_groups

        with_muon = {k: sorted(n for n, _ in v) for k, v in parameter_groups(pl_module.model, muon=True).items()}
        record = {"groups": group_names(trainer.optimizers[0], pl_module.model), "with_muon": with_muon,
                  "shapes": sorted({len(p.shape) for p in pl_module.model.parameters()})}
        Path(f"{self.path}.rank{trainer.global_rank}").write_text(json.dumps(record))
