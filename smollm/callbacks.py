"""The Lightning pieces that `python -m smollm.fit` plugs into its Trainer.

- `StepCheckpoint`: checkpoints named by step in one folder per run, all kept, `last.ckpt`
  always a link to the newest, one more at the end of every run and one on SIGTERM.
- `AtomicCheckpointIO`: writes through `smollm.checkpoint.save_atomic`, reads only safely.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from smollm.checkpoint import read_checkpoint, save_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, but atomic on write (fsync + rename: a crash mid-write never
    leaves a truncated checkpoint) and safe on read (weights_only: a checkpoint runs no code)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        save_atomic(checkpoint, path, write=self._write)

    def _write(self, checkpoint: dict[str, Any], f) -> None:
        import torch

        torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path)


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps every `step=NNNNNN.ckpt`, links `last.ckpt` to the newest, and
    also saves at the end of a run and when the process receives SIGTERM (pre-emption), at the
    next step boundary.

    The version counter is off: Lightning would otherwise write `last-v1.ckpt` beside a stale
    `last.ckpt` when a run resumed from its first checkpoint does not recognise `last.ckpt` as
    its own. A step file is only ever rewritten with the same step's state.
    """

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
                         save_top_k=save_top_k, save_last=save_last, auto_insert_metric_name=False,
                         enable_version_counter=False)
        self.save_on_train_end = save_on_train_end

    def save_now(self, trainer) -> None:
        """Save the current step (and link last.ckpt to it) unless it is saved already."""
        if self._last_global_step_saved == trainer.global_step or trainer.global_step == 0:
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.received_sigterm:  # Lightning raises SIGTERMException right after this hook
            self.save_now(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_on_train_end:
            self.save_now(trainer)
