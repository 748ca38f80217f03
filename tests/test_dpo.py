"""DPO: the losses by hand, the reference log-probs against a fresh forward, the shared-prompt batch, and training
on a tiny model that raises the held-out margin (full weights and LoRA)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rlhf.algos.core import position_ids_from_mask, token_logprobs
from rlhf.algos.dpo import dpo_loss
from rlhf.cli import main
from rlhf.config import DataConfig, DPOConfig
from rlhf.configlib import ConfigError, from_dict
from rlhf.data.io import PreferenceExample
from rlhf.models.loading import load_causal_lm
from rlhf.report.metrics import read_metrics
from rlhf.stages.dpo import (
    add_reference_logprobs,
    collate_dpo,
    encode_dpo_pair,
    encode_dpo_pairs,
    response_logprobs,
    run_dpo,
)
from tests.test_reward import GOOD, prompt_of, separable_rows, write_rows


def test_dpo_loss_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))
    # h = (-1 + 2) - (-3 + 2) = 2; beta 0.5: -log sigmoid(1) = log(1 + e^-1).
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)))
    assert stats["rewards/chosen"].item() == pytest.approx(0.5) and stats["rewards/rejected"].item() == pytest.approx(-0.5)
    assert stats["rewards/margins"].item() == pytest.approx(1.0) and stats["rewards/accuracies"].item() == 1.0
    # cDPO with eps = 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1).
    smooth, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert smooth.item() == pytest.approx(0.9 * math.log1p(math.exp(-1)) + 0.1 * math.log1p(math.exp(1)))
    # IPO: (h - 1 / (2 beta))^2 = (2 - 1)^2.
    assert dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")[0].item() == pytest.approx(1.0)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.1)[0].backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises log pi(chosen), lowers log pi(rejected)


def example(prompt: str, chosen: str, rejected: str) -> PreferenceExample:
    return PreferenceExample(prompt=prompt_of(prompt), chosen=chosen, rejected=rejected)


def test_reference_logprobs_equal_a_fresh_forward_of_the_frozen_model(tiny_llama):
    model, tok = load_causal_lm(tiny_llama)
    rows = separable_rows(6)
    pairs, _ = encode_dpo_pairs(tok, [example(r["prompt"], r["chosen"], r["rejected"]) for r in rows],
                                DataConfig(max_length=64))
    add_reference_logprobs(model, pairs, tok.pad_token_id, batch_size=4, share_prompt=True, device=torch.device("cpu"))
    with torch.no_grad():
        for p in pairs:  # one unpadded sequence at a time, scored the plain way: every position's logits, shifted
            for response, ref in ((p.chosen, p.ref_chosen), (p.rejected, p.ref_rejected)):
                ids = torch.tensor([p.prompt + response])
                labels = ids.clone()
                labels[:, : len(p.prompt)] = -100
                mask = torch.ones_like(ids)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
                assert token_logprobs(logits, labels).sum().item() == pytest.approx(ref, abs=1e-4)


def test_shared_prompt_batch_equals_the_full_sequences_and_their_gradients(tiny_llama):
    model, tok = load_causal_lm(tiny_llama)
    rows = separable_rows(5)  # prompts of different lengths: left padding in the batch
    pairs, _ = encode_dpo_pairs(tok, [example(r["prompt"], r["chosen"], r["rejected"]) for r in rows],
                                DataConfig(max_length=64))
    assert len({len(p.prompt) for p in pairs}) > 1
    batch = collate_dpo(pairs, tok.pad_token_id)
    grads = []
    for share in (True, False):
        model.zero_grad()
        lp = response_logprobs(model, batch, share)
        lp.sum().backward()
        grads.append((lp.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-4)


def test_overlong_pairs_lose_the_same_prompt_tokens_or_are_named(tiny_llama):
    _, tok = load_causal_lm(tiny_llama)
    ex = example("What is 1 + 2? " * 8, "1 + 2 = 3.", "1 + 2 = 4, or so I have heard from many people.")
    full = encode_dpo_pair(tok, ex, DataConfig(max_length=256))
    cut = encode_dpo_pair(tok, ex, DataConfig(max_length=len(full.rejected) + 5))
    assert cut.prompt == full.prompt[-5:] and cut.chosen == full.chosen and cut.rejected == full.rejected
    assert encode_dpo_pair(tok, ex, DataConfig(max_length=len(full.rejected))) is None
    from rlhf.data.chat import TooLong

    with pytest.raises(TooLong) as e:
        encode_dpo_pair(tok, ex, DataConfig(max_length=len(full.rejected) + 5, truncation="error"))
    assert e.value.field == "prompt"


def dpo_config(policy, train_file, val_file, out, **over) -> DPOConfig:
    base = {"policy": str(policy), "out": str(out), "beta": 0.1,
            "data": {"path": str(train_file), "val_path": str(val_file), "max_length": 64},
            "train": {"max_steps": 16, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.0, "log_every": 4}}
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return from_dict(DPOConfig, base)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_raises_the_held_out_margin_and_writes_a_model_folder(loss_type, tiny_llama, tmp_path):
    train = write_rows(tmp_path / "train.jsonl", separable_rows(48))
    val = write_rows(tmp_path / "val.jsonl", separable_rows(16, offset=5))
    out = tmp_path / "dpo"
    summary = run_dpo(dpo_config(tiny_llama, train, val, out, loss_type=loss_type))
    assert summary["initial"]["val/rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # the policy is its reference
    assert summary["final"]["val/rewards/margins"] > 0.05
    assert summary["final"]["val/rewards/accuracies"] > 0.8 > summary["initial"]["val/rewards/accuracies"]
    rows = read_metrics(out / "metrics.jsonl")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "train/loss"):
        assert any(key in r for r in rows), key
    before, after = load_file(str(tiny_llama / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    model, _ = load_causal_lm(out)  # an ordinary causal LM folder
    assert json.loads((out / "stage.json").read_text())["stage"] == "dpo"


def test_lora_dpo_trains_the_adapters_only(tiny_llama, tmp_path):
    train = write_rows(tmp_path / "train.jsonl", separable_rows(32))
    val = write_rows(tmp_path / "val.jsonl", separable_rows(8, offset=5))
    summary = run_dpo(dpo_config(tiny_llama, train, val, tmp_path / "dpo", lora={"enabled": True, "r": 4},
                                 train={"lr": 1e-2}))
    # The reference is the same weights with the adapters off: the margin starts at 0, and training moves it.
    assert summary["initial"]["val/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert summary["final"]["val/rewards/margins"] > 0.05
    before, after = load_file(str(tiny_llama / "model.safetensors")), load_file(str(tmp_path / "dpo" / "model.safetensors"))
    adapted = {k for k in before if "q_proj" in k or "v_proj" in k}
    assert all(torch.equal(before[k], after[k]) for k in before if k not in adapted)  # merged: only targets moved
    assert all(not torch.equal(before[k], after[k]) for k in adapted)


def test_dpo_reads_preference_files_as_rm_does(tiny_llama, tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_text(f"{json.dumps(GOOD)}\n" + json.dumps({"prompt": "What is 1 + 1?", "chosen": "2."}) + "\n")
    code = main(["dpo", "--policy", str(tiny_llama), "--data.path", str(data), "--out", str(tmp_path / "dpo")])
    err = capsys.readouterr().err
    assert code == 2 and "rlhf dpo: error:" in err and f"{data}:2:" in err and "'rejected'" in err
    assert not (tmp_path / "dpo").exists()
    with pytest.raises(ConfigError, match="label_smoothing applies to loss_type sigmoid"):
        from_dict(DPOConfig, {"loss_type": "ipo", "label_smoothing": 0.1})
