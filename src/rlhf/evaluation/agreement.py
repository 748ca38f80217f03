"""Inter-annotator agreement for preference labelling.

A reward model cannot be more consistent than the people who labelled its training pairs, so before
reading a reward model's held-out accuracy we want to know how often the annotators agree with each
other. This module computes the standard statistics, in pure Python, from a ``units`` mapping:
item id -> {annotator: value}, where the value is whatever the annotator picked (for preference
pairs: the text of the response they chose, see :func:`units_from_preferences`).

Statistics and what each one is for:

- :func:`cohen_kappa` (Cohen 1960): agreement of two raters on the same items, corrected for the
  agreement they would reach by chance given how often each uses each label,
  ``kappa = (p_o - p_e) / (1 - p_e)``. Used pairwise, it points at the one rater who disagrees with
  everyone.
- :func:`krippendorff_alpha` (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"):
  one reliability figure for the whole data set, for any number of raters and with missing labels,
  which is the usual shape of crowd or web-app feedback where each item gets a few raters out of many.
  Nominal level: two values either match or they don't.
- :func:`agreement_with_majority`: for each annotator, how often they side with the (leave-one-out)
  majority of the others; easy to explain on an admin page.
- :func:`pairwise_kappa` and :func:`annotator_report`: the above gathered per annotator pair and per
  annotator, with raters whose agreement is no better than chance flagged.

All the functions accept any hashable labels and annotator names; the report is JSON-serialisable as
long as the annotator names are strings (or other JSON key types).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from itertools import combinations
from typing import Any

Units = Mapping[Hashable, Mapping[Hashable, Hashable]]

# Landis & Koch (1977) call kappa in (0, 0.2] "slight" agreement: what two raters reach when one of them
# labels at random is kappa ~ 0, and sampling noise on a few hundred items puts it a little either side.
# A rater whose mean kappa with the others stays below this is not following the task.
DEFAULT_FLAG_BELOW = 0.2


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's (1960) kappa of two raters' labels on the same items: ``(p_o - p_e) / (1 - p_e)``.

    ``p_o`` is the share of items on which they agree; ``p_e = sum_c p_a(c) * p_b(c)`` is the agreement
    expected if each labelled independently at their own marginal rates. 1 is perfect agreement, 0 is
    chance level, negative is systematic disagreement.

    Degenerate case: when ``p_e == 1`` (both raters used one and the same category throughout) kappa is
    0/0. We return 1.0 if they agree on every item (which they then do) and 0.0 otherwise, so that the
    value stays a float that can be averaged rather than NaN.
    """
    if len(a) != len(b):
        raise ValueError(f"cohen_kappa needs two raters' labels on the same items: got {len(a)} and {len(b)} labels")
    n = len(a)
    if n < 1:
        raise ValueError("cohen_kappa needs at least one item labelled by both raters")
    p_o = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    p_e = sum(count_a[c] * count_b[c] for c in count_a) / (n * n)
    if p_e == 1.0:
        return 1.0 if p_o == 1.0 else 0.0
    return (p_o - p_e) / (1.0 - p_e)


def krippendorff_alpha(units: Units) -> float:
    """Krippendorff's alpha, nominal level, from the coincidence matrix (Krippendorff 2011, section C).

    ``alpha = 1 - D_o / D_e`` where, over pairable units (those with ``m_u >= 2`` values):

    - ``o_ck = sum_u (number of ordered pairs of values (c, k) from different raters in u) / (m_u - 1)``,
      so each pairable value contributes exactly 1 to the matrix whatever the unit's size;
    - ``n_c = sum_k o_ck`` and ``n = sum_c n_c`` (the number of pairable values);
    - ``D_o = sum_{c != k} o_ck / n`` (observed disagreement);
    - ``D_e = sum_{c != k} n_c * n_k / (n * (n - 1))`` (disagreement expected by chance).

    Units with fewer than 2 values carry no information about agreement and are ignored. Raises
    ValueError when fewer than 2 pairable values remain. When only one category was ever used,
    ``D_e == 0`` and there is no variation to be unreliable about; we return 1.0.
    """
    coincidences: dict[tuple[Hashable, Hashable], float] = defaultdict(float)
    for ratings in units.values():
        m = len(ratings)
        if m < 2:
            continue
        counts = Counter(ratings.values())
        for c, n_uc in counts.items():
            for k, n_uk in counts.items():
                # Ordered pairs of values from *different* raters: a value is not paired with itself.
                pairs = n_uc * (n_uk - 1) if c == k else n_uc * n_uk
                if pairs:
                    coincidences[c, k] += pairs / (m - 1)
    marginals: dict[Hashable, float] = defaultdict(float)
    for (c, _k), o in coincidences.items():
        marginals[c] += o
    n = sum(marginals.values())
    # n is a sum of whole values (each unit adds m_u), so rounding guards only float noise.
    if round(n) < 2:
        raise ValueError("krippendorff_alpha needs at least 2 pairable values (units with at least 2 labels)")
    d_o = sum(o for (c, k), o in coincidences.items() if c != k) / n
    d_e = sum(marginals[c] * marginals[k] for c in marginals for k in marginals if c != k) / (n * (n - 1))
    if d_e == 0.0:
        return 1.0
    return 1.0 - d_o / d_e


def agreement_with_majority(units: Units) -> dict[Hashable, float]:
    """For each annotator, the share of their labels that match the majority of the *other* labels.

    Only items with at least 3 labels count (the annotator's own plus at least 2 others), and the
    majority is leave-one-out so that an annotator never votes for themself: with 3 raters, a lone
    dissenter would otherwise still "agree" with a 1-1 tie broken their way. Items where the others'
    top label is tied are skipped for that annotator. Annotators with no counted item are omitted.
    """
    agreed: Counter[Hashable] = Counter()
    counted: Counter[Hashable] = Counter()
    for ratings in units.values():
        if len(ratings) < 3:
            continue
        for annotator, value in ratings.items():
            others = Counter(v for r, v in ratings.items() if r != annotator)
            top = others.most_common(2)
            if len(top) > 1 and top[0][1] == top[1][1]:
                continue  # no majority among the others
            counted[annotator] += 1
            agreed[annotator] += value == top[0][0]
    return {annotator: agreed[annotator] / counted[annotator] for annotator in counted}


def _annotators(units: Units) -> list[Hashable]:
    """All annotator names, sorted (by their text, so mixed name types still sort)."""
    return sorted({r for ratings in units.values() for r in ratings}, key=str)


def _pairwise(units: Units) -> dict[tuple[Hashable, Hashable], tuple[float | None, int]]:
    """(a, b) -> (kappa or None, number of shared items), for every pair of annotators, a before b."""
    result: dict[tuple[Hashable, Hashable], tuple[float | None, int]] = {}
    for a, b in combinations(_annotators(units), 2):
        shared = [(ratings[a], ratings[b]) for ratings in units.values() if a in ratings and b in ratings]
        # One shared item gives kappa 1 or 0 by the degenerate rule, which says nothing; require two.
        kappa = cohen_kappa([x for x, _ in shared], [y for _, y in shared]) if len(shared) >= 2 else None
        result[a, b] = (kappa, len(shared))
    return result


def pairwise_kappa(units: Units) -> dict[str, dict]:
    """Cohen's kappa of every pair of annotators on the items both labelled.

    Keys are ``f"{a}|{b}"`` with the names sorted; values ``{"kappa": float | None, "n": shared items}``,
    kappa being None when the pair shares fewer than 2 items.
    """
    return {f"{a}|{b}": {"kappa": kappa, "n": n} for (a, b), (kappa, n) in _pairwise(units).items()}


def _mean_kappas(pairs: dict[tuple[Hashable, Hashable], tuple[float | None, int]], raters: Sequence[Hashable]
                 ) -> dict[Hashable, float | None]:
    """Each rater's mean kappa over the computable pairs with the other ``raters`` (None without any)."""
    per_rater: dict[Hashable, list[float]] = {r: [] for r in raters}
    for (a, b), (kappa, _n) in pairs.items():
        if kappa is not None and a in per_rater and b in per_rater:
            per_rater[a].append(kappa)
            per_rater[b].append(kappa)
    return {r: (sum(ks) / len(ks) if ks else None) for r, ks in per_rater.items()}


def annotator_report(units: Units, *, flag_below: float = DEFAULT_FLAG_BELOW) -> dict[str, Any]:
    """Every agreement statistic in one JSON-serialisable dictionary, for the RM evaluation and admin page.

    ``flagged`` lists (sorted) the annotators whose mean pairwise kappa with the others is below
    ``flag_below``. The default 0.2 is the top of "slight" agreement on the Landis & Koch (1977) scale,
    which is where a rater who labels at random lands (kappa ~ 0 plus sampling noise), so they are
    flagged for review. Flagging is one annotator at a time, worst first, and a flagged annotator's
    kappas no longer count in the others' means: agreeing with a random rater is nobody's fault, and
    without this one coin-flipper drags an honest but noisy rater below the line. Annotators with no
    computable kappa are not flagged: there is no evidence yet. ``mean_kappa`` is over all pairs.
    """
    annotators = _annotators(units)
    overlapping = {item: ratings for item, ratings in units.items() if len(ratings) >= 2}
    try:
        alpha: float | None = krippendorff_alpha(overlapping)
    except ValueError:
        alpha = None
    pairs = _pairwise(units)
    mean_kappa = _mean_kappas(pairs, annotators)
    flagged: list[Hashable] = []
    while True:
        means = _mean_kappas(pairs, [r for r in annotators if r not in flagged])
        scored = [r for r, k in means.items() if k is not None]
        worst = min(scored, key=lambda r: means[r], default=None)
        if worst is None or means[worst] >= flag_below:
            break
        flagged.append(worst)
    labels = Counter(r for ratings in units.values() for r in ratings)
    return {
        "items": len(units),
        "overlap_items": len(overlapping),
        "labels_per_annotator": {r: labels[r] for r in annotators},
        "alpha": alpha,
        "kappa": {f"{a}|{b}": {"kappa": kappa, "n": n} for (a, b), (kappa, n) in pairs.items()},
        "mean_kappa": mean_kappa,
        "agreement_with_majority": agreement_with_majority(units),
        "flagged": sorted(flagged, key=str),
    }


def _as_text(value: Any) -> str:
    """A prompt or response as a hashable string: text as is, conversations (lists of messages) as
    canonical JSON so that equal conversations give equal keys, anything else through str()."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def units_from_preferences(rows: Iterable[Mapping]) -> dict[Hashable, dict[Hashable, str]]:
    """Build ``units`` from preference records with ``chosen``, ``rejected``, ``annotator`` and an item id.

    The item id is ``row["pair_id"]`` when present, else ``(prompt_text, frozenset({chosen, rejected}))``:
    the frozenset makes the pair order-free, so two annotators who saw the same two responses in either
    order share one item. A conversational prompt (list of messages) is keyed by its canonical JSON.
    The recorded value is which of the two responses was chosen, as "first" or "second" in a canonical
    (sorted) order of the pair's texts: a binary label with the same meaning on every item, so chance
    agreement is computed over two categories (with the chosen text as the value, every item would have
    categories of its own and kappa would degenerate to raw agreement). Rows without an annotator are skipped (nothing to attribute them to); if an annotator
    labelled an item twice, their last label wins (a corrected label supersedes the first).
    """
    units: dict[Hashable, dict[Hashable, str]] = {}
    for row in rows:
        annotator = row.get("annotator")
        if annotator is None:
            continue
        chosen, rejected = _as_text(row["chosen"]), _as_text(row["rejected"])
        if row.get("pair_id") is not None:
            item: Hashable = row["pair_id"]
        elif "prompt" in row:
            item = (_as_text(row["prompt"]), frozenset({chosen, rejected}))
        else:
            raise ValueError("a preference row needs a 'pair_id' or a 'prompt' to say which item it labels")
        units.setdefault(item, {})[annotator] = "first" if chosen < rejected else "second"
    return units
