"""The human path of a round: people label the round's pairs in the annotation app instead of the simulated annotators.

1. ``rlhf iterate RUN --feedback``: two responses per prompt sampled from the last round's policy (the round's own
   training prompts and seed, as ``rlhf collect`` would), loaded as pair items into ``RUN/round_K/feedback/annotate.db``;
   the commands that open the app on it are printed. Nothing else of the round is written yet.
2. People label in ``rlhf annotate --db RUN/round_K/feedback/annotate.db`` (overlap items go to several of them).
3. ``rlhf iterate RUN --continue``: the app's labels are exported as the round's training pairs
   (``round_K/prefs/train.jsonl``, exactly ``rlhf annotate export``'s rows) after the annotators' agreement is checked,
   and the round runs on from there (reward model on every round's pairs, PPO, evaluation), as a simulated round does.

The agreement gate is Cohen's kappa pooled over every pair of annotators who labelled the same items (each pair's kappa
weighted by its shared items). Below ``min_kappa`` the labels are mostly noise, and a reward model trained on them
teaches PPO little but the noise; with no item labelled twice, agreement is unmeasured. Either way the round stops
with the figures, unless told to go on (``--ignore_agreement``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from rlhf import distributed
from rlhf.config import RunConfig
from rlhf.configlib import ConfigError
from rlhf.data.io import load_prompts, write_jsonl_atomic
from rlhf.fsutil import read_json, write_json_atomic
from rlhf.stages.collect import sample, stats_path
from rlhf.stages.rounds import Round, feedback_folder, waiting_for_labels

log = logging.getLogger("rlhf.iterate")

MIN_KAPPA = 0.4  # the bottom of "moderate" agreement on the Landis & Koch (1977) scale
RESPONSES_PER_PROMPT = 2  # one pair item per prompt: what an annotator compares


def feedback_db(r: Round) -> Path:
    return feedback_folder(r) / "annotate.db"


def start_feedback(run: Path, r: Round, n_prompts: int | None = None) -> dict:
    """Sample the round's candidate pairs from the last policy into a fresh annotation database; returns what was
    written (also in ``feedback/round.json``)."""
    from rlhf.feedback.config import QueueConfig
    from rlhf.feedback.sources import build_items
    from rlhf.feedback.store import Store

    begun = [p for p in (Path(r.collect.out), feedback_folder(r) / "round.json") if p.is_file()]
    if begun:  # a database without round.json is a start that was interrupted: its items are added again, once
        raise ConfigError(f"round {r.k} of {run} has already begun ({begun[0]} exists): finish it with `rlhf iterate "
                          f"{run}` (or --continue after labelling); nothing was written")
    prompts = list(load_prompts(r.collect.prompts))[: n_prompts or r.collect.n_prompts]
    texts, _ = sample(r.collect.policy, prompts, r.collect, r.collect.seed, k=RESPONSES_PER_PROMPT)  # as collect samples
    rows = [(ex.prompt, replies) for ex, replies in zip(prompts, texts)]
    queue = QueueConfig(tasks=["pair"], k=RESPONSES_PER_PROMPT, overlap=r.collect.overlap, seed=r.collect.seed)
    specs, unusable = build_items(rows, queue)
    if not specs:
        raise ConfigError(f"round {r.k}: the {len(prompts)} prompts gave no pair of distinct non-empty responses from "
                          f"{r.collect.policy}; nothing was written")
    feedback_folder(r).mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(feedback_folder(r) / "responses.jsonl", [{"prompt": p, "responses": c} for p, c in rows])
    Store(str(feedback_db(r))).add_items(specs)
    state = {"round": r.k, "policy": r.collect.policy, "prompts": r.collect.prompts, "n_prompts": len(prompts),
             "items": len(specs), "overlap_items": sum(s.target > 1 for s in specs), "identical_or_empty": unusable,
             "db": str(feedback_db(r))}
    write_json_atomic(feedback_folder(r) / "round.json", state)
    return state


def pooled_kappa(report: dict) -> tuple[float | None, int]:
    """Cohen's kappa of every pair of annotators, weighted by their shared items; and how many shared items."""
    pairs = [(v["kappa"], v["n"]) for v in report["kappa"].values() if v["kappa"] is not None and v["n"]]
    n = sum(n for _, n in pairs)
    return (sum(k * n for k, n in pairs) / n if n else None), n


def check_agreement(report: dict, db: Path, min_kappa: float, ignore: bool) -> float | None:
    kappa, shared = pooled_kappa(report)
    if kappa is not None and kappa >= min_kappa:
        return kappa
    why = (f"the annotators' agreement is kappa {kappa:.2f} over {shared} shared labels, below --min_kappa {min_kappa:g}"
           if kappa is not None else "no item was labelled by two annotators, so their agreement is unmeasured")
    if not ignore:
        raise ConfigError(f"{db}: {why}. Label more overlap items (or review the flagged annotators: "
                          f"{report['flagged'] or 'none'}), or pass --ignore_agreement to train on these labels anyway; "
                          "nothing was written")
    log.warning("%s; going on (--ignore_agreement)", why)
    return kappa


def export_labels(r: Round, min_kappa: float = MIN_KAPPA, ignore_agreement: bool = False) -> dict:
    """The app's labels as the round's training pairs, with an agreement report beside them (which ``rm``'s
    ``drop_flagged_annotators`` reads, as it reads a simulated collection's)."""
    from rlhf.evaluation.agreement import annotator_report
    from rlhf.feedback.export import preference_rows
    from rlhf.feedback.stats import agreement_units
    from rlhf.feedback.store import Store

    state, db = read_json(feedback_folder(r) / "round.json"), feedback_db(r)
    if not isinstance(state, dict) or not db.is_file():
        raise ConfigError(f"round {r.k} has no annotation database at {db}: start the round with `--feedback` first")
    store = Store(str(db))
    rows, labels = preference_rows(store), store.label_rows(("pair", "rank"))
    if not rows:
        raise ConfigError(f"{db}: no pair is labelled yet ({len(labels)} labels, all ties or both bad); label some in "
                          f"`rlhf annotate --db {db}` first; nothing was written")
    report = annotator_report(agreement_units(labels))
    kappa = check_agreement(report, db, min_kappa, ignore_agreement)
    stats = {"source": "annotate", "db": str(db), "policy": state["policy"], "labels": len(rows),
             "pairs": len({row["pair_id"] for row in rows}), "kappa": kappa, "annotators": report}
    write_jsonl_atomic(r.collect.out, rows)
    write_json_atomic(stats_path(r.collect.out), stats)
    return stats


def announce(run: Path, state: dict) -> None:
    if not distributed.is_main():
        return
    db = state["db"]
    print(f"round {state['round']}: {state['items']} pairs ({state['overlap_items']} for several annotators) from "
          f"{state['policy']} on {state['n_prompts']} prompts, waiting for labels in {db}\n"
          f"  accounts:   rlhf annotate add-user --db {db} NAME [--token]\n"
          f"  label:      rlhf annotate --db {db}\n"
          f"  then:       rlhf iterate {run} --continue")


def feedback_round(cfg: RunConfig, r: Round, *, start: bool, finish: bool, n_prompts: int | None,
                   min_kappa: float, ignore_agreement: bool) -> bool:
    """The human path's step for round r (``--feedback``: start; ``--continue``: export the labels); returns whether
    the round can run on now."""
    run = Path(cfg.out)
    if start:
        state = start_feedback(run, r, n_prompts) if distributed.is_main() else {}
        distributed.barrier()
        announce(run, state)
        return False
    if finish:
        if not Path(r.collect.out).is_file() and distributed.is_main():
            stats = export_labels(r, min_kappa, ignore_agreement)
            log.info("round %d: %d labels on %d pairs exported to %s", r.k, stats["labels"], stats["pairs"], r.collect.out)
        distributed.barrier()
    elif waiting_for_labels(r):  # checked before the pipeline rewrites the run's config
        raise ConfigError(f"round {r.k} of {run} is waiting for people's labels in {feedback_db(r)}: finish it with "
                          f"`rlhf iterate {run} --continue`; nothing was written")
    return True
