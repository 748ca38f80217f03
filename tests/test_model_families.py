"""Correct on real model families: tiny Llama (Llama-3 template), Qwen2 (ChatML, Qwen2.5's generation config),
Gemma-2 (softcapping) and GPT-2 (no template), each built from its family's config and loaded the way a
user's folder is.

Each test names a silent error it rules out: the reward read at another token than the one it was
trained at, sampling reshaped by the folder's generation settings, log-probs that skip the model's own
logit transform, a critic in raw units, an overlong response scored as an empty one, micro-batching that
changes the numbers, settings that make PPO's ratios wrong.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhf.algos.core import IGNORE_INDEX, position_ids_from_mask
from rlhf.config import GenerationConfig, PPOConfig, RewardConfig
from rlhf.configlib import ConfigError, from_dict
from rlhf.data.chat import encode_prompt, encode_sft, pack_right, pad_right, stop_ids
from rlhf.models.loading import load_causal_lm
from rlhf.models.policy import (backbone, gather_logprobs, pack_rows, packed_hidden, packed_response_logits, plain_lm_head,
                                response_hidden, response_logits, unwrap)
from rlhf.models.reward import RewardModel, collate_sequences, encode_for_reward, load_reward_backbone
from rlhf.rollout import generate
from rlhf.rl.models import score_head
from rlhf.stages.ppo import RLRun
from rlhf.training import count_units, lm_loss

FAMILIES = ["tiny_llama3", "tiny_qwen2", "tiny_gemma2", "tiny_gpt2"]
PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]
RESPONSES = ["2 + 3 = 5.", "I can't help with that.", "The capital of France is Paris, and a spider has 8 legs."]


def save_rm(policy_dir: Path, out: Path, seed: int = 1, stats: tuple[float, float] | None = None) -> Path:
    """A reward model on the family's backbone (a random head), saved as `rlhf rm` saves one."""
    torch.manual_seed(seed)
    model, tok = load_reward_backbone(policy_dir)
    if stats:
        model.config.reward_mean, model.config.reward_std = stats
    model.config.rlhf_stop_token_ids = sorted(stop_ids(tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_is_read_where_it_was_trained_and_equals_the_libraries_score(family, request, tmp_path):
    folder = request.getfixturevalue(family)
    policy, ptok = load_causal_lm(folder)
    rm_dir = save_rm(folder, tmp_path / "rm")
    rm = RewardModel.load(rm_dir)
    stops = stop_ids(ptok)
    prompt_ids = encode_prompt(ptok, PROMPT)
    seqs = []
    for text in RESPONSES:
        trained = encode_for_reward(rm.tok, PROMPT, text, 256)  # what the RM is trained (and normalised) on
        # What PPO scores: the prompt the policy saw, then its response up to and including the first stop token.
        response = encode_sft(ptok, PROMPT, text, 256, turns="last")
        generated = [t for t, label in zip(response.input_ids, response.labels) if label != -100]
        assert generated[-1] in stops and sum(t in stops for t in generated) == 1  # nothing after the stop token
        assert trained == prompt_ids + generated
        seqs.append(trained)
    batch = collate_sequences(seqs, rm.tok.pad_token_id)  # right-padded, as a rollout's response part is
    ours = rm.raw(batch["input_ids"], batch["attention_mask"])[0]
    library = AutoModelForSequenceClassification.from_pretrained(str(rm_dir)).eval()
    with torch.no_grad():
        theirs = torch.stack([library(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs])
    assert torch.allclose(ours, theirs, atol=1e-5)


def argmax_loop(model, ids: list[int], stops: set[int], n: int) -> list[int]:
    """Greedy decoding by hand over the model's plain logits: no processor of any kind."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in stops:
                break
    return out[len(ids):]


def exaggerate(model) -> None:
    """Make the folder's settings strong enough that a tiny random model's outputs show them if they leak:
    Qwen2.5's repetition_penalty (1.05 there) and the no_repeat_ngram_size, min_p and top_k a folder may set."""
    g = model.generation_config
    g.repetition_penalty, g.no_repeat_ngram_size, g.min_p, g.top_k, g.do_sample = 10.0, 1, 0.99, 1, True


@pytest.mark.parametrize("family", ["tiny_qwen2", "tiny_llama3", "tiny_gemma2"])
def test_greedy_generation_is_the_plain_argmax(family, request):
    folder = request.getfixturevalue(family)
    model, tok = load_causal_lm(folder)
    exaggerate(model)
    stops = stop_ids(tok)
    prompts = [PROMPT, [{"role": "user", "content": "Hello, Alice! List 3 fruits."}]]
    greedy = generate(model, tok, prompts, GenerationConfig(max_new_tokens=12, batch_size=2))
    for p, g in zip(prompts, greedy):
        assert g.token_ids == argmax_loop(model, encode_prompt(tok, p), stops, 12)
    assert model.generation_config.repetition_penalty == 10.0  # the folder's own settings are back, for saving


@pytest.mark.parametrize("sampler", ["multinomial", "inverse_cdf"])
def test_sampling_draws_from_the_plain_softmax(sampler, tiny_qwen2):
    """With min_p 0.99 or top_k 1 leaking, every sample would be the greedy reply; with the repetition penalty
    or no_repeat_ngram_size, no sample could repeat a token."""
    model, tok = load_causal_lm(tiny_qwen2)
    exaggerate(model)
    greedy = generate(model, tok, [PROMPT], GenerationConfig(max_new_tokens=8))[0].token_ids
    sampled = generate(model, tok, [PROMPT] * 16, GenerationConfig(max_new_tokens=8, do_sample=True, sampler=sampler,
                                                                  batch_size=16), seed=3)
    assert sum(s.token_ids != greedy for s in sampled) >= 8
    assert any(len(set(s.token_ids)) < len(s.token_ids) for s in sampled)  # repeats, as the plain model makes them


@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_are_the_causal_lms_own(family, request):
    folder = request.getfixturevalue(family)
    model, tok = load_causal_lm(folder)
    torch.manual_seed(0)
    ids = torch.randint(10, len(tok) - 10, (3, 14))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    n_prompt = 6
    with torch.no_grad():
        ours = gather_logprobs(response_logits(model, ids, mask, n_prompt, 0.7)[0], ids[:, n_prompt:])
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits.float() / 0.7
        want = torch.log_softmax(full[:, n_prompt - 1 : -1], -1).gather(2, ids[:, n_prompt:, None])[..., 0]
        head_only = unwrap(model).get_output_embeddings()(response_hidden(model, ids, mask, n_prompt)).float() / 0.7
    assert torch.allclose(ours, want, atol=1e-5)
    skipped = torch.log_softmax(head_only, -1).gather(2, ids[:, n_prompt:, None])[..., 0]
    if family == "tiny_gemma2":  # the backbone plus the output embeddings would skip the softcap
        assert (skipped - want).abs().max() > 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_training_loss_and_gradients_are_the_causal_lms_own(family, request):
    """lm_loss (pretraining, SFT) fuses the head into a chunked cross-entropy where the logits are a plain head
    over the backbone, and keeps the model's forward where they are not (Gemma-2's softcap)."""
    model, tok = load_causal_lm(request.getfixturevalue(family))
    torch.manual_seed(0)
    ids = torch.randint(10, len(tok) - 10, (3, 14))
    mask, labels = torch.ones_like(ids), ids.clone()
    mask[0, 10:], labels[0, 10:], labels[:, :4] = 0, IGNORE_INDEX, IGNORE_INDEX  # right padding, an unscored prompt
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    assert (plain_lm_head(model) is None) == (family == "tiny_gemma2")
    results = []
    for loss_fn in (lm_loss, lambda m, b: (m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                                labels=b["labels"]).loss, None)):
        model.zero_grad()
        loss = loss_fn(model, batch)[0]
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ours, ours_grads), (want, want_grads) = results
    assert ours == pytest.approx(want, rel=1e-5)
    assert all(torch.allclose(ours_grads[n], want_grads[n], atol=1e-5) for n in want_grads)
    assert unwrap(model).get_output_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_sft_batch_trains_as_the_padded_one(family, request):
    """SFT's padding-free batches (pack_right: samples side by side in a row, positions restarting) give the padded
    batch's loss, scored-token count and gradients: no sample attends to another, none loses a scored token."""
    model, tok = load_causal_lm(request.getfixturevalue(family))
    texts = [("Add 2 and 3.", "5."), ("Name a colour.", "Blue, like the sky on a clear day."), ("Hi", "Hello!"),
             ("What is the capital of France? Tell me about it.", "Paris is the capital of France. " * 4)]
    rows = [encode_sft(tok, [{"role": "user", "content": q}], a, max_length=256) for q, a in texts]
    padded, packed = pad_right(rows, tok.pad_token_id), pack_right(rows, tok.pad_token_id)
    assert len(packed["input_ids"]) < len(rows) and "attention_mask" not in packed  # it packed
    assert int(packed["token_mask"].sum()) == int(padded["attention_mask"].sum())
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        loss, count = lm_loss(model, batch)
        loss.backward()
        results.append((loss.item(), int(count), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, n_a, grads_a), (loss_b, n_b, grads_b) = results
    assert n_a == n_b == count_units(padded) == count_units(packed)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert all(torch.allclose(grads_a[n], grads_b[n], atol=1e-5) for n in grads_a)
    # The same rows, but with the restarts removed (one position run per row): attention crosses samples.
    crossed = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
    model.zero_grad()
    lm_loss(model, crossed)[0].backward()
    assert not all(torch.allclose(grads_a[n], p.grad, atol=1e-5) for n, p in model.named_parameters())  # caught


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_give_the_padded_batchs_logits_hidden_states_and_values(family, request, tmp_path):
    """PPO's padding-free update (pack_rows: each sample's real tokens side by side, positions restarting) reads the
    logits, the policy's hidden states and the critic's (a reward-model copy's) hidden states of the padded batch at
    every response token, the model's logit transform included (Gemma-2's softcap)."""
    folder = request.getfixturevalue(family)
    model, tok = load_causal_lm(folder)
    critic, _ = load_reward_backbone(save_rm(folder, tmp_path / "rm"))
    torch.manual_seed(0)
    n_prompt, prompt_lengths, response_lengths = 6, [6, 2, 4, 3], [8, 3, 1, 1]
    ids = torch.randint(10, len(tok) - 10, (4, n_prompt + 8))  # (B, T)
    am = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        am[i, n_prompt - p : n_prompt + r] = 1
    mask = am[:, n_prompt:].bool()  # (B, A)
    packed = pack_rows(ids, am, n_prompt)
    assert packed.input_ids.shape == (2, 14)  # samples of 14, 5, 5, 4 tokens: 14 | 5 + 5 + 4
    with torch.no_grad():
        want, want_hidden = response_logits(model, ids, am, n_prompt, 0.7, with_hidden=True)
        got, got_hidden = packed_response_logits(model, packed, 0.7, with_hidden=True)
        want_critic, got_critic = response_hidden(critic, ids, am, n_prompt), packed_hidden(critic, packed)
        crossed = packed_hidden(critic, replace(packed, position_ids=torch.arange(14).expand(2, 14)))
    assert torch.allclose(got[mask], want[mask], atol=1e-5)
    assert torch.allclose(got_hidden[mask], want_hidden[mask], atol=1e-5)
    assert torch.allclose(got_critic[mask], want_critic[mask], atol=1e-5)
    assert not torch.allclose(crossed[mask], want_critic[mask], atol=1e-5)  # without the restarts, samples mix
    with pytest.raises(ValueError, match="contiguous"):
        pack_rows(ids, am.index_fill(1, torch.tensor([n_prompt]), 0), n_prompt)  # a hole in the middle of each row


def ppo_cfg(policy, rm, prompts, out, **over) -> PPOConfig:
    base = dict(policy=str(policy), reward_model=str(rm), prompts=str(prompts), out=str(out), iterations=1,
                batch_size=8, mini_batch_size=4, ppo_epochs=1, lr=1e-3, generation=dict(max_new_tokens=6, batch_size=8),
                kl=dict(coef=0.05, adaptive=False))
    base.update(over)
    return from_dict(PPOConfig, base)


@pytest.fixture()
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                            ["What is 3 + 4?", "Hello, Alice!", "List 3 fruits.", "The capital of France is"] * 2))
    return path


@pytest.mark.parametrize("family", ["tiny_llama3", "tiny_qwen2"])
def test_critic_starts_in_normalised_units_and_first_ratio_is_one(family, request, prompts, tmp_path):
    folder = request.getfixturevalue(family)
    rm_dir = save_rm(folder, tmp_path / "rm", stats=(3.0, 0.5))  # raw scores around 3: far from the returns' units
    run = RLRun(ppo_cfg(folder, rm_dir, prompts, tmp_path / "out"))
    ro, _ = run.rollout()
    raw_head = unwrap(load_reward_backbone(rm_dir)[0]).score
    with torch.no_grad():
        hidden = response_hidden(run.m.critic, ro.input_ids, ro.attention_mask, ro.n_prompt)
        want = ((raw_head(hidden).squeeze(-1) - 3.0) / 0.5) * ro.response_mask
    assert torch.allclose(ro.values, want, atol=1e-4)  # the critic's head is the normalised reward head
    assert score_head(run.m.critic).bias is not None
    stats = run.learner.minibatch(ro, torch.arange(4))
    assert stats["policy/approxkl"] == pytest.approx(0.0, abs=1e-10) and stats["policy/clipfrac"] == 0.0


def test_reward_model_without_statistics_is_normalised_on_the_first_rollout(tiny_llama3, prompts, tmp_path):
    rm_dir = save_rm(tiny_llama3, tmp_path / "rm")  # no reward_mean / reward_std, as a TRL or public RM
    run = RLRun(ppo_cfg(tiny_llama3, rm_dir, prompts, tmp_path / "out", batch_size=8, mini_batch_size=8))
    assert not run.m.reward.normalized
    ro, _ = run.rollout()
    assert run.m.reward.normalized
    assert ro.rm_scores.mean().item() == pytest.approx(0.0, abs=1e-5)  # measured on this very rollout
    assert ro.rm_scores.std().item() == pytest.approx(1.0, abs=1e-4)


def test_reward_model_with_its_own_short_context_gives_overlong_responses_the_missing_eos_score(
        tiny_llama3, tiny_gpt2, prompts, tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from conftest import make_tokenizer

    rm_dir = tmp_path / "short_rm"  # another tokenizer, and 24 positions
    rtok = make_tokenizer(gpt2_like=True)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(rtok) + 1, n_embd=32, n_layer=1, n_head=2, n_positions=24, num_labels=1)
    GPT2ForSequenceClassification(cfg).save_pretrained(rm_dir)
    rtok.save_pretrained(rm_dir)
    run = RLRun(ppo_cfg(tiny_llama3, rm_dir, prompts, tmp_path / "out", critic="policy", missing_eos_score=-7.0,
                         normalize_reward=False, reward_clip=0.0))
    texts = ["Paris.", "a spider has 8 legs " * 6]  # the second is longer than 24 tokens alone
    ids = torch.ones(2, 4, dtype=torch.long)
    sampled = SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids), ended=torch.tensor([True, True]))
    scores = run.experience._score(sampled, [0, 1], texts, [run.prompts.texts[i] for i in (0, 1)])[2]
    assert scores[1].item() == -7.0 and scores[0].item() != -7.0
    assert RewardModel.load(rm_dir).score([PROMPT, PROMPT], texts).isnan().tolist() == [False, True]


@pytest.mark.parametrize("critic", ["reward_model", "policy"])
def test_micro_batched_rollout_and_update_equal_the_whole_batch(critic, tiny_llama3, prompts, tmp_path):
    rm_dir = save_rm(tiny_llama3, tmp_path / "rm", stats=(0.0, 1.0))
    results = []
    for micro in (None, 3):
        run = RLRun(ppo_cfg(tiny_llama3, rm_dir, prompts, tmp_path / f"out{micro}", micro_batch_size=micro,
                             critic=critic, mini_batch_size=8, padding_free=False))  # padded: the passes' shapes
        shapes = {"policy": [], "reference": []}  # (rows, width) of each forward pass
        hooks = [getattr(run.m, name).register_forward_pre_hook(
            lambda _m, _a, kw, name=name: shapes[name].append(tuple(kw["input_ids"].shape)), with_kwargs=True)
            for name in shapes]
        ro, stats = run.rollout()
        for hook in hooks:
            hook.remove()
        scoring = {name: [rows for rows, width in s if width == ro.input_ids.shape[1]] for name, s in shapes.items()}
        # the scoring passes over whole sequences: micro-batches of 3; none of the policy's, whose log-probs (and,
        # for a value head on it, hidden states) the engine returns
        assert scoring["reference"] == ([3, 3, 2] if micro else [8])
        assert scoring["policy"] == []
        run.update(ro)
        results.append((ro, stats, {n: p.detach().clone() for n, p in run.m.policy.named_parameters()},
                        [p.detach().clone() for p in run.m.critic_parameters()]))
    (a, sa, pa, ca), (b, sb, pb, cb) = results
    assert torch.equal(a.input_ids, b.input_ids)  # the same samples
    for field in ("logprobs", "ref_logprobs", "values", "scores", "advantages", "returns"):
        assert torch.allclose(getattr(a, field), getattr(b, field), atol=1e-5), field
    assert sa["objective/entropy"] == pytest.approx(sb["objective/entropy"], abs=1e-5)
    assert all(torch.allclose(pa[n], pb[n], atol=1e-5) for n in pa)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ca, cb))


@pytest.mark.parametrize("critic", ["reward_model", "policy"])
def test_padding_free_update_equals_the_padded_one(critic, tiny_qwen2, tmp_path):
    """Packed micro-batches (ppo.padding_free) score the rollout as padded ones do and make the padded update's
    step: the same reference log-probs, values and advantages, the same parameters after the step and the same
    statistics, from fewer rows and no attention mask."""
    rm_dir = save_rm(tiny_qwen2, tmp_path / "rm", stats=(0.0, 1.0))
    long = ("Tell me, in a few words and without any list, what the weather in Paris is like in the spring. "
            "And what about the summer and the autumn?")
    prompts = tmp_path / "prompts.jsonl"  # four long prompts and four short: packed, short ones share a row
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [long, "Hi", long, "2 + 2?"] * 2))
    results = []
    for padding_free in (False, True):
        run = RLRun(ppo_cfg(tiny_qwen2, rm_dir, prompts, tmp_path / f"out{padding_free}", padding_free=padding_free,
                             critic=critic, micro_batch_size=4, generation=dict(max_new_tokens=12, batch_size=8)))
        calls = {"reference": [], "policy": []}  # (rows, attention mask given) of each pass of the model's body
        hooks = [backbone(getattr(run.m, name)).register_forward_pre_hook(
            lambda _m, _a, kw, name=name: calls[name].append((kw["input_ids"].shape[0], "attention_mask" in kw)),
            with_kwargs=True) for name in calls]
        ro, _ = run.rollout()
        calls["policy"].clear()  # its passes in generation
        stats = run.update(ro)
        for hook in hooks:
            hook.remove()
        results.append((ro, calls, stats, {n: p.detach().clone() for n, p in run.m.policy.named_parameters()},
                        [p.detach().clone() for p in run.m.critic_parameters()]))
    (a, calls_a, sa, pa, ca), (b, calls_b, sb, pb, cb) = results
    assert torch.equal(a.input_ids, b.input_ids)  # the same samples, scored alike
    for field in ("ref_logprobs", "values", "advantages", "returns"):
        assert torch.allclose(getattr(a, field), getattr(b, field), atol=1e-5), field
    # padded: the reference's two scoring passes, the policy's two update passes (its rollout log-probs are the
    # engine's); packed: fewer rows, no attention mask
    assert calls_a == {"reference": [(4, True), (4, True)], "policy": [(4, True), (4, True)]}
    for name, passes in calls_b.items():
        assert len(passes) == 2 and all(not masked for _, masked in passes) and sum(r for r, _ in passes) < 8, name
    assert all(torch.allclose(pa[n], pb[n], atol=1e-5) for n in pa)
    assert not all(torch.equal(pa[n], run.m.reference.state_dict()[n]) for n in pa)  # and the step moved them
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ca, cb))
    for key in ("policy/loss", "policy/approxkl", "policy/entropy", "val/loss"):
        assert sb[key] == pytest.approx(sa[key], abs=1e-5), key


@pytest.mark.parametrize("setting,key", [
    ({"generation": {"do_sample": True, "top_p": 0.9}}, "ppo.generation.top_p"),
    ({"kl": {"estimator": "k3"}}, "ppo.kl.estimator"),
    ({"lora": {"enabled": True, "dropout": 0.05}}, "ppo.lora.dropout"),
])
def test_settings_wrong_for_ppo_are_refused_at_parse_time(setting, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(PPOConfig, setting)


def test_data_margin_without_a_margin_weight_is_refused():
    with pytest.raises(ConfigError, match="loss.use_data_margin"):
        from_dict(RewardConfig, {"loss": {"use_data_margin": True}})


def test_reserved_pad_token_is_used_without_growing_the_embeddings(tiny_llama3):
    model, tok = load_causal_lm(tiny_llama3)
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert tok.pad_token_id not in stop_ids(tok)


def test_gemma2_loads_with_the_default_attention(tiny_gemma2):
    model, _ = load_causal_lm(tiny_gemma2)  # transformers refuses sdpa for it: "auto" lets it choose
    assert model.config._attn_implementation == "eager"


def test_lora_critic_trains_adapters_and_its_head_only(tiny_llama3, prompts, tmp_path):
    rm_dir = save_rm(tiny_llama3, tmp_path / "rm", stats=(0.0, 1.0))
    run = RLRun(ppo_cfg(tiny_llama3, rm_dir, prompts, tmp_path / "out", lora={"enabled": True}))
    trainable = [n for n, p in run.m.critic.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    assert sum(p.numel() for n, p in run.m.critic.named_parameters() if p.requires_grad) < \
        sum(p.numel() for p in run.m.critic.parameters()) / 4
    ro, _ = run.rollout()
    before = {n: p.detach().clone() for n, p in run.m.critic.named_parameters()}
    run.update(ro)
    moved = {n for n, p in run.m.critic.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= set(trainable)
