"""Simulated annotators: Bradley-Terry noise around the gold judge, each with its own quirk.

Real preference data is noisy and biased. These annotators make that concrete and measurable: the
careful one almost always agrees with gold, the average one errs on close calls, the length lover
rewards verbosity (a reward model trained on its labels learns to ramble: reward hacking you can
watch), and the random clicker is pure noise (agreement statistics should flag it).

Like people with a "tie" button, an annotator who sees no real difference between two replies says
so (`compare` returns "tie") instead of guessing; ties carry no preference and are left out of the
preference data. The random clicker never reads the replies, so it never says tie.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from rlhf.world.judge import judge
from rlhf.world.tasks import Task


def _sigmoid(x: float) -> float:
    # Split by sign so that large |x| never overflows exp().
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


@dataclass(frozen=True)
class Annotator:
    """P(a preferred) = sigmoid(beta * (gold_a - gold_b) + length_bias * (words_a - words_b)),
    except that with probability `random_rate` the annotator flips a fair coin instead.
    """

    name: str
    beta: float               # rationality: how sharply gold differences decide the label
    length_bias: float = 0.0  # logit bonus per extra word (the verbose-lover)
    random_rate: float = 0.0  # share of labels that are coin flips (1.0: the random clicker)
    tie_logit: float = 0.5    # "tie" when |perceived logit| is below this (careful: gold gap < 0.025)

    def logit(self, task: Task, a: str, b: str) -> float:
        """How much better `a` looks than `b` to this annotator when it reads them (log-odds)."""
        gold = judge(task, a).total - judge(task, b).total
        return self.beta * gold + self.length_bias * (len(a.split()) - len(b.split()))

    def prob_prefers_a(self, task: Task, a: str, b: str) -> float:
        """The probability that this annotator labels reply `a` as the better one when forced to choose."""
        return self.random_rate * 0.5 + (1.0 - self.random_rate) * _sigmoid(self.logit(task, a, b))

    def compare(self, task: Task, a: str, b: str, rng: random.Random) -> tuple[str, float]:
        """("a" | "b" | "tie", P of that choice to this annotator): a label with a tie option.

        The probability is the annotator's own confidence, which the caller can turn into a
        "slightly/much better" strength.
        """
        if rng.random() < self.random_rate:
            return rng.choice("ab"), 0.5  # a click without reading
        logit = self.logit(task, a, b)
        if abs(logit) < self.tie_logit:
            return "tie", 1.0
        p_a = _sigmoid(logit)
        return ("a", p_a) if rng.random() < p_a else ("b", 1.0 - p_a)

    def label(self, task: Task, a: str, b: str, rng: random.Random) -> int:
        """0 if this annotator prefers `a`, 1 if it prefers `b`; all randomness comes from `rng`."""
        return 0 if rng.random() < self.prob_prefers_a(task, a, b) else 1


CAREFUL = Annotator("careful", beta=20.0)
AVERAGE = Annotator("average", beta=8.0)
LENGTH_LOVER = Annotator("length_lover", beta=8.0, length_bias=0.3)
RANDOM_CLICKER = Annotator("random_clicker", beta=0.0, random_rate=1.0)
DEFAULT_ANNOTATORS: tuple[Annotator, ...] = (CAREFUL, AVERAGE, LENGTH_LOVER, RANDOM_CLICKER)


def annotator(name: str) -> Annotator:
    """A default annotator by name (for configs and the CLI)."""
    for a in DEFAULT_ANNOTATORS:
        if a.name == name:
            return a
    raise ValueError(f"unknown annotator {name!r}; choose from {[a.name for a in DEFAULT_ANNOTATORS]}")
