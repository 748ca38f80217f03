"""Simulated annotators: Bradley-Terry noise around the gold judge, each with its own quirk.

Real preference data is noisy and biased. These annotators make that concrete and measurable: the
careful one almost always agrees with gold, the average one errs on close calls, the length lover
rewards verbosity (a reward model trained on its labels learns to ramble: reward hacking you can
watch), and the random clicker is pure noise (agreement statistics should flag it).
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

    def prob_prefers_a(self, task: Task, a: str, b: str) -> float:
        """The probability that this annotator labels reply `a` as the better one."""
        gold = judge(task, a).total - judge(task, b).total
        extra_words = len(a.split()) - len(b.split())
        rational = _sigmoid(self.beta * gold + self.length_bias * extra_words)
        return self.random_rate * 0.5 + (1.0 - self.random_rate) * rational

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
