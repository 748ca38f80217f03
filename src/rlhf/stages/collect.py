"""Preference data from a policy: sample K responses per prompt, pair them, have annotators label them.

Besides the K(K-1)/2 pairs of a prompt's own responses, ``mismatch_pairs`` more per prompt pit one of
them against a response written for another prompt, and ``against_pairs`` more one of them against a response of
another policy (``against``: in rounds, the policy the previous round started from) to the same prompt.

In the assistant world the annotators are simulated (Bradley-Terry noise around the gold judge, each
with a quirk), so the labels are as noisy and biased as real ones, while the gold scores, kept in
separate fields for evaluation only, say what a careful rater would have preferred. Real users label
with `rlhf annotate` or bring their own file; both reach `rlhf rm` through the same loader.

Output rows: prompt, chosen, rejected, margin, annotator, plus pair_id (the same for every label of
one pair, so agreement can be measured), family, gold_chosen and gold_rejected. An annotator who sees
no difference says "tie"; ties make no row (they are counted in the statistics written beside the file).
"""

from __future__ import annotations

import copy
import itertools
import logging
import random
from pathlib import Path

from rlhf.config import CollectConfig, require
from rlhf.configlib import ConfigError, to_dict
from rlhf.data.io import load_prompts, write_jsonl_atomic
from rlhf.evaluation.agreement import annotator_report
from rlhf.fsutil import check_out, read_json, write_json_atomic
from rlhf.models.loading import load_causal_lm
from rlhf.report.progress import progress_bar
from rlhf.rollout import generate
from rlhf.world import annotator, derive_seed, judge, parse_prompt

log = logging.getLogger("rlhf.collect")

MUCH_BETTER = 1.0   # margin of a label the annotator is sure of (its P(choice) >= SURE)
SLIGHTLY_BETTER = 0.5
SURE = 0.9


def world_tasks(prompts) -> list:
    """The world task behind each prompt; the simulated annotators can judge nothing else."""
    tasks = []
    for ex in prompts:
        task = parse_prompt(ex.prompt[-1]["content"])
        if task is None:
            raise ConfigError(
                f"{ex.source}: field 'prompt': not an assistant-world prompt; simulated annotators only know the "
                "world. Label your own prompts with `rlhf annotate` and train `rlhf rm` on its export.")
        tasks.append(task)
    return tasks


def stats_path(out: str | Path) -> Path:
    """The statistics file written beside a collected preference file."""
    return Path(out).with_name(Path(out).stem + ".stats.json")


def collect_state(out: Path) -> str | None:
    """An earlier `rlhf collect` output (its statistics file lies beside it) is "finished"; anything else is not ours."""
    stats = read_json(stats_path(out))
    return "finished" if isinstance(stats, dict) and "labels" in stats else None


def label_pair(task, a: str, b: str, names: list[str], rng: random.Random) -> tuple[list[dict], dict[str, str]]:
    """Each named annotator's label of one pair: preference rows (chosen, rejected, margin from how sure
    it was), and every annotator's verdict including ties (ties make no row)."""
    rows, verdicts = [], {}
    for name in names:
        choice, p_choice = annotator(name).compare(task, a, b, rng)
        verdicts[name] = choice
        if choice == "tie":
            continue
        chosen, rejected = (a, b) if choice == "a" else (b, a)
        margin = MUCH_BETTER if p_choice >= SURE else SLIGHTLY_BETTER
        rows.append({"chosen": chosen, "rejected": rejected, "margin": margin, "annotator": name})
    return rows, verdicts


def evaluation_pairs(cfg: CollectConfig, prompts: str, out: str, seed: int) -> CollectConfig:
    """cfg for pairs that only evaluate a reward model: every prompt of `prompts`, and the policy's own pairs only
    (no mismatched or other-policy pairs), as PPO will show the reward model its replies."""
    held = copy.deepcopy(cfg)
    held.prompts, held.out, held.seed, held.n_prompts = prompts, out, seed, None
    held.mismatch_pairs = held.against_pairs = 0
    return held


def sample(policy: str, prompts, cfg: CollectConfig, seed: int, k: int | None = None) -> tuple[list[list[str]], list]:
    """k (default cfg.k) responses per prompt from `policy`, in batched passes: their texts (N, K), and the
    generations themselves, prompt-major (N * K,)."""
    k = k or cfg.k
    model, tok = load_causal_lm(policy, cfg.load)
    repeated = [ex.prompt for ex in prompts for _ in range(k)]
    with progress_bar(f"collect: sampling {Path(policy).name}", len(repeated)) as bar:
        gens = generate(model, tok, repeated, cfg.generation, seed=seed, progress=bar)
    return [[g.text for g in gens[i * k : (i + 1) * k]] for i in range(len(prompts))], gens


def run_collect(cfg: CollectConfig) -> dict:
    """Sample, pair and label; write cfg.out (JSONL) and its statistics beside it; return the statistics."""
    require(cfg, "policy", "prompts", "out", stage="collect")
    if cfg.against_pairs and not cfg.against:
        raise ConfigError("collect.against_pairs: name the policy to pair against in collect.against")
    check_out(cfg.out, stage="collect", kind="file", inputs={"policy": cfg.policy, "prompts": cfg.prompts,
                                                            "against": cfg.against}, state=collect_state, overwrite=cfg.overwrite)
    for name in cfg.annotators:
        try:
            annotator(name)
        except ValueError as e:
            raise ConfigError(f"collect.annotators: {e}") from None
    prompts = list(load_prompts(cfg.prompts))[: cfg.n_prompts]
    tasks = world_tasks(prompts)
    # 1. K samples per prompt from the policy, in one batched pass (and from `against`, for its pairs).
    texts, gens = sample(cfg.policy, prompts, cfg, cfg.seed)  # (N, K)
    against = sample(cfg.against, prompts, cfg, derive_seed(cfg.seed, "against"))[0] if cfg.against_pairs else []
    rows, verdicts, identical, empty = [], {}, 0, 0

    def add_pair(i: int, pair_id: str, first: str, second: str, rng: random.Random) -> None:
        """Show the pair in random order to one annotator (or all) and keep their labels as rows."""
        nonlocal identical, empty
        if first.strip() == second.strip():
            identical += 1  # nothing to compare
            return
        if not first.strip() or not second.strip():
            empty += 1  # preference files hold non-empty replies only (an empty one is usually a data bug)
            return
        a, b = (first, second) if rng.random() < 0.5 else (second, first)
        names = list(cfg.annotators) if rng.random() < cfg.overlap else [rng.choice(cfg.annotators)]
        pair_rows, verdicts[pair_id] = label_pair(tasks[i], a, b, names, rng)
        for row in pair_rows:
            rows.append({"prompt": prompts[i].prompt, **row, "pair_id": pair_id, "family": tasks[i].family,
                         "gold_chosen": judge(tasks[i], row["chosen"]).total,
                         "gold_rejected": judge(tasks[i], row["rejected"]).total})

    # 2. Every pair of distinct responses to the same prompt.
    rng = random.Random(cfg.seed)
    for i in range(len(prompts)):
        for x, y in itertools.combinations(range(cfg.k), 2):
            add_pair(i, f"{i}-{x}-{y}", texts[i][x], texts[i][y], rng)
    # 3. Mismatched pairs: one of the prompt's responses against one the policy wrote for another prompt.
    # Fluent, confident and off-topic, such replies are absent from on-policy pairs, so a reward model
    # never learns they are wrong, and PPO drifts to them on prompts unlike its training ones. Their own
    # random stream: the pairs above come out the same with or without these.
    mrng = random.Random(f"{cfg.seed}-mismatch")
    for i in range(len(prompts) if len(prompts) > 1 else 0):
        for m in range(cfg.mismatch_pairs):
            j = mrng.randrange(len(prompts) - 1)
            j += j >= i  # any prompt but this one
            add_pair(i, f"{i}-m{m}", mrng.choice(texts[i]), mrng.choice(texts[j]), mrng)
    # 4. Against the other policy: what the policy now says beside what `against` said, on the same prompt.
    arng = random.Random(f"{cfg.seed}-against")
    for i in range(len(against)):
        for m in range(cfg.against_pairs):
            add_pair(i, f"{i}-a{m}", arng.choice(texts[i]), arng.choice(against[i]), arng)
    ties = sum(v == "tie" for pair in verdicts.values() for v in pair.values())
    if not rows:
        raise ConfigError(f"no preference rows: {identical} identical pairs, {empty} with an empty reply, {ties} "
                         "labelled tie; sample more diverse responses (generation.temperature, k) or more prompts")
    out = Path(cfg.out)
    write_jsonl_atomic(out, rows)
    stats = {"prompts": len(prompts), "responses": len(gens), "pairs_labelled": len(verdicts),
             "mismatched_pairs_labelled": sum("-m" in pair_id for pair_id in verdicts),
             "against_pairs_labelled": sum("-a" in pair_id for pair_id in verdicts),
             "pairs": len({r["pair_id"] for r in rows}), "labels": len(rows), "ties": ties,
             "identical_pairs_skipped": identical, "empty_pairs_skipped": empty, "eos_rate": sum(g.ended for g in gens) / len(gens),
             # Agreement over every verdict, ties included: what the annotators did, not only what was kept.
             "annotators": annotator_report(verdicts), "config": to_dict(cfg)}
    write_json_atomic(stats_path(out), stats)
    log.info("collect: %d labels on %d pairs from %d prompts -> %s", len(rows), stats["pairs"], len(prompts), out)
    return stats
