"""Sampling maths of the rollout engines, as small pure functions: one step's logits in, tokens out.

Shapes: b rows of the batch still decoding, V vocabulary. The order is generate's: the caller's
logits processors (steering) on the raw logits, then temperature, then top-p, then the draw.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, TopPLogitsWarper


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering, transformers' TopPLogitsWarper itself (the smallest set of most likely tokens whose
    mass reaches top_p, at least one; -inf elsewhere): (b, V) -> (b, V)."""
    return scores if top_p >= 1.0 else TopPLogitsWarper(top_p)(None, scores)


def inverse_cdf_draw(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(scores) by inverting its CDF at one uniform per row: (b, V), (b,) -> (b,).

    The CDF is summed in fp32 (fp64 bought nothing measurable and cost a pass over (b, V)); ``right=True``
    finds the first index whose CDF exceeds u, which is never a token of probability 0."""
    cdf = torch.softmax(scores.float(), dim=-1).cumsum(dim=-1)  # (b, V)
    total = cdf[:, -1:]  # (b, 1): 1 up to rounding
    u = torch.minimum(uniforms.to(cdf.dtype).unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=scores.shape[1] - 1)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(token) and the entropy of softmax(logits / T), from the unprocessed logits: the distribution PPO
    scores (steering and top-p shape what is drawn, not what is scored). (b, V), (b,) -> (b,), (b,)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (b, V)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return logp.gather(1, tokens.unsqueeze(1)).squeeze(1), entropy


class InverseCDFSampler(LogitsProcessor):
    """The inverse-CDF draw for the ``hf`` engine: placed last in the processor list of a greedy ``generate``,
    it draws each row's token from softmax(scores) and returns scores that put all mass on it, turning greedy
    decoding into sampling from the processed distribution. The uniforms come from torch's global generator,
    so a seed fixes them."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = inverse_cdf_draw(scores, torch.rand(scores.shape[0], device=scores.device))  # (B,)
        return torch.full_like(scores, -float("inf")).scatter_(1, token.unsqueeze(1), 0.0)
