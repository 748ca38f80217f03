"""The critic-free advantage estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++) and GRPO's KL term, against hand-computed
values."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.algos.advantages import (
    group_advantages,
    reinforce_pp_advantages,
    reward_to_go,
    rloo_advantages,
    sequence_to_tokens,
)
from rlhf.rl.algorithms import k3_kl_loss


def test_grpo_normalises_within_each_group():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two prompts, K = 3
    # Group 1: mean 2, Bessel std 1 -> (-1, 0, 1) / (1 + eps); group 2: all equal -> 0 (it teaches nothing).
    got = group_advantages(scores, 3)
    assert torch.allclose(got, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / (1 + 1e-4))
    # Dr. GRPO: the mean only. Group (0, 4): mean 2 -> (-2, 2), where GRPO divides by std 2.828.
    dr = group_advantages(torch.tensor([0.0, 4.0]), 2, scale=False)
    assert dr.tolist() == [-2.0, 2.0]
    assert group_advantages(torch.tensor([0.0, 4.0]), 2)[1].item() == pytest.approx(2 / (math.sqrt(8) + 1e-4))


def test_rloo_baseline_leaves_the_sample_out():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 10.0, 20.0])
    # Sample 1: 1 - (2 + 3) / 2 = -1.5; sample 2: 2 - 2 = 0; sample 3: 3 - 1.5 = 1.5; then 0 - 15, 10 - 10, 20 - 5.
    assert rloo_advantages(rewards, 3).tolist() == [-1.5, 0.0, 1.5, -15.0, 0.0, 15.0]


def test_group_estimators_refuse_a_batch_of_partial_groups():
    with pytest.raises(ValueError, match="K=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="K >= 2"):
        rloo_advantages(torch.zeros(4), 1)


def test_reward_to_go_and_reinforce_pp_whitening():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0], [-1.0, 4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])  # the 9 is padding: never counted
    assert reward_to_go(rewards, mask).tolist() == [[6.0, 5.0, 3.0, 0.0], [3.0, 4.0, 0.0, 0.0]]
    # gamma 0.5: 3; 2 + 1.5 = 3.5; 1 + 1.75 = 2.75.
    assert reward_to_go(rewards, mask, gamma=0.5)[0].tolist() == [2.75, 3.5, 3.0, 0.0]
    # Whitened over the five real tokens of the whole batch (6, 5, 3, 3, 4): mean 4.2, Bessel var 1.7.
    got = reinforce_pp_advantages(rewards, mask)
    want = (torch.tensor([6.0, 5.0, 3.0, 3.0, 4.0]) - 4.2) / math.sqrt(1.7 + 1e-8)
    assert torch.allclose(got[mask == 1], want, atol=1e-6)
    assert (got[mask == 0] == 0).all()


def test_sequence_advantages_reach_every_response_token_only():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert sequence_to_tokens(torch.tensor([2.0, -1.0]), mask).tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]


def test_grpo_k3_term():
    # log p = -1, log p_ref = -2 on the one real token: r = p_ref / p = e^-1, k3 = r - 1 - log r = e^-1.
    logprobs, ref = torch.tensor([[-1.0, -5.0]], requires_grad=True), torch.tensor([[-2.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0]])
    loss = k3_kl_loss(logprobs, ref, mask, kl_coef=0.5)
    assert loss.item() == pytest.approx(0.5 * math.exp(-1))
    loss.backward()  # d/dlogp of (e^(ref - logp) - 1 + logp - ref) = 1 - e^(ref - logp)
    assert torch.allclose(logprobs.grad, torch.tensor([[0.5 * (1 - math.exp(-1)), 0.0]]))
