"""Iterated online RLHF (Bai et al. 2022; Llama 2): rounds after the first, each starting from the last policy.

Round 1 is the pipeline itself (pairs from the SFT model, the reward model, PPO from SFT). Round k >= 2, under
``RUN/round_k/``:

1. collect: pairs sampled from round k-1's policy on the training prompts (a new seed; the deployment prompts
   when the world has them, ``world.n_prompts_deploy``), and with ``against_pairs``
   pairs of its responses against those of the policy round k-1 started from, labelled by the world's simulated
   annotators; also pairs on the held-out prompts, which only the reward model's evaluation reads;
2. rm: a reward model trained again from ``rm.model`` (the SFT model) on every round's pairs, its scale measured on
   the current policy's samples; the annotators flagged at any round's collection are left out;
3. eval rm: the previous round's reward model and the new one on the new held-out pairs (how wrong the old one
   was about the policy it trained, and whether retraining fixed it);
4. ppo: PPO (or the configured algorithm) continues from round k-1's policy against the new reward model; the
   reference is the SFT model (``ref_refresh``: round k-1's policy);
5. eval: the held-out evaluation of the round's policy against SFT, and its KL to SFT.

Every stage is skipped when its output exists, as in the pipeline, so an interrupted run resumes inside the round.
With ``rlhf iterate --feedback`` people label step 1's training pairs instead (rlhf.stages.human).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from rlhf import distributed
from rlhf.config import CollectConfig, EvalConfig, EvalRMConfig, PPOConfig, RewardConfig, RunConfig
from rlhf.configlib import ConfigError
from rlhf.evaluation.hacking import fired_detectors
from rlhf.evaluation.policy import comparison_figures, eval_prompts, kl_to_reference, run_eval
from rlhf.evaluation.reward import run_eval_rm
from rlhf.fsutil import stage_done, write_json_atomic
from rlhf.stages.collect import evaluation_pairs, run_collect
from rlhf.stages.ppo import run_ppo
from rlhf.stages.reward import collection_report, run_rm
from rlhf.world import derive_seed

ROUND_KEYS = ("gold_score", "win_rate", "harmful_compliance", "over_refusal", "over_hedging", "honesty", "accuracy")


@dataclass
class Round:
    """The stage configs of round k (k >= 2), every path filled in."""

    k: int
    folder: Path
    collect: CollectConfig
    collect_heldout: CollectConfig
    rm: RewardConfig
    rm_before: EvalRMConfig  # the previous round's reward model on this round's held-out pairs
    rm_after: EvalRMConfig  # this round's
    ppo: PPOConfig
    eval: EvalConfig
    kl: Path


def round_folder(cfg: RunConfig, k: int) -> Path:
    return Path(cfg.out) / f"round_{k}"


def policy_of(cfg: RunConfig, k: int) -> str:
    """Round k's policy folder (round 1's is the pipeline's PPO output)."""
    return cfg.ppo.out if k == 1 else str(round_folder(cfg, k) / "ppo")


def start_of(cfg: RunConfig, k: int) -> str:
    """The policy round k started from (round 1: the pipeline's PPO policy, the SFT model)."""
    return cfg.ppo.policy if k == 1 else policy_of(cfg, k - 1)


def rm_of(cfg: RunConfig, k: int) -> str:
    return cfg.rm.out if k == 1 else str(round_folder(cfg, k) / "rm")


def train_pairs_of(cfg: RunConfig, k: int) -> str:
    return cfg.collect.out if k == 1 else str(round_folder(cfg, k) / "prefs" / "train.jsonl")


def round_configs(cfg: RunConfig, k: int, heldout_prompts: str) -> Round:
    """Round k's stages from the pipeline's configs (``cfg`` has its paths filled by ``stage_configs``)."""
    here, previous = round_folder(cfg, k), policy_of(cfg, k - 1)
    collect = copy.deepcopy(cfg.collect)
    collect.policy, collect.out = previous, str(here / "prefs" / "train.jsonl")
    collect.seed = derive_seed(cfg.collect.seed, f"round_{k}/collect")  # other samples than any round's before
    collect.against, collect.against_pairs = start_of(cfg, k - 1), cfg.against_pairs
    if cfg.world.n_prompts_deploy:  # the traffic of a deployed model: prompts no earlier step has seen
        collect.prompts = str(Path(cfg.out) / "world" / "prompts_deploy.jsonl")
    held = evaluation_pairs(collect, heldout_prompts, str(here / "prefs" / "heldout.jsonl"),
                            derive_seed(cfg.collect.seed, f"round_{k}/heldout"))
    rm = copy.deepcopy(cfg.rm)
    rm.data.path, rm.out = str(here / "prefs" / "all.jsonl"), str(here / "rm")
    rm.normalize.policy, rm.normalize.prompts = previous, cfg.ppo.prompts  # the scale PPO's rollouts will see
    before = EvalRMConfig(model=rm_of(cfg, k - 1), data=held.out, out=str(here / "eval" / "rm_before.json"),
                          max_length=cfg.rm.data.max_length, load=cfg.rm.load)
    after = EvalRMConfig(model=rm.out, data=held.out, out=str(here / "eval" / "rm.json"),
                         max_length=cfg.rm.data.max_length, load=cfg.rm.load)
    ppo = copy.deepcopy(cfg.ppo)
    ppo.policy, ppo.reward_model, ppo.out = previous, rm.out, str(here / "ppo")
    ppo.reference = previous if cfg.ref_refresh else (cfg.ppo.reference or cfg.ppo.policy)
    ev = copy.deepcopy(cfg.eval)
    ev.model, ev.against, ev.out = ppo.out, cfg.sft.out, str(here / "eval" / "ppo.json")
    ev.reward_model = rm.out
    return Round(k, here, collect, held, rm, before, after, ppo, ev, here / "eval" / "kl.json")


def all_pairs(cfg: RunConfig, r: Round) -> None:
    """Every round's training pairs in one file (round order) for round r's reward model."""
    combine_pairs([train_pairs_of(cfg, j) for j in range(1, r.k + 1)], r.rm)


def combine_pairs(files: list[str], rm: RewardConfig) -> None:
    """`files` in one file at ``rm.data.path``, and the annotators any of their collections flagged added to
    ``rm.exclude_annotators`` (the combined file has no collection statistics of its own)."""
    if rm.drop_flagged_annotators:
        flagged = {name for f in files for name in (collection_report(f) or {}).get("flagged", [])}
        rm.exclude_annotators = sorted(set(rm.exclude_annotators) | flagged)
        rm.drop_flagged_annotators = False
    out = Path(rm.data.path)
    if distributed.is_main() and not out.is_file():
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(Path(f).read_text() for f in files))
        tmp.replace(out)
    distributed.barrier()


def feedback_folder(r: Round) -> Path:
    """Where the human path (rlhf.stages.human) keeps round r's annotation database."""
    return r.folder / "feedback"


def waiting_for_labels(r: Round) -> bool:
    """Round r was started for people to label (``rlhf iterate --feedback``) and their labels are not exported yet."""
    return (feedback_folder(r) / "round.json").is_file() and not Path(r.collect.out).is_file()


def run_round(cfg: RunConfig, r: Round, stage) -> None:
    """Round r's stages through the pipeline's ``stage(name, done, fn, *args)`` (skip when finished, time, barrier)."""
    if waiting_for_labels(r):  # the simulated annotators must not label a round that people are labelling
        raise ConfigError(f"round {r.k} of {cfg.out} is waiting for people's labels in {feedback_folder(r)}: finish "
                          f"it with `rlhf iterate {cfg.out} --continue`")
    for name, c in ((f"round {r.k} collect", r.collect), (f"round {r.k} collect heldout", r.collect_heldout)):
        stage(name, Path(c.out).is_file(), run_collect, c)
    all_pairs(cfg, r)  # every process: the exclusions go into each one's config
    stage(f"round {r.k} rm", stage_done(r.rm.out) is not None, run_rm, r.rm)
    for name, c in ((f"round {r.k} eval rm before", r.rm_before), (f"round {r.k} eval rm", r.rm_after)):
        stage(name, Path(c.out).is_file(), run_eval_rm, c)
    stage(f"round {r.k} ppo", stage_done(r.ppo.out) is not None, run_ppo, r.ppo)
    stage(f"round {r.k} eval", Path(r.eval.out).is_file(), run_eval, r.eval)
    stage(f"round {r.k} eval kl", r.kl.is_file(), write_kl_to_sft, r, cfg)


def write_kl_to_sft(r: Round, cfg: RunConfig) -> None:
    """KL of the round's policy to the SFT model on the eval's held-out prompts, sampled as in rollouts."""
    write_json_atomic(r.kl, kl_to_reference(r.ppo.out, cfg.sft.out, eval_prompts(r.eval), r.ppo.generation,
                                            seed=r.eval.seed, load=r.ppo.load))


def eval_folder(cfg: RunConfig, k: int) -> Path:
    """Where round k's evaluations are: the run's eval/ for round 1, round_k/eval/ after."""
    return Path(cfg.out) / "eval" if k == 1 else round_folder(cfg, k) / "eval"


def round_figures(cfg: RunConfig, k: int) -> dict:
    """One row of the rounds table: the policy's held-out figures, its KL to SFT, the reward model's gold accuracy
    (for k >= 2: before and after retraining, on the round's held-out pairs), and the reward-hacking detectors that
    fired during its PPO."""
    here = eval_folder(cfg, k)
    ev, kl, rm = (json.loads((here / f"{name}.json").read_text()) for name in ("ppo", "kl", "rm"))
    before = json.loads((here / "rm_before.json").read_text()) if k > 1 else {}
    return {"round": k, **{key: ev.get(key) for key in ROUND_KEYS}, "win_rate_ci95": ev.get("intervals", {}).get("win_rate"),
            **comparison_figures(ev),
            "kl_to_sft": kl["kl"], "rm_gold_accuracy": rm.get("gold_accuracy"),
            "rm_gold_accuracy_before": before.get("gold_accuracy"), "alerts": fired_detectors(policy_of(cfg, k))}
