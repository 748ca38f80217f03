"""Batched generation from chat prompts: left-padded, KV cache, cut at the first EOS.

Shared by evaluation, preference collection and PPO rollouts, so all three see the same prompt
rendering and the same end-of-response rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import GenerationConfig
from rlhf.data.chat import Message, encode_text, pad_left, render_prompt


@dataclass
class Generation:
    """One sampled response."""

    text: str
    """The decoded response, without special tokens."""
    token_ids: list[int]
    """Response tokens up to and including the first EOS (if any)."""
    ended: bool
    """The response ended with EOS within max_new_tokens."""


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


def eos_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> set[int]:
    """Every token that ends a response: the tokenizer's EOS and the model's generation EOS list."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(gen_eos)
    return ids


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[Message]],
    cfg: GenerationConfig,
    *,
    seed: int = 0,
    logits_processor=None,
    progress=None,
) -> list[Generation]:
    """Generate one response per prompt, in prompt order. Batches are formed by prompt length."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [encode_text(tok, render_prompt(tok, p)) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths: less padding
    stop = eos_ids(model, tok)
    results: list[Generation | None] = [None] * len(prompts)
    torch.manual_seed(seed)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        batch = {k: v.to(device) for k, v in pad_left([encoded[i] for i in idx], tok.pad_token_id).items()}
        sampling = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0) if cfg.do_sample else dict(do_sample=False)
        out = model.generate(
            **batch, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=sorted(stop),
            logits_processor=logits_processor, **sampling,
        )  # (B, P + A)
        responses = out[:, batch["input_ids"].shape[1]:]  # (B, A)
        for row, i in enumerate(idx):
            ids, ended = truncate_at_eos(responses[row].tolist(), stop, tok.pad_token_id)
            results[i] = Generation(text=tok.decode(ids, skip_special_tokens=True).strip(), token_ids=ids, ended=ended)
        if progress is not None:
            progress.update(advance=len(idx))
    model.train(was_training)
    return results  # type: ignore[return-value]
