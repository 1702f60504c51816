"""smollm's one output channel: its own lines, notes and warnings, on stderr, said once.

Under several processes a line is said by global rank 0 only, unless it is about this process
(a shard it found damaged, a lock it waits for): then `every_rank=True`. Results a command prints
(a generated text, an evaluation table) are its output, not these lines, and go to stdout.
"""

from __future__ import annotations

import os
import sys

# Where launchers put the global rank, in the order Lightning reads them, each with the variable
# that says how many processes there are: a rank counts only beside a world of more than one, so a
# RANK left in the shell from an earlier torchrun does not silence a single-process run.
_RANK_VARIABLES = (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"),
                   ("JSM_NAMESPACE_RANK", "JSM_NAMESPACE_SIZE"))


def global_rank() -> int:
    """This process's global rank: torch.distributed's once it is set up, else the launcher's."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for rank, size in _RANK_VARIABLES:
        if os.environ.get(rank, "").isdigit() and os.environ.get(size, "").isdigit() and int(os.environ[size]) > 1:
            return int(os.environ[rank])
    return 0


def say(text: str, *, every_rank: bool = False) -> None:
    """Write one of smollm's lines (or a few) to stderr, from rank 0 unless `every_rank`."""
    if every_rank or global_rank() == 0:
        print(text, file=sys.stderr, flush=True)


def note(text: str, *, every_rank: bool = False) -> None:
    """`note: TEXT`: something the user may want to know; nothing is wrong."""
    say(f"note: {text}", every_rank=every_rank)


def warn(text: str, *, every_rank: bool = False) -> None:
    """`warning: TEXT`: something is off, and the run goes on."""
    say(f"warning: {text}", every_rank=every_rank)


__all__ = ["global_rank", "note", "say", "warn"]
