"""The direct preference losses as pure tensor functions: DPO (Rafailov et al. 2023), IPO (Azar et al. 2023) and
conservative DPO (label smoothing, Mitchell 2023).

Inputs are per-pair log-probabilities of the whole response, (B,) each: the policy's and the reference's, for the
chosen and the rejected side. The implicit reward of a response is beta * (log pi - log pi_ref).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss over the pairs and the statistics TRL names ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies``. All inputs (B,).

    sigmoid: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), h = the log-ratio margin (eps = 0 is DPO).
    ipo: (h - 1 / (2 beta))^2; pass per-token mean log-probs, as the IPO paper's and TRL's IPO do.
    """
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected  # (B,)
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r} (sigmoid or ipo)")
    with torch.no_grad():
        chosen, rejected = beta * chosen_ratio, beta * rejected_ratio
        stats = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                 "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).float().mean()}
    return losses.mean(), stats
