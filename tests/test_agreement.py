"""Inter-annotator agreement: hand-computed values and the published Krippendorff (2011) example."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from rlhf.evaluation.agreement import (
    agreement_with_majority,
    annotator_report,
    cohen_kappa,
    krippendorff_alpha,
    pairwise_kappa,
    units_from_preferences,
)


# --- Cohen's kappa -----------------------------------------------------------------------------------------------


def test_cohen_kappa_classic_2x2_table():
    # 50 items:            B yes  B no
    #             A yes      20     5    (A yes: 25)
    #             A no       10    15    (A no:  25)
    #                      (30)   (20)
    # p_o = (20 + 15) / 50 = 0.7
    # p_e = (25/50)(30/50) + (25/50)(20/50) = 0.3 + 0.2 = 0.5
    # kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    a = ["yes"] * 20 + ["yes"] * 5 + ["no"] * 10 + ["no"] * 15
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_cohen_kappa_identical_opposite_and_degenerate():
    labels = ["x", "y", "y", "x", "y", "x"]
    assert cohen_kappa(labels, labels) == pytest.approx(1.0)
    # Always opposite, each rater 50/50: p_o = 0, p_e = 0.5 * 0.5 + 0.5 * 0.5 = 0.5, kappa = -0.5 / 0.5 = -1.
    a = ["x", "y"] * 5
    b = ["y", "x"] * 5
    assert cohen_kappa(a, b) == pytest.approx(-1.0)
    # One shared category throughout: p_e = 1, kappa is 0/0; documented as 1.0 since they agree everywhere.
    assert cohen_kappa(["x"] * 3, ["x"] * 3) == 1.0


def test_cohen_kappa_rejects_bad_input():
    with pytest.raises(ValueError, match="same items"):
        cohen_kappa(["x", "y"], ["x"])
    with pytest.raises(ValueError, match="at least one"):
        cohen_kappa([], [])


# --- Krippendorff's alpha ----------------------------------------------------------------------------------------

# Krippendorff (2011) "Computing Krippendorff's Alpha-Reliability", section C: nominal data, 4 observers,
# 12 units, '.' = missing. The paper gives alpha_nominal = 0.743.
KRIPPENDORFF_2011_TABLE = {
    "A": "1 2 3 3 2 1 4 1 2 . . .",
    "B": "1 2 3 3 2 2 4 1 2 5 . 3",
    "C": ". 3 3 3 2 3 4 2 2 5 1 .",
    "D": "1 2 3 3 2 4 4 1 2 5 1 .",
}


def _units_from_table(table: dict[str, str]) -> dict[int, dict[str, int]]:
    units: dict[int, dict[str, int]] = {}
    for observer, row in table.items():
        for unit, value in enumerate(row.split(), start=1):
            units.setdefault(unit, {})
            if value != ".":
                units[unit][observer] = int(value)
    return units


def test_krippendorff_alpha_published_example():
    units = _units_from_table(KRIPPENDORFF_2011_TABLE)
    assert len(units) == 12
    assert units[1] == {"A": 1, "B": 1, "D": 1}
    assert units[12] == {"B": 3}  # a single value: not pairable, ignored
    # The paper's intermediate figures: n = 40 pairable values with n_1..n_5 = 9, 13, 10, 5, 3;
    # sum_{c != k} o_ck = 8 and sum_{c != k} n_c n_k = 1216, so alpha = 1 - 39 * 8 / 1216 = 113/152 = 0.743.
    assert krippendorff_alpha(units) == pytest.approx(0.743, abs=1e-3)


def test_krippendorff_alpha_hand_computed():
    # Two raters, 4 items: (a, a), (a, b), (b, b), (b, b).
    # Coincidences (each unit m_u = 2, weight 1/(m_u - 1) = 1 per ordered pair):
    #   o_aa = 2, o_ab = o_ba = 1, o_bb = 2 + 2 = 4  ->  n_a = 3, n_b = 5, n = 8
    # D_o = (o_ab + o_ba) / n = 2/8 = 0.25
    # D_e = (n_a n_b + n_b n_a) / (n (n - 1)) = 30/56
    # alpha = 1 - 0.25 * 56/30 = 1 - 14/30 = 8/15 = 0.5333...
    units = {1: {"r1": "a", "r2": "a"}, 2: {"r1": "a", "r2": "b"}, 3: {"r1": "b", "r2": "b"}, 4: {"r1": "b", "r2": "b"}}
    assert krippendorff_alpha(units) == pytest.approx(8 / 15)


def test_krippendorff_alpha_perfect_and_degenerate():
    perfect = {1: {"r1": "a", "r2": "a", "r3": "a"}, 2: {"r1": "b", "r2": "b"}, 3: {"r2": "c", "r3": "c"}}
    assert krippendorff_alpha(perfect) == pytest.approx(1.0)
    # Only one category ever used: D_e = 0, documented as 1.0.
    assert krippendorff_alpha({1: {"r1": "a", "r2": "a"}, 2: {"r1": "a"}}) == 1.0
    # No unit with two values: nothing pairable.
    with pytest.raises(ValueError, match="pairable"):
        krippendorff_alpha({1: {"r1": "a"}, 2: {"r2": "b"}})


# --- agreement with the majority ---------------------------------------------------------------------------------


def test_agreement_with_majority_exact_fractions():
    units = {
        1: {"p": "x", "q": "x", "s": "x", "r": "y"},  # r vs others {x: 3} -> disagrees; p, q, s agree
        2: {"p": "x", "q": "x", "s": "x", "r": "x"},  # everyone agrees
        # r vs others {y: 2} -> disagrees. p's others are {y, x}: a tie, skipped (same for q). With
        # p voting for itself, p would wrongly count as agreeing with a 2-1 majority.
        3: {"p": "y", "q": "y", "r": "x"},
        4: {"p": "x", "t": "y"},  # only 2 labels: ignored, so t has no counted item and is omitted
        5: {"p": "a", "q": "a", "s": "b", "r": "a"},  # r, p, q vs {a: 2, b: 1} -> agree; s vs {a: 3} -> disagrees
    }
    # r: items 1, 2, 3, 5 -> agrees on 2, 5          = 2/4
    # p: items 1, 2, 5    (3 skipped) -> agrees on all = 3/3; q likewise
    # s: items 1, 2, 5    -> agrees on 1, 2          = 2/3
    assert agreement_with_majority(units) == pytest.approx({"p": 1.0, "q": 1.0, "r": 0.5, "s": 2 / 3})
    assert "t" not in agreement_with_majority(units)


# --- pairwise kappa and the report -------------------------------------------------------------------------------


def test_pairwise_kappa_shared_items():
    units = {
        1: {"b": "x", "a": "x", "c": "x"},
        2: {"a": "y", "b": "y"},
        3: {"a": "x", "b": "y"},
        4: {"a": "y", "b": "x"},
    }
    result = pairwise_kappa(units)
    assert set(result) == {"a|b", "a|c", "b|c"}
    # a vs b on 4 items: a = x y x y, b = x y y x -> p_o = 0.5, p_e = 0.5 * 0.5 + 0.5 * 0.5 = 0.5 -> kappa 0.
    assert result["a|b"]["n"] == 4
    assert result["a|b"]["kappa"] == pytest.approx(0.0)
    assert result["a|c"] == {"kappa": None, "n": 1}
    assert result["b|c"] == {"kappa": None, "n": 1}


def _simulated_units(seed: int = 0, n_items: int = 300) -> dict[int, dict[str, str]]:
    """Three raters follow a hidden truth with 90% accuracy; "coin" flips a coin."""
    rng = random.Random(seed)
    units: dict[int, dict[str, str]] = {}
    for item in range(n_items):
        truth = rng.choice(["A", "B"])
        other = "B" if truth == "A" else "A"
        ratings = {name: (truth if rng.random() < 0.9 else other) for name in ("ann", "bob", "cat")}
        ratings["coin"] = rng.choice(["A", "B"])
        units[item] = ratings
    return units


def test_annotator_report_flags_the_random_rater():
    units = _simulated_units()
    report = annotator_report(units)
    # Expected: kappa between two 90% raters ~ (0.82 - 0.5) / 0.5 = 0.64; with the coin ~ 0.
    # Mean kappa: good raters ~ (0.64 + 0.64 + 0) / 3 ~ 0.43, coin ~ 0 < 0.2.
    assert report["flagged"] == ["coin"]
    assert report["items"] == 300
    assert report["overlap_items"] == 300
    assert report["labels_per_annotator"] == {"ann": 300, "bob": 300, "cat": 300, "coin": 300}
    assert set(report["kappa"]) == {"ann|bob", "ann|cat", "ann|coin", "bob|cat", "bob|coin", "cat|coin"}
    assert all(v["n"] == 300 for v in report["kappa"].values())
    assert report["kappa"]["ann|bob"]["kappa"] > 0.5
    assert abs(report["kappa"]["ann|coin"]["kappa"]) < 0.2
    assert 0.2 < report["alpha"] < 0.6
    majority = report["agreement_with_majority"]
    assert min(majority, key=majority.get) == "coin"
    assert majority["coin"] < 0.65 < min(majority[r] for r in ("ann", "bob", "cat"))
    # Mean kappa of each annotator is the mean of their 3 pairwise kappas.
    ks = report["kappa"]
    assert report["mean_kappa"]["coin"] == pytest.approx(
        (ks["ann|coin"]["kappa"] + ks["bob|coin"]["kappa"] + ks["cat|coin"]["kappa"]) / 3)
    json.loads(json.dumps(report))  # JSON-serialisable as is
    # A stricter threshold flags more; a threshold below every mean flags nobody. With a threshold no one
    # reaches, flagging goes on until one annotator is left with nobody to agree with: no evidence on them.
    assert annotator_report(units, flag_below=-1.0)["flagged"] == []
    strict = annotator_report(units, flag_below=1.0)["flagged"]
    assert len(strict) == 3 and "coin" in strict


def test_a_random_rater_does_not_drag_a_noisy_honest_rater_below_the_line():
    # 160 items, half "A": ann and bob give the truth, weak agrees with it on 100 (kappa 0.25 with each),
    # coin is exactly independent of all three (kappa 0: "A" on half of each truth x weak cell).
    truth = ["A"] * 80 + ["B"] * 80
    flip = set(range(30)) | set(range(80, 110))  # 60 flips, 30 per class: balanced marginals
    weak = [("B" if t == "A" else "A") if i in flip else t for i, t in enumerate(truth)]
    coin, seen = [], Counter()
    for t, w in zip(truth, weak):
        seen[t, w] += 1
        coin.append("A" if seen[t, w] % 2 else "B")
    units = {i: {"ann": truth[i], "bob": truth[i], "weak": weak[i], "coin": coin[i]} for i in range(160)}
    report = annotator_report(units)
    ks = {k: v["kappa"] for k, v in report["kappa"].items()}
    assert ks["ann|weak"] == pytest.approx(0.25) and ks["ann|coin"] == pytest.approx(0.0) and ks["ann|bob"] == 1.0
    # Over all pairs weak's mean is (0.25 + 0.25 + 0) / 3 = 0.167 < 0.2; without the coin it is 0.25.
    assert report["mean_kappa"]["weak"] == pytest.approx(0.5 / 3)
    assert report["flagged"] == ["coin"]


def test_annotator_report_without_overlap():
    report = annotator_report({1: {"a": "x"}, 2: {"b": "y"}})
    assert report == {
        "items": 2, "overlap_items": 0, "labels_per_annotator": {"a": 1, "b": 1}, "alpha": None,
        "kappa": {"a|b": {"kappa": None, "n": 0}}, "mean_kappa": {"a": None, "b": None},
        "agreement_with_majority": {}, "flagged": [],
    }
    json.dumps(report)


# --- units from preference records -------------------------------------------------------------------------------


def test_units_from_preferences():
    rows = [
        {"prompt": "Q1", "chosen": "A1", "rejected": "B1", "annotator": "ann"},
        {"prompt": "Q1", "chosen": "A1", "rejected": "B1", "annotator": "bob"},
        {"prompt": "Q2", "chosen": "A2", "rejected": "B2", "annotator": "ann"},
        # Same pair shown in the other order; bob prefers the other response.
        {"prompt": "Q2", "chosen": "B2", "rejected": "A2", "annotator": "bob"},
        {"prompt": "Q2", "chosen": "A2", "rejected": "B2", "annotator": None},
        {"prompt": "Q2", "chosen": "A2", "rejected": "B2"},
    ]
    units = units_from_preferences(rows)
    assert units == {
        ("Q1", frozenset({"A1", "B1"})): {"ann": "first", "bob": "first"},  # "A1" sorts before "B1"
        ("Q2", frozenset({"A2", "B2"})): {"ann": "first", "bob": "second"},
    }
    # They agree on Q1 and disagree on Q2.
    assert pairwise_kappa(units)["ann|bob"]["n"] == 2


def test_units_from_preferences_pair_id_conversations_and_relabels():
    messages = [{"role": "user", "content": "Hi"}]
    rows = [
        {"pair_id": 7, "prompt": "ignored", "chosen": "A", "rejected": "B", "annotator": "ann"},
        {"pair_id": 7, "prompt": "ignored", "chosen": "B", "rejected": "A", "annotator": "ann"},  # last label wins
        {"prompt": messages, "chosen": "Hello", "rejected": "Go away", "annotator": "ann"},
        # Same conversation written with its keys in another order: same item.
        {"prompt": [{"content": "Hi", "role": "user"}], "chosen": "Go away", "rejected": "Hello", "annotator": "bob"},
    ]
    units = units_from_preferences(rows)
    conversation_key = (json.dumps(messages, sort_keys=True), frozenset({"Hello", "Go away"}))
    # "Go away" sorts before "Hello": choosing "Hello" is choosing the second of the pair.
    assert units == {7: {"ann": "second"}, conversation_key: {"ann": "second", "bob": "first"}}
