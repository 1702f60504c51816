"""The DPO objective: a preference pair's loss from the log-probabilities of its two replies under
the policy (the model trained) and under the reference (the model it started from), and the
rewards that TensorBoard shows. Pure tensor arithmetic; LitSmolLM (smollm.module) computes the
log-probabilities (`SmolLM.sequence_logps`) and owns the reference.

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

import torch
import torch.nn.functional as F

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
