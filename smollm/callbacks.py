"""The Lightning pieces that `python -m smollm.fit` plugs into its Trainer.

- `StepCheckpoint`: checkpoints named by step in one folder per run, all kept, `last.ckpt`
  always a link to the newest, one more at the end of every run.
- `AtomicCheckpointIO`: writes through `smollm.checkpoint.save_atomic`, reads only safely; on
  resume it takes the checkpoint that smollm.fit has read and checked instead of reading it again.
- `StopAtStepEnd`: Ctrl-C or SIGTERM finishes the current step, saves it and stops; a second
  Ctrl-C stops at once.
- `ValidateAtEnd`: a run validates at its last step, whatever val_check_interval is.
- `KeepGlobalBatch`: a resume on another number of processes counts Lightning's micro-batches anew.

What the console says is smollm.console's.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from smollm.checkpoint import read_checkpoint, remove_checkpoint, save_atomic
from smollm.output import say


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, but atomic on write (fsync + rename: a crash mid-write never
    leaves a truncated checkpoint) with a digest of the bytes beside them, and safe on read (the
    digest verified, then weights_only: a checkpoint runs no code).

    A resume reads its checkpoint once: smollm.fit reads and checks it before the Trainer exists,
    and hands it over here (`hand_over`); Lightning's load of that path then takes it."""

    _handed: tuple[str, dict[str, Any]] | None = None  # (path, the checkpoint read from it)

    def hand_over(self, path, checkpoint: dict[str, Any]) -> None:
        """Give the checkpoint read from `path`, for Lightning's next load of that path."""
        self._handed = (str(path), checkpoint)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        save_atomic(checkpoint, path, write=self._write)

    def _write(self, checkpoint: dict[str, Any], f) -> None:
        torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if self._handed is not None and self._handed[0] == str(path):
            checkpoint, self._handed = self._handed[1], None
            return checkpoint
        return read_checkpoint(path)

    def remove_checkpoint(self, path) -> None:
        remove_checkpoint(path)


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that keeps every `step=NNNNNN.ckpt`, links `last.ckpt` to the newest, and
    also saves at the end of a run (and, through StopAtStepEnd, at the step a signal stops).

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

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_on_train_end:
            self.save_now(trainer)


class ValidateAtEnd(Callback):
    """Validate at the last step, whatever val_check_interval is, so that the end summary and
    TensorBoard hold the held-out loss of the weights saved at the end (a run of 300 steps that
    validates every 120 would otherwise end on step 240's figure, and a resume for 20 steps on
    none).

    At the last step it sets `trainer.should_stop`, which Lightning's training loop answers with
    a validation at that step (once, also when the step is a validation step anyway).
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run at the end of a step; that step was saved."""

    def __init__(self, signal_name: str, step: int) -> None:
        super().__init__(f"stopped by {signal_name} at step {step}")
        self.signal_name, self.step = signal_name, step


class StopAtStepEnd(Callback):
    """Ctrl-C (SIGINT) and SIGTERM (a scheduler's pre-emption) keep the work, wherever they land.

    The first signal asks the run to stop at the end of the current optimizer step: the step's
    remaining micro-batches are trained, the step is saved through `checkpoint`, and the run raises
    `Interrupted` before the next step starts (after that step's metrics are logged). A save in the
    middle of gradient accumulation would record a half-accumulated step, which no resume can
    continue exactly. During validation (always at a step end) the run stops at the next
    validation batch (under several processes, at the validation's end). A signal in the run's
    last step saves it and lets the run end as usual. Under several processes the ranks agree at
    every step end, so all stop at the same step even when only some were signalled.

    A second Ctrl-C stops at once (KeyboardInterrupt); the newest checkpoint is kept. A second
    SIGTERM changes nothing: the scheduler's grace period bounds the wait.

    Lightning's own SIGTERM handling stops after the current micro-batch, mid-accumulation; this
    replaces it while training. DataLoader workers ignore both signals (see smollm.data), so a
    signal to the whole process group does not kill them under the main process.
    """

    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self, checkpoint: StepCheckpoint | None) -> None:
        self.checkpoint = checkpoint
        self.requested: str | None = None  # the signal that asked to stop, on this process
        self.stopping = False  # the step is saved; stop before the next one
        self.stopped_at_once = False
        self._rank = 0
        self._step = 0  # global_step when the current micro-batch started
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested is not None:
            if signum == signal.SIGINT:  # Ctrl-C again: stop now, whatever is running
                self.stopped_at_once = True
                self.restore()
                raise KeyboardInterrupt
            return
        self.requested = self.NAMES[signum]
        if self._rank == 0:
            again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            say(f"\n{self.requested}: finishing the current step, then saving it and stopping{again}")

    def _take(self, signum: int) -> None:
        if threading.current_thread() is threading.main_thread() and signum not in self._previous:
            self._previous[signum] = signal.signal(signum, self._handler)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._rank = trainer.global_rank
        self._take(signal.SIGINT)

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning installs its SIGTERM handler after on_fit_start: take SIGTERM over here, and
        # with it a SIGTERM that Lightning noted during the sanity check.
        self._take(signal.SIGTERM)
        if trainer.received_sigterm:
            trainer._signal_connector.received_sigterm = False
            self.requested = self.requested or "SIGTERM"

    def on_fit_end(self, trainer, pl_module) -> None:
        self.restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back the handlers found, wherever ours is installed. Lightning's teardown (after
        on_exception, before on_fit_end) reinstalls every handler it found at its start, ours for
        SIGINT among them: smollm.fit calls this once more after fit. A stale handler would
        outlive the run, in this process and in every process it forks (a worker pool would
        then ignore SIGTERM)."""
        for signum, previous in self._previous.items():
            if previous is not None and signal.getsignal(signum) == self._handler:
                signal.signal(signum, previous)

    def _agreed(self, trainer) -> bool:
        """Whether any process was asked to stop (every process calls this at the same points)."""
        return trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False)

    def _save(self, trainer) -> None:
        if self.checkpoint is not None:
            self.checkpoint.save_now(trainer)

    def _stop(self, trainer) -> None:
        self.restore()
        raise Interrupted(self.requested or "SIGTERM", trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.stopping:
            self._stop(trainer)
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:  # inside the step's accumulation: not a step end
            return
        if self._agreed(trainer):
            self._save(trainer)
            if trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step:
                self.requested = None  # the last step: the run ends as usual, saved
            else:
                self.stopping = True

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.stopping and not trainer.sanity_checking:
            self._stop(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        # One process stops at the next batch; several agree at the end, as their batch counts may differ.
        if trainer.world_size == 1 and self.requested and not trainer.sanity_checking:
            self._save(trainer)
            self._stop(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and self._agreed(trainer):
            self._save(trainer)
            self._stop(trainer)


class KeepGlobalBatch(Callback):
    """A resume on another number of processes keeps the global batch, so each process
    accumulates another number of micro-batches per step (smollm.fit derives it). Lightning
    decides where a step ends from its count of micro-batches (`batch_progress`, restored from
    the checkpoint): counted with the checkpoint's accumulation, a step would end after too
    few or too many. This rewrites that count as if the run had always used the new one, before
    Lightning restores its loops. Optimizer steps, the schedule and the data position are
    counted in steps and samples, and stay as they are.
    """

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        data = checkpoint.get(type(trainer.datamodule).__qualname__) if trainer.datamodule is not None else None
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
        if not isinstance(data, dict) or "accumulate_grad_batches" not in data or progress is None:
            return
        shift = checkpoint.get("global_step", 0) * (trainer.accumulate_grad_batches - data["accumulate_grad_batches"])
        for part in ("total", "current"):
            for counter in progress.get(part, {}):
                progress[part][counter] += shift
