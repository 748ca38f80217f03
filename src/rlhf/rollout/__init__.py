"""The rollout engine: every stage that samples (collection, PPO rollouts, evaluation, red teaming, the
feedback app) goes through one interface, so the prompt rendering, the end-of-response rule and the sampling
distribution are defined once.

    engine = make_engine(model, tok, cfg.backend)
    sampled = engine.generate(encoded_prompts, cfg, seed, logits_processor=None)  # -> Sampled

Backends (``generation.backend``):

- ``static`` (what ``auto`` picks for decoder-only models whose cache can be static: Llama, Qwen2, Gemma-2,
  GPT-2, ...): our decode loop (``rlhf.rollout.static``), which also returns each token's log-prob;
- ``hf``: transformers' ``generate``, the reference (and what ``auto`` picks for any other model).

A serving engine (vLLM, SGLang on GPUs) is the third kind this interface is shaped for, not built yet: it
would take the policy's weights after every update (``load_weights`` from the trained state dict, or a shared
NCCL group), return the sampled tokens with the engine's own log-probs, and PPO would correct the mismatch
between those and the trainer's with a truncated importance weight (min(pi_train / pi_engine, C) per token).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import GenerationConfig
from rlhf.data.chat import Message, encode_prompt
from rlhf.rollout.common import Generation, Sampled, eos_ids, response_mask, stop_token_ids, truncate_at_eos
from rlhf.rollout.hf import HFEngine
from rlhf.rollout.static import StaticEngine, static_supported

__all__ = ["Engine", "Generation", "Sampled", "eos_ids", "generate", "make_engine", "response_mask", "stop_token_ids",
           "truncate_at_eos"]

log = logging.getLogger("rlhf.rollout")


class Engine(Protocol):
    """Samples one response per encoded prompt: ``generate(prompts, cfg, seed, logits_processor) -> Sampled``."""

    name: str

    def generate(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig, seed: int | None = None,
                 logits_processor=None) -> Sampled: ...


def make_engine(model: PreTrainedModel, tok: PreTrainedTokenizerBase, backend: str = "auto",
                stop: set[int] | None = None, hidden: bool = False) -> Engine:
    """The engine for ``model`` (a transformers causal LM, adapters injected): ``static`` where supported under
    ``auto``; asking for ``static`` where it is not supported is an error naming why. ``hidden``: the static engine
    also returns the final hidden states (``Sampled.hidden``, for a value head on the policy)."""
    stop = eos_ids(model, tok) if stop is None else stop
    if backend == "hf":
        return HFEngine(model, tok, stop)
    why = static_supported(model)
    if why is None:
        return StaticEngine(model, tok, stop, hidden)
    if backend == "static":
        raise ValueError(f"generation.backend static: {why}; use backend hf (or auto)")
    log.info("generation: the hf engine for %s (%s)", type(model).__name__, why)
    return HFEngine(model, tok, stop)


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
    """Generate one response per chat prompt, in prompt order, as text. Prompts are batched by length (less
    padding); each batch's randomness derives from (seed, batch index)."""
    was_training = model.training
    model.eval()
    encoded = [encode_prompt(tok, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths: less padding
    engine = make_engine(model, tok, cfg.backend)
    results: list[Generation | None] = [None] * len(prompts)
    torch.manual_seed(seed)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        sampled = engine.generate([encoded[i] for i in idx], cfg, seed=None, logits_processor=logits_processor)
        for row, i in enumerate(idx):
            ids = sampled.responses[row, : int(sampled.mask[row].sum())].tolist()
            results[i] = Generation(text=tok.decode(ids, skip_special_tokens=True).strip(), token_ids=ids,
                                    ended=bool(sampled.ended[row]))
        if progress is not None:
            progress.update(advance=len(idx))
    model.train(was_training)
    return results  # type: ignore[return-value]
