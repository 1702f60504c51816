"""The Lightning pieces that `python -m smollm.fit` plugs into its Trainer.

- `StepCheckpoint`: checkpoints named by step in one folder per run, all kept, `last.ckpt`
  always a link to the newest, one more at the end of every run.
- `AtomicCheckpointIO`: writes through `smollm.checkpoint.save_atomic`, reads only safely; on
  resume it takes the checkpoint that smollm.fit has read and checked instead of reading it again.
- `StopAtStepEnd`: Ctrl-C or SIGTERM finishes the current step, saves it and stops; a second
  Ctrl-C stops at once.
- `ValidateAtEnd`: a run validates at its last step, whatever val_check_interval is.
- `KeepGlobalBatch`: a resume on another number of processes counts Lightning's micro-batches anew.
- `BindData`: hands the module what it needs of the data, once the data is set up.
- `RunLength`: `--trainer.max_epochs` as optimizer steps, once the data is set up; the schedule spans them.
- `Throughput`: tokens/s and MFU, measured once for the console and TensorBoard.
- `ValidationSample`: the model's greedy continuation of the sample prompt at each validation.

What the console says is smollm.console's.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from smollm.batch import BatchPlan
from smollm.checkpoint import read_checkpoint, remove_checkpoint, save_atomic
from smollm.errors import UsageError
from smollm.generate import complete
from smollm.output import note, say
from smollm.sharding import full_model


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


class BindData(Callback):
    """Once the data module is set up (Lightning sets it up before the callbacks), hand the model
    what it needs of the data: `LitSmolLM.bind_data` takes the tokenizer, its name, the window
    length, the token cache, the data's format and (preference pairs) a way to read the pairs, and
    checks that they fit the model. The module itself never reads
    the data module."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        dm = trainer.datamodule
        if dm is not None and hasattr(pl_module, "bind_data"):
            pairs = getattr(dm, "pairs", None) is not None  # preference pairs: a precomputed DPO reference scores them
            pl_module.bind_data(dm.tokenizer, dm.tokenizer_name, seq_len=dm.seq_len,
                                token_cache=getattr(dm, "token_cache", None), data_format=getattr(dm, "format", None),
                                reference_pairs=dm.reference_pairs if pairs else None)


class RunLength(Callback):
    """The run's length in optimizer steps, once the data is set up (before the optimizer and its
    schedule are made).

    `--trainer.max_epochs N` counts passes over the training windows (`TextDataModule.epoch_steps`:
    N x the windows in global batches, continued from where a resume starts), and the module's
    schedule spans those steps (a warmup fraction, decay_steps null: `LitSmolLM.run_steps`).
    `--trainer.max_steps` given as well stops the run there if it comes first (Lightning's rule),
    said in one line, without changing the schedule: so 10 steps and 5 + 5 are the same run. The
    loader is endless (the order is per global sample), so Lightning's own epoch count would never
    end an epoch; it is turned off once the epochs are steps. Without max_epochs, max_steps is the
    run's length, as before."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        dm = trainer.datamodule
        epochs = trainer.max_epochs
        if stage != "fit" or epochs in (None, -1) or not hasattr(dm, "epoch_steps"):
            return
        if epochs <= 0:
            raise UsageError(f"--trainer.max_epochs must be a positive number of passes over the data, got {epochs}")
        steps, max_steps = dm.epoch_steps(epochs), trainer.max_steps
        stop = steps if max_steps is None or max_steps < 0 else min(steps, max_steps)
        start = dm.plan.start_step or 0
        if stop <= start:
            raise UsageError(f"the run resumes at step {start} and --trainer.max_epochs {epochs} ends at step {steps}: "
                             "nothing to train; raise --trainer.max_epochs to continue")
        if stop < steps:
            note(f"--trainer.max_steps {max_steps} stops the run before its {epochs} epoch(s) end at step {steps} (the "
                 "schedule spans the epochs); to finish them, resume with --ckpt_path last --trainer.max_steps -1")
        trainer.fit_loop.epoch_loop.max_steps = stop
        trainer.fit_loop.max_epochs = -1
        dm.epochs = epochs
        pl_module.run_steps = steps


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of a CUDA device (Lightning's table tells SXM, PCIe and NVL apart)."""
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, torch.bfloat16)


class Throughput(Callback):
    """Tokens/s over the steps since the last logging step, measured once: the console shows it and
    this callback logs it to TensorBoard (`train/tokens_per_sec`, `train/mfu`), with the rates the
    step used (`train/lr`, `train/lr_muon`) and the peak memory, at the logging steps only.

    Host timestamps only, no device sync: steady-state host time per step equals device time per
    step, because the host cannot run more than a bounded queue ahead of the device. Timed from
    the end of the first step: whole steps, not the warm-up. `measure` may be called by several
    hooks at a step end: the first call measures, the others get the same figure.
    """

    def __init__(self) -> None:
        self._window: tuple[float, int] | None = None  # (time, step) where the window began
        self._seen = 0  # the last step whose end was measured
        self._figure: float | None = None  # tokens/s measured at step `_seen`, if a logging step
        self._logged = -1  # the last step whose figures went to TensorBoard

    def start(self, step: int) -> None:
        self._window, self._seen, self._figure = None, step, None

    def measure(self, trainer, batch: Any) -> float | None:
        """Tokens/s (all processes) at a logging step's end; None at other steps and micro-batches."""
        step = trainer.global_step
        if step == self._seen:
            return self._figure
        self._seen, self._figure = step, None
        now = time.perf_counter()
        if self._window is None:
            self._window = (now, step)
            return None
        if step % trainer.log_every_n_steps and step < trainer.max_steps:
            return None
        (t0, s0), self._window = self._window, (now, step)
        tokens = (step - s0) * batch["input_ids"][:, 1:].numel() * trainer.accumulate_grad_batches
        self._figure = tokens * trainer.world_size / (now - t0) if now > t0 else None
        return self._figure

    def on_train_start(self, trainer, pl_module) -> None:
        self.start(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens_per_sec = self.measure(trainer, batch)
        if tokens_per_sec is None or self._logged == trainer.global_step:
            return
        self._logged = trainer.global_step
        # Logged at logging steps only: logging a float makes a device tensor (a sync).
        log = {"rank_zero_only": True}
        pl_module.log("train/tokens_per_sec", tokens_per_sec, **log)
        lrs = getattr(pl_module, "step_lrs", {})
        if "adamw" in lrs:
            pl_module.log("train/lr", lrs["adamw"], **log)
        if "muon" in lrs:
            pl_module.log("train/lr_muon", lrs["muon"], **log)
        device = pl_module.device
        if device.type == "cuda":  # the allocator's own count: no device sync
            pl_module.log("train/peak_memory_gib", torch.cuda.max_memory_allocated(device) / 2**30, **log)
        peak = pl_module.hparams.get("peak_flops") or peak_flops(device)
        if peak:
            seq_len = batch["input_ids"].shape[1] - 1
            mfu = tokens_per_sec * pl_module.config.flops_per_token(seq_len) / (peak * trainer.world_size)
            pl_module.log("train/mfu", mfu, **log)


class ValidationSample(Callback):
    """At each validation (not the sanity check), the model's greedy continuation of
    `--model.sample_prompt` (`--model.sample_tokens` of them; with --data.format chat, its reply to the
    prompt as a user's message) goes to TensorBoard as the text `val/sample`. Under FSDP every rank takes part in the generation; rank 0 writes it."""

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        tokenizer = getattr(pl_module, "tokenizer", None)  # handed over by BindData
        experiment = getattr(trainer.logger, "experiment", None)
        if tokenizer is None or trainer.sanity_checking or not hasattr(experiment, "add_text"):
            return
        prompt, chat = pl_module.hparams.sample_prompt, is_chat(trainer.datamodule)
        with full_model(trainer):
            text, _ = complete(pl_module.model, tokenizer, prompt, pl_module.hparams.sample_tokens, chat=chat)
        if trainer.global_rank == 0:
            experiment.add_text("val/sample", f"user: {prompt}\n\nassistant: {text}" if chat else prompt + text,
                                trainer.global_step)


def is_chat(datamodule: Any) -> bool:
    """Whether a run trains on conversations (or preference pairs): its samples are then the replies to
    a user's message."""
    return getattr(datamodule, "format", "text") in ("chat", "preference")


class KeepGlobalBatch(Callback):
    """A resume on another number of processes keeps the global batch, so each process
    accumulates another number of micro-batches per step (the run's BatchPlan says how many).
    Lightning decides where a step ends from its count of micro-batches (`batch_progress`,
    restored from the checkpoint): counted with the checkpoint's accumulation, a step would end
    after too few or too many. This moves that count as the plan says (`micro_batch_shift`), as if
    the run had always used the new split, before Lightning restores its loops. Optimizer steps,
    the schedule and the data position are counted in steps and samples, and stay as they are.

    The plan has read the checkpoint's state by then (smollm.fit loads it when it makes the plan;
    Lightning restores the data module, which loads it too, before the callbacks).
    """

    def __init__(self, plan: BatchPlan) -> None:
        self.plan = plan

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
        shift = self.plan.micro_batch_shift(checkpoint.get("global_step", 0))
        if progress is None or shift == 0:
            return
        for part in ("total", "current"):
            for counter in progress.get(part, {}):
                progress[part][counter] += shift
