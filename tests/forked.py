"""`python -m smollm.<command>` in a new process that skips the imports: forked from a process that
has already imported torch, Lightning and smollm.

A fresh Python process spends ~8-10 s of CPU importing torch and Lightning before a tiny test run
does anything, and the tests start dozens of them (each rank of a DDP run is one). Here every run is
still its own process: its own pid, environment, working directory, stdout/stderr, exit code and
signals, and `python -m`'s `__main__` and sys.argv. It is forked by the standard library's
forkserver, which imports the modules below once per test worker and computes nothing (so there are
no thread pools to inherit).

What a forked run cannot have is an import under another environment, or an import's own output. A
run whose environment changes what an import reads (HF_*, OMP_*, ...) gets a fresh interpreter
instead (`fitutil.run_fit` and `start_fit` decide), and so do the tests of what a user sees first
(`fresh=True`).
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import types
from pathlib import Path

# What the forkserver imports once: all that `python -m smollm.fit` imports, less smollm.fit itself
# (a module that `-m` runs must not be imported before, or runpy warns on stderr).
PRELOAD = ["torch", "torch.utils.tensorboard", "lightning.pytorch", "lightning.pytorch.cli", "transformers", "s3fs",
           "smollm", "smollm.module", "smollm.data", "smollm.callbacks", "smollm.config", "smollm.console"]

# Environment variables read when a module is imported (so fixed in the forkserver): a run that sets one
# to another value than the forkserver's is not forked.
IMPORT_TIME = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "OMP_", "MKL_", "CUDA_", "PYTHON")

_lock = threading.Lock()
_environment: dict[str, str] | None = None
_running: set[Forked] = set()


@atexit.register
def _kill_left_running() -> None:
    """A run a failed test left running is killed when the test process exits (multiprocessing
    would otherwise wait for it there: a forked run is its child, not a fresh process's)."""
    for proc in list(_running):
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)


def _start(environment: dict[str, str]) -> None:
    """Start this process's forkserver, importing PRELOAD under `environment`, once."""
    global _environment
    with _lock:
        if _environment is not None:
            return
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(environment)
        try:
            multiprocessing.forkserver.set_forkserver_preload(PRELOAD)
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _environment = dict(environment)


def can_fork(session: dict[str, str], changes: dict[str, str] | None) -> bool:
    """Whether a run whose environment is the test session's with `changes` imports as the forkserver
    did: none of the changes is read by an import. (The forkserver is started on first use under
    `session`, the environment the test session started with, not one that a test has patched.)"""
    _start(session)
    return all(value == _environment.get(key) for key, value in (changes or {}).items()
               if key.startswith(IMPORT_TIME))


def _run(argv: list[str], environment: dict[str, str], cwd: str, out: str, err: str) -> None:
    """In the forked process: take the run's stdio, environment and directory, run `-m MODULE ARGS`,
    `-c CODE ARGS` or `SCRIPT ARGS` as `python` does (`__main__`, sys.argv), and exit as the
    interpreter does."""
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environment)
    # What an import took from the environment, taken again from the run's: Lightning's rank for its
    # rank-zero-only calls (read from RANK, LOCAL_RANK, SLURM_PROCID at import), 0 in the forkserver.
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    if rank_zero is not None:
        rank_zero.rank_zero_only.rank = rank_zero._get_rank() or 0
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = argv[1:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path.insert(0, "")
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:  # as the interpreter: the traceback, then die of SIGINT
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    threading._shutdown()  # as at the interpreter's exit: wait for its other threads, then atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


class Forked:
    """A forked run, with the parts of subprocess.Popen that the tests use (text stdout and stderr,
    read once it has ended)."""

    def __init__(self, argv: list[str], environment: dict[str, str], cwd: Path) -> None:
        """argv: what follows `python`: `-m MODULE ARGS`, `-c CODE ARGS` or `SCRIPT ARGS`."""
        self.folder = tempfile.TemporaryDirectory(prefix="smollm-forked-")
        self.out, self.err = (os.path.join(self.folder.name, name) for name in ("out", "err"))
        for path in (self.out, self.err):
            Path(path).touch()
        self.args = [sys.executable, *argv]
        self.process = multiprocessing.get_context("forkserver").Process(
            target=_run, args=(list(argv), environment, str(cwd), self.out, self.err), daemon=False)
        # The forkserver's children would import the parent's __main__ first, as spawn's do (here
        # pytest's or a script's): none is given, since _run names all it needs.
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            self.process.start()
        finally:
            sys.modules["__main__"] = main
        self.pid = self.process.pid
        _running.add(self)

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        code = self.process.exitcode
        if code is not None:
            _running.discard(self)
        return code

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.process.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return (Path(self.out).read_text(encoding="utf-8", errors="replace"),
                Path(self.err).read_text(encoding="utf-8", errors="replace"))

    def stderr_so_far(self) -> str:
        """What the run has written to stderr so far."""
        return Path(self.err).read_text(encoding="utf-8", errors="replace")

    def send_signal(self, sig: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

