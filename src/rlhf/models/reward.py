"""Reward models: a backbone plus a scalar head, saved as an ordinary sequence-classification folder.

The folder is what ``AutoModelForSequenceClassification.from_pretrained(path)`` loads, with
``num_labels=1``: the convention TRL and OpenRLHF use, so any tool can read our reward models and we
can read theirs. Decoder backbones (Llama, GPT-2, Qwen...) read the reward at the last real token;
encoders (BERT-style) use their own pooler on the first token.

An ensemble is a folder with ``ensemble.json`` and one such folder per member (``member_0``, ...).
:class:`RewardModel` loads either and returns, per sequence, the members' mean reward and their
disagreement (standard deviation; 0 for a single model). Each folder's config carries
``reward_mean``/``reward_std`` measured on policy samples, so PPO can normalise without rescoring.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from rlhf.algos.core import last_token_index, position_ids_from_mask
from rlhf.config import ModelLoadConfig
from rlhf.data.chat import STOPS_ATTR, Encoded, Message, TooLong, encode_sft, specials_as_text
from rlhf.models.loading import (check_model_dir, disable_dropout, ensure_pad_token, folder_stop_ids, from_pretrained,
                                 load_tokenizer, positions_in)
from rlhf.models.policy import cache_kwarg, unwrap
from rlhf.models.tokenizer import CHAT_TEMPLATE

log = logging.getLogger("rlhf.models")

ENSEMBLE_FILE = "ensemble.json"


def is_encoder(model: PreTrainedModel) -> bool:
    """BERT-style models classify from their pooler; decoders have a ``score`` head read per token."""
    base = unwrap(model)
    return not hasattr(base, "score")


def load_reward_backbone(path: str | Path, load: ModelLoadConfig | None = None, *, gradient_checkpointing: bool = False
                         ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sequence-classification model with one output from any folder: a causal LM (new head) or a reward model."""
    load = load or ModelLoadConfig()
    path = check_model_dir(path)
    tok = load_tokenizer(path, load, template=False)
    model = from_pretrained(AutoModelForSequenceClassification, path, load, num_labels=1)
    if not is_encoder(model):
        # Decoders read the chat-formatted conversation, as the policy wrote it; encoders read a sentence
        # pair and keep their folder's own template (or none), so the saved folder renders with its tokenizer.
        if not tok.chat_template:
            tok.chat_template = CHAT_TEMPLATE
        ensure_pad_token(model, tok)
    elif tok.num_special_tokens_to_add(pair=True) == 0:
        log.warning("the tokenizer of %s adds no separators to a sentence pair; prompt and response are joined "
                    "with a newline", path)
    # Where a response ends: recorded in our reward models' config (from the policy folder they were trained
    # on), else the folder's own tokenizer EOS and generation_config.json.
    setattr(tok, STOPS_ATTR, getattr(model.config, "rlhf_stop_token_ids", None) or folder_stop_ids(path, tok))
    disable_dropout(model)  # the same pair must score the same in every pass
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tok


def reward_forward(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Rewards (B,) of full sequences (B, T), left-, right- or mixed-padded.

    For decoders the head is applied to the hidden state of the last real token only (found from the
    mask, with positions counted from the first real token), which is what the library's own forward
    computes for a right-padded batch, without projecting every position.
    """
    if is_encoder(model):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
    base = unwrap(model)
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                      use_cache=False).last_hidden_state  # (B, T, H)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]  # (B, H)
    return base.score(last)[:, 0].float()


def shared_prefix_rewards(model: PreTrainedModel, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor,
                          suffix_ids: torch.Tensor, suffix_mask: torch.Tensor) -> torch.Tensor:
    """Rewards (2B,) of B prefixes each continued by two suffixes, the prefix run once (decoders only).

    prefix (B, P) and suffix (2B, S) are right-padded; rows 2i and 2i+1 of the suffix continue prefix i,
    and every suffix has at least one real token. A preference pair's chosen and rejected share their
    prompt, so the prompt's keys and values are computed once and repeated for both continuations;
    gradients flow back through the repeat. The rewards equal ``reward_forward`` on the full sequences
    up to float rounding.
    """
    base = unwrap(model)
    backbone = getattr(base, base.base_model_prefix)
    cache = DynamicCache(config=base.config)
    cache_arg = cache_kwarg(backbone, cache)
    backbone(input_ids=prefix_ids, attention_mask=prefix_mask, position_ids=position_ids_from_mask(prefix_mask),
             use_cache=True, **cache_arg)
    if cache.get_seq_length() != prefix_ids.shape[1]:
        raise RuntimeError(f"{type(backbone).__name__} did not fill the KV cache; "
                           "train with --no-share_prompt (rm.share_prompt: false)")
    cache.batch_repeat_interleave(2)  # (2B, heads, P, d): one copy per continuation
    prefix_len = prefix_mask.sum(dim=1).repeat_interleave(2)  # (2B,)
    positions = prefix_len[:, None] + torch.arange(suffix_ids.shape[1], device=suffix_ids.device)  # (2B, S)
    mask = torch.cat([prefix_mask.repeat_interleave(2, dim=0), suffix_mask], dim=1)  # (2B, P + S)
    hidden = backbone(input_ids=suffix_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                      **cache_arg).last_hidden_state  # (2B, S, H)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(suffix_mask)]  # (2B, H)
    return base.score(last)[:, 0].float()


def encode_for_reward(tok: PreTrainedTokenizerBase, prompt: Sequence[Message], response: str, max_length: int,
                      encoder: bool = False) -> list[int] | None:
    """Token ids the reward model reads for one (prompt, response); None when the response alone is too long.

    Decoders see exactly what the policy saw and wrote: the rendered prompt, then the response ending
    in EOS, whose hidden state carries the reward. Encoders see the usual pair input
    ``[CLS] prompt [SEP] response [SEP]`` (scored with segment ids 0 throughout: pass only input_ids
    and attention_mask when you call such a model yourself). Overlong prompts lose their oldest tokens.
    """
    enc = encode_reward_input(tok, prompt, response, max_length, encoder)
    return None if enc is None else enc.input_ids


def encode_reward_input(tok: PreTrainedTokenizerBase, prompt: Sequence[Message], response: str, max_length: int,
                        encoder: bool = False, truncation: str = "left") -> Encoded | None:
    """``encode_for_reward`` with whether the prompt was cut (``Encoded.truncated``); truncation="error" raises
    TooLong naming the part that is too long ("prompt" or "completion")."""
    if not encoder:
        return encode_sft(tok, prompt, response, max_length, truncation, turns="last")
    prompt_text = "\n".join(m["content"] for m in prompt)  # encoders have no chat template (and often no EOS)
    if tok.num_special_tokens_to_add(pair=True) == 0:  # no separators: a newline at least keeps the two apart
        prompt_text += "\n"
    plain = specials_as_text(tok)
    n_response = len(tok(response, add_special_tokens=False, split_special_tokens=plain)["input_ids"])
    n_extra = tok.num_special_tokens_to_add(pair=True)
    n_prompt = len(tok(prompt_text, add_special_tokens=False, split_special_tokens=plain)["input_ids"])
    if n_prompt + n_response + n_extra > max_length and truncation == "error":
        field = "completion" if n_response + n_extra >= max_length else "prompt"
        raise TooLong(f"the prompt is {n_prompt} tokens and the response {n_response}: {n_prompt + n_response + n_extra} "
                      f"with separators, longer than data.max_length {max_length} (truncation: error)", field)
    if n_response + n_extra >= max_length:
        return None
    side, tok.truncation_side = tok.truncation_side, "left"  # overlong prompts lose their oldest tokens
    try:
        ids = tok(prompt_text, response, truncation="only_first", max_length=max_length, split_special_tokens=plain)["input_ids"]
    finally:
        tok.truncation_side = side
    return Encoded(ids, ids, truncated=n_prompt + n_response + n_extra > max_length)


class RewardModel:
    """One reward model or an ensemble, loaded for scoring: mean reward and disagreement per sequence.

    ``means``/``stds`` (M,) normalise each member's reward: the ``reward_mean``/``reward_std`` its folder
    stores (``rlhf rm`` measures them on policy samples), or, for a reward model trained elsewhere, what
    ``set_normalisation`` is given (PPO measures them on the initial policy's first rollout)."""

    def __init__(self, members: list[PreTrainedModel], tok: PreTrainedTokenizerBase, path: str | Path = ""):
        self.members, self.tok, self.path = members, tok, str(path)
        self.encoder = is_encoder(members[0])
        self.means = torch.tensor([float(getattr(m.config, "reward_mean", 0.0)) for m in members])  # (M,)
        self.stds = torch.tensor([float(getattr(m.config, "reward_std", 1.0)) for m in members])  # (M,)
        self.stored_normalisation = all(hasattr(m.config, "reward_mean") for m in members)
        limits = [p for p in (positions_in(m.config.to_dict()) for m in members) if p]
        self.max_length = min(limits) if limits else None  # the longest sequence every member was built for

    @classmethod
    def load(cls, path: str | Path, load: ModelLoadConfig | None = None) -> RewardModel:
        path = Path(path)
        folders = member_folders(path)
        members, tok = [], None
        for folder in folders:
            model, tok = load_reward_backbone(folder, load)
            members.append(model.eval())
        return cls(members, tok, path)

    @property
    def normalized(self) -> bool:
        """The reward has normalisation statistics: stored in the folder, or set for this run."""
        return self.stored_normalisation

    def set_normalisation(self, means: torch.Tensor, stds: torch.Tensor) -> None:
        """Normalise with these per-member statistics (M,) from now on."""
        self.means, self.stds = means.float().cpu(), stds.float().cpu().clamp_min(1e-6)
        self.stored_normalisation = True

    def normalise(self, rewards: torch.Tensor) -> torch.Tensor:
        """Each member's (r - mean) / std: (M, N) -> (M, N)."""
        return (rewards - self.means.to(rewards.device)[:, None]) / self.stds.to(rewards.device)[:, None]

    def to(self, device: torch.device | str) -> RewardModel:
        self.members = [m.to(device) for m in self.members]
        return self

    @torch.no_grad()
    def raw(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Each member's raw reward of full sequences (B, T): (M, B)."""
        return torch.stack([reward_forward(m, input_ids, attention_mask) for m in self.members])

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, normalize: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) over members, each (B,); normalize: each member's (r - mean) / std first."""
        rewards = self.raw(input_ids, attention_mask)  # (M, B)
        if normalize:
            rewards = self.normalise(rewards)
        return member_mean_std(rewards)

    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str], *, batch_size: int = 64,
              max_length: int | None = None, normalize: bool = False, per_member: bool = False) -> torch.Tensor:
        """Rewards of (prompt, response) pairs: (N,) mean, or (M, N) per member with per_member.

        Each pair is read whole up to ``max_length`` tokens (default: the reward model's own context), the
        prompt losing its oldest tokens if need be. A response that alone does not fit cannot be scored:
        its reward is NaN, for the caller to treat like a response without EOS, never a score of nothing."""
        limit = max_length or self.max_length or 1 << 20
        seqs = [encode_for_reward(self.tok, p, r, limit, self.encoder) for p, r in zip(prompts, responses)]
        out = self.score_sequences([s or [] for s in seqs], batch_size=batch_size)  # (M, N)
        out[:, [i for i, s in enumerate(seqs) if s is None]] = float("nan")
        if normalize:
            out = self.normalise(out)
        return out if per_member else out.mean(dim=0)

    @torch.no_grad()
    def score_sequences(self, seqs: Sequence[Sequence[int]], *, batch_size: int = 64) -> torch.Tensor:
        """Raw rewards (M, N) of already-encoded sequences, batched by length (less padding)."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = torch.zeros(len(self.members), len(seqs))  # (M, N)
        device = next(self.members[0].parameters()).device
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate_sequences([seqs[i] for i in idx], self.tok.pad_token_id or 0)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            out[:, idx] = self.raw(ids, mask).cpu()  # (M, b)
        return out


def member_mean_std(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over members and their disagreement (std; zeros for one model): (M, B) -> (B,), (B,)."""
    std = rewards.std(dim=0, unbiased=False) if rewards.shape[0] > 1 else torch.zeros_like(rewards[0])
    return rewards.mean(dim=0), std


def collate_sequences(seqs: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) ids and mask for sequences that are scored whole (an empty one is all padding)."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def member_folders(path: str | Path) -> list[Path]:
    """The model folders of a reward model: the folder itself, or an ensemble's members in order."""
    path = Path(path)
    spec = path / ENSEMBLE_FILE
    if spec.is_file():
        members = json.loads(spec.read_text())["members"]
        return [check_model_dir(path / m) for m in members]
    return [check_model_dir(path)]
