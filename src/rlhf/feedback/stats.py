"""The admin page's figures: progress, agreement (the reward model's statistics), gold accuracy, position bias.

Agreement comes from rlhf.evaluation.agreement (the functions `rlhf eval-rm` reports), on *units*
built from the stored labels with the shown order undone: a pair label's value is the index of the
better candidate, or "tie" / "both_bad"; a ranking contributes one unit per pair of its candidates.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Hashable, Iterable

from rlhf.evaluation.agreement import annotator_report
from rlhf.feedback.export import ranking_pairs
from rlhf.feedback.store import Store


def agreement_units(labels: Iterable[dict]) -> dict[Hashable, dict[str, str]]:
    """item (or item and candidate pair, for rankings) -> {annotator: what they said}.

    Gold items are left out: they measure accuracy against a known answer (gold_accuracy), and everyone
    sees them, so they would swamp the overlap items that agreement is about.
    """
    units: dict[Hashable, dict[str, str]] = defaultdict(dict)
    for label in labels:
        if label["gold"] is not None:
            continue
        if label["kind"] == "pair":
            value = str(label["better"]) if label["better"] is not None else label["choice"]
            units[f"item-{label['item_id']}"][label["annotator"]] = value
        elif label["kind"] == "rank":
            for better, worse, _margin in ranking_pairs(label["ranking"]):
                a, b = sorted((better, worse))
                units[f"item-{label['item_id']}:{a}-{b}"][label["annotator"]] = str(better)
    return dict(units)


def _share(hits: int, n: int) -> float | None:
    return hits / n if n else None


def position_bias(labels: Iterable[dict]) -> dict:
    """Share of decided pair labels (A or B better) won by the response shown on the left; 0.5 is unbiased."""
    left, decided = defaultdict(int), defaultdict(int)
    for label in labels:
        if label["kind"] == "pair" and label["choice"] in ("left", "right"):
            for who in (label["annotator"], None):
                decided[who] += 1
                left[who] += label["choice"] == "left"
    return {"left_share": _share(left[None], decided[None]), "n": decided[None],
            "per_annotator": {a: _share(left[a], decided[a]) for a in decided if a is not None}}


def gold_accuracy(labels: Iterable[dict]) -> dict[str, dict]:
    """Per annotator: the share of gold items on which they chose the known better response."""
    hits, seen = defaultdict(int), defaultdict(int)
    for label in labels:
        if label["kind"] == "pair" and label["gold"] is not None:
            seen[label["annotator"]] += 1
            hits[label["annotator"]] += label["better"] == label["gold"]
    return {a: {"accuracy": _share(hits[a], seen[a]), "n": seen[a]} for a in seen}


def admin_stats(store: Store) -> dict:
    """Everything the admin page shows, as JSON."""
    labels = store.label_rows()
    per_annotator: dict[str, list[int]] = defaultdict(list)
    for label in labels:
        per_annotator[label["annotator"]].append(label["time_ms"])
    report = annotator_report(agreement_units(labels))
    gold = gold_accuracy(labels)
    bias = position_bias(labels)
    annotators = {
        name: {"labels": len(times), "median_seconds": statistics.median(times) / 1000,
               "agreement_with_majority": report["agreement_with_majority"].get(name),
               "mean_kappa": report["mean_kappa"].get(name), "gold_accuracy": gold.get(name, {}).get("accuracy"),
               "gold_n": gold.get(name, {}).get("n", 0), "left_share": bias["per_annotator"].get(name),
               "flagged": name in report["flagged"]}
        for name, times in sorted(per_annotator.items())
    }
    return {"progress": store.item_counts(), "labels": len(labels), "annotators": annotators,
            "alpha": report["alpha"], "kappa": report["kappa"], "overlap_units": report["overlap_items"],
            "position_bias": {"left_share": bias["left_share"], "n": bias["n"]}}
