"""Prompts of an online RL run (a seeded order per epoch, red-team attacks mixed in), PPO-ptx data and the
constitution's steering processor."""

from __future__ import annotations

import logging

import torch

from rlhf.config import PPOConfig
from rlhf.configlib import ConfigError
from rlhf.data.chat import Encoded, count_control_rows, encode_prompt, encode_sft, encode_text, report_control_rows
from rlhf.data.io import load_prompts, load_records, load_sft
from rlhf.models.loading import max_positions
from rlhf.world import derive_seed, parse_prompt

log = logging.getLogger("rlhf.ppo")


class PromptStream:
    """Prompts in a fresh seeded order every epoch; batch i is a pure function of (seed, i) for resume."""

    def __init__(self, encoded: list[list[int]], messages: list[list[dict]], seed: int, texts: list[str] | None = None):
        self.encoded, self.messages, self.seed = encoded, messages, seed
        # What judges and reward components read: the last user turn, or for a red-team attack the
        # request it disguises (the intent is known when we build the attack).
        self.texts = texts or [m[-1]["content"] for m in messages]
        self._orders: dict[int, list[int]] = {}
        self.dropped = 0  # prompts left out for length

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, f"ppo/prompts/{epoch}"))
            self._orders[epoch] = torch.randperm(len(self.encoded), generator=gen).tolist()
        return self._orders[epoch]

    def batch(self, iteration: int, size: int) -> list[int]:
        n = len(self.encoded)
        return [self._order(i // n)[i % n] for i in range(iteration * size, (iteration + 1) * size)]


def load_prompt_stream(cfg: PPOConfig, tok) -> tuple[PromptStream, bool]:
    """Encoded prompts and whether they are assistant-world prompts (then the gold judge scores rollouts)."""
    rows = list(load_prompts(cfg.prompts))[: cfg.n_prompts]
    messages, texts = [r.prompt for r in rows], [r.prompt[-1]["content"] for r in rows]
    world = all(parse_prompt(t) is not None for t in texts)
    if cfg.safety.redteam_share > 0:
        if not world:
            raise ConfigError("ppo.safety.redteam_share: red-team prompts are built from the assistant world's harmful "
                              "intents; mix your own attack prompts into ppo.prompts instead")
        from rlhf.safety.redteam import training_attacks

        n_attacks = round(len(rows) * cfg.safety.redteam_share / (1 - cfg.safety.redteam_share))
        attacks = training_attacks(n_attacks, cfg.seed, contrast=cfg.safety.redteam_contrast)
        messages += [a.messages for a in attacks]
        texts += [a.case.prompt for a in attacks]
        log.info("PPO prompts: %d, of which %d red-team attacks (training wordings)", len(messages), len(attacks))
    report_control_rows(tok, count_control_rows(tok, ([m["content"] for m in msgs] for msgs in messages)), len(messages))
    encoded = [encode_prompt(tok, m) for m in messages]
    limit = prompt_limit(cfg)
    keep = [i for i, e in enumerate(encoded) if limit is None or len(e) <= limit]
    if len(keep) < len(encoded):
        log.warning("left out %d of %d prompts longer than %d tokens (ppo.max_prompt_length)", len(encoded) - len(keep),
                    len(encoded), limit)
        if not keep:
            raise ConfigError(f"ppo: every prompt of {cfg.prompts} is longer than {limit} tokens (ppo.max_prompt_length)")
    stream = PromptStream([encoded[i] for i in keep], [messages[i] for i in keep], cfg.seed, [texts[i] for i in keep])
    stream.dropped = len(encoded) - len(keep)
    return stream, world


def prompt_limit(cfg: PPOConfig) -> int | None:
    """The longest prompt a rollout takes: ppo.max_prompt_length, and at most what the policy's positions leave
    after max_new_tokens (a longer one would run past them)."""
    positions = max_positions(cfg.policy) if cfg.policy else None
    room = positions - cfg.generation.max_new_tokens if positions else None
    limits = [v for v in (cfg.max_prompt_length, room) if v]
    return min(limits) if limits else None


def load_ptx(cfg: PPOConfig, tok) -> list[Encoded]:
    """PPO-ptx sequences: SFT rows (loss on the response) or {"text"} rows (loss on every token)."""
    texts = [r["text"] for _, r in load_records(cfg.ptx_data) if isinstance(r.get("text"), str)]
    if texts:  # a corpus (other rows, such as chat transcripts in a pretraining mix, are left out)
        rows = [encode_text(tok, t)[: cfg.ptx_max_length] for t in texts]
        return [Encoded(input_ids=ids, labels=list(ids)) for ids in rows if len(ids) > 1]
    encoded = [encode_sft(tok, ex.prompt, ex.completion, cfg.ptx_max_length) for ex in load_sft(cfg.ptx_data)]
    return [e for e in encoded if e is not None]


def steering(cfg: PPOConfig, tok):
    """The constitution's logits processor for rollouts (ppo.safety.steer), else None.

    Responses are then sampled from the policy with banned completions removed, while log-probs are
    the policy's own: the rollout is slightly off-policy wherever a banned token would have been
    drawn, which the clipped ratio tolerates as long as that is rare.
    """
    if not cfg.safety.steer:
        return None
    from transformers import LogitsProcessorList

    from rlhf.safety.constitution import resolve_constitution

    return LogitsProcessorList([resolve_constitution(cfg.safety.constitution).logits_processor(tok)])
