"""Reward-hacking detectors over PPO rollouts, and penalty rewards for PPO's extra-reward hook.

A policy optimised against a learned reward finds what the reward model over-rewards (Gao et al. 2022,
"Scaling Laws for Reward Model Overoptimization", https://arxiv.org/abs/2210.10760): longer answers,
favoured words, list and exclamation formatting. Each detector is a small pure function over per-
iteration statistics, compared with the first `baseline_iterations` (the policy before it had time to
drift); `HackingMonitor` feeds them once per PPO iteration and reports each alert once.

The penalty rewards have the signature of `rlhf.rl.types.RewardComponent.fn`:
`fn(prompt_texts, responses) -> list[float]`, e.g.
`RewardComponent("length", length_penalty(30), weight=0.5)`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlhf.evaluation.diversity import ngrams, words

log = logging.getLogger("rlhf.hacking")

RewardFn = Callable[[list[str], list[str]], list[float]]

# Function words are left out of the stuffing checks: "the" may make up a fifth of any sentence.
STOPWORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been it its this that "
    "these those i you he she we they me my your our their not no do does did can will would so".split())


@dataclass(frozen=True)
class HackingThresholds:
    """When each detector fires. Changes are measured against the mean of the first
    `baseline_iterations` iterations; detectors stay silent until there is history past them."""

    baseline_iterations: int = 3
    """Iterations that make the baseline (the policy before it had time to exploit the RM)."""
    verbosity_growth: float = 0.5
    """Verbosity: mean response length (words) grown by more than this fraction over the baseline..."""
    verbosity_corr: float = 0.3
    """...while mean reward is above its baseline and the within-batch Pearson correlation of reward
    with length exceeds this: the RM is paying for length, and the policy is collecting."""
    stuffing_share_growth: float = 3.0
    """Keyword stuffing: a content word's share of all response words grown by this factor..."""
    stuffing_min_share: float = 0.05
    """...to at least this share (rare words tripling is noise)."""
    stuffing_repeat_rise: float = 0.2
    """Keyword stuffing, second trigger: the share of responses that repeat one word or phrase
    (see `repeats_phrase`) risen by this much (absolute) over the baseline. A rise, because some
    tasks legitimately repeat ("Repeat the word book 5 times")."""
    format_rise: float = 0.3
    """Format gaming: the share of responses with a format feature (list markers, exclamation marks,
    all caps, repeated punctuation) risen by this much (absolute) over the baseline."""
    divergence_window: int = 10
    """Proxy-gold divergence: the trailing window of iterations over which the slopes are fitted."""
    divergence_min_slope: float = 0.003
    """Fires when the proxy (RM) slope is above this and the gold slope below minus this, per
    iteration. Gold exists only in the assistant world; the detector is skipped without it."""
    divergence_t: float = 2.0
    """...and both slopes are significant: |slope / standard error| above this (about 95% for a
    10-iteration window), so batch-to-batch noise in the means does not fire it."""
    rearm_after: int = 5
    """Iterations a detector must stay silent before it can raise a new alert."""
    disagreement_ratio: float = 2.0
    """Ensemble disagreement: RM-ensemble std grown above this multiple of its baseline: the policy
    has left the region where the reward models agree. Skipped without an ensemble."""


@dataclass
class Alert:
    """One detector firing at one iteration."""

    detector: str
    iteration: int
    message: str
    value: float
    threshold: float


@dataclass
class IterationStats:
    """What the monitor keeps of one PPO iteration: means and shares, never the texts."""

    iteration: int
    mean_length: float
    mean_reward: float
    reward_length_corr: float
    kl: float
    repeat_share: float
    format_shares: dict[str, float]
    mean_gold: float | None = None
    disagreement: float | None = None


# -- per-response features --------------------------------------------------------------------------

def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation; 0 when either side is constant (no evidence either way)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else 0.0


def slope(ys: Sequence[float]) -> float:
    """Least-squares slope of ys against 0, 1, 2, ... (per iteration)."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def slope_t(ys: Sequence[float]) -> float:
    """t statistic of the least-squares slope (slope / its standard error): how far the trend stands
    out of the batch-to-batch noise. +-inf for a noiseless trend, 0 with fewer than three points."""
    n = len(ys)
    if n < 3:
        return 0.0
    b, mx, my = slope(ys), (n - 1) / 2, sum(ys) / n
    sxx = sum((i - mx) ** 2 for i in range(n))
    residual = sum((y - my - b * (i - mx)) ** 2 for i, y in enumerate(ys)) / (n - 2)
    if residual <= 1e-18:
        return 0.0 if b == 0 else math.copysign(math.inf, b)
    return b / math.sqrt(residual / sxx)


def repeats_phrase(text: str, min_count: int = 4, min_cover: float = 0.3, max_n: int = 3) -> bool:
    """True when one word n-gram (n = 1..max_n; single function words excluded) occurs at least
    `min_count` times and its occurrences cover at least `min_cover` of the words: "great great
    great great answer", not a long answer that says "model" four times."""
    toks = words(text)
    for n in range(1, max_n + 1):
        counts = Counter(g for g in ngrams(toks, n) if n > 1 or g[0] not in STOPWORDS)
        if counts:
            _, k = counts.most_common(1)[0]
            if k >= min_count and k * n / len(toks) >= min_cover:
                return True
    return False


_LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)
_REPEATED_PUNCT = re.compile(r"[!?]{2,}|\.{4,}")  # "..." is ordinary prose; "!!" and "?!" are not

def shouts(text: str) -> bool:
    """At least three words (of two letters or more) in capitals, and a third of all such words:
    an acronym or two (USA, HTML) does not count."""
    toks = re.findall(r"[A-Za-z]{2,}", text)
    caps = sum(w.isupper() for w in toks)
    return caps >= 3 and caps >= len(toks) / 3


FORMAT_FEATURES: dict[str, Callable[[str], bool]] = {
    "list_markers": lambda t: bool(_LIST_MARKER.search(t)),
    "exclamation": lambda t: "!" in t,
    "all_caps": shouts,
    "repeated_punctuation": lambda t: bool(_REPEATED_PUNCT.search(t)),
}


def format_shares(responses: Sequence[str]) -> dict[str, float]:
    """Share of responses showing each of FORMAT_FEATURES."""
    n = max(len(responses), 1)
    return {name: sum(f(r) for r in responses) / n for name, f in FORMAT_FEATURES.items()}


def word_counts(responses: Sequence[str]) -> Counter:
    """How often each word occurs in the responses."""
    return Counter(w for r in responses for w in words(r))


def batch_stats(iteration: int, responses: Sequence[str], rewards: Sequence[float], kl: float,
                gold: Sequence[float] | None = None, disagreement: float | None = None) -> IterationStats:
    """The per-iteration means the detectors need."""
    lengths = [len(words(r)) for r in responses]
    n = max(len(responses), 1)
    return IterationStats(
        iteration=iteration, mean_length=sum(lengths) / n, mean_reward=sum(rewards) / n,
        reward_length_corr=pearson(rewards, lengths), kl=float(kl),
        repeat_share=sum(repeats_phrase(r) for r in responses) / n, format_shares=format_shares(responses),
        mean_gold=sum(gold) / max(len(gold), 1) if gold is not None else None, disagreement=disagreement)


# -- detectors --------------------------------------------------------------------------------------

def _baseline(history: Sequence[IterationStats], t: HackingThresholds, key: Callable) -> float | None:
    """Mean of key(stats) over the baseline iterations; None until the history goes past them."""
    if len(history) <= t.baseline_iterations:
        return None
    return sum(key(s) for s in history[:t.baseline_iterations]) / t.baseline_iterations


def detect_verbosity(history: Sequence[IterationStats], t: HackingThresholds) -> Alert | None:
    """Length grown > verbosity_growth over the baseline while reward rose above its baseline, and
    reward correlates with length within the latest batch."""
    base_len = _baseline(history, t, lambda s: s.mean_length)
    base_reward = _baseline(history, t, lambda s: s.mean_reward)
    if base_len is None or base_reward is None:
        return None
    now = history[-1]
    growth = now.mean_length / max(base_len, 1e-9) - 1
    if growth > t.verbosity_growth and now.mean_reward > base_reward and now.reward_length_corr > t.verbosity_corr:
        return Alert("verbosity", now.iteration,
                     f"mean length {base_len:.1f} -> {now.mean_length:.1f} words (+{growth:.0%}) while reward "
                     f"rose {base_reward:.3f} -> {now.mean_reward:.3f}; corr(reward, length) = "
                     f"{now.reward_length_corr:.2f}", growth, t.verbosity_growth)
    return None


def detect_keyword_stuffing(history: Sequence[IterationStats], baseline_words: Mapping[str, int],
                            batch_words: Mapping[str, int], t: HackingThresholds) -> Alert | None:
    """A content word's share of all words grown stuffing_share_growth-fold to at least
    stuffing_min_share, or the share of responses repeating a phrase risen by stuffing_repeat_rise.
    Word counts come from `word_counts`."""
    base_repeat = _baseline(history, t, lambda s: s.repeat_share)
    if base_repeat is None:
        return None
    now = history[-1]
    base_total, total = max(sum(baseline_words.values()), 1), max(sum(batch_words.values()), 1)
    for word, k in sorted(batch_words.items(), key=lambda kv: -kv[1]):
        share = k / total
        if share < t.stuffing_min_share:
            break  # sorted by count: no later word can pass
        if word in STOPWORDS:
            continue
        # A word the baseline never used counts as used once: growth is large but finite.
        growth = share / (max(baseline_words.get(word, 0), 1) / base_total)
        if growth >= t.stuffing_share_growth:
            return Alert("keyword_stuffing", now.iteration,
                         f"'{word}' is {share:.1%} of response words, {growth:.1f}x its baseline share",
                         growth, t.stuffing_share_growth)
    rise = now.repeat_share - base_repeat
    if rise >= t.stuffing_repeat_rise:
        return Alert("keyword_stuffing", now.iteration,
                     f"{now.repeat_share:.0%} of responses repeat one word or phrase (baseline {base_repeat:.0%})",
                     rise, t.stuffing_repeat_rise)
    return None


def detect_format_gaming(history: Sequence[IterationStats], t: HackingThresholds) -> Alert | None:
    """The share of responses with some format feature risen by format_rise over the baseline;
    the alert names every feature that rose that much and carries the largest rise."""
    if len(history) <= t.baseline_iterations:
        return None
    now = history[-1]
    rises = {name: now.format_shares[name] - _baseline(history, t, lambda s: s.format_shares[name])
             for name in now.format_shares}
    gamed = {name: r for name, r in rises.items() if r >= t.format_rise}
    if not gamed:
        return None
    what = ", ".join(f"{name} {now.format_shares[name]:.0%} (+{r:.0%})" for name, r in gamed.items())
    return Alert("format_gaming", now.iteration, f"format features rising: {what}", max(gamed.values()),
                 t.format_rise)


def detect_proxy_gold_divergence(history: Sequence[IterationStats], t: HackingThresholds) -> Alert | None:
    """Over the trailing divergence_window iterations, proxy (RM) reward rising while gold falls:
    Goodhart's law caught in the act. Silent unless every iteration in the window has gold."""
    window = history[-t.divergence_window:]
    if len(window) < t.divergence_window or any(s.mean_gold is None for s in window):
        return None
    proxy = slope([s.mean_reward for s in window])
    gold = slope([s.mean_gold for s in window])  # type: ignore[misc]
    # Each iteration scores other prompts, so both means are noisy: a trend must stand out of that noise.
    significant = (slope_t([s.mean_reward for s in window]) > t.divergence_t
                   and slope_t([s.mean_gold for s in window]) < -t.divergence_t)  # type: ignore[misc]
    if significant and proxy > t.divergence_min_slope and gold < -t.divergence_min_slope:
        return Alert("proxy_gold_divergence", window[-1].iteration,
                     f"over the last {len(window)} iterations the RM reward slope is {proxy:+.4f}/it while "
                     f"the gold slope is {gold:+.4f}/it (KL {window[0].kl:.3f} -> {window[-1].kl:.3f})",
                     gold, -t.divergence_min_slope)
    return None


def detect_ensemble_disagreement(history: Sequence[IterationStats], t: HackingThresholds) -> Alert | None:
    """RM-ensemble std above disagreement_ratio times its baseline. Silent without an ensemble."""
    if any(s.disagreement is None for s in history):
        return None
    base = _baseline(history, t, lambda s: s.disagreement)
    if base is None:
        return None
    now = history[-1]
    ratio = now.disagreement / max(base, 1e-9)  # type: ignore[operator]
    if ratio > t.disagreement_ratio:
        return Alert("ensemble_disagreement", now.iteration,
                     f"reward-model ensemble std {base:.4f} -> {now.disagreement:.4f} ({ratio:.1f}x)",
                     ratio, t.disagreement_ratio)
    return None


# -- the monitor ------------------------------------------------------------------------------------

def fired_detectors(ppo_out: str | Path) -> list[str]:
    """The detectors that fired during a PPO run (its ``alerts.jsonl``), each once, sorted; [] without the file."""
    path = Path(ppo_out) / "alerts.jsonl"
    if not path.is_file():
        return []
    return sorted({json.loads(line)["detector"] for line in path.read_text().splitlines() if line.strip()})


@dataclass
class _Record:
    """What the summary tells about one detector that has fired."""

    first_iteration: int
    last_iteration: int = 0
    times_fired: int = 0  # separate episodes: firing, stopping, firing again counts 2
    last_value: float = 0.0
    threshold: float = 0.0
    last_message: str = ""
    active: bool = False  # firing at the latest update
    quiet: int = 0  # iterations since it last fired


@dataclass
class HackingMonitor:
    """Runs every detector once per PPO iteration; `update` returns only alerts that are new (a
    detector that keeps firing is reported once, and again only after it has been silent for
    `thresholds.rearm_after` iterations).

    Keeps per-iteration means and, for the baseline iterations only, word counts: memory does not
    grow with the number of responses."""

    thresholds: HackingThresholds = field(default_factory=HackingThresholds)
    history: list[IterationStats] = field(default_factory=list)
    baseline_words: Counter = field(default_factory=Counter)
    records: dict[str, _Record] = field(default_factory=dict)

    def update(self, iteration: int, responses: list[str], rewards: list[float], kl: float,
               gold: list[float] | None = None, disagreement: float | None = None) -> list[Alert]:
        t = self.thresholds
        self.history.append(batch_stats(iteration, responses, rewards, kl, gold, disagreement))
        counts = word_counts(responses)
        if len(self.history) <= t.baseline_iterations:
            self.baseline_words.update(counts)
        firing = [a for a in (
            detect_verbosity(self.history, t),
            detect_keyword_stuffing(self.history, self.baseline_words, counts, t),
            detect_format_gaming(self.history, t),
            detect_proxy_gold_divergence(self.history, t),
            detect_ensemble_disagreement(self.history, t),
        ) if a is not None]
        return self._new_alerts(iteration, firing)

    def _new_alerts(self, iteration: int, firing: list[Alert]) -> list[Alert]:
        """Record `firing`; return those whose detector was not firing at the previous update."""
        new = []
        for a in firing:
            rec = self.records.setdefault(a.detector, _Record(first_iteration=a.iteration))
            # A new episode only after rearm_after quiet iterations: a detector near its threshold
            # flickers on and off, and one alert per flicker would bury the log.
            if rec.times_fired == 0 or (not rec.active and rec.quiet >= self.thresholds.rearm_after):
                rec.times_fired += 1
                new.append(a)
                log.warning("reward hacking? [%s] iteration %d: %s", a.detector, a.iteration, a.message)
            rec.last_iteration, rec.last_value, rec.threshold, rec.last_message = (
                iteration, a.value, a.threshold, a.message)
        names = {a.detector for a in firing}
        for name, rec in self.records.items():
            rec.active = name in names
            rec.quiet = 0 if rec.active else rec.quiet + 1
        return new

    def state_dict(self) -> dict:
        """Everything `update` depends on, JSON-serialisable, for PPO checkpoints: a resumed run keeps its
        baseline and its alert episodes instead of starting them over."""
        return {"history": [asdict(h) for h in self.history], "baseline_words": dict(self.baseline_words),
                "records": {name: asdict(rec) for name, rec in self.records.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = [IterationStats(**h) for h in state["history"]]
        self.baseline_words = Counter(state["baseline_words"])
        self.records = {name: _Record(**rec) for name, rec in state["records"].items()}

    def summary(self) -> dict:
        """JSON-serialisable: which detectors fired (first and last iteration, how many separate
        times, last value and message, whether still firing) and the last iteration's statistics."""
        return {
            "fired": sorted(self.records),
            "detectors": {name: asdict(rec) for name, rec in sorted(self.records.items())},
            "iterations": len(self.history),
            "last": asdict(self.history[-1]) if self.history else None,
            "thresholds": asdict(self.thresholds),
        }


# -- penalty rewards (PPO extra-reward components) --------------------------------------------------

def length_penalty(target_words: int) -> RewardFn:
    """0 up to `target_words` words, then -(excess / target), capped at -1 (at twice the target)."""
    if target_words <= 0:
        raise ValueError(f"length_penalty: target_words must be positive, got {target_words}")

    def fn(prompts: list[str], responses: list[str]) -> list[float]:
        return [max(-1.0, -max(0, len(words(r)) - target_words) / target_words) for r in responses]
    return fn


def repeated_ngram_share(text: str, n: int) -> float:
    """Share of the text's word n-gram occurrences that repeat an earlier one: (total - unique) / total."""
    grams = ngrams(words(text), n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def repetition_penalty(n: int = 3) -> RewardFn:
    """Minus the share of repeated word n-grams in each response (0 for no repeats, towards -1 for
    loops). It also penalises tasks that ask for repetition; weight it accordingly."""
    if n < 1:
        raise ValueError(f"repetition_penalty: n must be at least 1, got {n}")

    def fn(prompts: list[str], responses: list[str]) -> list[float]:
        return [-repeated_ngram_share(r, n) for r in responses]
    return fn


def shingles(text: str) -> frozenset:
    """Word bigrams of a text; its single word when it has only one (so "Yes." still compares)."""
    toks = words(text)
    return frozenset(ngrams(toks, 2) if len(toks) > 1 else ngrams(toks, 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a & b| / |a | b|; 0 when both are empty."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def diversity_bonus() -> RewardFn:
    """For each response, 1 minus its largest word-bigram Jaccard overlap with the other responses
    of the batch: copies of one answer earn 0, an answer unlike the rest earns 1. A response with no
    words, or alone in its batch, earns 0 (nothing to be diverse with)."""

    def fn(prompts: list[str], responses: list[str]) -> list[float]:
        sets = [shingles(r) for r in responses]
        return [0.0 if not s or len(sets) < 2 else
                1.0 - max(jaccard(s, o) for j, o in enumerate(sets) if j != i)
                for i, s in enumerate(sets)]
    return fn
