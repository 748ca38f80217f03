"""The experience maker: steps 1-3 of an iteration, prompts in, a scored :class:`Rollout` out.

  1. generate (the rollout engine: left-padded prompts, sampling with the config's settings only, cut after
     the first stop token), K samples per prompt where the algorithm asks for groups;
  2. score (prompt, response) with the reward model at the last token; normalise; a fixed score for
     responses without a stop token (or past the reward model's context); extra reward components; clip;
  3. log-probs of the policy and of the reference at the sampling temperature, in fp32, and the critic's
     values where there is a critic.

Steps 4-5 (rewards and advantages) belong to the algorithm (:mod:`rlhf.rl.algorithms`).
Shapes: B samples, P prompt tokens (left-padded), A response tokens (right-padded), T = P + A, V vocabulary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from rlhf import distributed
from rlhf.algos.core import masked_sum
from rlhf.algos.ppo import entropy_from_logits
from rlhf.config import PPOConfig
from rlhf.configlib import ConfigError
from rlhf.models.policy import gather_logprobs, pack_rows, response_logits
from rlhf.models.reward import member_mean_std
from rlhf.rl.models import Models, fold_normalisation, score_head
from rlhf.rl.prompts import PromptStream
from rlhf.rl.types import RewardComponent, Rollout
from rlhf.rollout import Sampled

log = logging.getLogger("rlhf.ppo")


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Slices of at most ``size`` rows covering ``n`` rows (None: one slice)."""
    size = size or n
    return [slice(s, s + size) for s in range(0, n, size)]


def autocast(cfg: PPOConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")


class ExperienceMaker:
    """Turns a batch of prompt indices into a scored rollout (steps 1-3)."""

    def __init__(self, cfg: PPOConfig, models: Models, prompts: PromptStream, engine, processor,
                 components: Sequence[RewardComponent], device: torch.device):
        self.cfg, self.m, self.prompts, self.engine, self.processor = cfg, models, prompts, engine, processor
        self.components, self.device = list(components), device
        self.packed = cfg.padding_free and models.packs_samples()  # scoring passes without their padding

    @torch.no_grad()
    def make(self, idx: list[int], seed: int) -> tuple[Rollout, dict[str, float]]:
        """A rollout of the prompts ``idx`` (one row each; repeat an index for several samples of a prompt)."""
        cfg, m = self.cfg, self.m

        # 1. Generate. The static engine also returns each token's log-prob and entropy.
        sampled = self.engine.generate([self.prompts.encoded[i] for i in idx], cfg.generation, seed, self.processor)
        mask, ended = sampled.mask, sampled.ended  # (B, A), (B,)
        texts = [m.tok.decode(r[: int(n)], skip_special_tokens=True).strip() for r, n in zip(sampled.responses, mask.sum(1))]
        prompts = [self.prompts.texts[i] for i in idx]

        # 2. Score at the last token (the stop token, where the reward model was trained).
        rm_scores, rm_std, scores, components = self._score(sampled, idx, texts, prompts)  # (B,) x3, {}

        # 3. Log-probs of policy and reference (fp32, sampling temperature) and the critic's values.
        logprobs, ref_logprobs, values, entropy = self._score_tokens(sampled)

        ro = Rollout(sampled.input_ids, sampled.attention_mask, sampled.n_prompt, mask, logprobs, ref_logprobs, scores,
                     values=values, rm_scores=rm_scores, rm_std=rm_std, prompts=prompts, responses=texts)
        stats = {"objective/scores": rm_scores.mean().item(), "objective/entropy": entropy.item(),
                 "response/length": mask.sum(1).float().mean().item(), "response/eos_rate": ended.float().mean().item(),
                 **components}
        return ro, stats

    def _score(self, sampled: Sampled, idx: list[int], texts: list[str], prompts: list[str]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """(reward-model score, ensemble std, sequence score used in the reward), each (B,), and each extra
        component's mean."""
        cfg, rm = self.cfg, self.m.reward
        input_ids, attention_mask = sampled.input_ids, sampled.attention_mask
        if self.m.same_tokenizer:  # the RM reads exactly the tokens the policy wrote (the reward sits on EOS)
            parts = micro_batches(len(input_ids), cfg.micro_batch_size)
            per_member = torch.cat([rm.raw(input_ids[p], attention_mask[p]) for p in parts], dim=1)  # (M, B)
            fits = attention_mask.sum(1) <= (rm.max_length or input_ids.shape[1])  # (B,)
        else:  # its own tokenizer: the whole prompt and response, up to its own context
            per_member = rm.score([self.prompts.messages[i] for i in idx], texts, per_member=True).to(self.device)
            fits = per_member.isfinite().all(0)
            per_member = per_member.nan_to_num(0.0)
        if cfg.normalize_reward:
            if not rm.normalized:
                self._normalise_on_first_rollout(per_member[:, fits])
            per_member = rm.normalise(per_member)
        mean, std = member_mean_std(per_member)
        ended = sampled.ended & fits  # a sequence the reward model cannot read whole is scored like one without EOS
        rm_scores = mean - cfg.ensemble_penalty * std
        scores, means = rm_scores.clone(), {}
        for c in self.components:
            values = torch.tensor(list(c.fn(prompts, texts)), dtype=scores.dtype, device=scores.device)  # (B,)
            means[f"reward/{c.name}"] = values.mean().item()
            scores += c.weight * values
        if cfg.missing_eos_score is not None:
            scores = torch.where(ended, scores, torch.full_like(scores, cfg.missing_eos_score))
        if cfg.reward_clip:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        return rm_scores, std, scores, means

    def _score_tokens(self, sampled: Sampled) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Step 3 in micro-batches: policy and reference log-probs (B, A), the critic's values (B, A) (None without a
        critic) and the policy's mean entropy; a (b, A, V) logits tensor at a time, never the rollout's (B, A, V).

        The policy's forward is skipped when the engine returned the log-probs and entropies (the static engine:
        the same logits, read while sampling) and, for a value head, the hidden states it reads."""
        m, t, n_prompt, mask = self.m, self.cfg.generation.temperature, sampled.n_prompt, sampled.mask
        # Under bf16 autocast the update's log-probs are bf16 ones: the rollout's must be too, so the policy runs.
        from_engine = (sampled.logprobs is not None and (m.value_head is None or sampled.hidden is not None)
                       and self.cfg.mixed_precision != "bf16")
        logprobs, ref_logprobs, values, entropy = [], [], [], torch.zeros((), device=mask.device)
        for part in micro_batches(len(mask), self.cfg.micro_batch_size):
            ids, am, tokens, mk = sampled.input_ids[part], sampled.attention_mask[part], sampled.responses[part], mask[part]
            packed = pack_rows(ids, am, n_prompt) if self.packed else None
            with autocast(self.cfg, self.device):
                hidden = None
                if from_engine:
                    hidden = sampled.hidden[part] if m.value_head is not None else None  # (b, A, H)
                    logprobs.append(sampled.logprobs[part])
                    entropy += masked_sum(sampled.entropy[part], mk)
                else:
                    logits, hidden = response_logits(m.policy, ids, am, n_prompt, t, with_hidden=m.value_head is not None,
                                                     packed=packed)
                    logprobs.append(gather_logprobs(logits, tokens) * mk)  # (b, A)
                    entropy += masked_sum(entropy_from_logits(logits), mk)
                    del logits
                ref_logprobs.append(gather_logprobs(m.reference_logits(ids, am, n_prompt, t, packed), tokens) * mk)
                if m.has_critic:
                    values.append(m.values(ids, am, n_prompt, hidden, packed) * mk)
        return (torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values) if values else None,
                entropy / mask.sum().clamp(min=1))

    def _normalise_on_first_rollout(self, raw: torch.Tensor) -> None:
        """A reward model trained elsewhere stores no reward_mean/reward_std: measure them on the initial
        policy's first rollout (M, B), as `rlhf rm` does on SFT samples, instead of using raw scores against
        reward_clip and missing_eos_score; fold them into the critic too. They are kept in the checkpoints.
        Under several processes, on every process's rollout: the same statistics everywhere."""
        raw = torch.cat([r.to(raw.device) for r in distributed.gather_objects(raw.cpu())], dim=1)  # (M, global B)
        if raw.shape[1] < 2:
            raise ConfigError(f"ppo: {self.cfg.reward_model} stores no reward_mean/reward_std and the first rollout has "
                              "too few scorable responses to measure them; train it with `rlhf rm`, or set "
                              "ppo.normalize_reward false")
        means, stds = raw.mean(1), raw.std(1).clamp_min(1e-6)
        self.m.reward.set_normalisation(means, stds)
        if self.m.critic is not None:
            fold_normalisation(score_head(self.m.critic), means[0].item(), stds[0].item())
        log.warning("%s stores no reward_mean/reward_std: normalising with its scores on the initial policy's first "
                    "rollout (mean %s, std %s)", self.cfg.reward_model, [round(v, 4) for v in means.tolist()],
                    [round(v, 4) for v in stds.tolist()])
