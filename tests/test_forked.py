"""tests/forked.py, the tests' way of starting a smollm process without its imports: a forked run
is what a fresh `python -m smollm.fit` is, as far as the tests read it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import fitutil
import forked


def test_a_forked_run_prints_and_exits_as_a_fresh_interpreter(tmp_path):
    """The same command forked and fresh: the same stdout, stderr and exit code, for `--help`
    (argparse's name of the program, from sys.argv) and for a one-line error."""
    for args in (["--help"], [*fitutil.fit_args(tmp_path, tmp_path, tmp_path, 1), "--ckpt_path", "last"]):
        fresh = fitutil.run_fit(args, fresh=True)
        fork = fitutil.run_fit(args)
        assert isinstance(fork.args, list) and fork.args[:3] == [sys.executable, "-m", "smollm.fit"]
        assert (fork.returncode, fork.stdout, fork.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert fresh.returncode == 2 and fresh.stderr.startswith("error: ")


def test_a_forked_run_is_a_process_of_its_own(tmp_path):
    """Its own pid, environment and working directory, a signal's exit code, and the interpreter's
    exit for an uncaught exception: the traceback and code 1."""
    script = tmp_path / "probe.py"
    script.write_text("import os, sys, time\n"
                      "print(os.getpid(), os.getppid(), os.environ.get('PROBE'), os.getcwd(), sys.argv[1:], flush=True)\n"
                      "if sys.argv[1] == 'raise':\n    raise ValueError('a bug')\n"
                      "time.sleep(60)\n")
    environment = fitutil.subprocess_env({"PROBE": "yes"})
    proc = forked.Forked([str(script), "wait"], environment, tmp_path)
    fitutil.wait_for(proc, lambda: os.path.getsize(proc.out) > 0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    pid, parent, probe, cwd, argv = out.split(" ", 4)
    assert int(pid) == proc.pid and int(parent) != os.getpid() and proc.pid != os.getpid()
    assert (probe, cwd, argv.strip()) == ("yes", str(tmp_path), "['wait']")
    assert proc.returncode == -signal.SIGTERM and "PROBE" not in os.environ

    result = fitutil.run_python([str(script), "raise"], timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback") and result.stderr.rstrip().endswith("ValueError: a bug")


def test_a_forked_rank_is_its_rank_for_lightning_before_ddp_sets_it_up():
    """Lightning reads the process's rank from the environment at import (rank_zero_only.rank, which
    decides who logs before the strategy sets it); a forked run with LOCAL_RANK=1 is rank 1 there too."""
    code = "from lightning.fabric.utilities.rank_zero import rank_zero_only; print(rank_zero_only.rank)"
    for rank in ("0", "1"):
        result = fitutil.run_python(["-c", code], env={"LOCAL_RANK": rank, "WORLD_SIZE": "2"})
        assert isinstance(result, subprocess.CompletedProcess) and result.returncode == 0, result.stderr
        assert result.stdout == f"{rank}\n"
