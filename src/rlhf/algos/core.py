"""Pure tensor functions shared by every stage: masked statistics and token log-probabilities.

Tensors in, tensors out; no models, no state. Shapes: B batch, T tokens of the full sequence,
V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label value that transformers' losses skip


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is 1."""
    values = values * mask
    return values.sum() if dim is None else values.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is 1 (0 when the mask is empty)."""
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each next token, in fp32.

    logits: (B, T, V) from a forward pass over the full sequence; labels: (B, T), the same ids as the
    input (IGNORE_INDEX where not scored). Position t of the logits predicts token t+1, so the result
    is (B, T-1) aligned with ``labels[:, 1:]``; ignored positions get 0.
    """
    logits = logits[:, :-1].float()  # (B, T-1, V): fp32 so small differences of log-probs survive
    if temperature != 1.0:
        logits = logits / temperature
    targets = labels[:, 1:]  # (B, T-1)
    safe = targets.clamp(min=0)
    # log_softmax then gather: memory of one (B, T-1, V) fp32 tensor, which the loss needs anyway.
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, safe.unsqueeze(-1)).squeeze(-1)
    return logp * (targets != IGNORE_INDEX)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy over the scored tokens, and their count.

    logits: (B, T, V); labels: (B, T). Returns the loss (a scalar) and the number of scored tokens so
    that gradient accumulation can weight micro-batches by tokens rather than by sequences. The labels
    are shifted (not the logits) so the fused cross-entropy reads the logits without a copy.
    """
    shifted = next_token_labels(labels)
    n = (shifted != IGNORE_INDEX).sum()
    total = F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / n.clamp(min=1), n


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T): the label of position t is token t + 1 (IGNORE_INDEX at the last position)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def linear_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``causal_lm_loss`` of the logits ``hidden @ weight.T`` without making them: hidden (B, T, H), the LM head's
    weight (V, H), labels (B, T). The same loss and gradients up to float rounding (``linear_cross_entropy``)."""
    shifted = next_token_labels(labels)
    n = (shifted != IGNORE_INDEX).sum()
    return linear_cross_entropy(hidden.flatten(0, 1), weight, shifted.flatten()) / n.clamp(min=1), n


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         rows: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of the logits ``hidden @ weight.T`` (N, V) against labels (N,) (IGNORE_INDEX rows
    count 0), in chunks of ``rows`` rows whose gradients are computed as each chunk's logits are: the (N, V)
    logits and their gradient never exist whole (a 128k vocabulary's are the largest tensor of an SFT step)
    and each chunk's softmax passes run on memory that is still in cache. The default chunk holds about as many
    logits as ``hidden`` holds values (a power of two rows), and at least 64 rows: each chunk adds its part to
    the whole (V, H) weight gradient, which fewer rows would make the larger cost. Under autocast the matmuls
    run in its dtype (as an autocast ``Linear``'s forward and backward do) and the softmax in fp32."""
    if rows is None:
        per_chunk = math.ceil(hidden.shape[0] / math.ceil(weight.shape[0] / hidden.shape[1]))
        rows = max(64, 1 << max(0, per_chunk - 1).bit_length())
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, rows)
    return _linear_ce_chunks(hidden, weight, labels, rows, False, False)[0]


def _linear_ce_chunks(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int, grad_hidden: bool,
                      grad_weight: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The summed loss and, where asked, its gradients with respect to hidden (N, H) and weight (V, H)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    with torch.autocast(device, enabled=False):
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        d_hidden = torch.empty_like(hidden) if grad_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
        for start in range(0, hidden.shape[0], rows):
            h, y = hidden[start : start + rows].to(dtype), labels[start : start + rows]  # (c, H), (c,)
            logits = (h @ w.T).float()  # (c, V)
            scored, target = y != IGNORE_INDEX, y.clamp(min=0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            total += ((lse - logits.gather(1, target).squeeze(1)) * scored).sum()
            if d_hidden is None and d_weight is None:
                continue
            grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
            grad.scatter_add_(1, target, -scored.unsqueeze(1).to(grad.dtype))  # softmax - one_hot(label)
            grad.mul_(scored.unsqueeze(1))  # unscored rows: no gradient
            if d_hidden is not None:
                d_hidden[start : start + rows] = grad.to(dtype) @ w
            if d_weight is not None and dtype == torch.float32:
                d_weight.addmm_(grad.T, h)  # in place: one pass over the (V, H) gradient per chunk
            elif d_weight is not None:
                d_weight += (grad.to(dtype).T @ h).float()
    return total, d_hidden, (d_weight.to(weight.dtype) if d_weight is not None else None)


class _LinearCrossEntropy(torch.autograd.Function):
    """``linear_cross_entropy`` with its gradients made in the forward (chunk by chunk) and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows):
        total, d_hidden, d_weight = _linear_ce_chunks(hidden, weight, labels, rows, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(d_hidden, d_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        d_hidden, d_weight = ctx.saved_tensors
        return (d_hidden * grad_total.to(d_hidden.dtype) if d_hidden is not None else None,
                d_weight * grad_total.to(d_weight.dtype) if d_weight is not None else None, None, None)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask 1) token of each row, for left, right or mixed padding.

    attention_mask: (B, T) -> (B,). The rightmost 1 is found from the mask, never from a pad id, so a
    pad token that also occurs in the text (or equals EOS) cannot move it. A row with no real token
    gives 0.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    return (positions * (attention_mask != 0)).argmax(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only: (B, T). Left padding then does not shift a sequence's
    positions, so a left-padded and a right-padded row get the same hidden states."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
