"""The safety layer's extra PPO rewards, built from `ppo.safety` and registered through PPO's hook."""

from __future__ import annotations

from rlhf.config import SafetyConfig
from rlhf.evaluation import hacking
from rlhf.rl.types import RewardComponent
from rlhf.safety.constitution import resolve_constitution


def safety_components(cfg: SafetyConfig) -> list[RewardComponent]:
    """RewardComponents for every term with a non-zero weight: safety, length, repetition, diversity."""

    out = []
    if cfg.safety_weight:
        out.append(resolve_constitution(cfg.constitution).reward_component(cfg.safety_weight))
    if cfg.length_weight:
        out.append(RewardComponent("length", hacking.length_penalty(cfg.length_target), cfg.length_weight))
    if cfg.repetition_weight:
        out.append(RewardComponent("repetition", hacking.repetition_penalty(), cfg.repetition_weight))
    if cfg.diversity_weight:
        out.append(RewardComponent("diversity", hacking.diversity_bonus(), cfg.diversity_weight))
    return out
