"""SmolLM under Lightning's FSDP (`--trainer.strategy fsdp`): what sharding changes for us.

- One sharding unit per decoder layer (`shard_by_layer`): without a wrapping policy FSDP would
  make the whole model one unit and gather all of it at once. The embedding, the final norm and
  the tied lm head stay in the root unit, so the tied weight is never split between two units.
- The gradient norm (`clip_grad_norm`) is over the whole model: under FSDP each rank holds a
  shard of every gradient, and only FSDP's own `clip_grad_norm_` sums the shards across ranks.
- Running the model outside a training or validation step (`full_model`): Lightning runs those
  steps inside the root unit's forward, which gathers the root's weights; a sample generation
  after validation, or the next token at the end of `fit`, does not. `full_model` gathers the
  root's weights for it; each layer still gathers its own as it runs. Every rank must enter it.

Everywhere else (one device, DDP) these are the plain operations. Checkpoints under FSDP are
Lightning's "full" state dict (its default): one file written by rank 0, the same format as
without FSDP, read with `weights_only=True` (smollm.checkpoint).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from lightning.pytorch.strategies import FSDPStrategy

from smollm.model import DecoderLayer


def is_fsdp(trainer: Any) -> bool:
    """True when `trainer` runs Lightning's FSDP strategy (False for None: no Trainer attached)."""
    return trainer is not None and isinstance(trainer.strategy, FSDPStrategy)


def shard_by_layer(strategy: Any) -> None:
    """Give an FSDP strategy one unit per `DecoderLayer`, unless it was given its own policy.

    Exactly what `FSDPStrategy(auto_wrap_policy={DecoderLayer})` does at construction; done here
    so that the plain `--trainer.strategy fsdp` shards by layer. Call before the model is wrapped
    (LightningModule.configure_model runs before that).
    """
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    if isinstance(strategy, FSDPStrategy) and "auto_wrap_policy" not in strategy.kwargs:
        strategy.kwargs["auto_wrap_policy"] = ModuleWrapPolicy({DecoderLayer})


def clip_grad_norm(trainer: Any, module: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of `module` to max_norm; return the norm before clipping."""
    if is_fsdp(trainer):
        return trainer.strategy.model.clip_grad_norm_(max_norm)  # sums the shards of all ranks
    return torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)


@contextmanager
def full_model(trainer: Any) -> Iterator[None]:
    """Inside, the LightningModule's model can run a forward outside a training step (greedy
    generation) under FSDP; every rank must enter it. Elsewhere, a no-op."""
    if not is_fsdp(trainer):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    # recurse=False: only the root unit (embedding, norm, head) is gathered for the whole block.
    with torch.no_grad(), FullyShardedDataParallel.summon_full_params(
            trainer.strategy.model, recurse=False, writeback=False):
        yield
