"""BatchPlan: the global batch and how a run splits it, the samples seen at a step, and its state.

The global batch (`--data.global_batch_size`, windows per optimizer step, all processes
together) is the recipe. A run splits it into `accumulation` micro-batches of `micro_batch`
windows on each of `processes` processes. The training order is per global sample
(smollm.data.windows), so the samples a step trains on depend only on how many came before it:
`samples_at(step)`. A checkpoint records the plan (`state_dict`, kept in the data module's state
under the keys it always had); a run resumed with another number of processes, another
micro-batch or another global batch continues from the checkpoint's sample count
(`load_state_dict`), and Lightning's count of micro-batches is moved to the new split
(`micro_batch_shift`, used by smollm.callbacks.KeepGlobalBatch).

smollm.fit makes the plan once, from the options and the number of processes, and hands it to the
data module, the Trainer (its accumulation) and KeepGlobalBatch: nothing else does this arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from smollm.errors import DataError, UsageError
from smollm.output import say

_FIXED = ("global_batch", "micro_batch", "processes", "accumulation")


def _plural(n: int, word: str, suffix: str) -> str:
    return f"{n} {word}{suffix * (n != 1)}"


@dataclass
class BatchPlan:
    """Windows per optimizer step and their split; the sizes are fixed once made (a resume with
    other sizes is another plan), and only `load_state_dict` moves where the count starts."""

    global_batch: int  # windows per optimizer step, all processes together: the recipe
    micro_batch: int  # windows per micro-batch on each process (--data.batch_size)
    processes: int = 1  # the Trainer's world size
    accumulation: int = field(init=False)  # micro-batches per optimizer step on each process
    # The resume, set by load_state_dict: the checkpoint's plan, its step and the global samples
    # trained on by then. A fresh run counts from step 0, sample 0. start_step None: a checkpoint
    # that recorded no sample count (written before the global batch was), counted with its own
    # batch at every step.
    was: BatchPlan | None = field(default=None, compare=False)
    start_step: int | None = 0
    start_sample: int = 0

    def __post_init__(self) -> None:
        sizes = (self.global_batch, self.micro_batch, self.processes)
        if not all(isinstance(n, int) and n > 0 for n in sizes):
            raise UsageError(f"the global batch, micro-batch and processes must be positive integers, got "
                             f"{self.global_batch!r}, {self.micro_batch!r}, {self.processes!r}")
        self.accumulation = self._split()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FIXED and name in self.__dict__:
            raise AttributeError(f"BatchPlan.{name} is fixed once the plan is made; make another plan")
        object.__setattr__(self, name, value)

    def _split(self) -> int:
        """global / (micro-batch x processes). One that does not divide raises DataError naming the
        nearest valid choices: the largest micro-batch at or below micro_batch that divides, and the
        global batches on either side that micro_batch x processes divides."""
        G, B, W = self.global_batch, self.micro_batch, self.processes
        per_micro_step = B * W
        if G % per_micro_step == 0:
            return G // per_micro_step
        micro = [b for b in range(B, 0, -1) if G % (b * W) == 0]
        below = G // per_micro_step * per_micro_step
        choices = ["--data.global_batch_size " + " or ".join(str(g) for g in (below, below + per_micro_step) if g > 0)]
        if micro:
            choices.insert(0, f"--data.batch_size {micro[0]}")
        raise DataError(
            f"--data.global_batch_size {G} windows per step cannot be split into micro-batches of "
            f"{B} on {_plural(W, 'process', 'es')} ({per_micro_step} windows per micro-step); use "
            + ", or ".join(choices))

    @classmethod
    def from_options(cls, global_batch_size: int | None, batch_size: int, processes: int,
                     accumulate_grad_batches: int = 1) -> BatchPlan:
        """The plan of --data.global_batch_size and --data.batch_size on this many processes. Without
        a global batch, the batch as set: micro-batch x processes x --trainer.accumulate_grad_batches.
        A hand-set accumulation (other than 1) that disagrees with the global batch is one line."""
        if global_batch_size is None:
            global_batch_size = batch_size * processes * accumulate_grad_batches
        plan = cls(global_batch_size, batch_size, processes)
        if accumulate_grad_batches not in (1, plan.accumulation):
            raise UsageError(
                f"--trainer.accumulate_grad_batches {accumulate_grad_batches} disagrees with --data.global_batch_size "
                f"{global_batch_size} = {plan.accumulation} micro-batch(es) of {batch_size} on {processes} process(es); "
                "drop --trainer.accumulate_grad_batches (smollm derives it) or change --data.global_batch_size")
        return plan

    # -- the samples seen, and the resume --

    def samples_at(self, step: int) -> int:
        """Global samples trained on before optimizer step `step` (0-based: after `step` steps)."""
        if self.start_step is None:  # a checkpoint that recorded no sample count: its batch throughout
            assert self.was is not None
            return step * self.was.global_batch
        return self.start_sample + (step - self.start_step) * self.global_batch

    def step_after(self, samples: int) -> int:
        """The first optimizer step after which `samples` global samples have been trained on (an
        epoch's end: smollm.data's `epoch_steps`), counted as `samples_at` counts; never before the
        step a resume starts at."""
        if self.start_step is None:
            assert self.was is not None
            return -(-samples // self.was.global_batch)
        return self.start_step + max(0, -(-(samples - self.start_sample) // self.global_batch))

    def state_dict(self, step: int) -> dict[str, Any]:
        """What a checkpoint at `step` records: the split, the global batch and the samples seen."""
        return {"batch_size": self.micro_batch, "world_size": self.processes, "global_batch_size": self.global_batch,
                "accumulate_grad_batches": self.accumulation, "step": step, "samples_seen": self.samples_at(step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's state (the data module's: other keys are ignored): from its
        sample count at its step, one global batch of this plan per step since. A checkpoint written
        before the global batch was recorded holds only its micro-batch and processes: its batch was
        those times this plan's accumulation (set by hand then), at every step."""
        if "samples_seen" in state and "step" in state:
            self.was = BatchPlan(state["global_batch_size"], state["batch_size"], state["world_size"])
            self.start_step, self.start_sample = state["step"], state["samples_seen"]
        else:
            micro, processes = state.get("batch_size", self.micro_batch), state.get("world_size", 1)
            self.was = BatchPlan(micro * processes * self.accumulation, micro, processes)
            self.start_step, self.start_sample = None, 0

    def micro_batch_shift(self, step: int) -> int:
        """How far Lightning's count of micro-batches (restored from a checkpoint at `step`) moves so
        that it counts as if the run had always accumulated this plan's number per step; 0 on a
        fresh run or with the checkpoint's accumulation."""
        return 0 if self.was is None else step * (self.accumulation - self.was.accumulation)

    # -- what the console says --

    def describe(self, seq_len: int) -> str:
        """The batch line: windows and tokens per step, and how this run splits them; on a resume on
        another number of processes, that too."""
        G = self.global_batch
        line = f"batch: {G} windows x {seq_len} = {G * seq_len:,} tokens per step"
        split = f"{_plural(self.accumulation, 'micro-batch', 'es')} of {self.micro_batch}"
        processes = _plural(self.processes, "process", "es")
        if self.was is not None and self.was.processes != self.processes:
            return line + f", as in the checkpoint; resumed on {processes} (was {self.was.processes}): {split} per step"
        return line + f" = {split} x {processes}"


def resumed_global_batch(option: int | None, state: dict[str, Any] | None, step: int) -> int | None:
    """The global batch of a run resumed from a checkpoint at `step` whose data state is `state`:
    --data.global_batch_size when given (a change said in one line; the sample order then continues
    from the checkpoint's count), else the checkpoint's (None when it recorded none)."""
    saved = (state or {}).get("global_batch_size")
    if not saved:
        return option
    if option is not None and option != saved:
        say(f"global batch changed from {saved} to {option} windows per step, from step {step + 1} on; the sample "
            "order continues where the checkpoint stopped")
    return saved if option is None else option


__all__ = ["BatchPlan", "resumed_global_batch"]
