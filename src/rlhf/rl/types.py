"""The RL loop's leaf types: an extra reward term and one rollout batch (imported by the loop, the
safety layer and the evaluations; it imports nothing of ours)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class RewardComponent:
    """An extra term of the sequence reward: ``weight * fn(prompts, responses)``, added to the RM score.

    ``fn`` takes the prompt texts (the last user turn) and the response texts of a rollout and returns
    one float per sample. The safety layer registers its safety, length and diversity terms here.
    """

    name: str
    fn: Callable[[list[str], list[str]], Sequence[float]]
    weight: float


@dataclass
class Rollout:
    """One rollout batch (OpenRLHF's ``Experience``): everything the update needs, on one device.

    With K samples per prompt (GRPO, RLOO) the K samples of a prompt are adjacent rows.
    """

    input_ids: torch.Tensor  # (B, T) prompt (left-padded) then response (right-padded)
    attention_mask: torch.Tensor  # (B, T) 1 on real prompt and response tokens
    n_prompt: int  # P: response token a sits at position P + a of the full sequence
    response_mask: torch.Tensor  # (B, A) 1 up to and including the first EOS
    logprobs: torch.Tensor  # (B, A) policy log-probs at sampling time (fp32, sampling temperature)
    ref_logprobs: torch.Tensor  # (B, A) reference log-probs
    scores: torch.Tensor  # (B,) the sequence score that enters the reward (normalised, penalised, clipped)
    values: torch.Tensor | None = None  # (B, A) critic values of the state before each token (None: no critic)
    rewards: torch.Tensor | None = None  # (B, A) per-token rewards (set by the algorithm)
    advantages: torch.Tensor | None = None  # (B, A) advantages (set by the algorithm)
    returns: torch.Tensor | None = None  # (B, A) the critic's targets (None: no critic)
    rm_scores: torch.Tensor | None = None  # (B,) the reward model's own score (mean - ensemble_penalty * std)
    rm_std: torch.Tensor | None = None  # (B,) ensemble disagreement (zeros for a single reward model)
    prompts: list[str] = field(default_factory=list)  # what judges read: the last user turn (or an attack's request)
    responses: list[str] = field(default_factory=list)  # decoded responses
