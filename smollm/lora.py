"""LoRA: low-rank adapters on named linear layers of a SmolLM, the base weights frozen.

A targeted `nn.Linear` W (out x in) becomes a `LoRALinear` computing

    y = x W^T + scaling * dropout(x) A^T B^T,    A (rank x in), B (out x rank), scaling = alpha / rank

exactly as PEFT's LoRA layer does (PEFT adds `lora_B(lora_A(dropout(x))) * scaling` to the base
layer's output): A starts kaiming-uniform (a = sqrt(5), nn.Linear's own init, bound 1/sqrt(in)) and
B at zero, so the adapted model starts as the base. The layer keeps the base's `weight` under its
own name, so the model's state-dict keys are unchanged and the adapters add `.lora_A`, `.lora_B`.

- `apply_lora(model, rank, alpha, dropout, targets)`: freeze every weight, adapt the targets;
- `adapters_off(model)`: inside it, the model is its base (no copy): DPO's reference;
- `merge_lora(model)`: W += scaling * B A, in place; the adapted layers become plain nn.Linear, so
  the model is a plain SmolLM again (what export writes);
- `adapter_state_dict(model)`, `is_adapter_key(key)`: the adapters alone (what checkpoints keep);
- `base_digest(model)`: the digest of the base weights, which a checkpoint records with their
  source so that a resume or an export finds the very weights the adapters were trained on;
- `check_options(...)`: bad options as one line each.

Targets are module names of the decoder layers (Hugging Face's: q_proj, k_proj, v_proj, o_proj,
gate_proj, up_proj, down_proj). The tied embedding / lm head and the norms stay frozen.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from smollm.digest import state_digest
from smollm.errors import UsageError
from smollm.model import DecoderLayer

# Every linear layer of a decoder layer: QLoRA's finding (Dettmers et al. 2023, section 4) is that
# adapting all of them is what matches full fine-tuning; PEFT's Llama default (q_proj and v_proj, from
# the original LoRA paper's GPT-3 runs) falls short of it.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_NAMES = ("lora_A", "lora_B")


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update, B @ A scaled by alpha / rank.

    It is an nn.Linear (the same `weight` parameter, the same state-dict key), so code that asks
    what a module is still finds a linear layer; `enabled` False makes it exactly the base layer."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.register_parameter("bias", base.bias)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's (and loralib's) init of A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """scaling * B @ A, (out x in), computed in float32 and returned in the weight's dtype."""
        return (self.lora_B.float() @ self.lora_A.float() * self.scaling).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def check_options(rank: Any, alpha: Any = None, dropout: Any = 0.0, targets: Any = TARGETS,
                  optimizer: str = "adamw") -> None:
    """LoRA's options, each bad one as one line naming it. `rank` None means no LoRA (nothing to check)."""
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise UsageError(f"--model.lora_rank {rank!r}: the rank of LoRA's adapters must be a positive whole "
                         "number (8, 16, 32 ...); leave it null to train every weight")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise UsageError(f"--model.lora_alpha {alpha!r}: must be a positive number (the adapters' update is "
                         "scaled by alpha / rank), or null for 2 x the rank")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UsageError(f"--model.lora_dropout {dropout!r}: a probability in [0, 1)")
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
        raise UsageError(f"--model.lora_targets {targets!r}: a list of module names, e.g. "
                         f"[{', '.join(TARGETS)}]")
    if optimizer != "adamw":
        raise UsageError(f"--model.optimizer {optimizer} with --model.lora_rank {rank}: LoRA's adapters train with "
                         "AdamW (Muon is for whole hidden-layer matrices; a rank-r factor is not one); drop "
                         "--model.optimizer or set it to adamw")


def check_resume(path: str, checkpoint: dict[str, Any], rank: int | None, alpha: float | None,
                 targets: Any) -> None:
    """LoRA switched on or off, or other adapters (rank, alpha, targets), than the checkpoint's: one
    line. The optimizer state and the weights saved are the other kind's; --model.init_from starts
    a new run from the checkpoint's weights (with LoRA: the base with its adapters merged)."""
    saved = checkpoint.get("smollm", {}).get("lora")
    fresh = f"start a new run (another --name) with --model.init_from {path}"
    if saved and rank is None:
        raise UsageError(f"checkpoint {path} holds LoRA adapters (rank {saved['rank']}) and this run trains every "
                         f"weight; resume with --model.lora_rank {saved['rank']}, or {fresh} to fine-tune its merged "
                         "weights in full")
    if not saved and rank is not None:
        raise UsageError(f"checkpoint {path} trained every weight and this run asks for LoRA (--model.lora_rank "
                         f"{rank}); resume without --model.lora_rank, or {fresh} --model.lora_rank {rank} to put "
                         "adapters on its weights")
    if not saved:
        return
    ours = {"rank": rank, "alpha": default_alpha(rank, alpha), "targets": list(targets)}
    same = {"rank": lambda a, b: a == b, "alpha": lambda a, b: a == b, "targets": lambda a, b: sorted(a) == sorted(b)}
    differ = [f"--model.lora_{k} {saved[k]} -> {v}" for k, v in ours.items() if not same[k](saved[k], v)]
    if differ:
        raise UsageError(f"checkpoint {path} holds other LoRA adapters than this run asks for ({'; '.join(differ)}); "
                         f"resume with the checkpoint's, or {fresh} for new adapters on its merged weights")


def default_alpha(rank: int, alpha: float | None) -> float:
    """alpha, or 2 x rank when None: a scaling of 2 at every rank (litgpt's r 8, alpha 16)."""
    return float(2 * rank if alpha is None else alpha)


def targeted(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every linear layer of a decoder layer whose own name is one of `targets`.
    A target that names no such module is one line listing those there are."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, DecoderLayer)]
    found: list[tuple[str, nn.Linear]] = []
    names: set[str] = set()
    for layer_name, layer in layers:
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                short = name.rsplit(".", 1)[-1]
                names.add(short)
                if short in targets:
                    found.append((f"{layer_name}.{name}", module))
    unknown = [t for t in targets if t not in names]
    if unknown:
        known = [t for t in TARGETS if t in names] + sorted(names - set(TARGETS))
        hint = " (it shares the embedding's matrix: tied weights stay frozen)" if "lm_head" in unknown else ""
        raise UsageError(f"--model.lora_targets: {', '.join(map(repr, unknown))} names no linear layer of the "
                         f"model{hint}; the decoder layers' are {', '.join(known)}")
    return found


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0,
               targets: Sequence[str] = TARGETS) -> nn.Module:
    """Freeze every parameter of `model` and replace each targeted linear layer by a `LoRALinear`
    over it (in place; the base weights are shared, not copied). Returns the model."""
    check_options(rank, alpha, dropout, list(targets))
    found = targeted(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    alpha = default_alpha(rank, alpha)
    for name, linear in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(linear, rank, alpha, dropout))
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, every adapter of `model` is switched off: its forward is the base model's, with the
    same weights in the same memory (DPO's reference, no second copy). Switched back on after,
    whatever happens inside."""
    layers = [m for m in lora_layers(model) if m.enabled]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += scaling * B A) and put a plain nn.Linear back
    in its place, in place: the model is a plain SmolLM afterwards, which needs nothing of LoRA."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = nn.Parameter(module.weight + module.delta(), requires_grad=module.weight.requires_grad)
        if module.bias is not None:
            linear.bias = module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key names an adapter matrix (`....q_proj.lora_A`)."""
    return key.rsplit(".", 1)[-1] in ADAPTER_NAMES


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def trainable_count(config: Any, rank: int, targets: Sequence[str] = TARGETS) -> int:
    """Parameters of the adapters of a model of `config`: rank x (in + out) per targeted layer."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"q_proj": (c.hidden_size, q), "k_proj": (c.hidden_size, kv), "v_proj": (c.hidden_size, kv),
              "o_proj": (q, c.hidden_size), "gate_proj": (c.hidden_size, c.intermediate_size),
              "up_proj": (c.hidden_size, c.intermediate_size), "down_proj": (c.intermediate_size, c.hidden_size)}
    return c.num_hidden_layers * sum(rank * sum(shapes[t]) for t in targets if t in shapes)


def base_digest(model: nn.Module) -> str:
    """The digest of the base weights (every entry of the state dict but the adapters, by name,
    dtype, shape and bytes, in name order): the same weights give the same digest whatever file
    they were read from."""
    return state_digest(model, skip=is_adapter_key)
