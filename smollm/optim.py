"""What the optimizer is: parameter groups, AdamW or Muon beside AdamW, the learning-rate schedule.

`--model.optimizer adamw` (SmolLM2's recipe): one AdamW over everything; matrices decay, norm
weights don't. `--model.optimizer muon`: Muon (torch.optim.Muon: momentum orthogonalized by
Newton-Schulz iterations) takes the 2-D projection weights inside the decoder layers (q, k, v, o,
gate, up, down); AdamW keeps the tied embedding/head and the norm weights, the split the Muon
authors and torchtitan use. Lightning's automatic optimization drives one optimizer, so the two
are held by one `MuonWithAdamW` (as torchtitan's OptimizersContainer holds several): Lightning's
loop, our clipping hook, the one LambdaLR schedule and the checkpoint's optimizer state all see a
single optimizer whose param_groups are both optimizers' groups.

LitSmolLM calls `configure_optimizers` and, on resume, `apply_settings`; `fit` calls the two
checks that refuse what cannot work before anything is built.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from smollm.errors import UsageError
from smollm.lora import ADAPTER_NAMES, LoRALinear
from smollm.model import DecoderLayer, RMSNorm

OPTIMIZERS = ("adamw", "muon")

# Settings a resume takes from the checkpoint's optimizer and scheduler state unless they are
# applied again (apply_settings); the schedule's shape is rebuilt from the current ones.
OPTIMIZER_SETTINGS = ("learning_rate", "betas", "weight_decay", "fused_adamw", "muon_lr", "muon_weight_decay",
                      "muon_momentum", "muon_nesterov", "muon_ns_steps", "muon_adjust_lr")
SCHEDULE_SETTINGS = ("warmup_steps", "decay_steps", "min_lr_ratio", "schedule")


def lr_lambda(step: int, warmup_steps: int, decay_steps: int, min_lr_ratio: float,
              schedule: str) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based), the same for every group.

    Linear warmup over `warmup_steps`, then
      cosine: cosine decay from 1 to `min_lr_ratio` at step `decay_steps`;
      wsd:    stable at 1 until the last 20% of `decay_steps`, then linear decay to `min_lr_ratio`
              (warmup-stable-decay, as SmolLM2 was trained).
    After `decay_steps` the multiplier stays at `min_lr_ratio`. The rule depends only on the step,
    never on `trainer.max_steps`, so extending a run never makes the learning rate jump.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr_ratio
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = max(warmup_steps, int(0.8 * decay_steps))
    if step < decay_start:
        return 1.0
    return 1.0 - (1 - min_lr_ratio) * (step - decay_start) / max(1, decay_steps - decay_start)


def plain_name(name: str) -> str:
    """A parameter's name in the model as written, whatever wraps it: FSDP's, activation
    checkpointing's and torch.compile's wrappers add their own segments to the names."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def parameter_groups(model: nn.Module, muon: bool = False) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Each trainable parameter's group, {"decay": [(name, param), ...], "no_decay": ..., "muon": ...},
    decided by the module that holds it, never by its shape at the time: FSDP shows every
    parameter as a 1-D shard, so a shape rule would put them all in one group.

    A Linear's weight inside a decoder layer (q, k, v, o, gate, up, down) is "muon" with Muon
    (Muon orthogonalizes whole hidden-layer matrices, as its authors and torchtitan split it),
    else "decay"; the embedding (tied to the head) and any other Linear weight (an untied head)
    "decay"; norm weights and biases "no_decay"; LoRA's adapter matrices "decay" (AdamW, as PEFT
    and litgpt train them; the frozen base is in no group). A parameter of any other module is refused
    rather than guessed at (FSDP's flat parameters, with use_orig_params false, are such).
    Names are `plain_name`s.
    """
    layers = [name + "." for name, m in model.named_modules() if isinstance(m, DecoderLayer)]
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"decay": [], "no_decay": [], "muon": []}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for short, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # a tied weight is taken once
                continue
            seen.add(id(param))
            name = plain_name(f"{module_name}.{short}" if module_name else short)
            if isinstance(module, LoRALinear) and short in ADAPTER_NAMES:
                kind = "decay"  # LoRA's A and B: AdamW with the other matrices (check_options refuses Muon)
            elif isinstance(module, nn.Linear) and short == "weight":
                in_layer = any(module_name.startswith(prefix) for prefix in layers)
                kind = "muon" if muon and in_layer else "decay"
            elif isinstance(module, nn.Embedding):
                kind = "decay"
            elif isinstance(module, RMSNorm) or short == "bias":
                kind = "no_decay"
            else:
                raise UsageError(f"parameter {name} belongs to a {type(module).__name__}, which smollm does not "
                                 "know how to put in a parameter group (under FSDP: keep use_orig_params true, "
                                 "Lightning's default)")
            groups[kind].append((name, param))
    return groups


def muon_lr(h: Mapping[str, Any]) -> float:
    return h["learning_rate"] if h.get("muon_lr") is None else h["muon_lr"]


def muon_weight_decay(h: Mapping[str, Any]) -> float:
    return h["weight_decay"] if h.get("muon_weight_decay") is None else h["muon_weight_decay"]


def group_settings(h: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each named parameter group's settings from the options: the base learning rate the
    schedule multiplies, and what the group's optimizer reads."""
    # "fused" too: a resume loads the checkpoint's group settings, its kernel choice included.
    adamw = {"lr": h["learning_rate"], "betas": tuple(h["betas"]), "fused": h.get("fused_adamw") is not False}
    return {
        "decay": {**adamw, "weight_decay": h["weight_decay"]},  # matrices (with muon: the embedding)
        "no_decay": {**adamw, "weight_decay": 0.0},  # norm weights
        "muon": {"lr": muon_lr(h), "weight_decay": muon_weight_decay(h), "momentum": h["muon_momentum"],
                 "nesterov": h["muon_nesterov"], "ns_steps": h["muon_ns_steps"],
                 "adjust_lr_fn": h["muon_adjust_lr"]},
    }


def build_optimizer(model: nn.Module, h: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW alone, or MuonWithAdamW, over `model`'s trainable parameters, per `h` (LitSmolLM's
    hyperparameters). Every group carries its name ("decay", "no_decay", "muon")."""
    settings = group_settings(h)
    use_muon = h.get("optimizer", "adamw") == "muon"
    groups = parameter_groups(model, muon=use_muon)

    def group(name: str) -> dict[str, Any]:
        return {"params": [p for _, p in groups[name]], "name": name, **settings[name]}

    # Matrices decay (every projection, and the tied embedding/lm head as nanoGPT and SmolLM2
    # do); norm weights don't.
    adamw = torch.optim.AdamW([group("decay"), group("no_decay")], fused=settings["decay"]["fused"])
    if not use_muon:
        return adamw
    return MuonWithAdamW(adamw, torch.optim.Muon([group("muon")]))


def configure_optimizers(model: nn.Module, h: Mapping[str, Any]) -> dict[str, Any]:
    """What LightningModule.configure_optimizers returns: the optimizer and, stepped every
    optimizer step, one LambdaLR whose multiplier (warmup, then the schedule) scales every group's
    own base learning rate."""
    optimizer = build_optimizer(model, h)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_of(h))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def schedule_of(h: Mapping[str, Any]) -> Callable[[int], float]:
    warmup, decay, floor, shape = h["warmup_steps"], h["decay_steps"], h["min_lr_ratio"], h["schedule"]
    return lambda step: lr_lambda(step, warmup, decay, floor, shape)


def apply_settings(optimizer: torch.optim.Optimizer, scheduler: Any, h: Mapping[str, Any]) -> None:
    """Set every group's settings and base learning rate from `h`, at the scheduler's current
    step: a resumed run with changed options uses them from its next step on."""
    settings = group_settings(h)
    factor = lr_lambda(scheduler.last_epoch, h["warmup_steps"], h["decay_steps"], h["min_lr_ratio"],
                       h["schedule"])
    base_lrs = []
    for i, group in enumerate(optimizer.param_groups):
        # Groups carry their names; a checkpoint from before they did has AdamW's two, in order.
        values = settings[group.get("name") or ("decay", "no_decay")[i]]
        group.update({k: v for k, v in values.items() if k != "lr"})
        group["initial_lr"] = values["lr"]
        group["lr"] = values["lr"] * factor
        base_lrs.append(values["lr"])
    scheduler.base_lrs = base_lrs
    scheduler.lr_lambdas = [schedule_of(h)] * len(base_lrs)


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current learning rate of each optimizer: {"adamw": ..., "muon": ...} (muon if used)."""
    out: dict[str, float] = {}
    for group in optimizer.param_groups:
        out.setdefault("muon" if group.get("name") == "muon" else "adamw", float(group["lr"]))
    return out


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True when the whole step can be skipped on the device: a fused AdamW reads `found_inf`.
    Muon has no such input, so with Muon a bad step must be caught on the host before it runs."""
    return isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and AdamW as one optimizer, for Lightning, the schedule and the checkpoint.

    `param_groups` and `state` are live views of the two optimizers' own (AdamW's groups first,
    so group 0 is still AdamW's); `step` runs the closure once (forward, backward, clipping), then
    both steps; `state_dict` is {"adamw": ..., "muon": ...}, each optimizer's own, so a resume
    restores each exactly.
    """

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Muon) -> None:
        self.adamw, self.muon = adamw, muon
        # Optimizer.__init__ sets up the hooks and the step's profiling wrapper; it needs a
        # parameter of its own (one of the two optimizers' would be "in more than one group").
        # The group it makes is dropped: `param_groups` and `state` are the two optimizers'.
        super().__init__([torch.empty(0)], {})

    # Optimizer.__init__ assigns its own `param_groups` and `state`; ours are the two optimizers'
    # (their load_state_dict replaces their group dicts, so a stored list would go stale).
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adamw.param_groups + self.muon.param_groups

    @param_groups.setter
    def param_groups(self, value: Any) -> None:
        pass

    @property
    def state(self) -> dict[torch.Tensor, Any]:
        return {**self.adamw.state, **self.muon.state}

    @state.setter
    def state(self, value: Any) -> None:
        pass

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.adamw.step()
        self.muon.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if set(state_dict) != {"adamw", "muon"}:
            raise UsageError("the checkpoint's optimizer state is not Muon beside AdamW; resume with the "
                             "optimizer it was trained with (--model.optimizer)")
        self.adamw.load_state_dict(state_dict["adamw"])
        self.muon.load_state_dict(state_dict["muon"])


def check_same_optimizer(path: str, checkpoint: Mapping[str, Any], optimizer: str) -> None:
    """Refuse to resume a run with another optimizer: the saved state is the other optimizer's.
    Starting afresh from the checkpoint's weights (--model.init_from) is the explicit way."""
    saved = (checkpoint.get("hyper_parameters") or {}).get("optimizer", "adamw")
    if saved != optimizer:
        raise UsageError(f"checkpoint {path} was trained with --model.optimizer {saved} and this run asks for "
                         f"{optimizer}; resume with --model.optimizer {saved}, or start a new run (another "
                         f"--name) with --model.init_from {path} to take its weights with a fresh optimizer")


def check_same_groups(path: str, checkpoint: Mapping[str, Any], model: nn.Module, optimizer: str) -> None:
    """Refuse to resume optimizer state whose groups hold other numbers of parameters than this
    version gives `model`: the state would be refused deep inside Lightning with a traceback.
    Checkpoints written under FSDP before groups were decided by identity are such (all in
    no_decay: nothing decayed)."""
    states = checkpoint.get("optimizer_states") or [{}]
    saved = states[0].get("adamw", states[0]) if optimizer == "muon" else states[0]
    saved_groups = saved.get("param_groups") or []
    counts = {(g.get("name") or ("decay", "no_decay")[i]): len(g["params"]) for i, g in enumerate(saved_groups)}
    ours = {name: len(params) for name, params in parameter_groups(model, muon=optimizer == "muon").items()
            if name in counts}
    if counts and counts != ours:
        def say(c: Mapping[str, int]) -> str:
            return ", ".join(f"{n} {k}" for k, n in c.items())

        raise UsageError(f"checkpoint {path} holds optimizer state for parameter groups of {say(counts)} "
                         f"parameters, and this version groups them as {say(ours)} (a checkpoint written under "
                         f"FSDP before groups were fixed decayed nothing); start a new run (another --name) with "
                         f"--model.init_from {path} to take its weights with a fresh optimizer")


def check_strategy(optimizer: str, strategy: Any) -> None:
    """Muon orthogonalizes each whole matrix; under FSDP each rank holds a 1-D slice of a unit's
    flattened weights, so Muon would need every matrix gathered (torchtitan's DistMuon does so),
    and its momentum kept and checkpointed whole. That is not built: refuse the pair before
    anything is built."""
    text = str(strategy.get("class_path", strategy) if isinstance(strategy, Mapping) else strategy)
    if optimizer == "muon" and "fsdp" in text.lower():
        raise UsageError(f"--model.optimizer muon cannot run under --trainer.strategy {text}: Muon orthogonalizes "
                         "each whole matrix and FSDP gives each process a 1-D slice of it (gathering them for Muon "
                         "is not implemented); use --trainer.strategy ddp, or --model.optimizer adamw")


def check_clipping(grad_clip: float, gradient_clip_val: Any, gradient_clip_algorithm: Any) -> None:
    """smollm clips the global gradient norm itself (--model.grad_clip); the Trainer's clipping
    options would be passed over in silence, so they are refused. `norm`, what ours does, is fine."""
    if grad_clip < 0:
        raise UsageError(f"--model.grad_clip {grad_clip}: give the largest gradient norm (> 0), or 0 for no clipping")
    if gradient_clip_val is not None:
        raise UsageError(f"--trainer.gradient_clip_val {gradient_clip_val} is not used: smollm clips the global "
                         f"gradient norm with --model.grad_clip (now {grad_clip}; 0 disables it); give "
                         f"--model.grad_clip {gradient_clip_val} instead")
    algorithm = getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm)
    if algorithm not in (None, "norm"):
        raise UsageError(f"--trainer.gradient_clip_algorithm {algorithm} is not supported: smollm clips the global "
                         "gradient norm (--model.grad_clip); drop --trainer.gradient_clip_algorithm")


def check_precision(precision: Any) -> str | None:
    """AdamW on half-precision weights trains something else than the recipe: refuse 16-true
    (no loss scaling, and AdamW's eps 1e-8 is 0 in float16: the run diverges within a few steps),
    and return a warning for bf16-true (updates below 1/256 of a weight round away)."""
    text = str(precision)  # Lightning's "16" and "bf16" are its mixed modes
    if text == "16-true":
        raise UsageError(f"--trainer.precision {text} trains in float16 without loss scaling (and, outside FSDP, keeps "
                         "the weights and AdamW's state in float16, where its eps 1e-8 is 0); use --trainer.precision "
                         "16-mixed or bf16-mixed")
    if text == "bf16-true":
        return (f"warning: --trainer.precision {text} keeps the weights in bfloat16: an update smaller than 1/256 of "
                "a weight is lost; bf16-mixed keeps float32 weights")
    return None
