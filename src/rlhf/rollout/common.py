"""What every rollout engine shares: the stop-token set, the end-of-response rule and the result types.

A response ends with its first stop token (the tokenizer's EOS and the generation config's EOS ids);
everything after it is padding, whichever engine sampled it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.data.chat import pad_left


@dataclass
class Generation:
    """One sampled response."""

    text: str
    """The decoded response, without special tokens."""
    token_ids: list[int]
    """Response tokens up to and including the first EOS (if any)."""
    ended: bool
    """The response ended with EOS within max_new_tokens."""


@dataclass
class Sampled:
    """Responses sampled for a batch of prompts, as tensors ready for scoring and log-probs."""

    input_ids: torch.Tensor  # (B, T) prompt (left-padded) then response (right-padded with pad)
    attention_mask: torch.Tensor  # (B, T) 1 on real prompt and response tokens
    n_prompt: int  # P: response token a sits at position P + a
    responses: torch.Tensor  # (B, A) response tokens, pad after the first EOS
    mask: torch.Tensor  # (B, A) 1 up to and including the first EOS
    ended: torch.Tensor  # (B,) the response ended with EOS
    logprobs: torch.Tensor | None = None  # (B, A) log softmax(logits / T) of each response token, 0 after the end
    entropy: torch.Tensor | None = None  # (B, A) entropy of softmax(logits / T) at each response token, 0 after the end
    hidden: torch.Tensor | None = None  # (B, A, H) the policy's final hidden state before each response token, 0 after
    """The last three come from engines that read them off the decode loop (``static``; ``hidden`` only when asked
    for); ``None`` from ``hf``."""


def truncate_at_eos(ids: Sequence[int], eos_ids: set[int], pad_id: int | None) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first EOS; drop padding. Returns (ids, ended_with_eos)."""
    out = []
    for t in ids:
        out.append(int(t))
        if t in eos_ids:
            return out, True
    if pad_id is not None:
        while out and out[-1] == pad_id:
            out.pop()
    return out, False


def stop_token_ids(tok: PreTrainedTokenizerBase, generation_eos: int | Sequence[int] | None) -> set[int]:
    """Every token that ends a response: the tokenizer's EOS and a generation config's EOS id or list."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif generation_eos:
        ids.update(generation_eos)
    return ids


def eos_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> set[int]:
    """Every token that ends a response: the tokenizer's EOS and the model's generation EOS list."""
    return stop_token_ids(tok, getattr(getattr(model, "generation_config", None), "eos_token_id", None))


def response_mask(responses: torch.Tensor, stop: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Which response tokens are real: everything up to and including the first EOS.

    responses: (B, A) -> (mask (B, A) of 0/1, ended (B,) bool). Tokens after the first EOS (the
    padding an engine adds to finished rows, or anything a custom stopping rule let through) are cut.
    """
    is_eos = torch.isin(responses, torch.tensor(sorted(stop), device=responses.device, dtype=responses.dtype))
    before_or_at_first_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0  # (B, A)
    return before_or_at_first_eos.long(), is_eos.any(dim=1)


def generation_batches(prompts: Sequence[Sequence[int]], batch_size: int, pad_id: int, device: torch.device
                       ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The prompts left-padded to one width (B, P), and the generation batches of ``batch_size`` rows, each cut
    to its own longest prompt (one long prompt does not widen every batch)."""
    batch = {k: v.to(device) for k, v in pad_left(prompts, pad_id).items()}  # (B, P)
    parts = []
    for s in range(0, len(prompts), batch_size):
        p = max(len(x) for x in prompts[s : s + batch_size])  # the leftmost columns beyond are padding
        parts.append({k: v[s : s + batch_size, -p:] for k, v in batch.items()})
    return batch, parts


def pad_steps(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros after the last step of a per-token tensor (b, A_i, ...) -> (b, width, ...)."""
    return torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1], *x.shape[2:])], dim=1)


def join_batches(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, chunks: Sequence[torch.Tensor], pad_id: int,
                 stop: set[int], extras: Sequence[Sequence[torch.Tensor]] = ()) -> Sampled:
    """One Sampled from the prompts (B, P) and each generation batch's responses (b, A_i), padded to one width A
    and cut after the first stop token. ``extras``: per-token tensors per batch ((b, A_i) log-probs and entropies,
    (b, A_i, H) hidden states), 0-padded."""
    width = max(c.shape[1] for c in chunks)
    responses = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=pad_id) for c in chunks])  # (B, A)
    mask, ended = response_mask(responses, stop)
    responses = responses.masked_fill(mask == 0, pad_id)
    joined = [torch.cat([pad_steps(x, width) for x in parts]) * mask.view(*mask.shape, *[1] * (parts[0].dim() - 2))
              for parts in extras]
    return Sampled(torch.cat([prompt_ids, responses], dim=1), torch.cat([prompt_mask, mask], dim=1),
                   prompt_ids.shape[1], responses, mask, ended, *joined)
