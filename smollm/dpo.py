"""The DPO objective: a preference pair's loss from the log-probabilities of its two replies under
the policy (the model trained) and under the reference (the model it started from), and the
rewards that TensorBoard shows. Pure tensor arithmetic; LitSmolLM (smollm.module) computes the
log-probabilities (`SmolLM.sequence_logps`); the reference it asks (`LitSmolLM.reference_logps`)
is a `Reference` (below).

For a pair with policy log-probabilities pc, pr (chosen, rejected: each the sum over the reply's
tokens) and reference ones rc, rr, the implicit rewards are beta (pc - rc) and beta (pr - rr), and
with the margin d = (pc - rc) - (pr - rr):

- "sigmoid" (DPO, Rafailov et al. 2023): -log sigmoid(beta d);
- "hinge" (SLiC, Zhao et al. 2023): max(0, 1 - beta d);
- "ipo" (Azar et al. 2023): (d' - 1 / (2 beta))^2, where d' is d with each reply's log-ratio
  divided by its number of tokens (TRL's form, confirmed with the IPO authors).

These are TRL's DPOTrainer `loss_type`s of the same names, term for term (tests/test_dpo_parity.py).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from smollm.digest import state_digest
from smollm.errors import InitFromError, UsageError
from smollm.model import SmolLM

LOSSES = ("sigmoid", "ipo", "hinge")


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                    reference_rejected: torch.Tensor, beta: float, loss: str = "sigmoid",
                    chosen_tokens: torch.Tensor | None = None,
                    rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen rewards, rejected rewards), each (P,), from (P,) log-probabilities;
    the rewards are detached. `chosen_tokens` and `rejected_tokens` (P,): each reply's scored tokens,
    which "ipo" divides by."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    if loss == "sigmoid":
        per_pair = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss == "hinge":
        per_pair = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    elif loss == "ipo":
        margin = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        per_pair = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}; one of {', '.join(LOSSES)}")
    return per_pair, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def reward_sums(per_pair: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """(5,) float32 sums over the pairs: [loss, chosen reward, rejected reward, accurate (chosen
    reward above rejected), pairs]: what micro-batches and processes add up, and `reward_means` divides."""
    return torch.stack([per_pair.detach().sum(), chosen.sum(), rejected.sum(), (chosen > rejected).sum(),
                        torch.tensor(float(len(per_pair)), device=chosen.device)]).float()


def reward_means(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics as TRL names them, from `reward_sums` added up: the mean loss, rewards/chosen,
    rewards/rejected, rewards/margins (chosen - rejected) and rewards/accuracies (the fraction of
    pairs whose chosen reward is the higher)."""
    loss, chosen, rejected, accurate, n = (sums / sums[4].clamp(min=1)).unbind()
    return {"loss": loss, "rewards/chosen": chosen, "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected, "rewards/accuracies": accurate}


class Reference:
    """DPO's reference model, behind `LitSmolLM.reference_logps`: a frozen copy of the initial weights
    (`model`; not a submodule of the LightningModule, so it is neither trained, nor saved with the
    weights, nor wrapped by DDP), or with `precompute`, no copy but each pair's log-probabilities
    under those weights (`logps` (n_pairs, 2): chosen, rejected), scored before training.

    A checkpoint records what makes a resume exact: for the copy, the digest of its weights (the copy
    itself is rebuilt from --model.init_from, which smollm.fit keeps on resume for this); for the
    precomputed kind, the table itself and the key of the token cache it was scored on."""

    def __init__(self, model: SmolLM, precompute: bool = False, adapters: bool = False) -> None:
        self.model: SmolLM | None = None
        self.logps: torch.Tensor | None = None
        self.digest: str | None = None
        self.data_key: str | None = None  # the token cache's key (bind_data): what a precomputed table scored
        # LoRA: the policy with its adapters off is the reference; the checkpoint's LoRA record identifies the base
        self.adapters = adapters and not precompute
        if not precompute and not adapters:
            self.model = copy.deepcopy(model).eval().requires_grad_(False)
            self.digest = state_digest(self.model)

    def state_dict(self) -> dict[str, Any]:
        if self.adapters:
            return {"kind": "adapters off"}
        if self.model is not None:
            return {"kind": "frozen", "digest": self.digest}
        return {"kind": "precomputed", "logps": None if self.logps is None else self.logps.detach().cpu(),
                "data_key": self.data_key}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kind = "adapters off" if self.adapters else "frozen" if self.model is not None else "precomputed"
        if state.get("kind") != kind:
            raise UsageError(f"the checkpoint's DPO reference is {state.get('kind') or 'absent'}, this run's "
                             f"{kind}; keep --model.dpo_precompute_reference as the checkpoint's run had it")
        if kind == "adapters off":
            return
        if kind == "frozen":
            if state.get("digest") != self.digest:
                raise InitFromError("the DPO reference rebuilt from --model.init_from is not the one the checkpoint's run "
                                    "started from (its weights' digest differs): resume with the same --model.init_from "
                                    "weights, unchanged")
            return
        if state.get("data_key") != self.data_key and self.data_key is not None:
            raise UsageError("the checkpoint's precomputed DPO reference scored other preference pairs than the data "
                             "given now (another token cache); resume on the checkpoint's data")
        self.logps = state.get("logps")


def check_objective(objective: str, data_format: str | None) -> None:
    """Preference pairs are DPO's data, and DPO's only: one line for any other pairing."""
    if data_format is None:
        return
    if objective == "dpo" and data_format != "preference":
        raise UsageError(f"--model.objective dpo trains on preference pairs, but --data.format is {data_format}; "
                         "set --data.format preference (records with prompt, chosen and rejected)")
    if objective != "dpo" and data_format == "preference":
        raise UsageError(f"--data.format preference holds pairs for DPO, but --model.objective is {objective}; "
                         "set --model.objective dpo (or --data.format chat to fine-tune on conversations)")
