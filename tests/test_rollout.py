"""The rollout engines: the static decode loop gives generate's greedy tokens on real model families, log-probs
equal to a fresh forward of the policy, the same tokens whether finished rows leave the batch or not, and the
same tokens for a row whatever else is in its batch."""

from __future__ import annotations

import pytest
import torch
from transformers import TopPLogitsWarper

from rlhf.config import GenerationConfig
from rlhf.configlib import ConfigError
from rlhf.data.chat import encode_prompt
from rlhf.models.loading import load_causal_lm
from rlhf.models.policy import gather_logprobs, response_logits
from rlhf.rollout import make_engine
from rlhf.rollout.sampling import inverse_cdf_draw, logprobs_and_entropy, top_p_filter

QUESTIONS = ["Hi", "What is 3 + 4 and then some more words to make it long?", "A", "List 3 fruits.", "Hello, Alice!"]


def encoded(tok, n: int = 5) -> list[list[int]]:
    return [encode_prompt(tok, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(n)]


@pytest.mark.parametrize("family", ["tiny_llama3", "tiny_qwen2", "tiny_gpt2", "tiny_gemma2"])
def test_static_greedy_tokens_equal_generates(family, request):
    model, tok = load_causal_lm(request.getfixturevalue(family))
    prompts = encoded(tok)  # five lengths: left padding in play
    cfg = GenerationConfig(max_new_tokens=16, batch_size=5)
    static, hf = make_engine(model, tok, "static"), make_engine(model, tok, "hf")
    assert (static.name, hf.name) == ("static", "hf")
    ours, theirs = static.generate(prompts, cfg, 0), hf.generate(prompts, cfg, 0)
    assert torch.equal(ours.responses, theirs.responses) and torch.equal(ours.mask, theirs.mask)
    assert torch.equal(ours.input_ids, theirs.input_ids) and theirs.logprobs is None


@pytest.mark.parametrize("family", ["tiny_llama3", "tiny_gemma2"])
@pytest.mark.parametrize("sampler", ["inverse_cdf", "multinomial"])
def test_engine_logprobs_equal_a_fresh_forward(family, sampler, request):
    """Gemma-2 included: its final-logit softcap must be in the engine's log-probs as in the forward's."""
    model, tok = load_causal_lm(request.getfixturevalue(family))
    cfg = GenerationConfig(max_new_tokens=12, batch_size=8, do_sample=True, temperature=0.7, sampler=sampler)
    s = make_engine(model, tok, "static").generate(encoded(tok, 8), cfg, 1)
    with torch.no_grad():
        logits, _ = response_logits(model, s.input_ids, s.attention_mask, s.n_prompt, 0.7)
        want = gather_logprobs(logits, s.responses) * s.mask
        p = torch.log_softmax(logits, -1)
        want_entropy = -(p.exp() * p).sum(-1) * s.mask
    assert s.mask.sum() > 40
    assert (s.logprobs - want).abs().max() < 1e-5
    assert (s.entropy - want_entropy).abs().max() < 1e-4
    assert torch.all(s.logprobs[s.mask == 0] == 0)


class StopAtLength:
    """Forces the stop token once a row holds ``n`` real tokens: rows of different prompt lengths stop at
    different steps (a random tiny model seldom samples EOS on its own)."""

    def __init__(self, n: int, pad: int, eos: int):
        self.n, self.pad, self.eos = n, pad, eos

    def __call__(self, input_ids, scores):
        done = (input_ids != self.pad).sum(1) >= self.n  # (b,)
        scores[done] = -float("inf")
        scores[done, self.eos] = 0.0
        return scores


@pytest.mark.parametrize("do_sample", [False, True])
def test_finished_rows_leaving_the_batch_change_no_token(do_sample, tiny_llama3):
    model, tok = load_causal_lm(tiny_llama3)
    engine, prompts = make_engine(model, tok, "static"), encoded(tok, 10)
    longest, shortest = max(map(len, prompts)), min(map(len, prompts))
    stop = StopAtLength(longest + 2, tok.pad_token_id, tok.eos_token_id)  # a short prompt runs longer
    runs = [engine.generate(prompts, GenerationConfig(max_new_tokens=longest - shortest + 4, batch_size=10, do_sample=do_sample,
                                                      compact=compact), 3, [stop])
            for compact in (0.0, 1.0)]  # leave at every stop / never
    lengths = runs[0].mask.sum(1)
    assert len(set(lengths.tolist())) >= 3 and runs[0].ended.all()  # rows did stop at different steps
    assert torch.equal(runs[0].responses, runs[1].responses)
    assert (runs[0].logprobs - runs[1].logprobs).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["tiny_llama3", "tiny_gemma2"])
def test_engine_hidden_states_equal_a_fresh_forward(family, request):
    """The final hidden states the engine hands a value head: from the fused steps (Llama) and from the model's
    own forward (Gemma-2), with rows leaving the batch as they stop, equal to the backbone's output on the
    finished sequences."""
    model, tok = load_causal_lm(request.getfixturevalue(family))
    prompts = encoded(tok, 10)
    longest, shortest = max(map(len, prompts)), min(map(len, prompts))
    stop = StopAtLength(longest + 2, tok.pad_token_id, tok.eos_token_id)  # a short prompt runs longer
    cfg = GenerationConfig(max_new_tokens=longest - shortest + 4, batch_size=10, do_sample=True, compact=0.0)
    s = make_engine(model, tok, "static", hidden=True).generate(prompts, cfg, 1, [stop])
    with torch.no_grad():
        _, want = response_logits(model, s.input_ids, s.attention_mask, s.n_prompt, 1.0, with_hidden=True)
    assert len(set(s.mask.sum(1).tolist())) >= 3  # rows stopped at different steps: the batch was compacted
    assert s.hidden.shape == want.shape and want.abs().max() > 0.1
    assert (s.hidden - want * s.mask[..., None]).abs().max() < 1e-5
    assert make_engine(model, tok, "static").generate(prompts, cfg, 1, [stop]).hidden is None  # only when asked


def test_a_row_gets_the_tokens_it_gets_alone(tiny_qwen2):
    model, tok = load_causal_lm(tiny_qwen2)
    engine, prompts = make_engine(model, tok, "static"), encoded(tok)
    cfg = GenerationConfig(max_new_tokens=10, batch_size=5)
    batched = engine.generate(prompts, cfg, 0)
    for i, p in enumerate(prompts):
        alone = engine.generate([p], cfg, 0)
        n = int(alone.mask.sum())
        assert batched.responses[i, :n].tolist() == alone.responses[0, :n].tolist() and int(batched.mask[i].sum()) == n


def test_seed_fixes_the_draws(tiny_llama):
    model, tok = load_causal_lm(tiny_llama)
    engine = make_engine(model, tok, "auto")
    assert engine.name == "static"
    cfg = GenerationConfig(max_new_tokens=8, batch_size=8, do_sample=True)
    first, again, other = (engine.generate(encoded(tok, 8), cfg, s).responses for s in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_static_where_unsupported_is_an_error_and_auto_falls_back(tiny_llama, monkeypatch):
    import rlhf.rollout as rollout

    model, tok = load_causal_lm(tiny_llama)
    monkeypatch.setattr(rollout, "static_supported", lambda m: "no static cache for TestModel")
    assert make_engine(model, tok, "auto").name == "hf"
    with pytest.raises(ValueError, match="no static cache for TestModel"):
        make_engine(model, tok, "static")


def test_compact_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="compact"):
        GenerationConfig(compact=1.5).validate()


def test_top_p_filter_equals_transformers_warper():
    torch.manual_seed(0)
    scores = torch.randn(6, 50) * 3
    for p in (0.3, 0.9, 0.999):
        assert torch.equal(top_p_filter(scores, p), TopPLogitsWarper(p)(None, scores.clone()))
    assert top_p_filter(scores, 1.0) is scores


def test_inverse_cdf_draw_follows_the_softmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -float("inf"), -1.0, 0.5])
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0))
    tokens = inverse_cdf_draw(logits.expand(len(u), -1), u)
    share = torch.bincount(tokens, minlength=6).double() / len(tokens)
    assert share[3] == 0  # probability 0 is never drawn
    assert share.tolist() == pytest.approx(torch.softmax(logits, -1).tolist(), abs=0.005)  # binomial sd < 0.0012
    assert inverse_cdf_draw(logits[None], torch.tensor([1.0])).item() == 5  # u = 1 stays inside the vocabulary


def test_logprobs_and_entropy_of_the_plain_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lp, ent = logprobs_and_entropy(logits, torch.tensor([2, 0]), 2.0)
    p = torch.softmax(logits / 2.0, -1)
    assert lp.tolist() == pytest.approx([p[0, 2].log().item(), -torch.log(torch.tensor(3.0)).item()])
    assert ent.tolist() == pytest.approx((-(p * p.log()).sum(-1)).tolist())


def test_fused_steps_of_a_lora_policy_sample_the_adapted_model(tiny_qwen2):
    """The fused decode step reads W + the adapters' delta: its log-probs are those of the adapted model's forward,
    and differ from the base model's (the adapters are not silently dropped)."""
    from rlhf.config import LoraConfig
    from rlhf.models.loading import apply_lora
    from rlhf.models.policy import unwrap
    from rlhf.rollout import fused

    model, tok = load_causal_lm(tiny_qwen2)
    model = apply_lora(model, LoraConfig(enabled=True, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # peft starts B at zero: make the adapters count
    engine = make_engine(unwrap(model), tok, "static")
    assert engine.fused
    s = engine.generate(encoded(tok, 6), GenerationConfig(max_new_tokens=10, batch_size=6, do_sample=True), 2)
    with torch.no_grad():
        adapted = gather_logprobs(response_logits(model, s.input_ids, s.attention_mask, s.n_prompt, 1.0)[0], s.responses)
        with model.disable_adapter():
            base = gather_logprobs(response_logits(model, s.input_ids, s.attention_mask, s.n_prompt, 1.0)[0], s.responses)
    assert (s.logprobs - adapted * s.mask).abs().max() < 1e-5
    assert (s.logprobs - base * s.mask).abs().max() > 1e-2
    assert fused.linear_weight(unwrap(model).model.layers[0].self_attn.q_proj)[0] is not \
        unwrap(model).model.layers[0].self_attn.q_proj.base_layer.weight  # a copy: the trained weights untouched
