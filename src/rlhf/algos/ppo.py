"""The PPO maths for RLHF as pure tensor functions, plus the KL controllers.

Shapes: B samples in the rollout, A response tokens (right-padded; ``mask`` is 1 on real response
tokens, which form a prefix of each row). Names follow the papers and the reference implementations:
Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Ziegler et al. 2019 (the adaptive KL
controller), and "The N Implementation Details of RLHF with PPO" (Huang et al. 2023).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf.algos.core import masked_mean, masked_sum


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` where ``mask`` is 1 (Bessel-corrected by default, as the references do)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Normalise ``values`` to unit variance over the masked positions (and mean 0 with shift_mean).

    Masked-out positions come back as 0 so they cannot leak into a later sum. ``all_sum``: the sum over every
    process of a tensor; the mean and variance are then the global batch's (two passes, as with one process).
    """
    if all_sum is None:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    else:
        total, n = all_sum(torch.stack([masked_sum(values.float(), mask), mask.sum().float()]))
        mean = total / n.clamp(min=1)
        var = all_sum(masked_sum((values.float() - mean) ** 2, mask)) / (n - 1).clamp(min=1)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy.

    (B, A) -> (B, A). k1 = log p - log p_ref: unbiased, can be negative per token; the standard in the
    RLHF reward. k2 = (log p - log p_ref)^2 / 2: low variance, biased. k3 = (r - 1) - log r with
    r = p_ref / p: unbiased and never negative (http://joschu.net/blog/kl-approx.html).
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (k1, k2 or k3)")


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """r_t = -kl_coef * KL_t on every response token, plus the sequence score on the last one.

    scores: (B,); kl, mask: (B, A) -> (B, A). The score lands on the last real token (the EOS when the
    response ended), where the reward model read it.
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1) - 1).clamp(min=0).long()  # (B,)
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses.

    rewards, values, mask: (B, A) -> (advantages (B, A), returns (B, A)). The episode ends at the last
    real token: the value after it is 0. Vectorised over the batch; one backward pass over A.
    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  returns = A + V.
    """
    rewards, values, mask = rewards.float(), values.float() * mask, mask.float()
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,)
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
        next_value = values[:, t]
    returns = advantages + values
    return advantages * mask, returns * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate loss (Schulman et al. 2017), averaged over response tokens.

    All (B, A). Returns the loss and statistics: clipfrac (share of tokens where the clipped term was
    the one used), approxkl (0.5 * E[(log ratio)^2], the estimator of the reference implementations).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2), averaged over response tokens.

    All (B, A). Returns the loss and its clipfrac.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_err > unclipped_err).float(), mask)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: (B, A, V) -> (B, A), in fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over the masked positions: 1 is a perfect critic, 0 a constant one."""
    var_returns = masked_var(returns, mask)
    return 1 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)


def sequence_kl(kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL per sequence, (B, A) -> (B,): the per-token estimates summed over the response."""
    return masked_sum(kl, mask, dim=1)


@dataclass
class FixedKLController:
    """A constant KL coefficient."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """The proportional controller of Ziegler et al. 2019 (https://arxiv.org/abs/1909.08593, section 2.2).

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon), where KL is the
    rollout's mean KL per sequence and n_steps the samples in that rollout.
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def kl_controller(coef: float, adaptive: bool, target: float, horizon: int) -> FixedKLController | AdaptiveKLController:
    return AdaptiveKLController(coef, target, horizon) if adaptive else FixedKLController(coef)
