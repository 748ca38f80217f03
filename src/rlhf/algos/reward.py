"""The reward model's pairwise loss: a pure function of the two rewards of each pair.

Bradley-Terry (Christiano et al. 2017; Ouyang et al. 2022): P(chosen > rejected) = sigmoid(r_c - r_r),
trained by maximum likelihood, i.e. loss = -logsigmoid(r_c - r_r). Two optional terms:

- a hinge on the margin, ``margin_weight * relu(margin - (r_c - r_r))``: pairs labelled "much better"
  should be separated by more than pairs labelled "slightly better" (Llama 2 uses the margin inside
  the sigmoid; the hinge keeps the Bradley-Terry term a proper likelihood);
- reward centering (Eisenstein et al. 2023, "Helping or Herding?"), ``center_coef * (r_c + r_r)^2``:
  Bradley-Terry fixes rewards only up to a constant; this pins the constant near 0 so that rewards
  of different runs and ensemble members are comparable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
    margin_weight: float = 0.0,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Mean pairwise loss over the batch. r_chosen, r_rejected: (B,); margin: (B,) or a float."""
    diff = (r_chosen - r_rejected).float()  # (B,)
    loss = -F.logsigmoid(diff)
    if margin_weight and margin is not None:
        loss = loss + margin_weight * F.relu(torch.as_tensor(margin, dtype=diff.dtype, device=diff.device) - diff)
    if center_coef:
        loss = loss + center_coef * (r_chosen.float() + r_rejected.float()) ** 2
    return loss.mean()


def preference_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs where the chosen response gets the higher reward (ties count half)."""
    return ((r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()).mean()
