"""Steps 4-5 of an iteration per algorithm: a scored rollout's rewards and advantages; and what each adds to
the clipped policy loss. The maths is in :mod:`rlhf.algos`; this file only says which piece each method uses.

- ``ppo``: KL (k1) on every token of the reward, the score on the last; GAE with the critic; whitened advantages
  (``whiten_advantages``); clipped value loss beside the policy loss.
- ``grpo``: K samples per prompt; the group-normalised score on every token (``scale_rewards: false`` for Dr.
  GRPO); no KL in the reward: beta * k3 KL to the reference is a loss term instead.
- ``rloo``: K samples per prompt; the reward is the score minus beta * the sequence's KL; the leave-one-out
  baseline of the other K - 1 samples.
- ``reinforce_pp``: PPO's per-token rewards; their reward-to-go whitened over the whole batch; no critic.

All four then take the same clipped-ratio policy loss (PPO's), so ``ppo_epochs`` and ``mini_batch_size`` mean the
same for each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf import distributed
from rlhf.algos import advantages as estimators
from rlhf.algos.core import masked_mean
from rlhf.algos.ppo import compute_gae, kl_penalty, per_token_rewards, sequence_kl, whiten
from rlhf.config import PPOConfig
from rlhf.rl.types import Rollout


def global_sum():
    """Under several processes, the all-reduce that makes batch statistics the global batch's; else None."""
    return distributed.all_sum if distributed.processes() > 1 else None


def ppo_advantages(ro: Rollout, cfg: PPOConfig, kl_coef: float) -> None:
    mask = ro.response_mask
    kl = kl_penalty(ro.logprobs, ro.ref_logprobs, cfg.kl.estimator) * mask  # (B, A)
    ro.rewards = per_token_rewards(ro.scores, kl, kl_coef, mask)
    ro.advantages, ro.returns = compute_gae(ro.rewards, ro.values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        ro.advantages = whiten(ro.advantages, mask, all_sum=global_sum())


def grpo_advantages(ro: Rollout, cfg: PPOConfig, kl_coef: float) -> None:
    mask = ro.response_mask
    ro.rewards = per_token_rewards(ro.scores, torch.zeros_like(mask, dtype=torch.float), 0.0, mask)  # KL is in the loss
    group = estimators.group_advantages(ro.scores, cfg.num_generations, cfg.scale_rewards)  # (B,)
    ro.advantages = estimators.sequence_to_tokens(group, mask)


def rloo_advantages(ro: Rollout, cfg: PPOConfig, kl_coef: float) -> None:
    mask = ro.response_mask
    kl = kl_penalty(ro.logprobs, ro.ref_logprobs, "k1") * mask  # (B, A)
    ro.rewards = per_token_rewards(ro.scores, kl, kl_coef, mask)
    reward = ro.scores - kl_coef * sequence_kl(kl, mask)  # (B,) the sequence's reward with its KL
    ro.advantages = estimators.sequence_to_tokens(estimators.rloo_advantages(reward, cfg.num_generations), mask)


def reinforce_pp_advantages(ro: Rollout, cfg: PPOConfig, kl_coef: float) -> None:
    mask = ro.response_mask
    kl = kl_penalty(ro.logprobs, ro.ref_logprobs, "k1") * mask
    ro.rewards = per_token_rewards(ro.scores, kl, kl_coef, mask)
    ro.advantages = estimators.reinforce_pp_advantages(ro.rewards, mask, cfg.gamma, all_sum=global_sum())


def no_kl_loss(logprobs, ref_logprobs, mask, kl_coef) -> torch.Tensor | None:
    return None


def k3_kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """GRPO's KL term: beta * mean over response tokens of k3 = p_ref/p - 1 - log(p_ref/p) (unbiased, >= 0)."""
    return kl_coef * masked_mean(kl_penalty(logprobs, ref_logprobs, "k3"), mask)


@dataclass(frozen=True)
class Algorithm:
    """What one online method contributes to the shared loop."""

    name: str
    critic: bool  # trains a value model beside the policy (the clipped value loss joins the policy loss)
    advantages: Callable[[Rollout, PPOConfig, float], None]  # steps 4-5: sets ro.rewards, ro.advantages (and returns)
    kl_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor | None]  # a KL loss term, or None


ALGORITHMS = {
    "ppo": Algorithm("ppo", critic=True, advantages=ppo_advantages, kl_loss=no_kl_loss),
    "grpo": Algorithm("grpo", critic=False, advantages=grpo_advantages, kl_loss=k3_kl_loss),
    "rloo": Algorithm("rloo", critic=False, advantages=rloo_advantages, kl_loss=no_kl_loss),
    "reinforce_pp": Algorithm("reinforce_pp", critic=False, advantages=reinforce_pp_advantages,
                              kl_loss=no_kl_loss),
}
