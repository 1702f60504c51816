"""The training checkpoint of `python -m smollm.fit`: one owner for its format.

A checkpoint is Lightning's dict, written by `torch.save`, plus our "smollm" entry:

    state_dict           model weights under "model.<HF Llama name>" (+ LitSmolLM's metric state)
    optimizer_states, lr_schedulers, loops, callbacks, global_step, epoch   Lightning's own
    hyper_parameters     LitSmolLM's __init__ arguments; datamodule_hyper_parameters likewise
    smollm               {"model_config": ModelConfig fields, "tokenizer": name or folder,
                          "logger_version": TensorBoard version, "rng": every generator's state}

Everything in it is tensors and plain Python values, so it is read with `weights_only=True`:
a file whose pickle asks for anything else (code to run) is refused, never executed. Files are
written atomically (`save_atomic`) and named `step=NNNNNN.ckpt`; `find_last_checkpoint` picks the
newest of a run. `model_from_checkpoint` rebuilds a plain SmolLM without Lightning.
"""

from __future__ import annotations

import errno
import glob
import os
import random
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from smollm.config import ModelConfig
from smollm.errors import MissingPathError, SmolLMError, UsageError
from smollm.hf import HFFormatError, UnsafeFileError, load_hf, load_torch_file, model_from_state
from smollm.model import SmolLM

STEP_FILE = re.compile(r"^step=(\d+)\.ckpt$")


class CheckpointError(SmolLMError, ValueError):
    """A checkpoint that cannot be used: missing, unreadable, unsafe, not ours, or of another model."""


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load a training checkpoint safely (weights_only, memory-mapped): every way it can be
    broken, or unsafe, is one CheckpointError naming the file."""
    path = str(path)
    if os.path.isdir(path):
        # What FSDP writes with state_dict_type="sharded" (or torch.distributed.checkpoint): its
        # metadata file is an unrestricted pickle, which could run code when loaded.
        raise CheckpointError(f"checkpoint {path} is a folder (a sharded checkpoint?); smollm reads only "
                              "single-file checkpoints, whose loading cannot run code: train with FSDP's "
                              "default state_dict_type 'full'")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty; resume from an earlier checkpoint")
    try:
        checkpoint = load_torch_file(path, mmap=True)
    except UnsafeFileError as e:
        raise CheckpointError(f"checkpoint {e}. Use a checkpoint written by smollm.fit") from None
    except Exception as e:  # noqa: BLE001  zip errors, truncation: all the same to the user
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint "
                              f"({type(e).__name__}); resume from an earlier checkpoint") from None
    if not isinstance(checkpoint, dict) or "smollm" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} was not written by smollm.fit (no model config in it)")
    return checkpoint


def checkpoint_config(checkpoint: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**checkpoint["smollm"]["model_config"])


def check_config(path: str | os.PathLike, checkpoint: dict[str, Any], expected: ModelConfig) -> None:
    """Refuse a checkpoint of another model configuration, naming each differing field."""
    differ = expected.diff(checkpoint_config(checkpoint))
    if differ:
        raise CheckpointError(f"checkpoint {path} is of another model configuration: "
                              + "; ".join(f"{d} (run != checkpoint)" for d in differ))


def strip_compile_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a `torch.compile(model)` state dict ("._orig_mod.") -> the plain model's keys."""
    return {key.replace("_orig_mod.", ""): value for key, value in state.items()}


def model_from_checkpoint(path: str | os.PathLike) -> tuple[SmolLM, str | None]:
    """A training checkpoint -> (float32 SmolLM in eval mode, the tokenizer it was trained with)."""
    checkpoint = read_checkpoint(path)
    state = {key[len("model."):]: value for key, value in strip_compile_prefix(checkpoint["state_dict"]).items()
             if key.startswith("model.")}
    try:
        model = model_from_state(checkpoint_config(checkpoint), state)  # checks the key set and every shape
    except HFFormatError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    return model, checkpoint["smollm"].get("tokenizer")


def load_model(path: str | os.PathLike) -> tuple[SmolLM, str | None]:
    """A .ckpt of smollm.fit or a Hugging Face model folder -> (float32 SmolLM in eval mode, its
    tokenizer: the one the run trained with, or the folder itself when it holds tokenizer files,
    else None)."""
    p = Path(path)
    if p.is_dir():
        has_tokenizer = (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()
        return load_hf(p), str(p) if has_tokenizer else None
    if not p.exists():
        raise MissingPathError(f"{path}: no such file or directory")
    if p.suffix != ".ckpt":
        raise UsageError(f"{path}: expected a .ckpt of smollm.fit or a Hugging Face model folder")
    return model_from_checkpoint(p)


def step_files(dirpath: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, path) of every complete `step=N.ckpt` in dirpath, oldest first (temporary files are
    never considered)."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(str(dirpath)), "step=*.ckpt")):
        m = STEP_FILE.match(os.path.basename(path))
        if m and os.path.isfile(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def find_last_checkpoint(dirpath: str | os.PathLike) -> str | None:
    """The newest `step=N.ckpt` of a run's folder, or None."""
    steps = step_files(dirpath)
    return steps[-1][1] if steps else None


def save_atomic(checkpoint: dict[str, Any], path: str | os.PathLike,
                write: Callable[[dict[str, Any], Any], None] = torch.save) -> None:
    """`write` (torch.save) to a temporary file, fsync, then rename into place.

    A process killed mid-write (SIGKILL, power loss) or a full disk leaves at worst a stray
    `*.tmp` file, never a truncated checkpoint; the checkpoints already saved are untouched.
    """
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        hint = "free some space" if e.errno == errno.ENOSPC else "check the folder"
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; {hint} "
                              "and resume with --ckpt_path last (earlier checkpoints are intact)") from None


# ---- random number generators: Lightning saves none, so a resume would draw other numbers


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain numbers: loadable with weights_only=True."""
    version, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- one run per folder at a time


class RunLock:
    """An exclusive lock on a run's checkpoint folder, held while training: `.NAME.lock` beside
    the folder `NAME`, so the folder itself holds only checkpoints.

    The operating system releases it when the process ends, however it ends, so a killed run
    never leaves it stuck; the file records the holder's pid for the message.
    """

    def __init__(self, dirpath: str | os.PathLike) -> None:
        folder = os.path.abspath(str(dirpath))
        self.folder = folder
        self.path = os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.lock")
        self._file = None

    def acquire(self) -> None:
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            pid = f" (pid {holder})" if holder else ""
            raise CheckpointError(f"another run is training into {self.folder}{pid}; "
                                  "wait for it to finish, or start this one with another --name") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def check_writable(folder: str | os.PathLike, what: str) -> None:
    """Create `folder` if needed and write a file in it, or raise one line saying which folder."""
    import tempfile

    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise CheckpointError(f"cannot write to {what} {folder} ({e.strerror or e}); choose a writable "
                              "folder (--trainer.default_root_dir, --checkpoint.dirpath)") from None
