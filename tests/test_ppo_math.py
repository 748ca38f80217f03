"""The PPO maths against plain loops and hand-computed values: GAE, KL estimators, controllers, losses."""

import math

import pytest
import torch

from rlhf.algos.ppo import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    per_token_rewards,
    ppo_policy_loss,
    sequence_kl,
    value_loss,
    whiten,
)


def gae_loop(rewards, values, lengths, gamma, lam):
    """GAE written the slow way: one sample and one token at a time, straight from the paper."""
    adv = [[0.0] * len(r) for r in rewards]
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            last = delta + gamma * lam * last
            adv[b][t] = last
    ret = [[adv[b][t] + values[b][t] if t < n else 0.0 for t in range(len(rewards[b]))] for b, n in enumerate(lengths)]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_vectorised_gae_equals_plain_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 6]
    rewards, values = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    # Garbage beyond each response must not leak in: the loop never reads it.
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    want_adv, want_ret = gae_loop(rewards.tolist(), values.tolist(), lengths, gamma, lam)
    assert torch.allclose(adv, torch.tensor(want_adv), atol=1e-5)
    assert torch.allclose(ret, torch.tensor(want_ret), atol=1e-5)


def test_gae_by_hand():
    # Two tokens, gamma 1, lambda 0.5: delta_1 = 1 - 0.5 = 0.5; delta_0 = 0 + 0.5 - 0.2 = 0.3;
    # A_1 = 0.5; A_0 = 0.3 + 0.5 * 0.5 = 0.55.
    adv, ret = compute_gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.5]]), torch.ones(1, 2), 1.0, 0.5)
    assert adv[0].tolist() == pytest.approx([0.55, 0.5])
    assert ret[0].tolist() == pytest.approx([0.75, 1.0])


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    assert kl_penalty(logp, ref, "k1")[0].tolist() == pytest.approx([0.5, -1.0])
    assert kl_penalty(logp, ref, "k2")[0].tolist() == pytest.approx([0.125, 0.5])
    # k3 = (r - 1) - log r with r = p_ref / p = exp(ref - logp)
    want = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]
    assert kl_penalty(logp, ref, "k3")[0].tolist() == pytest.approx(want)
    assert (kl_penalty(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")


def test_kl_estimators_are_unbiased_on_samples():
    # Sample from p; E_p[k1] and E_p[k3] both equal KL(p || q) computed exactly.
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.3, 0.3, 0.4])
    exact = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, logq = p.log()[x], q.log()[x]
    assert kl_penalty(logp, logq, "k1").mean().item() == pytest.approx(exact, abs=0.01)
    assert kl_penalty(logp, logq, "k3").mean().item() == pytest.approx(exact, abs=0.01)


def test_adaptive_controller_by_hand():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=1000)  # error = 9/6 - 1 = 0.5, clipped to 0.2 -> x(1 + 0.02)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(current_kl=5.4, n_steps=1000)  # error = -0.1 -> x(1 - 0.01)
    assert ctl.value == pytest.approx(0.102 * 0.99)
    ctl.update(current_kl=0.0, n_steps=500)  # error = -1, clipped to -0.2 -> x(1 - 0.01)
    assert ctl.value == pytest.approx(0.102 * 0.99 * 0.99)
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    restored = AdaptiveKLController(0.5, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_per_token_rewards_put_the_score_on_the_last_real_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0]])
    r = per_token_rewards(torch.tensor([1.0, -2.0]), kl, 0.5, mask)
    assert r[0].tolist() == pytest.approx([-0.05, -0.1, 1.0 - 0.15, 0.0])
    assert r[1].tolist() == pytest.approx([-2.0 - 0.25, 0.0, 0.0, 0.0])
    assert sequence_kl(kl, mask).tolist() == pytest.approx([0.6, 0.5])


def test_policy_loss_by_hand_including_clipped_cases():
    old = torch.zeros(1, 4)
    # ratios e^0.5 = 1.65 and e^-0.5 = 0.61, with positive and negative advantages; cliprange 0.2
    new = torch.tensor([[0.5, 0.5, -0.5, -0.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, stats = ppo_policy_loss(new, old, adv, torch.ones(1, 4), cliprange=0.2)
    r_hi, r_lo = math.exp(0.5), math.exp(-0.5)
    # token 0: A>0, ratio high -> clipped 1.2 used: -1.2. token 1: A<0, ratio high -> unclipped: +1.65.
    # token 2: A>0, ratio low -> unclipped: -0.61. token 3: A<0, ratio low -> clipped 0.8: +0.8.
    per_token = [-1.2, r_hi, -r_lo, 0.8]
    assert loss.item() == pytest.approx(sum(per_token) / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["approxkl"].item() == pytest.approx(0.5 * 0.25)


def test_policy_loss_gradient_is_zero_where_clipped_and_ignores_padding():
    new = torch.tensor([[0.5, 0.0, 3.0]], requires_grad=True)
    loss, _ = ppo_policy_loss(new, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[1, 1, 0]]), 0.2)
    loss.backward()
    assert new.grad[0, 0].item() == 0.0  # clipped: no push further
    assert new.grad[0, 1].item() == pytest.approx(-0.5)  # -A * ratio / 2 tokens
    assert new.grad[0, 2].item() == 0.0  # padding
    assert loss.item() == pytest.approx((-1.2 - 1.0) / 2)


def test_value_loss_by_hand_including_clipped_cases():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    new = torch.tensor([[0.5, 0.1, -0.5]])
    ret = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = value_loss(new, old, ret, torch.ones(1, 3), cliprange_value=0.2)
    # token 0: unclipped (0.5-1)^2 = 0.25, clipped (0.2-1)^2 = 0.64 -> 0.64 (clipped used)
    # token 1: inside the range: (0.1-1)^2 = 0.81 both
    # token 2: unclipped 0.25, clipped (-0.2-0)^2 = 0.04 -> 0.25
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.25) / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)


def test_whiten_over_masked_positions():
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0], [4.0, 5.0, 60.0, 70.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = whiten(x, m)
    real = w[m.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.std().item() == pytest.approx(1.0, abs=1e-4)
    assert w[~m.bool()].abs().sum().item() == 0.0
    kept = whiten(x, m, shift_mean=False)[m.bool()]
    assert kept.mean().item() == pytest.approx(3.0, abs=1e-5)


def test_entropy_and_explained_variance():
    uniform = torch.zeros(1, 1, 4)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(4))
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)
    ret, m = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4)
    assert explained_variance(ret, ret, m).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.5), ret, m).item() == pytest.approx(0.0, abs=1e-6)
