"""The models of an online RL run: policy (optionally LoRA), reference, critic (PPO only) and reward model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.config import PPOConfig
from rlhf.configlib import ConfigError
from rlhf.models.loading import apply_lora, load_causal_lm
from rlhf.models.policy import PackedRows, ValueHead, packs_samples, response_hidden, response_logits, unwrap
from rlhf.models.reward import RewardModel, load_reward_backbone, member_folders


@dataclass
class Models:
    """Policy, reference, critic and reward model of an online RL run (the critic-free algorithms have no critic)."""

    policy: torch.nn.Module
    tok: object
    reference: torch.nn.Module | None  # None with LoRA and no ppo.reference: the policy without its adapters is it
    critic: torch.nn.Module | None  # a reward-model copy whose head reads every token; None with critic=policy
    value_head: ValueHead | None  # the value head on the policy's hidden states with critic=policy
    # (both None for the critic-free algorithms)
    reward: RewardModel
    same_tokenizer: bool  # the reward model reads the policy's tokens as they are

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int,
               policy_hidden: torch.Tensor | None, packed: PackedRows | None = None) -> torch.Tensor:
        """Critic values (B, A) of the state before each response token (the critic reads ``packed`` where given)."""
        if self.value_head is not None:
            return self.value_head(policy_hidden)
        hidden = response_hidden(self.critic, input_ids, attention_mask, n_prompt, packed)  # (B, A, H)
        return unwrap(self.critic).score(hidden).squeeze(-1).float()

    def packs_samples(self) -> bool:
        """The policy, the reference and the critic keep packed samples apart (``rlhf.models.policy.pack_rows``)."""
        return all(packs_samples(m) for m in (self.policy, self.reference, self.critic) if m is not None)

    @property
    def has_critic(self) -> bool:
        return self.critic is not None or self.value_head is not None

    @property
    def critic_module(self) -> torch.nn.Module | None:
        return self.value_head if self.value_head is not None else self.critic

    def critic_parameters(self) -> list[torch.nn.Parameter]:
        module = self.critic_module
        return [p for p in module.parameters() if p.requires_grad] if module is not None else []

    def reference_logits(self, input_ids, attention_mask, n_prompt, temperature: float,
                         packed: PackedRows | None = None) -> torch.Tensor:
        """The reference's response logits (B, A, V), as ``response_logits`` computes the policy's."""
        if self.reference is not None:
            return response_logits(self.reference, input_ids, attention_mask, n_prompt, temperature, packed=packed)[0]
        with self.policy.disable_adapter():  # LoRA: base weights without adapters, LM head included, = the initial policy
            return response_logits(self.policy, input_ids, attention_mask, n_prompt, temperature, packed=packed)[0]


def load_models(cfg: PPOConfig, device: torch.device, with_critic: bool = True) -> Models:
    """Policy (optionally LoRA), reference, critic (``with_critic``) and reward model, dropout off, on ``device``."""
    policy, tok = load_causal_lm(cfg.policy, cfg.load, gradient_checkpointing=cfg.gradient_checkpointing)
    reference = None
    if cfg.lora.enabled:
        policy = apply_lora(policy, cfg.lora)
    if not cfg.lora.enabled or cfg.reference:  # with LoRA and no other reference: the policy without its adapters
        reference, ref_tok = load_causal_lm(cfg.reference or cfg.policy, cfg.load)
        if ref_tok.get_vocab() != tok.get_vocab():
            raise ConfigError(f"ppo.reference: {cfg.reference} has another tokenizer than the policy {cfg.policy}: the KL "
                              "compares their log-probs token by token")
        reference.requires_grad_(False).eval()
    reward = RewardModel.load(cfg.reward_model, cfg.load).to(device)
    for m in reward.members:
        m.requires_grad_(False)
    same_tokenizer = not reward.encoder and reward.tok.get_vocab() == tok.get_vocab()
    critic, value_head = None, None
    if with_critic and cfg.critic == "reward_model":
        if reward.encoder or not same_tokenizer:
            raise ConfigError("ppo.critic=reward_model needs a decoder reward model with the policy's tokenizer "
                              "(its head is read at every response token); use --critic policy")
        critic, _ = load_reward_backbone(member_folders(cfg.reward_model)[0], cfg.load,
                                         gradient_checkpointing=cfg.gradient_checkpointing)
        # In the units of the returns from the start: the head predicts the normalised score, not the raw one.
        fold_normalisation(score_head(critic), *((reward.means[0], reward.stds[0]) if cfg.normalize_reward else (0.0, 1.0)))
        if cfg.lora.enabled:  # adapters (and the head) only, like the policy
            critic = apply_lora(critic, cfg.lora, task_type="SEQ_CLS")
    elif with_critic:  # critic=policy
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
