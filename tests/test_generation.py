"""Batched generation and atomic outputs."""

import pytest
import torch
from transformers import LogitsProcessorList

from rlhf.config import GenerationConfig
from rlhf.fsutil import atomic_dir
from rlhf.rollout import generate, truncate_at_eos
from rlhf.rollout.hf import generate_kwargs, sampling_processors
from rlhf.rollout.sampling import InverseCDFSampler
from rlhf.models.loading import load_causal_lm
from rlhf.report.metrics import MetricsLogger, read_metrics


def test_truncate_at_first_eos_and_drop_padding():
    assert truncate_at_eos([5, 6, 2, 7, 2], {2}, 0) == ([5, 6, 2], True)
    assert truncate_at_eos([5, 6, 0, 0], {2}, 0) == ([5, 6], False)


def test_batched_generation_keeps_prompt_order_and_matches_unbatched(tiny_llama):
    model, tok = load_causal_lm(tiny_llama)
    prompts = [[{"role": "user", "content": t}] for t in ("Hi", "What is 3 + 4 and then some more words?", "A")]
    cfg = GenerationConfig(max_new_tokens=6, batch_size=3)
    batched = generate(model, tok, prompts, cfg)
    single = [generate(model, tok, [p], GenerationConfig(max_new_tokens=6, batch_size=1))[0] for p in prompts]
    # Left padding with an attention mask must not change greedy outputs.
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(len(g.token_ids) <= 6 for g in batched)
    assert all(g.ended == (g.token_ids[-1] == tok.eos_token_id) for g in batched if g.token_ids)


def draw(processors, scores: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The tokens a greedy step takes after ``processors``: (B, V) scores -> (B,)."""
    torch.manual_seed(seed)
    return processors(torch.zeros(scores.shape[0], 1, dtype=torch.long), scores.clone()).argmax(-1)


def test_inverse_cdf_sampler_draws_from_the_softmax():
    # 200,000 rows of one distribution: each token's share is its probability (binomial sd < 0.0012),
    # and a token of probability 0 (score -inf) is never drawn.
    logits = torch.tensor([2.0, 1.0, 0.0, -float("inf"), -1.0, 0.5])
    p = torch.softmax(logits, -1)
    tokens = draw(LogitsProcessorList([InverseCDFSampler()]), logits.expand(200_000, -1))
    share = torch.bincount(tokens, minlength=6).double() / len(tokens)
    assert share[3] == 0
    assert share.tolist() == pytest.approx(p.tolist(), abs=0.005)
    # the draw is the global generator's: the same seed gives the same tokens, another seed others
    assert torch.equal(draw(LogitsProcessorList([InverseCDFSampler()]), logits.expand(64, -1), seed=1),
                       draw(LogitsProcessorList([InverseCDFSampler()]), logits.expand(64, -1), seed=1))
    assert not torch.equal(tokens[:64], draw(LogitsProcessorList([InverseCDFSampler()]), logits.expand(64, -1), seed=1))


def test_sampling_processors_apply_temperature_and_top_p_before_sampling():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).expand(100_000, -1)
    hot = draw(sampling_processors(GenerationConfig(do_sample=True, temperature=2.0)), logits)
    share = torch.bincount(hot, minlength=4).double() / len(hot)
    assert share.tolist() == pytest.approx(torch.softmax(logits[0] / 2.0, -1).tolist(), abs=0.005)
    # top_p 0.7: the nucleus is the two most likely tokens (0.644 < 0.7 <= 0.644 + 0.237), renormalised
    nucleus = draw(sampling_processors(GenerationConfig(do_sample=True, top_p=0.7)), logits)
    share = torch.bincount(nucleus, minlength=4).double() / len(nucleus)
    p = torch.softmax(logits[0], -1)[:2]
    assert share[2:].tolist() == [0.0, 0.0]
    assert share[:2].tolist() == pytest.approx((p / p.sum()).tolist(), abs=0.005)


def test_generate_kwargs_pick_the_decoding():
    assert generate_kwargs(GenerationConfig(do_sample=False)) == {"do_sample": False, "logits_processor": None}
    multinomial = generate_kwargs(GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, sampler="multinomial"))
    assert multinomial["do_sample"] and (multinomial["temperature"], multinomial["top_p"], multinomial["top_k"]) == (0.7, 0.9, 0)
    steer = object()
    inverse = generate_kwargs(GenerationConfig(do_sample=True, sampler="inverse_cdf"), [steer])
    assert not inverse["do_sample"]  # greedy takes the sampler's token
    assert inverse["logits_processor"][0] is steer and isinstance(inverse["logits_processor"][-1], InverseCDFSampler)


def test_inverse_cdf_generation_is_seeded(tiny_llama):
    model, tok = load_causal_lm(tiny_llama)
    prompts = [[{"role": "user", "content": t}] for t in ("Hi", "What is 3 + 4?")] * 4
    cfg = GenerationConfig(do_sample=True, sampler="inverse_cdf", max_new_tokens=8, batch_size=8)
    first, again, other = (generate(model, tok, prompts, cfg, seed=s) for s in (0, 0, 1))
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]


def test_atomic_dir_keeps_the_old_output_when_writing_fails(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (out / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folders left behind


def test_metrics_logger_writes_jsonl(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(1, **{"train/loss": 2.5})
        log.log(2, **{"val/loss": 2.0})
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[0]["train/loss"] == 2.5
