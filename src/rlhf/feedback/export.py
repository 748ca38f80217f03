"""Export the labels in the formats the pipeline reads: preference pairs for `rlhf rm`, demonstrations for
`rlhf sft`, and a Hugging Face ``datasets`` folder (``save_to_disk``) of the pairs.

Every label is stored with the order its responses were *shown* in; the export maps shown positions back
to the candidates, so "left was better" becomes the right ``chosen``. Rows go through the project's own
record writer (rlhf.data.io.to_record), so they have exactly the columns the loaders accept.

- pair: A or B better -> one row, ``margin`` 1.0 for "much better" and 0.5 for "slightly" (the values
  `rlhf collect` uses). Ties and "both bad" say nothing about which is better and are left out, unless
  ``keep_ties``: then they are rows with ``margin`` 0 and an ``outcome`` column, for analysis or a loss
  that reads it (plain `rlhf rm` would treat them as preferences).
- rank: a ranking of K responses gives the K(K-1)/2 pairs it implies, each better-ranked response
  chosen over each worse-ranked one; neighbours in the ranking get margin 0.5, pairs further apart 1.0.
- Gold items are quality checks with known answers and are left out unless ``include_gold``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path

from rlhf.data.io import PreferenceExample, SFTExample, to_record, write_jsonl_atomic
from rlhf.feedback.store import Store
from rlhf.fsutil import atomic_dir, check_out, holding

log = logging.getLogger("rlhf.annotate")

# The margins `rlhf collect` writes (rlhf.stages.collect), so both sources mean the same thing to the RM loss.
MUCH_BETTER, SLIGHTLY_BETTER, NO_PREFERENCE = 1.0, 0.5, 0.0
DATASET_COLUMNS = ("prompt", "chosen", "rejected", "margin", "annotator", "pair_id")


def ranking_pairs(ranking: Sequence[int]) -> list[tuple[int, int, float]]:
    """(better, worse, margin) for every pair a best-first ranking implies: K(K-1)/2 of them."""
    return [(ranking[i], ranking[j], SLIGHTLY_BETTER if j == i + 1 else MUCH_BETTER)
            for i, j in combinations(range(len(ranking)), 2)]


def _pair_row(label: dict, better: int, worse: int, margin: float, pair_id: str, **extra) -> dict:
    candidates, flags = label["candidates"], label["flags"]
    example = PreferenceExample(
        prompt=label["prompt"], chosen=candidates[better], rejected=candidates[worse], margin=margin,
        annotator=label["annotator"],
        extra={"pair_id": pair_id, "kind": label["kind"], "flags_chosen": flags.get(better, []),
               "flags_rejected": flags.get(worse, []), "time_ms": label["time_ms"], **extra})
    return to_record(example)


def _pair_label_rows(label: dict, keep_ties: bool) -> list[dict]:
    pair_id = f"item-{label['item_id']}"
    # Which candidate sat on the left: kept so that position bias can be audited from the file alone.
    left = label["shown_order"][0]
    if label["better"] is not None:
        better = label["better"]
        worse = 1 - better
        margin = MUCH_BETTER if label["strength"] == "much" else SLIGHTLY_BETTER
        return [_pair_row(label, better, worse, margin, pair_id, chosen_shown="left" if better == left else "right")]
    if keep_ties:
        return [_pair_row(label, 0, 1, NO_PREFERENCE, pair_id, outcome=label["choice"])]
    return []


def preference_rows(store: Store, *, keep_ties: bool = False, include_gold: bool = False) -> list[dict]:
    """Every pair and ranking label as preference rows, in label order."""
    rows: list[dict] = []
    for label in store.label_rows(("pair", "rank")):
        if label["gold"] is not None and not include_gold:
            continue
        if label["kind"] == "pair":
            rows += _pair_label_rows(label, keep_ties)
        else:
            for better, worse, margin in ranking_pairs(label["ranking"]):
                a, b = sorted((better, worse))  # the same pair_id for a pair whichever way it was ranked
                rows.append(_pair_row(label, better, worse, margin, f"item-{label['item_id']}:{a}-{b}"))
    return rows


def sft_rows(store: Store) -> list[dict]:
    """Demonstrations as SFT records (prompt + completion), with the draft they were edited from, if any."""
    rows = []
    for label in store.label_rows(("demo",)):
        draft = label["candidates"][0] if label["candidates"] else None
        extra = {"annotator": label["annotator"], "edited_from": draft, "edited": draft is not None and draft != label["text"],
                 "time_ms": label["time_ms"]}
        rows.append(to_record(SFTExample(prompt=label["prompt"], completion=label["text"], extra=extra)))
    return rows


def _as_conversation(row: dict) -> dict:
    """A row with message-list prompt and replies: the one layout every row can share in an Arrow table."""
    if isinstance(row["prompt"], list):
        return row
    return {**row, "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def write_dataset(rows: list[dict], out: str | Path) -> None:
    """A ``datasets`` folder (save_to_disk) with the canonical preference columns, written atomically."""
    from datasets import Dataset

    table = [{k: r.get(k) for k in DATASET_COLUMNS} for r in rows]
    if len({isinstance(r["prompt"], str) for r in table}) > 1:  # Arrow needs one type per column
        table = [_as_conversation(r) for r in table]
    with atomic_dir(out) as tmp:
        Dataset.from_list(table).save_to_disk(str(tmp))


def _export_state(keys: tuple[str, ...]):
    """check_out's view of an earlier export: a JSON Lines file whose first row has ``keys``."""

    def state(path: Path) -> str | None:
        try:
            with open(path, encoding="utf-8") as f:
                first = json.loads(f.readline())
        except (OSError, ValueError):
            return None
        return "finished" if isinstance(first, dict) and all(k in first for k in keys) else None

    return state


def check_export_paths(out: str | None, sft: str | None, dataset: str | None, overwrite: bool) -> None:
    """Refuse, before anything is read, paths that hold anything but an earlier export (or one without --overwrite)."""
    if out:
        check_out(out, stage="annotate export", kind="file", state=_export_state(("chosen", "rejected")),
                  overwrite=overwrite)
    if sft:
        check_out(sft, stage="annotate export", kind="file", state=_export_state(("prompt", "completion")),
                  overwrite=overwrite, flag="--sft")
    if dataset:
        check_out(dataset, stage="annotate export", kind="dir", overwrite=overwrite, flag="--dataset",
                  state=holding("dataset_info.json"))


def export(store: Store, *, out: str | None = None, sft: str | None = None, dataset: str | None = None,
           keep_ties: bool = False, include_gold: bool = False, overwrite: bool = False) -> dict[str, int]:
    """Write the requested files; returns how many rows each got."""
    if not (out or sft or dataset):
        raise ValueError("nothing to export: give --out (preference JSONL), --sft (demonstration JSONL) or --dataset (folder)")
    check_export_paths(out, sft, dataset, overwrite)
    counts: dict[str, int] = {}
    if out or dataset:
        prefs = preference_rows(store, keep_ties=keep_ties, include_gold=include_gold)
        if not prefs:
            raise ValueError("no preference labels to export yet (ties, both-bad and gold labels are left out by default)")
        if out:
            counts["preferences"] = write_jsonl_atomic(out, prefs)
        if dataset:
            write_dataset(prefs, dataset)
            counts["dataset"] = len(prefs)
    if sft:
        demos = sft_rows(store)
        if not demos:
            raise ValueError("no demonstrations to export yet")
        counts["demonstrations"] = write_jsonl_atomic(sft, demos)
    return counts
