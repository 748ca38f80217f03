"""Best-of-n: the analytic KL, the pick, and a run on a tiny policy and reward model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf.config import BoNConfig, EvalConfig
from rlhf.configlib import ConfigError, from_dict
from rlhf.evaluation.best_of_n import best_of_n, best_of_n_kl, rm_scores, run_bon, sample_rounds
from rlhf.evaluation.policy import eval_prompts
from rlhf.models.loading import load_causal_lm
from rlhf.models.reward import RewardModel, load_reward_backbone
from rlhf.rollout import generate


def test_analytic_kl_and_the_pick():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9], [float("nan"), -1.0, 2.0, 2.0]])
    assert best_of_n(scores, 1).tolist() == [0, 0]
    assert best_of_n(scores, 2).tolist() == [1, 1]  # an unscorable sample ranks last
    assert best_of_n(scores, 4).tolist() == [3, 2]  # the first one on ties


@pytest.fixture(scope="module")
def random_rm(tiny_llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    torch.manual_seed(3)
    model, tok = load_reward_backbone(tiny_llama)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # a reward model with opinions
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def bon_config(policy, rm, out, **over) -> BoNConfig:
    return from_dict(BoNConfig, {"policy": str(policy), "reward_model": str(rm), "out": str(out), "n_prompts": 12,
                                 "ns": [1, 2, 4], "seed": 0, "sampling_seed": 5, "generation": {"do_sample": True, "max_new_tokens": 6},
                                 **over})


def test_best_of_one_is_plain_sampling_and_more_never_scores_lower(tiny_llama, random_rm, tmp_path):
    cfg = bon_config(tiny_llama, random_rm, tmp_path / "bon.json")
    prompts = eval_prompts(EvalConfig(n_prompts=cfg.n_prompts, seed=cfg.seed))
    rounds = sample_rounds(cfg, prompts, 4)
    model, tok = load_causal_lm(tiny_llama)
    plain = generate(model, tok, [p["prompt"] for p in prompts], cfg.generation, seed=cfg.sampling_seed)
    assert [g.text for g in rounds[0]] == [g.text for g in plain]
    assert any(a.text != b.text for a, b in zip(rounds[0], rounds[1]))  # the other rounds are other draws
    scores = rm_scores(cfg, RewardModel.load(random_rm), prompts, rounds)  # (P, N)
    rows = torch.arange(len(prompts))
    for n in (2, 4):
        assert (scores[rows, best_of_n(scores, n)] >= scores[:, 0]).all()
    result = run_bon(cfg)
    curve = result["curve"]
    assert [r["n"] for r in curve] == [1, 2, 4]
    assert curve[0]["kl"] == 0 and curve[2]["kl"] == pytest.approx(math.log(4) - 0.75)
    assert curve[0]["rm_score"] == pytest.approx(scores[:, 0].mean().item(), abs=1e-5)
    assert curve[0]["rm_score"] < curve[1]["rm_score"] <= curve[2]["rm_score"]  # a random RM still has a favourite
    assert all(r["gold_score"] is not None for r in curve)
    samples = [json.loads(line) for line in (tmp_path / "bon.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and all("rm_score" in s for s in samples)


def test_list_flags_of_numbers_are_numbers_and_of_names_stay_names():
    from rlhf.cli import build_parser
    from rlhf.configlib import build_config
    from rlhf.config import DPOConfig

    ns = build_parser().parse_args(["bon", "--ns", "1", "4", "16"])
    assert build_config(BoNConfig, ns).ns == [1, 4, 16]
    ns = build_parser().parse_args(["dpo", "--exclude_annotators", "no", "null"])  # names YAML would read as false, None
    assert build_config(DPOConfig, ns).exclude_annotators == ["no", "null"]


def test_best_of_n_needs_sampling():
    with pytest.raises(ConfigError, match="do_sample"):
        from_dict(BoNConfig, {"generation": {"do_sample": False}})
