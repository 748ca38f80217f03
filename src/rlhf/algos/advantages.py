"""Advantage estimators of the critic-free online methods, as pure tensor functions.

PPO's GAE (with a critic) lives in :mod:`rlhf.algos.ppo`. The estimators here need no value model:

- GRPO (Shao et al. 2024, https://arxiv.org/abs/2402.03300): K samples per prompt, the advantage of a
  sample is its score minus its group's mean, divided by the group's std (Dr. GRPO, Liu et al. 2025,
  https://arxiv.org/abs/2503.20783, drops the division: it weights easy and hard prompts alike);
- RLOO (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740): the baseline of a sample is the mean
  reward of the other K - 1 samples of its prompt;
- REINFORCE++ (Hu 2025, https://arxiv.org/abs/2501.03262): per-token rewards (KL on every token, the score
  on the last), their reward-to-go, normalised over the whole batch.

Shapes: B samples, the K samples of one prompt adjacent (rows g*K .. g*K + K - 1 are group g); A response
tokens, ``mask`` 1 on real response tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf.algos.ppo import whiten


def _groups(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) -> (B / K, K), refusing a batch that is not whole groups."""
    if group_size < 2 or values.shape[0] % group_size:
        raise ValueError(f"need groups of K >= 2 adjacent samples; got {values.shape[0]} samples and K={group_size}")
    return values.float().view(-1, group_size)


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: (score - group mean) / (group std + eps), or without the division (Dr. GRPO). (B,) -> (B,).

    The std is Bessel-corrected, as in the paper's and TRL's implementation; a group whose samples all
    scored the same has advantage 0 everywhere (it teaches nothing).
    """
    g = _groups(scores, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: r_i - mean_{j != i} r_j over the sample's group. (B,) -> (B,).

    The leave-one-out baseline does not depend on the sample itself, so the estimator stays unbiased.
    """
    g = _groups(rewards, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).view(-1)


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over each response: (B, A), (B, A) -> (B, A), 0 past the response."""
    rewards, mask = rewards.float() * mask, mask.float()
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                            all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """REINFORCE++: the reward-to-go of per-token rewards, whitened over every response token of the batch
    (the global batch is the baseline; no critic, no groups; ``all_sum`` as in ``whiten``). (B, A), (B, A) -> (B, A)."""
    return whiten(reward_to_go(rewards, mask, gamma), mask, all_sum=all_sum)


def sequence_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One advantage per sample on every one of its response tokens: (B,), (B, A) -> (B, A)."""
    return advantages.float().unsqueeze(1) * mask
