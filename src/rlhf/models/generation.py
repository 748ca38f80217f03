"""Batched generation from chat prompts: left-padded, KV cache, cut at the first EOS.

Shared by evaluation, preference collection and PPO rollouts, so all three see the same prompt
rendering and the same end-of-response rule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers import (LogitsProcessor, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase,
                          TemperatureLogitsWarper, TopPLogitsWarper)

from rlhf.config import GenerationConfig
from rlhf.data.chat import Message, encode_prompt, pad_left


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


class InverseCDFSampler(LogitsProcessor):
    """Draws each row's next token from softmax(scores) and returns scores that put all mass on it
    (``generation.sampler: inverse_cdf``).

    Placed last in the processor list of a greedy ``generate``, it turns greedy decoding into sampling
    from the processed distribution (temperature, top-p and any steering already applied). Why:
    ``torch.multinomial`` draws one random number per vocabulary entry, which on a CPU can cost a good
    share of a tiny model's decode step; inverse-CDF sampling draws one per row, from the same
    distribution but a different random stream. The uniforms come from torch's global generator, so a
    seed fixes them.
    """

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores.double(), dim=-1).cumsum(dim=-1)  # (B, V) fp64: tiny masses stay drawable
        total = cdf[:, -1:]  # (B, 1) 1 up to rounding
        u = torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device) * total
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total: never past the end
        # right=True: the first index whose CDF exceeds u, which is never a token of probability 0.
        token = torch.searchsorted(cdf, u, right=True)  # (B, 1)
        return torch.full_like(scores, -float("inf")).scatter_(1, token, 0.0)


def sampling_processors(cfg: GenerationConfig, logits_processor=None) -> LogitsProcessorList:
    """The processors of one greedy-mode generate call with the inverse-CDF sampler: the caller's
    (steering), then temperature, top-p (top-k off) and the sampler, whose token generate then takes."""
    procs = LogitsProcessorList(logits_processor or [])
    if cfg.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(cfg.temperature))
    if cfg.top_p < 1.0:
        procs.append(TopPLogitsWarper(cfg.top_p))
    procs.append(InverseCDFSampler())
    return procs


def generate_kwargs(cfg: GenerationConfig, logits_processor=None) -> dict:
    """``model.generate`` arguments for the config's decoding: greedy, generate's own multinomial sampling
    (temperature/top-p, top-k off) or greedy behind the inverse-CDF sampler."""
    if not cfg.do_sample:
        return dict(do_sample=False, logits_processor=logits_processor)
    if cfg.sampler == "inverse_cdf":
        return dict(do_sample=False, logits_processor=sampling_processors(cfg, logits_processor))
    return dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, logits_processor=logits_processor)


@contextlib.contextmanager
def only_our_settings(model: PreTrainedModel, tok: PreTrainedTokenizerBase, stop: set[int]):
    """Generate with exactly the settings our config names. transformers fills every setting a call leaves
    unset from ``model.generation_config``: a folder's repetition_penalty, top_k, min_p, no_repeat_ngram_size,
    bad words or forced tokens would reshape what is drawn, while log-probs and KL are computed from plain
    ``softmax(logits / T)``. For the call, the model's generation config holds the stop and pad ids only;
    the folder's own is put back after (and saved with the model, for other tools)."""
    saved = model.generation_config
    model.generation_config = HFGenerationConfig(eos_token_id=sorted(stop), pad_token_id=tok.pad_token_id,
                                                 bos_token_id=saved.bos_token_id if saved is not None else None)
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def sample_batch(model: PreTrainedModel, tok: PreTrainedTokenizerBase, batch: dict[str, torch.Tensor],
                 cfg: GenerationConfig, stop: set[int], logits_processor=None) -> torch.Tensor:
    """Responses (B, A) to left-padded prompts (B, P): KV cache on, sequences that stopped padded with pad."""
    with only_our_settings(model, tok, stop):
        out = model.generate(
            **batch, max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=sorted(stop),
            use_cache=True, **generate_kwargs(cfg, logits_processor),
        )  # (B, P + A)
    return out[:, batch["input_ids"].shape[1]:]


def response_mask(responses: torch.Tensor, stop: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Which response tokens are real: everything up to and including the first EOS.

    responses: (B, A) -> (mask (B, A) of 0/1, ended (B,) bool). Tokens after the first EOS (the
    padding generate adds to finished rows, or anything a custom stopping rule let through) are cut.
    """
    is_eos = torch.isin(responses, torch.tensor(sorted(stop), device=responses.device, dtype=responses.dtype))
    before_or_at_first_eos = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0  # (B, A)
    return before_or_at_first_eos.long(), is_eos.any(dim=1)


@dataclass
class Sampled:
    """Responses sampled for a batch of prompts, as tensors ready for scoring and log-probs."""

    input_ids: torch.Tensor  # (B, T) prompt (left-padded) then response (right-padded with pad)
    attention_mask: torch.Tensor  # (B, T) 1 on real prompt and response tokens
    n_prompt: int  # P: response token a sits at position P + a
    responses: torch.Tensor  # (B, A) response tokens, pad after the first EOS
    mask: torch.Tensor  # (B, A) 1 up to and including the first EOS
    ended: torch.Tensor  # (B,) the response ended with EOS


@torch.no_grad()
def sample_responses(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[Sequence[int]],
                     cfg: GenerationConfig, stop: set[int], logits_processor=None) -> Sampled:
    """Sample one response per encoded prompt, in generation batches of cfg.batch_size, cut after the first EOS.

    Each generation batch is padded to its own longest prompt (one long prompt does not widen every batch);
    the rollout's tensors then share one width, left-padded further where needed."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in pad_left(prompts, tok.pad_token_id).items()}  # (B, P)
    chunks = []
    for s in range(0, len(prompts), cfg.batch_size):
        p = max(len(x) for x in prompts[s : s + cfg.batch_size])  # the batch's own width: its leftmost columns are padding
        chunks.append(sample_batch(model, tok, {k: v[s : s + cfg.batch_size, -p:] for k, v in batch.items()}, cfg, stop,
                                   logits_processor))
    width = max(c.shape[1] for c in chunks)
    responses = torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=tok.pad_token_id) for c in chunks])  # (B, A)
    mask, ended = response_mask(responses, stop)
    responses = responses.masked_fill(mask == 0, tok.pad_token_id)
    return Sampled(torch.cat([batch["input_ids"], responses], dim=1), torch.cat([batch["attention_mask"], mask], dim=1),
                   batch["input_ids"].shape[1], responses, mask, ended)


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
    encoded = [encode_prompt(tok, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths: less padding
    stop = eos_ids(model, tok)
    results: list[Generation | None] = [None] * len(prompts)
    torch.manual_seed(seed)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        batch = {k: v.to(device) for k, v in pad_left([encoded[i] for i in idx], tok.pad_token_id).items()}
        responses = sample_batch(model, tok, batch, cfg, stop, logits_processor)  # (B, A)
        for row, i in enumerate(idx):
            ids, ended = truncate_at_eos(responses[row].tolist(), stop, tok.pad_token_id)
            results[i] = Generation(text=tok.decode(ids, skip_special_tokens=True).strip(), token_ids=ids, ended=ended)
        if progress is not None:
            progress.update(advance=len(idx))
    model.train(was_training)
    return results  # type: ignore[return-value]
