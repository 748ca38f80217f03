"""The pure maths: masked statistics, token log-probs against the model's own loss, the LR schedule."""

import math

import pytest
import torch

from rlhf.algos.core import IGNORE_INDEX, causal_lm_loss, linear_cross_entropy, masked_mean, masked_sum, token_logprobs
from rlhf.models.loading import load_causal_lm
from rlhf.training import lr_factor


def test_masked_mean_ignores_masked_positions():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_mean(x, m, dim=1).tolist() == pytest.approx([1.5, 3.0])
    assert masked_sum(x, m).item() == pytest.approx(6.0)
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


def _batch(tok):
    ids = tok(["What is 3 + 4? 3 + 4 = 7.", "Hello, Alice!"], add_special_tokens=False)["input_ids"]
    width = max(map(len, ids))
    input_ids = torch.full((2, width), tok.pad_token_id)
    labels = torch.full((2, width), IGNORE_INDEX)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        labels[i, 3 : len(row)] = torch.tensor(row[3:])  # the first 3 tokens play the prompt
        mask[i, : len(row)] = 1
    return input_ids, labels, mask


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
def test_masked_logprob_sum_equals_model_loss(which, request):
    model, tok = load_causal_lm(request.getfixturevalue(which))
    input_ids, labels, mask = _batch(tok)
    out = model(input_ids=input_ids, attention_mask=mask, labels=labels)
    logp = token_logprobs(out.logits, labels)  # (B, T-1)
    n = (labels[:, 1:] != IGNORE_INDEX).sum()
    assert (-logp.sum() / n).item() == pytest.approx(out.loss.item(), rel=1e-5)
    ours, count = causal_lm_loss(out.logits, labels)
    assert ours.item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert count == n


def _ce_and_grads(loss_fn, hidden, weight, labels):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_fn(h, w, labels)
    (loss * 0.5).backward()  # a scale from above the loss reaches both gradients
    return loss.detach(), h.grad, w.grad


def _logits_ce(h, w, labels):
    return torch.nn.functional.cross_entropy(h @ w.T, labels, ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("rows", [None, 4, 7, 64])
def test_linear_cross_entropy_equals_the_logits_loss_and_gradients(rows):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 8, generator=g), torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[::5] = IGNORE_INDEX
    want = _ce_and_grads(_logits_ce, hidden, weight, labels)
    got = _ce_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, rows), hidden, weight, labels)
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-6)
    for a, b in zip(got[1:], want[1:]):
        assert torch.allclose(a, b, atol=1e-5)
    assert got[1][::5].abs().max() == 0  # an ignored row has no gradient
    with torch.no_grad():  # evaluation: the loss alone
        assert linear_cross_entropy(hidden, weight, labels, rows).item() == pytest.approx(want[0].item(), rel=1e-6)
    frozen_head = weight.clone()  # a frozen head (LoRA): no gradient is made for it
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, frozen_head, labels, rows).backward()
    assert frozen_head.grad is None and torch.allclose(h.grad, want[1] * 2, atol=1e-5)


def test_linear_cross_entropy_under_autocast_matches_an_autocast_linear():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(40, 16, generator=g), torch.randn(30, 16, generator=g) * 0.3
    labels = torch.randint(0, 30, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _ce_and_grads(lambda h, w, y: _logits_ce(h, w, y).float(), hidden, weight, labels)
        got = _ce_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, 16), hidden, weight, labels)
    exact = _ce_and_grads(_logits_ce, hidden, weight, labels)
    assert got[0].item() == pytest.approx(want[0].item(), rel=1e-2)
    for a, b, c in zip(got[1:], want[1:], exact[1:]):
        assert a.dtype == c.dtype == torch.float32
        # bf16 matmuls, fp32 gradients: within twice the error of autocast's own linear against fp32
        assert (a - c).abs().max() <= 2 * (b - c).abs().max() + 1e-6


def test_token_logprobs_temperature_scales_logits():
    logits = torch.randn(1, 4, 11)
    labels = torch.randint(0, 11, (1, 4))
    assert torch.allclose(token_logprobs(logits, labels, temperature=2.0), token_logprobs(logits / 2, labels))


def test_lr_schedule_warms_up_then_decays_to_floor():
    total, warmup = 100, 10
    f = [lr_factor(s, total, warmup, "cosine", 0.1) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay after warmup
    assert f[-1] == pytest.approx(0.1, abs=0.01)
    assert lr_factor(50, total, 0, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(99, total, 10, "constant", 0.1) == 1.0
    assert math.isclose(lr_factor(55, total, 10, "cosine", 0.0), 0.5, abs_tol=1e-9)


def test_early_stopping_keeps_the_best_weights():
    from rlhf.training import FitResult, _BestWeights

    layer = torch.nn.Linear(2, 1)
    best, res = _BestWeights(patience=2), FitResult()
    stops = []
    for i, val in enumerate([3.0, 2.0, 2.5, 2.6]):
        with torch.no_grad():
            layer.weight.fill_(float(i))
        stops.append(best.update(layer, val, res))
    assert stops == [False, False, False, True]  # two validations without improvement
    best.restore(layer)
    assert torch.all(layer.weight == 1.0) and res.best_val_loss == 2.0  # the weights of the 2.0 validation


def test_length_grouped_batches_cover_every_sample_once_with_less_padding():
    import random

    from rlhf.training import epoch_batches

    lengths = [random.Random(i).randint(5, 60) for i in range(3000)]
    plain = epoch_batches(len(lengths), 16, torch.Generator().manual_seed(0))
    grouped = epoch_batches(len(lengths), 16, torch.Generator().manual_seed(0), lengths)
    assert sorted(i for b in grouped for i in b) == list(range(len(lengths)))

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches) / sum(lengths)

    assert padding(grouped) < padding(plain) / 5
    assert grouped != epoch_batches(len(lengths), 16, torch.Generator().manual_seed(1), lengths)  # still shuffled
    sizes = [len(b) for b in grouped]
    assert sizes.count(16) == len(grouped) - 1 or sizes.count(16) == len(grouped)
