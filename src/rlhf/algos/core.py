"""Pure tensor functions shared by every stage: masked statistics and token log-probabilities.

Tensors in, tensors out; no models, no state. Shapes: B batch, T tokens of the full sequence,
V vocabulary.
"""

from __future__ import annotations

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
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): label of position t is token t+1
    n = (shifted != IGNORE_INDEX).sum()
    total = F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / n.clamp(min=1), n


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
