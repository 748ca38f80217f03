"""The PPO stage on tiny models: log-prob consistency, learning a programmatic reward, LoRA, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from rlhf.algos.core import position_ids_from_mask, token_logprobs
from rlhf.config import PPOConfig
from rlhf.configlib import ConfigError, from_dict
from rlhf.models.loading import load_causal_lm
from rlhf.report.metrics import read_metrics
from rlhf.models.policy import response_logits
from rlhf.rl import experience
from rlhf.rl.types import RewardComponent
from rlhf.stages.ppo import RLRun, run_ppo

def ppo_config(policy, rm, prompts, out, **over) -> PPOConfig:
    base = dict(policy=str(policy), reward_model=str(rm), prompts=str(prompts), out=str(out), iterations=4,
                batch_size=8, mini_batch_size=4, ppo_epochs=2, lr=1e-3, missing_eos_score=None,
                generation=dict(do_sample=True, max_new_tokens=8, batch_size=8), kl=dict(coef=0.01, adaptive=False))
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return from_dict(PPOConfig, base)


def test_rollout_logprobs_equal_a_fresh_forward_and_first_ratio_is_one(tiny_llama, flat_rm, prompt_file, tmp_path):
    run = RLRun(ppo_config(tiny_llama, flat_rm, prompt_file, tmp_path / "out", generation={"temperature": 0.7}))
    ro, _ = run.rollout()
    # A fresh full forward of the unchanged policy, read the plain way: logits of every position, shifted.
    model = run.m.policy
    logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                   position_ids=position_ids_from_mask(ro.attention_mask)).logits  # (B, T, V)
    labels = ro.input_ids.masked_fill(ro.attention_mask == 0, -100)
    fresh = token_logprobs(logits, labels, temperature=0.7)[:, ro.n_prompt - 1 :] * ro.response_mask  # (B, A)
    assert torch.allclose(fresh, ro.logprobs, atol=1e-5)
    # The reference is a copy of the same weights: KL 0, and a first minibatch with ratio exactly 1.
    assert torch.allclose(ro.ref_logprobs, ro.logprobs, atol=1e-6)
    stats = run.learner.minibatch(ro, torch.arange(4))
    assert stats["policy/approxkl"] == pytest.approx(0.0, abs=1e-12)
    assert stats["policy/clipfrac"] == 0.0
    # Responses are cut after the first EOS and the mask covers a prefix of each row.
    m = ro.response_mask
    assert ((m[:, 1:] <= m[:, :-1]).all())
    assert (ro.input_ids[:, ro.n_prompt :][m == 0] == run.m.tok.pad_token_id).all()


def test_a_value_head_reads_the_engines_hidden_states_without_a_policy_forward(tiny_llama, flat_rm, prompt_file,
                                                                                 tmp_path, monkeypatch):
    run = RLRun(ppo_config(tiny_llama, flat_rm, prompt_file, tmp_path / "out", critic="policy"))
    torch.nn.init.normal_(run.m.value_head.score.weight)  # zero-initialised: give it values to compare
    calls = []
    monkeypatch.setattr(experience, "response_logits", lambda *a, **k: calls.append(1) or response_logits(*a, **k))
    ro, _ = run.rollout()
    assert calls == []  # log-probs, entropies and the value head's input all came from the engine
    with torch.no_grad():
        _, hidden = response_logits(run.m.policy, ro.input_ids, ro.attention_mask, ro.n_prompt, 1.0, with_hidden=True)
        want = run.m.value_head(hidden) * ro.response_mask
    assert want.abs().max() > 0.1 and torch.allclose(ro.values, want, atol=1e-5)


def lowercase_share(prompts: list[str], responses: list[str]) -> list[float]:
    """The programmatic reward: the share of a response's characters that are ASCII lowercase letters."""
    return [sum(c.isascii() and c.islower() for c in r) / max(len(r), 1) for r in responses]


def test_ppo_raises_a_programmatic_reward_and_changes_the_weights(tiny_llama, flat_rm, prompt_file, tmp_path):
    cfg = ppo_config(tiny_llama, flat_rm, prompt_file, tmp_path / "out", iterations=24, batch_size=16,
                     mini_batch_size=8, generation={"max_new_tokens": 6, "batch_size": 16})
    summary = run_ppo(cfg, [RewardComponent("lowercase", lowercase_share, weight=1.0)])
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert len(rows) == 24 and summary["iterations"] == 24
    for key in ("objective/scores", "objective/kl", "objective/kl_coef", "objective/entropy", "policy/approxkl",
                "policy/clipfrac", "policy/loss", "val/loss", "val/clipfrac", "val/explained_variance",
                "response/length", "response/eos_rate", "time/rollout", "time/update", "lr"):
        assert key in rows[-1], key
    reward = [r["reward/lowercase"] for r in rows]
    # One iteration's share of lowercase words varies by about 0.04 (16 samples), so a mean over 4 iterations
    # by about 0.02 and the difference of two such means by about 0.03: a rise of 0.08 is well past noise.
    assert sum(reward[-4:]) / 4 > sum(reward[:4]) / 4 + 0.08
    assert rows[-1]["objective/kl"] > 0
    before = load_file(str(tiny_llama / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "out" / "stage.json").read_text())["stage"] == "ppo"


@pytest.mark.parametrize("algorithm, k", [("grpo", 4), ("rloo", 4), ("reinforce_pp", 1)])
def test_critic_free_algorithms_raise_a_programmatic_reward(algorithm, k, tiny_llama, flat_rm, prompt_file, tmp_path):
    cfg = ppo_config(tiny_llama, flat_rm, prompt_file, tmp_path / "out", algorithm=algorithm, num_generations=k,
                     iterations=24, batch_size=16, mini_batch_size=8, generation={"max_new_tokens": 6, "batch_size": 16})
    summary = run_ppo(cfg, [RewardComponent("lowercase", lowercase_share, weight=1.0)])
    rows = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert summary["algorithm"] == algorithm and len(rows) == 24
    assert "val/loss" not in rows[-1] and ("policy/kl_loss" in rows[-1]) == (algorithm == "grpo")
    reward = [r["reward/lowercase"] for r in rows]
    # The same margin as PPO's test above: past the noise of two 4-iteration means.
    assert sum(reward[-4:]) / 4 > sum(reward[:4]) / 4 + 0.08
    before = load_file(str(tiny_llama / "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    state = load_file(str(tmp_path / "out" / "checkpoint-24" / "trainable.safetensors"))
    assert not any(name.startswith("critic.") for name in state)  # no critic trained or saved


def test_grouped_rollout_holds_k_samples_of_each_prompt_and_no_critic(tiny_llama, flat_rm, prompt_file, tmp_path):
    run = RLRun(ppo_config(tiny_llama, flat_rm, prompt_file, tmp_path / "out", algorithm="grpo", num_generations=4,
                           generation={"temperature": 1.0}), [RewardComponent("lowercase", lowercase_share, weight=1.0)])
    assert run.m.critic is None and run.m.value_head is None and run.learner.critic_opt is None
    ro, _ = run.rollout()
    assert ro.prompts == [run.prompts.texts[i] for i in run.prompts.batch(0, 2) for _ in range(4)]
    assert len(set(ro.responses)) > 2  # K different samples, not K copies of one
    # Each sample's advantage is its group-normalised score on every response token.
    per_sample = ro.advantages.sum(1) / ro.response_mask.sum(1)
    assert torch.allclose(per_sample.view(2, 4).mean(1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(ro.advantages, per_sample[:, None] * ro.response_mask)
    stats = run.learner.minibatch(ro, torch.arange(4), run.kl_ctl.value)
    assert stats["policy/kl_loss"] == pytest.approx(0.0, abs=1e-6)  # the reference is the same weights


def test_grouped_algorithms_need_several_samples_per_prompt(tiny_llama, flat_rm, prompt_file, tmp_path):
    with pytest.raises(ConfigError, match="num_generations: rloo needs K >= 2"):
        ppo_config(tiny_llama, flat_rm, prompt_file, tmp_path / "out", algorithm="rloo")
    with pytest.raises(ConfigError, match="multiple of ppo.num_generations"):
        ppo_config(tiny_llama, flat_rm, prompt_file, tmp_path / "out", algorithm="grpo", num_generations=3)


def test_lora_ppo_keeps_base_weights_and_has_no_reference_copy(tiny_llama, flat_rm, prompt_file, tmp_path):
    cfg = ppo_config(tiny_llama, flat_rm, prompt_file, tmp_path / "out", critic="policy", lr=1e-2,
                     lora={"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]})
    run = RLRun(cfg, [RewardComponent("lowercase", lowercase_share, weight=1.0)])
    assert run.m.reference is None and run.m.critic is None  # one causal LM in memory: the policy
    base = {n: p.detach().clone() for n, p in run.m.policy.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in run.m.policy.named_parameters() if "lora_" in n}
    for _ in range(3):
        _, ro = run.step()
    assert all(torch.equal(p, base[n]) for n, p in run.m.policy.named_parameters() if n in base)
    assert any(not torch.equal(p, lora[n]) for n, p in run.m.policy.named_parameters() if n in lora)
    assert run.m.value_head.score.weight.abs().sum() > 0
    # The reference (the policy with adapters disabled) is still the initial model, while the policy moved.
    initial, _ = load_causal_lm(tiny_llama)
    ids, mask, p = ro.input_ids, ro.attention_mask, ro.n_prompt
    with torch.no_grad():
        want = response_logits(initial, ids, mask, p, 1.0)[0]
        ref = run.m.reference_logits(ids, mask, p, 1.0)
        now = response_logits(run.m.policy, ids, mask, p, 1.0)[0]
    assert torch.allclose(ref, want, atol=1e-5)
    assert not torch.allclose(now, want, atol=1e-3)


@pytest.mark.parametrize("lora", [False, True])
def test_a_reference_other_than_the_policy_is_the_one_the_kl_reads(lora, tiny_llama, flat_rm, prompt_file, tmp_path):
    """ppo.reference (an SFT model while the policy continues from an earlier RL run): the rollout's reference
    log-probs are that model's, with or without LoRA on the policy."""
    other, tok = load_causal_lm(tiny_llama)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other.save_pretrained(tmp_path / "ref")
    tok.save_pretrained(tmp_path / "ref")
    extra = {"lora": {"enabled": True, "r": 4, "target_modules": ["q_proj", "v_proj"]}, "critic": "policy"} if lora else {}
    run = RLRun(ppo_config(tiny_llama, flat_rm, prompt_file, tmp_path / "out", reference=str(tmp_path / "ref"), **extra))
    ro, _ = run.rollout()
    with torch.no_grad():
        logits, _ = response_logits(other, ro.input_ids, ro.attention_mask, ro.n_prompt, 1.0)  # (B, A, V)
    tokens = ro.input_ids[:, ro.n_prompt :].unsqueeze(-1)  # (B, A, 1)
    want = torch.log_softmax(logits, dim=-1).gather(-1, tokens).squeeze(-1) * ro.response_mask  # (B, A)
    assert torch.allclose(ro.ref_logprobs * ro.response_mask, want, atol=1e-5)
    assert (ro.ref_logprobs - ro.logprobs).abs().max() > 1e-2  # not the policy's own: the KL starts above 0


def test_out_with_checkpoints_needs_resume(tiny_llama, flat_rm, prompt_file, tmp_path):
    cfg = ppo_config(tiny_llama, flat_rm, prompt_file, tmp_path / "out", iterations=2)
    run_ppo(cfg)
    with pytest.raises(ConfigError, match="--resume"):
        run_ppo(cfg)


def test_resume_refuses_another_run_and_names_what_differs(tiny_llama, flat_rm, prompt_file, tmp_path):
    out = tmp_path / "out"
    run_ppo(ppo_config(tiny_llama, flat_rm, prompt_file, out, iterations=2))
    other_prompts = tmp_path / "other.jsonl"
    other_prompts.write_text(prompt_file.read_text().replace("Alice", "Bob"))
    with pytest.raises(ConfigError, match=r"lr: 0\.001 -> 0\.002.*--resume_changed"):
        run_ppo(ppo_config(tiny_llama, flat_rm, prompt_file, out, iterations=3, lr=2e-3, resume=True))
    with pytest.raises(ConfigError, match=r"prompts: .*other\.jsonl \(other content\)"):
        run_ppo(ppo_config(tiny_llama, flat_rm, other_prompts, out, iterations=3, resume=True))
    assert not (out / "checkpoint-3").exists()
    # More iterations of the same run continue; with --resume_changed a changed setting is accepted (and logged).
    assert run_ppo(ppo_config(tiny_llama, flat_rm, prompt_file, out, iterations=3, resume=True))["iterations"] == 3
    changed = ppo_config(tiny_llama, flat_rm, prompt_file, out, iterations=4, lr=2e-3, resume=True, resume_changed=True)
    assert run_ppo(changed)["iterations"] == 4


def _ppo_cmd(policy, rm, prompts, out, *extra) -> list[str]:
    return [sys.executable, "-m", "rlhf.cli", "ppo", "--policy", str(policy), "--reward_model", str(rm),
            "--prompts", str(prompts), "--out", str(out), "--iterations", "8", "--save_every", "2",
            "--batch_size", "8", "--mini_batch_size", "4", "--lr", "1e-3", "--generation.max_new_tokens", "8",
            "--generation.batch_size", "8", "--kl.coef", "0.05", "--kl.target", "0.5", "--kl.horizon", "50", *extra]


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_resume_after_a_kill_reproduces_the_uninterrupted_run(algorithm, tiny_llama, flat_rm, prompt_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ["--algorithm", algorithm, "--num_generations", "4" if algorithm == "grpo" else "1"]
    straight = subprocess.run(_ppo_cmd(tiny_llama, flat_rm, prompt_file, tmp_path / "a", *extra), env=env,
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    proc = subprocess.Popen(_ppo_cmd(tiny_llama, flat_rm, prompt_file, tmp_path / "b", *extra), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "b" / "checkpoint-4" / "state.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "stage.json").exists()
    resumed = subprocess.run(_ppo_cmd(tiny_llama, flat_rm, prompt_file, tmp_path / "b", *extra, "--resume"), env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert not list((tmp_path / "b").glob(".*.tmp-*"))  # whatever the kill left half-written was cleaned up
    a, b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))
    for key in ("objective/scores", "objective/kl", "objective/kl_coef", "policy/loss",
                "val/loss" if algorithm == "ppo" else "policy/kl_loss"):
        assert b[-1][key] == pytest.approx(a[-1][key], rel=1e-4, abs=1e-6), key
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    stage_a, stage_b = (json.loads((tmp_path / x / "stage.json").read_text()) for x in "ab")
    assert stage_b["resumed_from"] == 4
    # The monitors carry on from the checkpoint: the same eight iterations seen, the same final state.
    assert stage_a["hacking"]["iterations"] == stage_b["hacking"]["iterations"] == 8
    assert stage_b["hacking"]["detectors"] == stage_a["hacking"]["detectors"]
    assert stage_b["hacking"]["last"]["mean_length"] == pytest.approx(stage_a["hacking"]["last"]["mean_length"])


def test_steered_rollouts_never_write_a_banned_word(tiny_llama, flat_rm, prompt_file, tmp_path):
    from collections import Counter

    def run(out, **over):
        return RLRun(ppo_config(tiny_llama, flat_rm, prompt_file, tmp_path / out, batch_size=16,
                                 generation={"batch_size": 16, "max_new_tokens": 12}, **over))

    def written(ro) -> list[int]:
        return ro.input_ids[:, ro.n_prompt:][ro.response_mask == 1].tolist()

    plain = run("plain")
    ro, _ = plain.rollout()
    tok = plain.m.tok

    def single_tokens(word: str) -> set[int]:
        """The token ids of the word's one-token spellings (start of reply or after a space, as it is or capitalised)."""
        ids = [tok(v, add_special_tokens=False)["input_ids"] for v in (word, " " + word, word.capitalize(), " " + word.capitalize())]
        return {i[0] for i in ids if len(i) == 1}

    # The unsteered policy's favourite word that it writes as one token; banning the word bans that token.
    word, banned = next((w, b) for t, _ in Counter(written(ro)).most_common()
                        if (w := tok.decode([t]).strip()).isalpha() and t in (b := single_tokens(w)))
    constitution = tmp_path / "c.yaml"
    constitution.write_text(f"principles:\n  - id: no_word\n    description: d\n    checks: [{{phrases: [{word}]}}]\n")
    ro, _ = run("steered", safety={"constitution": str(constitution), "steer": True}).rollout()
    assert not set(written(ro)) & banned
