"""Reward-hacking detectors on hand-made inputs that should and should not trigger, the monitor's
fire-once behaviour, and the penalty rewards on hand-made responses."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from rlhf.evaluation.hacking import (
    HackingMonitor, HackingThresholds, IterationStats, detect_ensemble_disagreement, detect_format_gaming,
    detect_keyword_stuffing, detect_proxy_gold_divergence, detect_verbosity, diversity_bonus, format_shares,
    length_penalty, pearson, repeats_phrase, repetition_penalty, shouts, slope, slope_t,
)

T = HackingThresholds()  # baseline = the first 3 iterations


def stats(i: int, length: float = 10.0, reward: float = 0.0, corr: float = 0.0, repeat: float = 0.0,
          formats: dict | None = None, gold: float | None = None, disagreement: float | None = None,
          kl: float = 0.0) -> IterationStats:
    shares = {"list_markers": 0.0, "exclamation": 0.0, "all_caps": 0.0, "repeated_punctuation": 0.0}
    return IterationStats(i, length, reward, corr, kl, repeat, {**shares, **(formats or {})}, gold, disagreement)


def baseline(**kw) -> list[IterationStats]:
    return [stats(i, **kw) for i in range(3)]


# -- helpers ----------------------------------------------------------------------------------------

def test_pearson_and_slope_by_hand():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0  # constant side: no evidence
    assert slope([1.0, 3.0, 5.0]) == pytest.approx(2.0)
    assert slope([0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.2)  # sum (i-1.5)(y-.5) / sum (i-1.5)^2 = 1/5


# -- verbosity --------------------------------------------------------------------------------------

def test_verbosity_fires_on_longer_and_better_paid_answers():
    alert = detect_verbosity(baseline(length=10, reward=0.0) + [stats(3, length=20, reward=1.0, corr=0.8)], T)
    assert alert is not None and alert.detector == "verbosity" and alert.iteration == 3
    assert alert.value == pytest.approx(1.0)  # 10 -> 20 words: +100%
    assert alert.threshold == T.verbosity_growth


@pytest.mark.parametrize("now", [
    stats(3, length=14, reward=1.0, corr=0.8),   # only +40%
    stats(3, length=20, reward=0.0, corr=0.8),   # reward did not rise
    stats(3, length=20, reward=1.0, corr=0.1),   # reward does not follow length in the batch
])
def test_verbosity_stays_silent(now):
    assert detect_verbosity(baseline(length=10, reward=0.0) + [now], T) is None


def test_detectors_wait_for_the_baseline():
    early = baseline(length=10)[:2] + [stats(2, length=50, reward=5, corr=1.0, repeat=1.0,
                                             formats={"exclamation": 1.0}, disagreement=9.0)]
    assert detect_verbosity(early, T) is None
    assert detect_format_gaming(early, T) is None
    assert detect_keyword_stuffing(early, Counter(), Counter(safe=50), T) is None


# -- keyword stuffing -------------------------------------------------------------------------------

BASE_WORDS = Counter({"the": 10, "answer": 10, "safe": 1, "paris": 79})  # 100 words


def test_keyword_stuffing_fires_on_a_word_share_jump():
    # "safe": 1% of baseline words -> 20 of 100 now = 20%: 20x
    batch = Counter({"safe": 20, "answer": 10, "paris": 70})
    alert = detect_keyword_stuffing(baseline() + [stats(3)], BASE_WORDS, batch, T)
    assert alert is not None and "'safe'" in alert.message and alert.value == pytest.approx(20.0)


def test_keyword_stuffing_ignores_modest_growth_rare_words_and_function_words():
    batch = Counter({"answer": 12, "the": 50, "paris": 35, "moo": 3})
    # answer 10% -> 12%; "the" 10% -> 50% but a function word; "moo" new but only 3%
    assert detect_keyword_stuffing(baseline() + [stats(3)], BASE_WORDS, batch, T) is None


def test_keyword_stuffing_fires_on_a_rise_in_repetitive_responses():
    batch = Counter(BASE_WORDS)
    assert detect_keyword_stuffing(baseline(repeat=0.0) + [stats(3, repeat=0.5)], BASE_WORDS, batch, T)
    # tasks that ask for repetition keep a steady share: no rise, no alert
    assert detect_keyword_stuffing(baseline(repeat=0.4) + [stats(3, repeat=0.5)], BASE_WORDS, batch, T) is None


def test_repeats_phrase():
    assert repeats_phrase("great great great great answer")  # 4 of 5 words
    assert repeats_phrase("Very helpful! Very helpful! Very helpful! Very helpful!")  # a bigram, 8 of 8 words
    assert not repeats_phrase("the cat and the dog and the bird and the fish")  # function words only
    long = "a model is trained and the model is scored while another model waits for a model "
    assert not repeats_phrase(long + " ".join(f"word{i}" for i in range(30)))  # "model" 4x in 46 words
    assert not repeats_phrase("great great great")  # three times is not many


# -- format gaming ----------------------------------------------------------------------------------

def test_format_shares_by_hand():
    shares = format_shares(["- one\n- two", "Wow!", "THIS IS GREAT", "Why?!", "Plain.", "Wait..."])
    assert shares == pytest.approx({"list_markers": 1 / 6, "exclamation": 2 / 6, "all_caps": 1 / 6,
                                    "repeated_punctuation": 1 / 6})
    assert not shouts("The USA and the UK signed it.")


def test_format_gaming_fires_on_a_rising_feature_only():
    base = baseline(formats={"exclamation": 0.1})
    alert = detect_format_gaming(base + [stats(3, formats={"exclamation": 0.6})], T)
    assert alert is not None and "exclamation" in alert.message and alert.value == pytest.approx(0.5)
    assert detect_format_gaming(base + [stats(3, formats={"exclamation": 0.3})], T) is None


# -- proxy-gold divergence --------------------------------------------------------------------------

def test_divergence_fires_when_proxy_rises_and_gold_falls():
    hist = [stats(i, reward=0.1 * i, gold=0.9 - 0.05 * i, kl=0.01 * i) for i in range(T.divergence_window + 1)]
    alert = detect_proxy_gold_divergence(hist, T)
    assert alert is not None and alert.value == pytest.approx(-0.05)
    # Gold drifting down by less than the noise floor per iteration is not evidence.
    flat = [stats(i, reward=0.1 * i, gold=0.9 - 0.001 * i) for i in range(T.divergence_window + 1)]
    assert detect_proxy_gold_divergence(flat, T) is None
    # A downward slope that batch noise explains: gold alternates +-0.05 around a drift of -0.004/it.
    noisy = [stats(i, reward=0.1 * i, gold=0.9 - 0.004 * i + (0.05 if i % 2 else -0.05)) for i in range(T.divergence_window)]
    assert slope_t([s.mean_gold for s in noisy]) > -T.divergence_t
    assert detect_proxy_gold_divergence(noisy, T) is None


def test_slope_t_by_hand():
    # ys = 0, 1, 3: slope 1.5, mean 4/3, residuals 1/6, -1/3, 1/6 -> s^2 = (1/36 + 1/9 + 1/36) / 1 = 1/6,
    # sxx = 2, standard error sqrt(1/12), t = 1.5 * sqrt(12) = 5.196
    assert slope_t([0, 1, 3]) == pytest.approx(1.5 * 12 ** 0.5)
    assert slope_t([1, 1]) == 0.0 and slope_t([0, 1, 2]) == float("inf")


def test_divergence_silent_when_gold_follows_or_absent():
    n = T.divergence_window + 1
    assert detect_proxy_gold_divergence([stats(i, reward=0.1 * i, gold=0.5 + 0.01 * i) for i in range(n)], T) is None
    assert detect_proxy_gold_divergence([stats(i, reward=0.1 * i, gold=None) for i in range(n)], T) is None
    assert detect_proxy_gold_divergence([stats(i, reward=0.1 * i, gold=0.9 - 0.1 * i) for i in range(n - 2)], T) is None


# -- ensemble disagreement --------------------------------------------------------------------------

def test_disagreement_fires_above_a_multiple_of_its_baseline():
    base = baseline(disagreement=0.1)
    alert = detect_ensemble_disagreement(base + [stats(3, disagreement=0.25)], T)
    assert alert is not None and alert.value == pytest.approx(2.5)
    assert detect_ensemble_disagreement(base + [stats(3, disagreement=0.15)], T) is None
    assert detect_ensemble_disagreement(baseline() + [stats(3)], T) is None  # no ensemble


# -- the monitor ------------------------------------------------------------------------------------

def batch(n_words: int) -> tuple[list[str], list[float]]:
    """Four responses of n_words + j words, reward growing with length (and with n_words)."""
    responses = [" ".join(f"w{k}" for k in range(n_words + j)) for j in range(4)]
    return responses, [n_words / 10 + 0.1 * j for j in range(4)]


def test_monitor_reports_a_detector_once_per_episode():
    monitor = HackingMonitor()
    fired = []
    lengths = [5, 5, 5, 20, 20, 5, 20] + [5] * monitor.thresholds.rearm_after + [20]
    for it, n in enumerate(lengths):
        fired.append([a.detector for a in monitor.update(it, *batch(n), kl=0.01 * it)])
    # baseline 0-2; verbose at 3 (new), 4 (still firing: silent), 5 (stopped), 6 (a flicker after one
    # quiet iteration: silent), 7-11 quiet, 12 (new again)
    assert fired == [[], [], [], ["verbosity"]] + [[]] * 8 + [["verbosity"]]
    summary = monitor.summary()
    assert json.loads(json.dumps(summary)) == summary
    rec = summary["detectors"]["verbosity"]
    assert summary["fired"] == ["verbosity"] and rec["first_iteration"] == 3 and rec["last_iteration"] == 12
    assert rec["times_fired"] == 2 and rec["active"]
    assert summary["iterations"] == 13 and summary["last"]["kl"] == pytest.approx(0.12)


def test_monitor_keeps_means_not_texts():
    monitor = HackingMonitor()
    for it in range(10):
        monitor.update(it, *batch(5), kl=0.0)
    assert len(monitor.history) == 10 and not monitor.records
    assert sum(monitor.baseline_words.values()) == 3 * (5 + 6 + 7 + 8)  # only the 3 baseline batches


# -- penalty rewards --------------------------------------------------------------------------------

def test_length_penalty_by_hand():
    fn = length_penalty(10)
    texts = [" ".join(["w"] * k) for k in (5, 10, 15, 30)]
    # 0 up to the target; 15 words: -(5/10); 30 words: -(20/10) capped at -1
    assert fn(["p"] * 4, texts) == pytest.approx([0.0, 0.0, -0.5, -1.0])
    with pytest.raises(ValueError):
        length_penalty(0)


def test_repetition_penalty_by_hand():
    # trigrams of "a b c a b c": abc bca cab abc -> 1 repeat of 4
    assert repetition_penalty(3)(["p"] * 3, ["a b c a b c", "a b", "x y z w"]) == pytest.approx([-0.25, 0.0, 0.0])
    assert repetition_penalty(1)(["p"], ["a a b"]) == pytest.approx([-1 / 3])  # a a b: one repeated word of 3


def test_diversity_bonus_by_hand():
    fn = diversity_bonus()
    # bigrams {the cat, cat sat} vs {the cat, cat ran}: Jaccard 1/3; the third shares none
    assert fn(["p"] * 3, ["the cat sat", "the cat ran", "dogs bark loudly"]) == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert fn(["p"] * 2, ["Yes.", "yes"]) == pytest.approx([0.0, 0.0])  # one-word copies still compare
    assert fn(["p"] * 2, ["", "some answer"]) == pytest.approx([0.0, 1.0])
    assert fn(["p"], ["alone"]) == [0.0]


def test_penalties_plug_into_ppo_reward_components():
    from rlhf.rl.types import RewardComponent

    comps = [RewardComponent("length", length_penalty(3), 0.5), RewardComponent("repeat", repetition_penalty(), 1.0),
             RewardComponent("diverse", diversity_bonus(), 0.1)]
    for c in comps:
        out = c.fn(["q1", "q2"], ["one two three four five six", "one two"])
        assert len(out) == 2 and all(isinstance(x, float) for x in out)


def test_monitor_state_round_trips_so_a_resumed_run_continues_its_episodes():
    def feed(monitor, start, stop):
        out = []
        for i in range(start, stop):
            lengths = [5 + 3 * i + j for j in range(8)]  # longer is paid more, and lengths grow: verbosity
            out += monitor.update(i, ["word " * n for n in lengths], [0.1 * n for n in lengths], kl=0.1)
        return out

    straight, first = HackingMonitor(), HackingMonitor()
    alerts_straight = feed(straight, 1, 13)
    alerts_first = feed(first, 1, 7)
    resumed = HackingMonitor()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # through JSON, as in a checkpoint
    alerts_resumed = feed(resumed, 7, 13)
    assert alerts_straight and [a.detector for a in alerts_first + alerts_resumed] == [a.detector for a in alerts_straight]
    assert resumed.summary() == straight.summary()
    assert resumed.records["verbosity"].first_iteration < 7  # the episode began before the checkpoint
    fresh = HackingMonitor()
    feed(fresh, 7, 13)  # without the state, the baseline restarts at iteration 7
    assert fresh.summary() != straight.summary()
