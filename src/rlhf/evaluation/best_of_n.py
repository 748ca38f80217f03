"""Best-of-n: sample n responses, keep the one the reward model ranks first.

Both a baseline (no training at all) and a measurement: the KL of best-of-n to the policy it samples from is
log n - (n - 1) / n (Stiennon et al. 2020, appendix; Gao et al. 2022), so its gold score for n = 1, 2, 4, ...
traces the gold-versus-KL frontier that RL should match or beat. The samples are drawn once for the largest n;
best-of-n reads the first n of each prompt's samples, so a larger n never picks a lower reward-model score, and
the first sample of each prompt is plain sampling with the seed (best-of-1 is the policy itself).
Shapes: P prompts, N samples per prompt.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from rlhf.config import BoNConfig, EvalConfig, require
from rlhf.data.io import write_jsonl_atomic
from rlhf.evaluation.policy import eval_prompts, score, world_tasks
from rlhf.fsutil import check_out, json_with_keys, write_json_atomic
from rlhf.models.loading import load_causal_lm
from rlhf.models.reward import RewardModel, member_mean_std
from rlhf.report.progress import progress_bar
from rlhf.rollout import Generation, generate
from rlhf.world import RATES, derive_seed

log = logging.getLogger("rlhf.bon")


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || policy) = log n - (n - 1) / n nats."""
    return math.log(n) - (n - 1) / n


def best_of_n(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Index (P,) of the highest score among each row's first n samples: (P, N) -> (P,); the first one on ties.
    A sample the reward model could not score (NaN) is ranked last."""
    first = scores[:, :n].nan_to_num(float("-inf"))
    return first.argmax(dim=1)


def sample_rounds(cfg: BoNConfig, prompts: list[dict], n: int) -> list[list[Generation]]:
    """n rounds of one sample per prompt, rounds[j][i] for prompt i; round 0 is plain sampling with the seed."""
    model, tok = load_causal_lm(cfg.policy, cfg.load)
    base = cfg.seed if cfg.sampling_seed is None else cfg.sampling_seed
    rounds = []
    with progress_bar("bon", n) as bar:
        for j in range(n):
            seed = base if j == 0 else derive_seed(base, f"bon/{j}")
            rounds.append(generate(model, tok, [p["prompt"] for p in prompts], cfg.generation, seed=seed))
            bar.update()
    return rounds


def rm_scores(cfg: BoNConfig, rm: RewardModel, prompts: list[dict], rounds: list[list[Generation]]) -> torch.Tensor:
    """(P, N) scores, normalised as PPO sees them; an ensemble's mean - ensemble_penalty * std."""
    columns = []
    for gens in rounds:
        per_member = rm.score([p["prompt"] for p in prompts], [g.text for g in gens], per_member=True,
                              normalize=rm.normalized)  # (M, P)
        mean, std = member_mean_std(per_member)
        columns.append(mean - cfg.ensemble_penalty * std)
    return torch.stack(columns, dim=1)  # (P, N)


def run_bon(cfg: BoNConfig) -> dict:
    """Best-of-n for every n in cfg.ns on the prompts; write cfg.out; return the result."""
    require(cfg, "policy", "reward_model", "out", stage="bon")
    check_out(cfg.out, stage="bon", kind="file", overwrite=cfg.overwrite, state=json_with_keys("policy", "curve"),
              inputs={"policy": cfg.policy, "reward_model": cfg.reward_model, "prompts": cfg.prompts})
    start = time.perf_counter()
    rm = RewardModel.load(cfg.reward_model, cfg.load)
    prompts = eval_prompts(EvalConfig(prompts=cfg.prompts, n_prompts=cfg.n_prompts, seed=cfg.seed))
    tasks = world_tasks(prompts)
    rounds = sample_rounds(cfg, prompts, max(cfg.ns))
    scores = rm_scores(cfg, rm, prompts, rounds)  # (P, N)
    curve, picked, judged, chosen = [], [], [], torch.zeros(0)
    for n in sorted(set(cfg.ns)):
        pick = best_of_n(scores, n)  # (P,)
        picked = [rounds[int(j)][i] for i, j in enumerate(pick)]
        metrics, judged = score(tasks, picked)
        chosen = scores[torch.arange(len(prompts)), pick]  # (P,)
        curve.append({"n": n, "kl": best_of_n_kl(n), "rm_score": chosen.nan_to_num(0.0).mean().item(),
                      **{k: metrics.get(k) for k in ("gold_score", *(name for name, _, _ in RATES), "mean_length")}})
        log.info("best-of-%d: gold %.3f, RM %.3f, KL %.3f", n, curve[-1]["gold_score"] or float("nan"),
                 curve[-1]["rm_score"], curve[-1]["kl"])
    result = {"policy": str(cfg.policy), "reward_model": str(cfg.reward_model), "n_prompts": len(prompts),
              "seconds": time.perf_counter() - start, "curve": curve, "largest": {"n": curve[-1]["n"], **metrics}}
    out = Path(cfg.out)
    write_json_atomic(out, result)
    write_jsonl_atomic(out.with_name(out.stem + ".samples.jsonl"), [
        {"prompt": p["prompt"][-1]["content"], "response": g.text, "rm_score": float(r), "gold": j.total if j else None}
        for p, g, r, j in zip(prompts, picked, chosen.tolist(), judged)])
    return result
