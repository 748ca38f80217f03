"""Stage 3: PPO against the reward model, with a KL penalty to the frozen initial policy.

One iteration is a rollout (steps 1-5) and an update (step 6), numbered as in OpenAI's
lm-human-preferences and its reproduction by Huang et al. 2023 ("The N Implementation Details of
RLHF with PPO"):

  1. generate a response per prompt (left-padded prompts, KV cache, sampling with the config's settings
     only), cut after the first stop token;
  2. score (prompt, response) with the reward model at the last token; normalise; fixed score for
     responses without a stop token (or past the reward model's context); clip;
  3. log-probs of the policy and of the reference at the sampling temperature, in fp32, and the
     critic's values;
  4. per-token rewards: -kl_coef * KL_t on every token, the score on the last one, plus any extra
     reward components registered with a weight;
  5. advantages and returns with GAE, advantages whitened over the rollout;
  6. ppo_epochs passes over shuffled minibatches: clipped policy loss, clipped value loss, optional
     entropy bonus and PPO-ptx loss, gradient clipping; stop early when approximate KL passes a bound.

The maths lives in :mod:`rlhf.algos.ppo`; this file holds the models, the loop, checkpoints and logs.
Shapes: B rollout samples, P prompt tokens (left-padded), A response tokens (right-padded),
T = P + A, V vocabulary, H hidden size.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import load_file, save_file

from rlhf.algos.core import causal_lm_loss, masked_mean, masked_sum
from rlhf.algos.ppo import (
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_controller,
    kl_penalty,
    per_token_rewards,
    ppo_policy_loss,
    sequence_kl,
    value_loss,
    whiten,
)
from rlhf.config import PPOConfig, require
from rlhf.configlib import ConfigError, to_dict
from rlhf.data.chat import Encoded, count_control_rows, encode_prompt, encode_sft, encode_text, pad_right, report_control_rows
from rlhf.data.io import load_prompts, load_records, load_sft
from rlhf.fsutil import (atomic_dir, check_out, fingerprint, mark_stage, marked, remove_output, stage_done,
                         write_json_atomic)
from rlhf.models.loading import apply_lora, check_length, load_causal_lm, max_positions, save_model
from rlhf.models.policy import ValueHead, gather_logprobs, response_hidden, response_logits, unwrap
from rlhf.models.reward import RewardModel, load_reward_backbone, member_folders, member_mean_std
from rlhf.report.metrics import MetricsLogger
from rlhf.report.progress import progress_bar
from rlhf.rollout import Sampled, make_engine
from rlhf.world import derive_seed, judge_prompt, parse_prompt

log = logging.getLogger("rlhf.ppo")

CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


@dataclass
class RewardComponent:
    """An extra term of the sequence reward: ``weight * fn(prompts, responses)``, added to the RM score.

    ``fn`` takes the prompt texts (the last user turn) and the response texts of a rollout and returns
    one float per sample. The safety layer registers its safety, length and diversity terms here.
    """

    name: str
    fn: Callable[[list[str], list[str]], Sequence[float]]
    weight: float


@dataclass
class Rollout:
    """One rollout batch (OpenRLHF's ``Experience``): everything the update needs, on one device."""

    input_ids: torch.Tensor  # (B, T) prompt (left-padded) then response (right-padded)
    attention_mask: torch.Tensor  # (B, T) 1 on real prompt and response tokens
    n_prompt: int  # P: response token a sits at position P + a of the full sequence
    response_mask: torch.Tensor  # (B, A) 1 up to and including the first EOS
    logprobs: torch.Tensor  # (B, A) policy log-probs at sampling time (fp32, sampling temperature)
    ref_logprobs: torch.Tensor  # (B, A) reference log-probs
    values: torch.Tensor  # (B, A) critic values of the state before each response token
    scores: torch.Tensor  # (B,) the sequence score that enters the reward (normalised, penalised, clipped)
    rewards: torch.Tensor  # (B, A) per-token rewards
    advantages: torch.Tensor  # (B, A) whitened GAE advantages
    returns: torch.Tensor  # (B, A) GAE returns (the critic's targets)
    rm_scores: torch.Tensor | None = None  # (B,) the reward model's own score (mean - ensemble_penalty * std)
    rm_std: torch.Tensor | None = None  # (B,) ensemble disagreement (zeros for a single reward model)
    prompts: list[str] = field(default_factory=list)  # what judges read: the last user turn (or an attack's request)
    responses: list[str] = field(default_factory=list)  # decoded responses


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


@dataclass
class Models:
    """Policy, reference, critic and reward model of a PPO run."""

    policy: torch.nn.Module
    tok: object
    reference: torch.nn.Module | None  # None with LoRA: the policy with its adapters disabled is the reference
    critic: torch.nn.Module | None  # a reward-model copy whose head reads every token; None with critic=policy
    value_head: ValueHead | None  # the value head on the policy's hidden states with critic=policy
    reward: RewardModel
    same_tokenizer: bool  # the reward model reads the policy's tokens as they are

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int,
               policy_hidden: torch.Tensor | None) -> torch.Tensor:
        """Critic values (B, A) of the state before each response token."""
        if self.value_head is not None:
            return self.value_head(policy_hidden)
        hidden = response_hidden(self.critic, input_ids, attention_mask, n_prompt)  # (B, A, H)
        return unwrap(self.critic).score(hidden).squeeze(-1).float()

    def critic_parameters(self) -> list[torch.nn.Parameter]:
        module = self.value_head if self.value_head is not None else self.critic
        return [p for p in module.parameters() if p.requires_grad]

    def reference_logits(self, input_ids, attention_mask, n_prompt, temperature: float) -> torch.Tensor:
        """The reference's response logits (B, A, V), as ``response_logits`` computes the policy's."""
        if self.reference is not None:
            return response_logits(self.reference, input_ids, attention_mask, n_prompt, temperature)[0]
        with self.policy.disable_adapter():  # LoRA: base weights without adapters, LM head included, = the initial policy
            return response_logits(self.policy, input_ids, attention_mask, n_prompt, temperature)[0]


def load_models(cfg: PPOConfig, device: torch.device) -> Models:
    """Policy (optionally LoRA), reference, critic and reward model, dropout off, on ``device``."""
    policy, tok = load_causal_lm(cfg.policy, cfg.load, gradient_checkpointing=cfg.gradient_checkpointing)
    reference = None
    if cfg.lora.enabled:
        policy = apply_lora(policy, cfg.lora)
    else:
        reference, _ = load_causal_lm(cfg.policy, cfg.load)
        reference.requires_grad_(False).eval()
    reward = RewardModel.load(cfg.reward_model, cfg.load).to(device)
    for m in reward.members:
        m.requires_grad_(False)
    same_tokenizer = not reward.encoder and reward.tok.get_vocab() == tok.get_vocab()
    critic, value_head = None, None
    if cfg.critic == "reward_model":
        if reward.encoder or not same_tokenizer:
            raise ConfigError("ppo.critic=reward_model needs a decoder reward model with the policy's tokenizer "
                              "(its head is read at every response token); use --critic policy")
        critic, _ = load_reward_backbone(member_folders(cfg.reward_model)[0], cfg.load,
                                         gradient_checkpointing=cfg.gradient_checkpointing)
        # In the units of the returns from the start: the head predicts the normalised score, not the raw one.
        fold_normalisation(score_head(critic), *((reward.means[0], reward.stds[0]) if cfg.normalize_reward else (0.0, 1.0)))
        if cfg.lora.enabled:  # adapters (and the head) only, like the policy
            critic = apply_lora(critic, cfg.lora, task_type="SEQ_CLS")
    else:
        value_head = ValueHead(unwrap(policy).config.hidden_size)
    for m in (policy, reference, critic, value_head):
        if m is not None:
            m.to(device)
    policy.eval()  # dropout is off in any case; eval() also keeps layers like BatchNorm fixed
    return Models(policy, tok, reference, critic, value_head, reward, same_tokenizer)


def score_head(critic: torch.nn.Module) -> torch.nn.Linear:
    """The critic's scalar head (the trainable copy under a peft wrapper)."""
    head = unwrap(critic).score
    return head.modules_to_save[head.active_adapter] if hasattr(head, "modules_to_save") else head


@torch.no_grad()
def fold_normalisation(head: torch.nn.Linear, mean: float, std: float) -> None:
    """Make ``head(h)`` the normalised ``(head(h) - mean) / std`` by rewriting its weights (a bias is added
    where the head has none): a critic copied from the reward model then starts in the units of the
    returns, rather than predicting raw scores that value clipping takes many iterations to walk off."""
    mean, std = float(mean), float(std)
    if head.bias is None:
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features, dtype=head.weight.dtype, device=head.weight.device))
    head.weight.div_(std)
    head.bias.sub_(mean).div_(std)


# ----------------------------------------------------------------------------------------------------
# Prompts and PPO-ptx data
# ----------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------
# The run: rollout (steps 1-5) and update (step 6)
# ----------------------------------------------------------------------------------------------------


class PPORun:
    """The state of a PPO run: models, optimisers, KL controller, iteration counter.

    ``step()`` runs one iteration and returns its metrics; ``run_ppo`` drives it with logging and
    checkpoints. Benchmarks and tests call ``rollout``/``update`` directly.
    """

    def __init__(self, cfg: PPOConfig, components: Sequence[RewardComponent] = ()):
        self.cfg, self.components = cfg, list(components)
        # The device from accelerate (CUDA when visible); PPO runs in fp32: log-prob ratios need the precision.
        self.device = PartialState().device
        self.m = load_models(cfg, self.device)
        self.prompts, self.world = load_prompt_stream(cfg, self.m.tok)
        self.engine = make_engine(unwrap(self.m.policy), self.m.tok, cfg.generation.backend)
        self.ptx = load_ptx(cfg, self.m.tok) if cfg.ptx_coef > 0 else []
        self.processor = steering(cfg, self.m.tok)
        policy_params = [p for p in self.m.policy.parameters() if p.requires_grad]
        self.policy_opt = torch.optim.AdamW(policy_params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-5)
        self.critic_opt = torch.optim.AdamW(self.m.critic_parameters(), lr=cfg.critic_lr or cfg.lr,
                                            weight_decay=cfg.weight_decay, eps=1e-5)
        self.kl_ctl = kl_controller(cfg.kl.coef, cfg.kl.adaptive, cfg.kl.target, cfg.kl.horizon)
        self.iteration = 0
        self.inputs = input_fingerprints(cfg)  # recorded in every checkpoint: a resume must read the same

    # -- rollout ----------------------------------------------------------------------------------------

    def _seed(self, purpose: str) -> int:
        """Randomness of iteration i derives from a hash of (seed, i, purpose): a resumed run draws what the
        original drew, and no two (seed, iteration, purpose) share a stream (a linear mix of them can)."""
        return derive_seed(self.cfg.seed, f"ppo/{self.iteration}/{purpose}")

    @torch.no_grad()
    def rollout(self) -> tuple[Rollout, dict[str, float]]:
        cfg, m = self.cfg, self.m
        idx = self.prompts.batch(self.iteration, cfg.batch_size)

        # 1. Generate: left-padded prompts, KV cache, sampling with our settings only; everything after the
        #    first stop token is padding. The static engine also returns each token's log-prob and entropy.
        sampled = self.engine.generate([self.prompts.encoded[i] for i in idx], cfg.generation, self._seed("rollout"),
                                       self.processor)
        input_ids, attention_mask, n_prompt = sampled.input_ids, sampled.attention_mask, sampled.n_prompt  # (B, T), (B, T), P
        responses, mask, ended = sampled.responses, sampled.mask, sampled.ended  # (B, A), (B, A), (B,)
        texts = [m.tok.decode(r[: int(n)], skip_special_tokens=True).strip() for r, n in zip(responses, mask.sum(1))]
        prompts = [self.prompts.texts[i] for i in idx]

        # 2. Score at the last token (the stop token, where the reward model was trained); normalise; a fixed
        #    score without a stop token or past the reward model's context; clip.
        rm_scores, rm_std, scores, components = self._score(input_ids, attention_mask, idx, texts, ended)  # (B,) x3, {}

        # 3. Log-probs of policy and reference (fp32, sampling temperature, the causal LM's own logits) and the
        #    critic's values, in micro-batches.
        logprobs, ref_logprobs, values, entropy = self._score_tokens(sampled)

        # 4. Per-token rewards: -kl_coef * KL_t everywhere, the score (plus extra components) on the last token.
        kl = kl_penalty(logprobs, ref_logprobs, cfg.kl.estimator) * mask  # (B, A)
        rewards = per_token_rewards(scores, kl, self.kl_ctl.value, mask)

        # 5. Advantages and returns (GAE), advantages whitened over the rollout's response tokens.
        advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)

        seq_kl = sequence_kl(logprobs - ref_logprobs, mask)  # (B,) k1 summed: the KL the controller tracks
        ro = Rollout(input_ids, attention_mask, n_prompt, mask, logprobs, ref_logprobs, values, scores, rewards,
                     advantages, returns, rm_scores, rm_std, prompts, texts)
        stats = {
            "objective/scores": rm_scores.mean().item(),
            "objective/rlhf_reward": (scores - self.kl_ctl.value * seq_kl).mean().item(),
            "objective/kl": seq_kl.mean().item(),
            "objective/kl_coef": self.kl_ctl.value,
            "objective/entropy": entropy.item(),
            "response/length": mask.sum(1).float().mean().item(),
            "response/eos_rate": ended.float().mean().item(),
            "val/explained_variance": explained_variance(values, returns, mask).item(),
            **components,
        }
        if self.world:  # measured, never trained on: the truth to hold the proxy against
            stats["objective/gold"] = sum(judge_prompt(p, r).total for p, r in zip(prompts, texts)) / len(texts)
        return ro, stats

    def _score(self, input_ids, attention_mask, idx, texts, ended
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """(reward-model score, ensemble std, sequence score used in the reward), each (B,), and each extra
        component's mean."""
        cfg, rm = self.cfg, self.m.reward
        if self.m.same_tokenizer:  # the RM reads exactly the tokens the policy wrote (the reward sits on EOS)
            per_member = torch.cat([rm.raw(input_ids[p], attention_mask[p]) for p in self._micro_batches(len(input_ids))],
                                   dim=1)  # (M, B)
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
        ended = ended & fits  # a sequence the reward model cannot read whole is scored like one without EOS
        rm_scores = mean - cfg.ensemble_penalty * std
        scores, means = rm_scores.clone(), {}
        prompts = [self.prompts.texts[i] for i in idx]
        for c in self.components:
            values = torch.tensor(list(c.fn(prompts, texts)), dtype=scores.dtype, device=scores.device)  # (B,)
            means[f"reward/{c.name}"] = values.mean().item()
            scores += c.weight * values
        if cfg.missing_eos_score is not None:
            scores = torch.where(ended, scores, torch.full_like(scores, cfg.missing_eos_score))
        if cfg.reward_clip:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        return rm_scores, std, scores, means

    def _micro_batches(self, n: int) -> list[slice]:
        size = self.cfg.micro_batch_size or n
        return [slice(s, s + size) for s in range(0, n, size)]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.mixed_precision == "bf16")

    def _score_tokens(self, sampled: Sampled) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step 3 in micro-batches: policy and reference log-probs (B, A), the critic's values (B, A) and the
        policy's mean entropy; a (b, A, V) logits tensor at a time, never the rollout's (B, A, V).

        The policy's forward is skipped when the engine returned the log-probs and entropies (the static engine:
        the same logits, read while sampling) and no value head needs the policy's hidden states."""
        m, t, n_prompt, mask = self.m, self.cfg.generation.temperature, sampled.n_prompt, sampled.mask
        # Under bf16 autocast the update's log-probs are bf16 ones: the rollout's must be too, so the policy runs.
        from_engine = sampled.logprobs is not None and m.value_head is None and self.cfg.mixed_precision != "bf16"
        logprobs, ref_logprobs, values, entropy = [], [], [], torch.zeros((), device=mask.device)
        for part in self._micro_batches(len(mask)):
            ids, am, tokens, mk = sampled.input_ids[part], sampled.attention_mask[part], sampled.responses[part], mask[part]
            with self._autocast():
                hidden = None
                if from_engine:
                    logprobs.append(sampled.logprobs[part])
                    entropy += masked_sum(sampled.entropy[part], mk)
                else:
                    logits, hidden = response_logits(m.policy, ids, am, n_prompt, t, with_hidden=m.value_head is not None)
                    logprobs.append(gather_logprobs(logits, tokens) * mk)  # (b, A)
                    entropy += masked_sum(entropy_from_logits(logits), mk)
                    del logits
                ref_logprobs.append(gather_logprobs(m.reference_logits(ids, am, n_prompt, t), tokens) * mk)
                values.append(m.values(ids, am, n_prompt, hidden) * mk)
        return torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values), entropy / mask.sum().clamp(min=1)

    def _normalise_on_first_rollout(self, raw: torch.Tensor) -> None:
        """A reward model trained elsewhere stores no reward_mean/reward_std: measure them on the initial
        policy's first rollout (M, B), as `rlhf rm` does on SFT samples, instead of using raw scores against
        reward_clip and missing_eos_score; fold them into the critic too. They are kept in the checkpoints."""
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

    # -- update -----------------------------------------------------------------------------------------

    def update(self, ro: Rollout) -> dict[str, float]:
        """6. ppo_epochs passes over shuffled minibatches; early stop on approximate KL."""
        cfg, m = self.cfg, self.m
        gen = torch.Generator().manual_seed(self._seed("minibatches"))
        m.policy.train()
        totals: dict[str, float] = {}
        n_mb, stopped = 0, False
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size, generator=gen).to(self.device)
            for start in range(0, cfg.batch_size, cfg.mini_batch_size):
                stats = self._minibatch(ro, order[start : start + cfg.mini_batch_size])
                n_mb += 1
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                if cfg.approxkl_stop and stats["policy/approxkl"] > cfg.approxkl_stop:
                    stopped = True
                    break
            if stopped:
                break
        m.policy.eval()
        out = {k: v / n_mb for k, v in totals.items()}
        out["policy/epochs_done"] = n_mb / (cfg.batch_size // cfg.mini_batch_size)
        return out

    def _minibatch(self, ro: Rollout, idx: torch.Tensor) -> dict[str, float]:
        """One optimiser step on a minibatch: gradients accumulated over its micro-batches, each weighted by its
        share of the minibatch's response tokens, so the step equals the whole minibatch's (losses are means
        over response tokens)."""
        cfg, m = self.cfg, self.m
        n_tokens = ro.response_mask[idx].sum().clamp(min=1)
        # Micro-batches of similar response lengths, each cut to its own width: less padding computed, and the
        # same step (the gradients of all the minibatch's micro-batches are summed before it).
        idx = idx[ro.response_mask[idx].sum(1).argsort(stable=True)]
        stats: dict[str, float] = {}
        for part in self._micro_batches(len(idx)):
            weight = ro.response_mask[idx[part]].sum() / n_tokens
            loss, micro = self._micro_loss(ro, idx[part])
            (loss * weight).backward()
            for k, v in micro.items():
                stats[k] = stats.get(k, 0.0) + v * weight.item()
        if self.ptx:
            ptx_loss = self._ptx_loss()
            (cfg.ptx_coef * ptx_loss).backward()
            stats["ptx/loss"] = ptx_loss.item()
        for opt, params in ((self.policy_opt, [p for p in m.policy.parameters() if p.requires_grad]),
                            (self.critic_opt, m.critic_parameters())):
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return stats

    def _micro_loss(self, ro: Rollout, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped policy loss, the clipped value loss and the entropy bonus of some rollout rows, each a
        mean over their response tokens; and the statistics."""
        cfg, m = self.cfg, self.m
        ids, am, mask = ro.input_ids[idx], ro.attention_mask[idx], ro.response_mask[idx]
        # Drop the columns that are padding for all these rows: response columns past the longest response, and
        # prompt columns before the longest prompt (positions come from the mask, so nothing else changes).
        width = int(mask.sum(1).max())
        lead = int(am[:, : ro.n_prompt].any(dim=0).long().argmax())
        n_prompt = ro.n_prompt - lead
        ids, am, mask = ids[:, lead : ro.n_prompt + width], am[:, lead : ro.n_prompt + width], mask[:, :width]
        with self._autocast():
            logits, hidden = response_logits(m.policy, ids, am, n_prompt, cfg.generation.temperature,
                                             with_hidden=m.value_head is not None)  # (b, a, V), (b, a, H)
            logprobs = gather_logprobs(logits, ids[:, n_prompt :])
            values = m.values(ids, am, n_prompt, hidden)
        pg_loss, pg = ppo_policy_loss(logprobs, ro.logprobs[idx, :width], ro.advantages[idx, :width], mask, cfg.cliprange)
        vf_loss, vf = value_loss(values, ro.values[idx, :width], ro.returns[idx, :width], mask, cfg.cliprange_value)
        with torch.set_grad_enabled(cfg.ent_coef != 0):  # without a bonus it is a statistic: no backward through it
            entropy = masked_mean(entropy_from_logits(logits), mask)
        loss = pg_loss + cfg.vf_coef * vf_loss - cfg.ent_coef * entropy
        return loss, {"policy/loss": pg_loss.item(), "policy/approxkl": pg["approxkl"].item(),
                      "policy/clipfrac": pg["clipfrac"].item(), "policy/entropy": entropy.item(),
                      "val/loss": vf_loss.item(), "val/clipfrac": vf["clipfrac"].item()}

    def _ptx_loss(self) -> torch.Tensor:
        """PPO-ptx: the language-modelling loss on a seeded batch of the ptx data."""
        rng = random.Random(self._seed(f"ptx/{self.policy_opt_steps()}"))
        rows = [self.ptx[rng.randrange(len(self.ptx))] for _ in range(self.cfg.ptx_batch_size)]
        batch = {k: v.to(self.device) for k, v in pad_right(rows, self.m.tok.pad_token_id).items()}
        logits = self.m.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return causal_lm_loss(logits, batch["labels"])[0]

    def policy_opt_steps(self) -> int:
        states = self.policy_opt.state.values()
        return int(next(iter(states))["step"]) if states else 0

    # -- one iteration ----------------------------------------------------------------------------------

    def set_lr(self) -> float:
        """Constant learning rate after a linear warmup of warmup_iterations."""
        factor = min(1.0, (self.iteration + 1) / self.cfg.warmup_iterations) if self.cfg.warmup_iterations else 1.0
        for opt, lr in ((self.policy_opt, self.cfg.lr), (self.critic_opt, self.cfg.critic_lr or self.cfg.lr)):
            for g in opt.param_groups:
                g["lr"] = lr * factor
        return self.cfg.lr * factor

    def step(self) -> tuple[dict[str, float], Rollout]:
        """One PPO iteration: rollout, update, KL controller; returns the iteration's metrics."""
        lr = self.set_lr()
        t0 = time.perf_counter()
        ro, stats = self.rollout()
        t1 = time.perf_counter()
        stats.update(self.update(ro))
        t2 = time.perf_counter()
        self.kl_ctl.update(stats["objective/kl"], self.cfg.batch_size)
        self.iteration += 1
        stats.update({"time/rollout": t1 - t0, "time/update": t2 - t1, "lr": lr})
        return stats, ro

    # -- checkpoints ------------------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trained tensor: the policy's (all weights, or the adapters) and the critic's."""
        state = {f"policy.{n}": p.detach().cpu().contiguous() for n, p in self.m.policy.named_parameters() if p.requires_grad}
        module = self.m.value_head if self.m.value_head is not None else self.m.critic
        state.update({f"critic.{n}": p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad})
        return state

    def save_checkpoint(self, out: Path, monitor: dict | None = None) -> Path:
        """Write checkpoint-N atomically (weights as safetensors, optimiser and RNG state as tensors, the
        monitors' state as JSON); keep two."""
        path = out / f"checkpoint-{self.iteration}"
        with atomic_dir(path) as tmp:
            if monitor is not None:
                write_json_atomic(tmp / "monitor.json", monitor)
            save_file(self.trainable_state(), str(tmp / "trainable.safetensors"))
            torch.save({"policy": self.policy_opt.state_dict(), "critic": self.critic_opt.state_dict()}, tmp / "optimizer.pt")
            torch.save({"torch": torch.get_rng_state(), "python": torch.tensor(list(random.getstate()[1]))}, tmp / "rng.pt")
            rm = self.m.reward
            write_json_atomic(tmp / "state.json", {"iteration": self.iteration, "kl_controller": self.kl_ctl.state_dict(),
                                                   "reward_normalisation": {"mean": rm.means.tolist(), "std": rm.stds.tolist()},
                                                   "config": to_dict(self.cfg), "inputs": self.inputs})
        for old in sorted(checkpoints(out), key=checkpoint_step)[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def load_checkpoint(self, path: Path) -> None:
        state = load_file(str(path / "trainable.safetensors"))
        module = self.m.value_head if self.m.value_head is not None else self.m.critic
        with torch.no_grad():
            for prefix, mod in (("policy.", self.m.policy), ("critic.", module)):
                params = dict(mod.named_parameters())
                for name, tensor in state.items():
                    if name.startswith(prefix):
                        params[name[len(prefix):]].copy_(tensor)
        opt = torch.load(path / "optimizer.pt", weights_only=True, map_location=self.device)
        self.policy_opt.load_state_dict(opt["policy"])
        self.critic_opt.load_state_dict(opt["critic"])
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate((3, tuple(int(x) for x in rng["python"]), None))
        meta = json.loads((path / "state.json").read_text())
        self.iteration = int(meta["iteration"])
        self.kl_ctl.load_state_dict(meta["kl_controller"])
        if "reward_normalisation" in meta:  # the statistics the run measured (or the folder's): the same rewards
            norm = meta["reward_normalisation"]
            self.m.reward.set_normalisation(torch.tensor(norm["mean"]), torch.tensor(norm["std"]))


def checkpoints(out: Path) -> list[Path]:
    return [p for p in out.glob("checkpoint-*") if CHECKPOINT.search(p.name) and (p / "state.json").is_file()]


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT.search(path.name).group(1))


def truncate_log(path: Path, last_step: int, key: str = "step") -> None:
    """Drop the JSONL records past the checkpoint being resumed (by their ``key``), so that the log reads as
    one uninterrupted run: each iteration once."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)[key] <= last_step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


# Settings that do not change what a resumed run computes: they may differ from the checkpoint's.
RESUME_FREE = ("out", "resume", "resume_changed", "overwrite", "iterations", "save_every", "log_every")
INPUTS = ("policy", "reward_model", "prompts", "ptx_data")


def input_fingerprints(cfg: PPOConfig) -> dict[str, dict | None]:
    """What the run reads, for the resume check: each input's resolved path and a digest of its content."""
    return {name: {"path": str(Path(v).resolve()), "digest": fingerprint(v)} if (v := getattr(cfg, name)) else None
            for name in INPUTS}


def resume_differences(saved: dict, cfg: PPOConfig) -> list[str]:
    """How the run asked for differs from the one a checkpoint was made with: inputs first, then settings."""
    diffs = []
    now = input_fingerprints(cfg)
    for name in INPUTS:
        before, after = (saved.get("inputs") or {}).get(name), now[name]
        if (before or {}).get("digest") != (after or {}).get("digest"):
            was = before["path"] if before else "none"
            diffs.append(f"{name}: {was} -> {getattr(cfg, name) or 'none'} ({'other content' if before and after else 'changed'})")
    old, new = flatten(saved.get("config") or {}), flatten(to_dict(cfg))
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in (*RESUME_FREE, *INPUTS):
            continue
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return diffs


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def ppo_state(path: Path) -> str | None:
    """What a folder holds for check_out: a finished PPO run, one to resume, one killed early, or none."""
    if stage_done(path, "ppo") is not None:
        return "finished"
    if checkpoints(path):
        return "resumable"
    return "partial" if marked(path, "ppo") else None


def check_ppo_out(cfg: PPOConfig) -> str:
    """Before any model loads: may cfg.out be written ("new", "replace") or resumed ("resume")? A resume must
    continue the same run: other inputs or settings than the checkpoint's are refused unless resume_changed."""
    inputs = {"policy": cfg.policy, "reward_model": cfg.reward_model, "prompts": cfg.prompts, "ptx_data": cfg.ptx_data}
    action = check_out(cfg.out, stage="ppo", kind="dir", inputs=inputs, state=ppo_state, overwrite=cfg.overwrite,
                       resume=cfg.resume)
    if action == "resume":
        found = checkpoints(Path(cfg.out))
        if not found:
            raise ConfigError(f"ppo: --resume: {cfg.out} holds no checkpoint to continue from; pass --overwrite to start again")
        last = max(found, key=checkpoint_step)
        saved = json.loads((last / "state.json").read_text())
        if "config" not in saved:
            log.warning("%s records no settings (an older checkpoint): resuming without checking them", last)
        elif diffs := resume_differences(saved, cfg):
            listed = "; ".join(diffs)
            if not cfg.resume_changed:
                raise ConfigError(f"ppo: --resume: {last} was made by a different run ({listed}); pass "
                                  "--resume_changed to continue with these changes, or --overwrite to start again")
            log.warning("resuming %s with changes (--resume_changed): %s", last, listed)
    return action


def prepare_out(cfg: PPOConfig, run: PPORun, action: str) -> Path:
    """Create, replace or resume the output folder (as check_ppo_out decided)."""
    out = Path(cfg.out)
    if action == "replace":
        remove_output(out)
    out.mkdir(parents=True, exist_ok=True)
    mark_stage(out, "ppo")
    found = checkpoints(out) if action == "resume" else []
    if found:
        last = max(found, key=checkpoint_step)
        run.load_checkpoint(last)
        log.info("resumed from %s (iteration %d)", last, run.iteration)
    truncate_log(out / "metrics.jsonl", run.iteration)
    truncate_log(out / "alerts.jsonl", run.iteration, key="iteration")
    return out


def save_final(run: PPORun, out: Path, summary: dict) -> None:
    """The policy as an ordinary model folder (written to a temp folder, files moved in), then stage.json last."""
    with atomic_dir(out / "final") as tmp:
        save_model(run.m.policy, run.m.tok, tmp, lora_save=run.cfg.lora.save)
    for f in (out / "final").iterdir():
        os.replace(f, out / f.name)
    (out / "final").rmdir()
    write_json_atomic(out / "stage.json", summary)


class Monitor:
    """Watches each rollout for reward hacking and mode collapse (measured, never trained on).

    Alerts go to the log and to OUT/alerts.jsonl as they fire; the per-iteration figures join the
    metrics as ``hacking/alerts`` and ``diversity/*``. Diversity uses the bag-of-words similarity here
    (no embedding model inside the training loop); `rlhf eval` measures it with embeddings.
    """

    def __init__(self, world: bool, ensemble: bool):
        from rlhf.evaluation.diversity import Embedder
        from rlhf.evaluation.hacking import HackingMonitor

        self.world, self.ensemble = world, ensemble
        self.hacking, self.embedder = HackingMonitor(), Embedder(bag_of_words=True)
        self.collapse: dict = {"collapsed_iterations": [], "last": None}

    def update(self, iteration: int, ro: Rollout, kl: float, alerts_file: Path) -> dict[str, float]:
        from rlhf.evaluation.diversity import diversity_report

        gold = [judge_prompt(p, r).total for p, r in zip(ro.prompts, ro.responses)] if self.world else None
        alerts = self.hacking.update(iteration, ro.responses, ro.rm_scores.tolist(), kl, gold,
                                     ro.rm_std.mean().item() if self.ensemble else None)
        if alerts:
            with alerts_file.open("a") as f:  # appended as they fire: a crash keeps what was seen
                f.writelines(json.dumps(asdict(a)) + "\n" for a in alerts)
        div = diversity_report(ro.responses, self.embedder)
        if div["is_collapsed"]:
            self.collapse["collapsed_iterations"].append(iteration)
            if len(self.collapse["collapsed_iterations"]) == 1:
                log.warning("mode collapse? iteration %d: %s", iteration, "; ".join(div["collapse_reasons"]))
        self.collapse["last"] = {k: v for k, v in div.items() if k != "thresholds"}
        return {"hacking/alerts": float(len(self.hacking.records)), "diversity/distinct_2": div["distinct_2"],
                "diversity/self_bleu": div["self_bleu"], "diversity/similarity": div["mean_similarity"],
                "diversity/collapsed": float(div["is_collapsed"])}

    def state_dict(self) -> dict:
        return {"hacking": self.hacking.state_dict(), "collapse": self.collapse}

    def load_state_dict(self, state: dict) -> None:
        self.hacking.load_state_dict(state["hacking"])
        self.collapse = state["collapse"]


def run_ppo(cfg: PPOConfig, components: Sequence[RewardComponent] = ()) -> dict:
    """Optimise cfg.policy against cfg.reward_model on cfg.prompts; write cfg.out; return a summary."""
    from rlhf.safety.rewards import safety_components

    require(cfg, "policy", "reward_model", "prompts", "out", stage="ppo")
    action = check_ppo_out(cfg)
    check_length(cfg.policy, cfg.generation.max_new_tokens, "generation.max_new_tokens")
    if cfg.ptx_coef > 0:
        check_length(cfg.policy, cfg.ptx_max_length, "ptx_max_length")
    run = PPORun(cfg, [*components, *safety_components(cfg.safety)])
    out = prepare_out(cfg, run, action)
    start, first = time.perf_counter(), run.iteration
    last: dict[str, float] = {}
    log.info("PPO: %d iterations of %d prompts (%d minibatches x %d epochs); critic: %s; reference: %s",
             cfg.iterations, cfg.batch_size, cfg.batch_size // cfg.mini_batch_size, cfg.ppo_epochs, cfg.critic,
             "policy without adapters" if run.m.reference is None else "frozen copy")
    monitor = Monitor(run.world, len(run.m.reward.members) > 1)
    if first and (saved := max(checkpoints(out), key=checkpoint_step) / "monitor.json").is_file():
        monitor.load_state_dict(json.loads(saved.read_text()))
    # purge_step: TensorBoard hides what an interrupted attempt logged past the checkpoint.
    with MetricsLogger(out, purge_step=first + 1 if first else None) as logger, progress_bar("ppo", cfg.iterations) as bar:
        bar.update(advance=first)
        while run.iteration < cfg.iterations:
            last, ro = run.step()
            last.update(monitor.update(run.iteration, ro, last["objective/kl"], out / "alerts.jsonl"))
            bar.update(score=last["objective/scores"], kl=last["objective/kl"], **(
                {"gold": last["objective/gold"]} if "objective/gold" in last else {}))
            if run.iteration % cfg.log_every == 0 or run.iteration == cfg.iterations:
                logger.log(run.iteration, **last)
            if cfg.save_every and run.iteration % cfg.save_every == 0 and run.iteration < cfg.iterations:
                run.save_checkpoint(out, monitor.state_dict())
    if first < cfg.iterations or not checkpoints(out):
        run.save_checkpoint(out, monitor.state_dict())
    summary = {"stage": "ppo", "iterations": run.iteration, "resumed_from": first or None,
               "seconds": time.perf_counter() - start, "final": last, "kl_coef": run.kl_ctl.value,
               "world": run.world, "dropped_prompts": run.prompts.dropped, "hacking": monitor.hacking.summary(),
               "collapse": monitor.collapse, "config": to_dict(cfg)}
    save_final(run, out, summary)
    return summary
