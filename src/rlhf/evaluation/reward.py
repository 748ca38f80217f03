"""Reward-model evaluation: how far PPO can trust the reward model.

On a preference file (held-out pairs), for one model or an ensemble:

- accuracy: agreement with the file's labels (noisy when annotators are);
- gold_accuracy: agreement with the noise-free preference of the gold judge, on pairs whose gold
  scores differ (assistant world, or any file with gold_chosen/gold_rejected fields);
- per_family and per_annotator accuracies;
- by_gold_gap: gold accuracy by how far apart the gold judge puts the two responses (|gold_chosen - gold_rejected|
  in GAP_EDGES bins): a model that misses only near-ties lacks resolution, one that misses wide gaps is wrong;
- by_split: for prompts of the assistant world, accuracy by whether the prompt's phrasing, or only an entity in it,
  is held out of every training split, or neither (what a reward model trained on train-split pairs has seen);
- by_decision: for assistant-world pairs, gold accuracy by what the gold preference turns on (a harmful request
  complied with, a refusal, an "I don't know", a right answer against a wrong one, or style alone);
- ece: expected calibration error of P(chosen) = sigmoid(r_chosen - r_rejected), 10 equal-width
  confidence bins (Guo et al. 2017);
- length_correlation: Pearson correlation between reward and response length in words over the
  distinct responses in the file (policy samples): a reward that grows with length invites rambling;
- disagreement: for an ensemble, the mean standard deviation of the members' normalised rewards;
- prompt_dependence: how often the model scores a prompt's own preferred response above the preferred response to
  another prompt of the same family, both under this prompt: a reward model that reads only the response scores
  about 0.5 here, and PPO can please it with a fluent answer to another question;
- annotators: agreement statistics of the labels themselves (kappa, alpha, agreement with the majority).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence

import torch

from rlhf.algos.reward import preference_accuracy
from rlhf.config import EvalRMConfig, require
from rlhf.configlib import ConfigError
from rlhf.data.io import PreferenceExample, load_preferences, to_record
from rlhf.evaluation.agreement import annotator_report, units_from_preferences
from rlhf.fsutil import check_out, json_with_keys, write_json_atomic
from rlhf.models.loading import check_length
from rlhf.models.reward import RewardModel, member_folders

log = logging.getLogger("rlhf.eval_rm")


def expected_calibration_error(p_chosen: torch.Tensor, bins: int = 10) -> float:
    """ECE of the predicted preference: confidence max(p, 1-p) against being right, binned by confidence."""
    conf = torch.maximum(p_chosen, 1 - p_chosen)  # (N,)
    right = (p_chosen > 0.5).float() + 0.5 * (p_chosen == 0.5).float()
    edges = torch.linspace(0.5, 1.0, bins + 1)
    ece = 0.0
    for i in range(bins):
        upper = conf <= edges[i + 1] if i == bins - 1 else conf < edges[i + 1]
        in_bin = (conf >= edges[i]) & upper
        if in_bin.any():
            ece += in_bin.float().mean().item() * abs(right[in_bin].mean().item() - conf[in_bin].mean().item())
    return ece


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side is constant or there are fewer than 3 points."""
    n = len(x)
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def score_pairs(rm: RewardModel, pairs: Sequence[PreferenceExample], batch_size: int, max_length: int
                ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Per-member rewards of chosen and rejected, each (M, N), scoring every distinct response once.

    Also returns {(prompt key, response): column} for the distinct responses."""
    keys: dict[tuple[str, str], int] = {}
    prompts, responses = [], []
    for ex in pairs:
        for text in (ex.chosen, ex.rejected):
            key = (json.dumps(ex.prompt, sort_keys=True), text)
            if key not in keys:
                keys[key] = len(responses)
                prompts.append(ex.prompt)
                responses.append(text)
    rewards = rm.score(prompts, responses, batch_size=batch_size, max_length=max_length,
                       normalize=rm.normalized, per_member=True)  # (M, R)
    idx = [(keys[(json.dumps(ex.prompt, sort_keys=True), ex.chosen)], keys[(json.dumps(ex.prompt, sort_keys=True), ex.rejected)])
           for ex in pairs]
    c = torch.tensor([i for i, _ in idx])
    r = torch.tensor([j for _, j in idx])
    return rewards[:, c], rewards[:, r], {"rewards": rewards, "responses": responses}


def _gold_agreement(pairs: Sequence[PreferenceExample], rc: torch.Tensor, rr: torch.Tensor) -> list[float | None]:
    """Per pair: 1/0 when the reward model agrees/disagrees with the gold preference, None without one."""
    out = []
    for k, ex in enumerate(pairs):
        gc, gr = ex.extra.get("gold_chosen"), ex.extra.get("gold_rejected")
        if gc is None or gr is None or gc == gr:
            out.append(None)
        else:
            out.append(0.5 if rc[k] == rr[k] else float((rc[k] > rr[k]).item() == (gc > gr)))
    return out


GAP_EDGES = (0.0, 0.1, 0.3, 0.5)  # lower edges of the gold-gap bins; the last bin is open above


def gold_gap_bin(ex: PreferenceExample) -> str | None:
    """The pair's bin of |gold_chosen - gold_rejected| ("0.1-0.3", ">=0.5"), None without a gold preference."""
    gc, gr = ex.extra.get("gold_chosen"), ex.extra.get("gold_rejected")
    if gc is None or gr is None or gc == gr:
        return None
    gap = abs(gc - gr)
    lo = max(i for i, edge in enumerate(GAP_EDGES) if gap >= edge)
    return f">={GAP_EDGES[lo]}" if lo == len(GAP_EDGES) - 1 else f"{GAP_EDGES[lo]}-{GAP_EDGES[lo + 1]}"


def _world_task(ex: PreferenceExample):
    """The assistant-world task of the pair's last user turn, or None."""
    from rlhf.world import parse_prompt

    user = [m["content"] for m in ex.prompt if m["role"] == "user"]
    return parse_prompt(user[-1]) if user else None


def world_split(ex: PreferenceExample) -> str | None:
    """"held-out phrasing", "held-out entity", "deploy" or "train" for a prompt of the assistant world; None for
    others."""
    from rlhf.world.tasks import kind_of

    task = _world_task(ex)
    if task is None:
        return None
    if kind_of(task).phrasings[task.get("phrasing")].heldout:
        return "held-out phrasing"
    return {"heldout": "held-out entity", "deploy": "deploy"}.get(task.split, "train")


# In this order: a harmful request refused or complied with is "compliance" even though the refusal differs too.
DECISIONS = (("complied", "compliance"), ("refused", "refusal"), ("hedged", "hedge"), ("correct", "right vs wrong"))


def gold_decision(ex: PreferenceExample) -> str | None:
    """What the gold judge's preference of an assistant-world pair turns on: the first of its verdicts that differ
    between the two replies ("compliance" with a harmful request, "refusal", "hedge": says it does not know,
    "right vs wrong"), or "style" when none does and only how well the same kind of reply is written separates
    them (two wrong answers, two refusals); None without a gold preference or outside the world.

    The decisions are what PPO exploits (a stock refusal, a stock "I don't know"), so a reward model has to get them
    right; style pairs are close calls even for the annotators."""
    from rlhf.world import judge

    gc, gr = ex.extra.get("gold_chosen"), ex.extra.get("gold_rejected")
    task = None if gc is None or gr is None or gc == gr else _world_task(ex)
    if task is None:
        return None
    a, b = judge(task, ex.chosen), judge(task, ex.rejected)
    return next((name for field, name in DECISIONS if bool(getattr(a, field)) != bool(getattr(b, field))), "style")


def _grouped(pairs: Sequence[PreferenceExample], right: torch.Tensor, gold: list, key) -> dict:
    """Accuracy and gold accuracy per group (family, annotator)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for k, ex in enumerate(pairs):
        name = key(ex)
        if name is not None:
            groups[str(name)].append(k)
    out = {}
    for name, ks in sorted(groups.items()):
        g = [gold[k] for k in ks if gold[k] is not None]
        out[name] = {"n": len(ks), "accuracy": right[ks].mean().item(),
                     "gold_pairs": len(g), "gold_accuracy": sum(g) / len(g) if g else None}
    return out


def mismatch_triples(pairs: Sequence[PreferenceExample]) -> list[tuple[list, str, str, str | None]]:
    """(prompt, its preferred response, another prompt's preferred response, family) for each distinct prompt.

    The preferred response is the gold judge's better one where the file has gold scores, else the label's. The
    other prompt is the next distinct prompt of the same family in the file (cyclically); a family with one
    prompt, or an "other" response that is the prompt's own text, makes no triple."""
    best: dict[str, tuple[list, str, str | None]] = {}
    for ex in pairs:
        gc, gr = ex.extra.get("gold_chosen"), ex.extra.get("gold_rejected")
        better = ex.rejected if gc is not None and gr is not None and gr > gc else ex.chosen
        best.setdefault(json.dumps(ex.prompt, sort_keys=True), (ex.prompt, better, ex.extra.get("family")))
    by_family: dict[str | None, list[tuple[list, str]]] = defaultdict(list)
    for prompt, response, family in best.values():
        by_family[family].append((prompt, response))
    out = []
    for family, items in by_family.items():
        for i, (prompt, own) in enumerate(items):
            other = items[(i + 1) % len(items)][1]
            if other != own:  # a family of one prompt pits it against itself
                out.append((prompt, own, other, family))
    return out


def prompt_dependence(rm: RewardModel, pairs: Sequence[PreferenceExample], batch_size: int, max_length: int) -> dict | None:
    """The share of ``mismatch_triples`` whose own response the model scores above the other (ties half), overall
    and per family; None when the file has no two prompts of one family."""
    triples = mismatch_triples(pairs)
    if not triples:
        return None
    prompts = [t[0] for t in triples] * 2
    rewards = rm.score(prompts, [t[1] for t in triples] + [t[2] for t in triples], batch_size=batch_size,
                       max_length=max_length, normalize=rm.normalized)  # (2T,): own responses, then the others'
    own, other = rewards[: len(triples)], rewards[len(triples) :]
    right = ((own > other).float() + 0.5 * (own == other).float()).tolist()  # NaN (too long) compares False: a miss
    families: dict[str, list[float]] = defaultdict(list)
    for (_, _, _, family), r in zip(triples, right):
        families[str(family)].append(r)
    return {"accuracy": sum(right) / len(right), "n": len(right),
            "per_family": {f: {"n": len(v), "accuracy": sum(v) / len(v)} for f, v in sorted(families.items())}}


def evaluate_reward_model(rm: RewardModel, pairs: Sequence[PreferenceExample], *, batch_size: int = 64,
                          max_length: int = 256) -> dict:
    """Every metric of the module docstring for ``rm`` on ``pairs``."""
    if not pairs:
        raise ValueError("no preference pairs to evaluate")
    chosen, rejected, scored = score_pairs(rm, pairs, batch_size, max_length)
    keep = [k for k in range(len(pairs)) if chosen[:, k].isfinite().all() and rejected[:, k].isfinite().all()]
    if len(keep) < len(pairs):  # a response that alone is longer than max_length cannot be scored
        log.warning("%d of %d pairs have a response longer than max_length=%d: left out", len(pairs) - len(keep),
                    len(pairs), max_length)
        pairs, chosen, rejected = [pairs[k] for k in keep], chosen[:, keep], rejected[:, keep]
        finite = scored["rewards"].isfinite().all(0)
        scored = {"rewards": scored["rewards"][:, finite],
                  "responses": [t for t, f in zip(scored["responses"], finite.tolist()) if f]}
    if not pairs:
        raise ConfigError(f"eval-rm: no pair has responses that fit max_length={max_length}; raise --max_length")
    rc, rr = chosen.mean(0), rejected.mean(0)  # (N,)
    right = (rc > rr).float() + 0.5 * (rc == rr).float()  # (N,)
    gold = _gold_agreement(pairs, rc, rr)
    gold_known = [g for g in gold if g is not None]
    all_rewards = scored["rewards"].mean(0)  # (R,) over distinct responses
    lengths = [len(t.split()) for t in scored["responses"]]
    result = {
        "n_pairs": len(pairs), "members": len(rm.members), "normalized": rm.normalized,
        "accuracy": preference_accuracy(rc, rr).item(),
        "gold_accuracy": sum(gold_known) / len(gold_known) if gold_known else None,
        "gold_pairs": len(gold_known),
        "per_family": _grouped(pairs, right, gold, lambda ex: ex.extra.get("family")),
        "per_annotator": _grouped(pairs, right, gold, lambda ex: ex.annotator),
        "by_gold_gap": _grouped(pairs, right, gold, gold_gap_bin),
        "by_split": _grouped(pairs, right, gold, world_split),
        "by_decision": _grouped(pairs, right, gold, gold_decision),
        "ece": expected_calibration_error(torch.sigmoid(rc - rr)),
        "length_correlation": pearson(all_rewards.tolist(), lengths),
        "reward_mean": all_rewards.mean().item(), "reward_std": all_rewards.std().item(),
        "disagreement": scored["rewards"].std(0, unbiased=False).mean().item() if len(rm.members) > 1 else None,
        "prompt_dependence": prompt_dependence(rm, pairs, batch_size, max_length),
    }
    if any(ex.annotator for ex in pairs):
        result["annotators"] = annotator_report(units_from_preferences(to_record(ex) for ex in pairs))
    return result


def run_eval_rm(cfg: EvalRMConfig) -> dict:
    """Evaluate cfg.model on cfg.data; write cfg.out (JSON); return the metrics."""
    require(cfg, "model", "data", "out", stage="eval-rm")
    check_out(cfg.out, stage="eval-rm", kind="file", inputs={"model": cfg.model, "data": cfg.data}, overwrite=cfg.overwrite,
              state=json_with_keys("model", "n_pairs"))
    for folder in member_folders(cfg.model):
        check_length(folder, cfg.max_length, "max_length")
    pairs = list(load_preferences(cfg.data))
    rm = RewardModel.load(cfg.model, cfg.load)
    result = {"model": str(cfg.model), "data": str(cfg.data),
              **evaluate_reward_model(rm, pairs, batch_size=cfg.batch_size, max_length=cfg.max_length)}
    write_json_atomic(cfg.out, result)
    return result
