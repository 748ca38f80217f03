"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: PPO (or GRPO) on a tiny model against a
programmatic reward (the share of lowercase letters). Before the run, one rollout's advantages are checked against a
one-process computation on the gathered rollout (PPO: GAE whitened over the global batch; GRPO: group baselines).
Each process records every file it creates, replaces or opens for writing under OUT and reports them, with the
check, in REPORT.rankN.json (outside OUT).

    python tests/ddp_ppo.py POLICY REWARD_MODEL PROMPTS OUT REPORT ALGORITHM
"""

from __future__ import annotations

import builtins
import io
import json
import os
import sys
from pathlib import Path

import torch

from rlhf import distributed
from rlhf.algos.advantages import group_advantages, sequence_to_tokens
from rlhf.algos.ppo import compute_gae, whiten
from rlhf.configlib import from_dict
from rlhf.config import PPOConfig
from rlhf.rl.types import RewardComponent
from rlhf.stages.ppo import RLRun, run_ppo


def lowercase_share(prompts: list[str], responses: list[str]) -> list[float]:
    return [sum(c.isascii() and c.islower() for c in r) / max(len(r), 1) for r in responses]


def record_writes(root: Path) -> list[str]:
    """Wrap the calls that create or change files, keeping the paths under ``root`` they touch."""
    seen: list[str] = []

    def note(path) -> None:
        try:
            p = Path(os.fspath(path)).resolve()
        except TypeError:  # a file descriptor
            return
        if p == root or root in p.parents:
            seen.append(str(p.relative_to(root)))

    def wrap(module, name, writes):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            if args and writes(*args, **kwargs):
                note(args[0])
            return original(*args, **kwargs)

        setattr(module, name, wrapper)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
    for module in (builtins, io):  # open() and Path.open()
        wrap(module, "open", lambda f, mode="r", *a, **k: any(c in mode for c in "wax+"))
    wrap(os, "open", lambda f, flags, *a, **k: bool(flags & write_flags))
    for name in ("mkdir", "replace", "rename", "unlink", "rmdir"):
        wrap(os, name, lambda *a, **k: True)
    return seen


def gathered(t: torch.Tensor) -> torch.Tensor:
    """Every process's (b, A_r) rows, right-padded with zeros to the widest A, stacked in rank order."""
    parts = distributed.gather_objects(t.cpu())
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])


def check_advantages(cfg: PPOConfig) -> dict:
    """One rollout of a fresh run: its advantages against a one-process computation on the gathered rollout."""
    run = RLRun(cfg, [RewardComponent("lowercase", lowercase_share, weight=1.0)])
    ro, _ = run.rollout()
    mask, adv = gathered(ro.response_mask), gathered(ro.advantages)
    if cfg.algorithm == "grpo":
        scores = torch.cat(distributed.gather_objects(ro.scores.cpu()))
        one_process = sequence_to_tokens(group_advantages(scores, cfg.num_generations, cfg.scale_rewards), mask)
        k = cfg.num_generations  # every group of K adjacent rows is one prompt's, within this process
        local = float(all(len(set(ro.prompts[i : i + k])) == 1 for i in range(0, len(ro.prompts), k)))
    else:
        rewards, values = gathered(ro.rewards), gathered(ro.values)
        one_process = whiten(compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)[0], mask)
        # how far this process's own whitening would have been off: the check can tell the two apart
        own = whiten(compute_gae(ro.rewards, ro.values, ro.response_mask, cfg.gamma, cfg.lam)[0], ro.response_mask)
        local = (ro.advantages - own).abs().max().item()
    return {"rows": len(mask), "max_diff": (adv - one_process).abs().max().item(), "local": local}


def main(policy: str, rm: str, prompts: str, out: str, report: str, algorithm: str) -> None:
    distributed.init()  # as `rlhf` starts it
    cfg = from_dict(PPOConfig, dict(
        algorithm=algorithm, num_generations=4 if algorithm == "grpo" else 1,
        policy=policy, reward_model=rm, prompts=prompts, out=out, iterations=24, batch_size=16, mini_batch_size=8,
        ppo_epochs=2, lr=1e-3, missing_eos_score=None, generation=dict(do_sample=True, max_new_tokens=6, batch_size=16),
        kl=dict(coef=0.01, adaptive=False)))
    advantages = check_advantages(cfg)
    writes = record_writes(Path(out).resolve())
    summary = run_ppo(cfg, [RewardComponent("lowercase", lowercase_share, weight=1.0)])
    found = list(writes)
    with builtins.open(f"{report}.rank{distributed.rank()}.json", "w") as f:
        json.dump({"processes": distributed.processes(), "advantages": advantages, "writes": found,
                   "iterations": summary["iterations"]}, f)
    distributed.finish()  # as `rlhf` ends it


if __name__ == "__main__":
    main(*sys.argv[1:7])
