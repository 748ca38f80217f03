"""The learner: step 6 of an iteration, ``ppo_epochs`` passes over shuffled minibatches of a rollout.

Each minibatch is one optimiser step of the policy (and of the critic, where the algorithm has one): the clipped
policy loss, the algorithm's KL loss term (GRPO), the clipped value loss (PPO), an optional entropy bonus and
PPO-ptx loss, gradient clipping; the epochs stop early when approximate KL passes a bound.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from rlhf import distributed
from rlhf.algos.core import causal_lm_loss, masked_mean
from rlhf.algos.ppo import entropy_from_logits, ppo_policy_loss, value_loss
from rlhf.config import PPOConfig
from rlhf.data.chat import Encoded, pad_right
from rlhf.models.policy import gather_logprobs, pack_rows, response_logits
from rlhf.rl.algorithms import Algorithm
from rlhf.rl.experience import autocast, micro_batches
from rlhf.rl.models import Models
from rlhf.rl.types import Rollout


class Learner:
    """Optimisers and the update of one rollout."""

    def __init__(self, cfg: PPOConfig, models: Models, algorithm: Algorithm, device: torch.device, ptx: list[Encoded],
                 seed_of: Callable[[str], int]):
        self.cfg, self.m, self.algorithm, self.device, self.ptx = cfg, models, algorithm, device, ptx
        self.seed_of = seed_of  # the current iteration's seed for a purpose (minibatch order, ptx rows)
        self.packed = cfg.padding_free and models.packs_samples()  # micro-batches without their padding
        self.policy_params = [p for p in models.policy.parameters() if p.requires_grad]
        self.policy_opt = torch.optim.AdamW(self.policy_params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-5)
        critic = models.critic_parameters()
        self.critic_opt = torch.optim.AdamW(critic, lr=cfg.critic_lr or cfg.lr, weight_decay=cfg.weight_decay,
                                            eps=1e-5) if critic else None

    def optimisers(self) -> dict[str, torch.optim.Optimizer]:
        return {"policy": self.policy_opt, **({"critic": self.critic_opt} if self.critic_opt else {})}

    def set_lr(self, iteration: int) -> float:
        """Constant learning rate after a linear warmup of warmup_iterations."""
        cfg = self.cfg
        factor = min(1.0, (iteration + 1) / cfg.warmup_iterations) if cfg.warmup_iterations else 1.0
        for name, opt in self.optimisers().items():
            for g in opt.param_groups:
                g["lr"] = (cfg.lr if name == "policy" else cfg.critic_lr or cfg.lr) * factor
        return cfg.lr * factor

    def update(self, ro: Rollout, kl_coef: float) -> dict[str, float]:
        """6. ppo_epochs passes over shuffled minibatches; early stop on approximate KL."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(self.seed_of("minibatches"))
        # This process's rows: its share of every minibatch (the update is the same as one process's on the whole).
        n, size = len(ro.scores), cfg.mini_batch_size // distributed.processes()
        self.m.policy.train()
        totals: dict[str, float] = {}
        n_mb, stopped = 0, False
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(n, generator=gen).to(self.device)
            for start in range(0, n, size):
                stats = self.minibatch(ro, order[start : start + size], kl_coef)
                n_mb += 1
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                if cfg.approxkl_stop and stats["policy/approxkl"] > cfg.approxkl_stop:
                    stopped = True
                    break
            if stopped:
                break
        self.m.policy.eval()
        out = {k: v / n_mb for k, v in totals.items()}
        out["policy/epochs_done"] = n_mb / (n // size)
        return out

    def minibatch(self, ro: Rollout, idx: torch.Tensor, kl_coef: float = 0.0) -> dict[str, float]:
        """One optimiser step on a minibatch: gradients accumulated over its micro-batches, each weighted by its
        share of the minibatch's response tokens, so the step equals the whole minibatch's (losses are means
        over response tokens). Under several processes ``idx`` is this process's part of the minibatch: the shares
        are of the response tokens of every process's part, and the gradients are summed over the processes."""
        cfg = self.cfg
        n_tokens = distributed.all_sum(ro.response_mask[idx].sum()).clamp(min=1)
        # Micro-batches of similar response lengths, each cut to its own width: less padding computed, and the
        # same step (the gradients of all the minibatch's micro-batches are summed before it).
        idx = idx[ro.response_mask[idx].sum(1).argsort(stable=True)]
        stats: dict[str, float] = {}
        for part in micro_batches(len(idx), cfg.micro_batch_size):
            weight = ro.response_mask[idx[part]].sum() / n_tokens
            loss, micro = self._micro_loss(ro, idx[part], kl_coef)
            (loss * weight).backward()
            for k, v in micro.items():
                stats[k] = stats.get(k, 0.0) + v * weight.item()
        if self.ptx:  # each process its own rows: the mean of the processes' losses
            ptx_loss = self._ptx_loss()
            (cfg.ptx_coef * ptx_loss / distributed.processes()).backward()
            stats["ptx/loss"] = ptx_loss.item() / distributed.processes()
        stats = distributed.sum_over_processes(stats)  # the shares' weighted sums: the whole minibatch's means
        for opt, params in ((self.policy_opt, self.policy_params), (self.critic_opt, self.m.critic_parameters())):
            if opt is None:
                continue
            distributed.sync_gradients(params)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return stats

    def _micro_loss(self, ro: Rollout, idx: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped policy loss, the algorithm's KL term, the clipped value loss and the entropy bonus of some
        rollout rows, each a mean over their response tokens; and the statistics."""
        cfg, m = self.cfg, self.m
        ids, am, mask = ro.input_ids[idx], ro.attention_mask[idx], ro.response_mask[idx]
        # Drop the columns that are padding for all these rows: response columns past the longest response, and
        # prompt columns before the longest prompt (positions come from the mask, so nothing else changes).
        width = int(mask.sum(1).max())
        lead = int(am[:, : ro.n_prompt].any(dim=0).long().argmax())
        n_prompt = ro.n_prompt - lead
        ids, am, mask = ids[:, lead : ro.n_prompt + width], am[:, lead : ro.n_prompt + width], mask[:, :width]
        t, with_hidden = cfg.generation.temperature, m.value_head is not None
        packed = pack_rows(ids, am, n_prompt) if self.packed else None  # the same numbers, no padding computed
        with autocast(cfg, self.device):
            logits, hidden = response_logits(m.policy, ids, am, n_prompt, t, with_hidden=with_hidden,
                                             packed=packed)  # (b, a, V), (b, a, H)
            logprobs = gather_logprobs(logits, ids[:, n_prompt :])
            values = m.values(ids, am, n_prompt, hidden, packed) if m.has_critic else None
        pg_loss, pg = ppo_policy_loss(logprobs, ro.logprobs[idx, :width], ro.advantages[idx, :width], mask, cfg.cliprange)
        with torch.set_grad_enabled(cfg.ent_coef != 0):  # without a bonus it is a statistic: no backward through it
            entropy = masked_mean(entropy_from_logits(logits), mask)
        loss = pg_loss - cfg.ent_coef * entropy
        stats = {"policy/loss": pg_loss.item(), "policy/approxkl": pg["approxkl"].item(),
                 "policy/clipfrac": pg["clipfrac"].item(), "policy/entropy": entropy.item()}
        if (kl_loss := self.algorithm.kl_loss(logprobs, ro.ref_logprobs[idx, :width], mask, kl_coef)) is not None:
            loss = loss + kl_loss
            stats["policy/kl_loss"] = kl_loss.item()
        if values is not None:
            vf_loss, vf = value_loss(values, ro.values[idx, :width], ro.returns[idx, :width], mask, cfg.cliprange_value)
            loss = loss + cfg.vf_coef * vf_loss
            stats.update({"val/loss": vf_loss.item(), "val/clipfrac": vf["clipfrac"].item()})
        return loss, stats

    def _ptx_loss(self) -> torch.Tensor:
        """PPO-ptx: the language-modelling loss on a seeded batch of the ptx data."""
        rng = random.Random(self.seed_of(f"ptx/{self.policy_opt_steps()}"))
        rows = [self.ptx[rng.randrange(len(self.ptx))] for _ in range(self.cfg.ptx_batch_size)]
        batch = {k: v.to(self.device) for k, v in pad_right(rows, self.m.tok.pad_token_id).items()}
        logits = self.m.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return causal_lm_loss(logits, batch["labels"])[0]

    def policy_opt_steps(self) -> int:
        states = self.policy_opt.state.values()
        return int(next(iter(states))["step"]) if states else 0
