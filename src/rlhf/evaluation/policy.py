"""Policy evaluation: generate on held-out prompts and score with the world's gold judge.

The gold judge is the only source of truth here; it is never used to train the policy. Responses
are greedy by default, so two runs on the same model give the same figures.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from rlhf.config import EvalConfig, GenerationConfig, ModelLoadConfig, require
from rlhf.data.chat import count_control_rows, encode_prompt, report_control_rows
from rlhf.data.io import load_prompts, write_jsonl_atomic
from rlhf.evaluation.alignment_tax import load_texts, perplexity, world_heldout_text
from rlhf.evaluation.diversity import Embedder, diversity_report
from rlhf.fsutil import check_out, json_with_keys, write_json_atomic
from rlhf.models.loading import check_model_dir, load_causal_lm
from rlhf.models.policy import gather_logprobs, response_logits
from rlhf.models.reward import RewardModel, member_folders
from rlhf.report.progress import progress_bar
from rlhf.rollout import Generation, generate, make_engine
from rlhf.safety.constitution import resolve_constitution
from rlhf.world import RATES, judge, parse_prompt, prompt_set, summarise

log = logging.getLogger("rlhf.eval")


def eval_prompts(cfg: EvalConfig) -> list[dict]:
    """[{"prompt": messages, "family": ...}]: the given file, or the world's held-out prompts."""
    if cfg.prompts:
        rows = [{"prompt": ex.prompt, **ex.extra} for ex in load_prompts(cfg.prompts)]
        return rows[: cfg.n_prompts]
    return [{"prompt": [{"role": "user", "content": r["prompt"]}], "family": r["family"]}
            for r in prompt_set("heldout", cfg.n_prompts, cfg.seed)]


def run_policy(model_dir: str, prompts: Sequence[dict], cfg: EvalConfig, desc: str) -> tuple[list[Generation], dict]:
    """Responses of one model to the prompts, and its capability figures that need the model itself."""
    model, tok = load_causal_lm(model_dir, cfg.load)
    report_control_rows(tok, count_control_rows(tok, ([m["content"] for m in p["prompt"]] for p in prompts)), len(prompts))
    processor = None
    if cfg.steer:
        from transformers import LogitsProcessorList

        require(cfg, "constitution", stage="eval (steer)")
        processor = LogitsProcessorList([resolve_constitution(cfg.constitution).logits_processor(tok)])
    with progress_bar(desc, len(prompts)) as bar:
        gens = generate(model, tok, [p["prompt"] for p in prompts], cfg.generation, seed=cfg.seed,
                        logits_processor=processor, progress=bar)
    extra = {}
    texts = load_texts(cfg.perplexity_text) if cfg.perplexity_text else world_heldout_text(cfg.seed) if not cfg.prompts else None
    if texts:
        extra["perplexity"] = perplexity(model, tok, texts)
    return gens, extra


def response_metrics(prompts: Sequence[dict], gens: Sequence[Generation], cfg: EvalConfig, rm: RewardModel | None
                     ) -> tuple[dict, list[float] | None]:
    """What any model's responses can be measured by, world prompts or not: diversity, constitution
    violations, the reward model's mean reward; and the per-response RM rewards (None without an RM)."""
    texts = [g.text for g in gens]
    out: dict = {"diversity": diversity_report(texts, Embedder())}
    if cfg.constitution:
        out["constitution"] = resolve_constitution(cfg.constitution).summarise([p["prompt"][-1]["content"] for p in prompts], texts)
    rewards = None
    if rm is not None:  # None where the response alone is longer than the reward model's context
        rewards = [None if math.isnan(r) else r for r in rm.score([p["prompt"] for p in prompts], texts,
                                                                  normalize=rm.normalized).tolist()]
        scored = [r for r in rewards if r is not None]
        out["rm_reward"] = sum(scored) / len(scored) if scored else None
        if len(scored) < len(rewards):
            out["rm_unscored"] = len(rewards) - len(scored)
    return out, rewards


def world_tasks(prompts: Sequence[dict]) -> list:
    """The assistant-world task of each prompt, None for a prompt that is not the world's (the gold judge
    cannot score it)."""
    return [parse_prompt(p["prompt"][-1]["content"]) for p in prompts]


def score(tasks: Sequence, gens: Sequence[Generation]) -> tuple[dict, list]:
    """Metrics of one policy's responses, and the per-sample judgements (None where the prompt is not the
    world's: the gold figures cover the world prompts only; length and EOS rate cover every prompt)."""
    judgements = [judge(t, g.text) if t is not None else None for t, g in zip(tasks, gens)]
    judged = [j for j in judgements if j is not None]
    metrics = summarise(judged)
    checked = {f: [j for j in judged if j.family == f] for f in ("arithmetic", "facts")}
    metrics["accuracy_by_family"] = {f: sum(bool(j.correct) for j in js) / len(js) for f, js in checked.items() if js}
    metrics["mean_length"] = sum(len(g.token_ids) for g in gens) / max(len(gens), 1)
    metrics["eos_rate"] = sum(g.ended for g in gens) / max(len(gens), 1)
    metrics["intervals"] = rate_intervals(judged)
    return metrics, judgements


# Which judge produced each figure of an eval result (the "judges" key of the output).
GOLD_FIGURES = ("gold_score", "families", "axes", "accuracy_by_family", "win_rate", "comparison",
                *(name for name, _, _ in RATES))
JUDGES = {"rm_reward": "reward_model", "rm_win_rate": "reward_model", "mean_length": "counted", "eos_rate": "counted",
          "diversity": "embeddings", "constitution": "constitution", "perplexity": "policy likelihood",
          "redteam": "gold judge (red-team cases)"}


def judges_of(result: dict) -> dict[str, str]:
    """Map each figure present in an eval result to what produced it: the gold judge (world prompts only),
    the reward model, the constitution, a count."""
    out = {k: f"gold judge ({result['judged_prompts']} assistant-world prompts)" for k in GOLD_FIGURES
           if result.get(k) is not None and result["judged_prompts"]}
    out.update({k: v for k, v in JUDGES.items() if result.get(k) is not None})
    return out


Z95 = 1.959964  # two-sided 95% quantile of the standard normal


def wilson_interval(successes: float, n: int, z: float = Z95) -> list[float] | None:
    """Wilson score interval [low, high] of a binomial rate (None for n = 0).

    Unlike the normal approximation it stays inside [0, 1] and is not zero-width at 0 of n: 0 harmful
    replies out of 50 still allows a true rate up to 7% (Wilson, 1927; Brown, Cai & DasGupta, 2001).
    """
    if n == 0:
        return None
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5 / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def normal_interval(values: Sequence[float], z: float = Z95) -> list[float] | None:
    """Normal-approximation interval [low, high] of the mean of per-prompt values (sample sd / sqrt(n));
    None with fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return [mean - z * sd / n**0.5, mean + z * sd / n**0.5]


def mean_interval(values: Sequence[float], z: float = Z95) -> list[float] | None:
    """``normal_interval`` clipped to [0, 1], for means of values in [0, 1] (the win rate's outcomes are 1, 0.5
    and 0); None with fewer than two values."""
    ci = normal_interval(values, z)
    return None if ci is None else [max(0.0, ci[0]), min(1.0, ci[1])]


def rate_intervals(judgements: Sequence) -> dict[str, list[float]]:
    """95% Wilson intervals of the headline rates (the world's RATES), for those whose families were evaluated."""
    out = {}
    for name, families, attr in RATES:
        flags = [bool(getattr(j, attr)) for j in judgements if j.family in families]
        if flags:
            out[name] = wilson_interval(sum(flags), len(flags))
    return out


def win_outcomes(ours: Sequence, theirs: Sequence) -> list[float]:
    """Per prompt: 1 where our gold total beats theirs, 0.5 for a tie, 0 for a loss."""
    return [1.0 if a.total > b.total else 0.5 if a.total == b.total else 0.0 for a, b in zip(ours, theirs)]


def win_rate(ours: Sequence, theirs: Sequence) -> float:
    """Share of prompts where our gold total beats theirs; ties count half."""
    return sum(win_outcomes(ours, theirs)) / max(len(ours), 1)


def verdict(gold_diff_ci95: list[float] | None, untied_ci95: list[float] | None = None) -> str:
    """Did the model get better than the one it is compared with, by two 95% intervals: of the mean paired gold
    difference (against 0) and of the win rate among untied prompts (against 0.5). ``better`` needs both above;
    ``worse``: one below and neither above; ``mixed``: one above and one below (small wins, large losses, or
    the reverse); else ``no measurable difference``. A claimed gain must survive both; a regression shows in
    either."""
    if gold_diff_ci95 is None:
        return "not measured"
    up = [gold_diff_ci95[0] > 0, untied_ci95 is not None and untied_ci95[0] > 0.5]
    down = [gold_diff_ci95[1] < 0, untied_ci95 is not None and untied_ci95[1] < 0.5]
    if any(up) and any(down):
        return "mixed"
    return "better" if all(up) else "worse" if any(down) else "no measurable difference"


def paired_comparison(ours: Sequence, theirs: Sequence) -> dict:
    """Our gold judgements against theirs on the same prompts: wins, ties and losses of the gold totals, the win
    rate among the non-tied prompts, and the mean paired gold difference (ours - theirs), each with its 95%
    interval, and the verdict of the two. The paired difference is what the prompts' own difficulty cancels out
    of; a win rate with ties half sits near 0.5 when most prompts tie, whichever way the rest go."""
    outcomes = win_outcomes(ours, theirs)
    untied = [o for o in outcomes if o != 0.5]
    diffs = [a.total - b.total for a, b in zip(ours, theirs)]
    ci, untied_ci = normal_interval(diffs), mean_interval(untied)
    return {"wins": outcomes.count(1.0), "ties": outcomes.count(0.5), "losses": outcomes.count(0.0),
            "win_rate_untied": sum(untied) / len(untied) if untied else None, "win_rate_untied_ci95": untied_ci,
            "gold_diff": sum(diffs) / len(diffs) if diffs else None, "gold_diff_ci95": ci, "verdict": verdict(ci, untied_ci)}


COMPARISON_FIGURES = ("win_rate_untied", "gold_diff", "gold_diff_ci95", "verdict")


def comparison_figures(ev: dict) -> dict:
    """The paired comparison's headline of an eval result made with --against (None for each without one)."""
    c = ev.get("comparison") or {}
    return {key: c.get(key) for key in COMPARISON_FIGURES}


def run_eval(cfg: EvalConfig) -> dict:
    """Evaluate cfg.model (and cfg.against); write cfg.out (JSON) and a samples file beside it."""
    require(cfg, "model", "out", stage="eval")
    check_out(cfg.out, stage="eval", kind="file", overwrite=cfg.overwrite, state=json_with_keys("model", "n_prompts"),
              inputs={"model": cfg.model, "against": cfg.against, "prompts": cfg.prompts,
                      "reward_model": cfg.reward_model, "perplexity_text": cfg.perplexity_text})
    for folder in (cfg.model, cfg.against):  # a missing folder fails now, not after generating
        if folder:
            check_model_dir(folder)
    if cfg.reward_model:
        member_folders(cfg.reward_model)
    if cfg.constitution:
        resolve_constitution(cfg.constitution)  # a bad file fails now, not after generating
    prompts = eval_prompts(cfg)
    tasks = world_tasks(prompts)
    n_world = sum(t is not None for t in tasks)
    if n_world < len(prompts):
        log.info("%d of %d prompts are not assistant-world prompts: the gold judge scores the other %d; length, EOS "
                 "rate, diversity%s cover all", len(prompts) - n_world, len(prompts), n_world,
                 " and the reward model" if cfg.reward_model else "")
    rm = RewardModel.load(cfg.reward_model, cfg.load) if cfg.reward_model else None
    gens, capability = run_policy(cfg.model, prompts, cfg, "eval")
    metrics, judged = score(tasks, gens)
    figures, rewards = response_metrics(prompts, gens, cfg, rm)
    result = {"model": str(cfg.model), "n_prompts": len(prompts), "judged_prompts": n_world,
              "unjudged_prompts": len(prompts) - n_world, **metrics, **capability, **figures}
    if cfg.redteam:
        result["redteam"] = redteam_summary(cfg)
    samples = [
        {"prompt": p["prompt"][-1]["content"], "family": j.family if j else None, "response": g.text,
         "gold": j.total if j else None, "ended": g.ended, "reasons": list(j.reasons) if j else [],
         **({"rm_reward": rewards[i]} if rewards else {})}
        for i, (p, g, j) in enumerate(zip(prompts, gens, judged))
    ]
    if cfg.against:
        compare_against(cfg, prompts, tasks, rm, result, samples, judged, rewards)
    result["judges"] = judges_of(result)
    out = Path(cfg.out)
    write_json_atomic(out, result)
    write_jsonl_atomic(out.with_name(out.stem + ".samples.jsonl"), samples)
    return result


def compare_against(cfg: EvalConfig, prompts, tasks, rm, result: dict, samples: list[dict], judged: list,
                    rewards: list[float] | None) -> None:
    """Add the `against` model's figures and the win rates of cfg.model over it: by the gold judge on the world
    prompts (``win_rate``, ties half, and ``comparison``: wins, ties, losses, the untied win rate, the paired gold
    difference and its verdict), and by the reward model on every prompt (``rm_win_rate``)."""
    other_gens, other_capability = run_policy(cfg.against, prompts, cfg, "eval ref")
    other_metrics, other_judged = score(tasks, other_gens)
    ours = [j for j in judged if j is not None]
    theirs = [j for j in other_judged if j is not None]
    if ours:
        result["win_rate"] = win_rate(ours, theirs)
        result["intervals"]["win_rate"] = mean_interval(win_outcomes(ours, theirs))
        result["comparison"] = paired_comparison(ours, theirs)
    other_figures, other_rewards = response_metrics(prompts, other_gens, cfg, rm)
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards or [], other_rewards or [])
                if a is not None and b is not None]
    if outcomes:
        result["rm_win_rate"] = sum(outcomes) / len(outcomes)
        result["intervals"]["rm_win_rate"] = mean_interval(outcomes)
    result["against"] = {"model": str(cfg.against), **other_metrics, **other_capability,
                         **{k: v for k, v in other_figures.items() if k != "diversity"}}
    for i, (s, g, j) in enumerate(zip(samples, other_gens, other_judged)):
        s["against_response"], s["against_gold"] = g.text, j.total if j else None
        if other_rewards:
            s["against_rm_reward"] = other_rewards[i]


def redteam_summary(cfg: EvalConfig) -> dict:
    """The red team's headline (asr overall and per strategy) for cfg.model, with the eval's settings."""
    from rlhf.safety.redteam import attack_model, build_attacks, headline, strategies, summarise_attacks, world_test_cases

    attacks = build_attacks(world_test_cases(), strategies(), seed=cfg.seed)
    constitution = resolve_constitution(cfg.constitution) if cfg.constitution else None
    summary = summarise_attacks(attacks, attack_model(cfg.model, attacks, cfg, constitution, "redteam"), constitution)
    return headline(summary)


def response_logprobs(model, sampled, temperature: float) -> torch.Tensor:
    """log p of each sampled response token under ``model``: (B, A), 0 on padding."""
    logits, _ = response_logits(model, sampled.input_ids, sampled.attention_mask, sampled.n_prompt, temperature)  # (B, A, V)
    return gather_logprobs(logits, sampled.responses) * sampled.mask


@torch.no_grad()
def kl_to_reference(model_dir: str, reference_dir: str, prompts: Sequence[dict], generation: GenerationConfig, *,
                    seed: int = 0, load: ModelLoadConfig | None = None) -> dict:
    """Mean KL per sequence of a policy to its reference on responses sampled from the policy.

    KL(pi || pi_ref) per sequence = E_pi[sum_t log pi(y_t) - log pi_ref(y_t)], estimated by sampling with
    the rollout settings (temperature, top-p) and summing k1 over response tokens: the quantity the
    adaptive controller tracks during PPO, here on held-out prompts.
    """
    policy, tok = load_causal_lm(model_dir, load)
    reference, _ = load_causal_lm(reference_dir, load)
    policy.eval(), reference.eval()
    engine = make_engine(policy, tok, generation.backend)
    encoded = [encode_prompt(tok, p["prompt"]) for p in prompts]
    torch.manual_seed(seed)
    per_sequence = []
    with progress_bar("kl", len(encoded)) as bar:
        for start in range(0, len(encoded), generation.batch_size):
            sampled = engine.generate(encoded[start : start + generation.batch_size], generation)
            # Both sides from the same kind of forward (not the engine's log-probs): a model's KL to itself is then 0.
            kl = response_logprobs(policy, sampled, generation.temperature) - response_logprobs(reference, sampled, generation.temperature)
            per_sequence += kl.sum(dim=1).tolist()  # (B,)
            bar.update(advance=len(sampled.ended))
    return {"kl": sum(per_sequence) / len(per_sequence), "n_prompts": len(per_sequence), "model": str(model_dir),
            "reference": str(reference_dir), "temperature": generation.temperature, "per_sequence": per_sequence}
