"""The policy's forward pass over the response part of a (prompt, response) batch.

Shared by PPO (rollout and update) and the evaluation of KL to the reference, so that both read
log-probs the same way. The logits come from the causal LM's own forward (``logits_to_keep`` the
response slice), so every model-specific transform of the logits (Gemma-2's final_logit_softcapping,
Cohere's logit_scale, Granite's logits_scaling) is applied: what is scored is what was sampled.
Shapes: B samples, P prompt tokens (left-padded), A response tokens (right-padded), T = P + A,
V vocabulary, H hidden size.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from rlhf.algos.core import position_ids_from_mask
from rlhf.data.chat import first_fit


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (adapters stay active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body (without a head) of a causal LM or sequence classifier."""
    base = unwrap(model)
    return getattr(base, base.base_model_prefix)


# Causal LMs whose logits are exactly ``lm_head(backbone output)``: no softcapping (Gemma-2), logit scale
# (Cohere, Granite) or other transform between them, so a loss may apply the head's weight itself.
PLAIN_HEAD_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GPT2LMHeadModel")


# Transformer bodies whose attention mask transformers builds from restarting position_ids (packed samples, no
# attention_mask), under a causal LM or a sequence classifier: tests/test_model_families.py checks packed against
# padded for each family it builds.
PACKED_BACKBONES = ("LlamaModel", "MistralModel", "Qwen2Model", "Gemma2Model", "GPT2Model")


def packs_samples(model: torch.nn.Module) -> bool:
    """The model keeps packed samples apart (``rlhf.data.chat.pack_right``'s batches and ``pack_rows``')."""
    base = unwrap(model)
    return type(getattr(base, base.base_model_prefix, None)).__name__ in PACKED_BACKBONES


def plain_lm_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The LM head of a causal LM whose logits are ``head(backbone(...).last_hidden_state)`` with a bias-free
    ``nn.Linear`` head (not wrapped by peft), else None (the model's own forward is what gives its logits)."""
    base = unwrap(model)
    head = getattr(base, "lm_head", None)
    if type(base).__name__ not in PLAIN_HEAD_ARCHITECTURES or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return head


def response_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int,
                    packed: PackedRows | None = None) -> torch.Tensor:
    """Final hidden states of the states that predict each response token: (B, T) -> (B, A, H).

    Position P - 1 + a holds the state before response token a. Positions come from the mask, the
    same positions generation used for the left-padded prompt. With ``packed`` (``pack_rows`` of the batch),
    the same states are read off the packed rows.
    """
    if packed is not None:
        return packed_hidden(model, packed)
    hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    return hidden[:, n_prompt - 1 : -1]  # (B, A, H)


@functools.cache
def keeps_logits(model_class: type) -> bool:
    """The class's forward takes logits_to_keep (every causal LM in transformers 5 does); asked once per class."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def cache_kwarg(module: torch.nn.Module, cache) -> dict:
    """``{name: cache}`` for ``module``'s forward: transformers 5 calls the argument ``cache``, earlier versions
    ``past_key_values`` (an unknown name would be swallowed by ``**kwargs`` and the cache silently not filled)."""
    return {"cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values": cache}


def response_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int,
                    temperature: float, *, with_hidden: bool = False, packed: PackedRows | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token logits (B, A, V) of the response tokens in fp32 at the sampling temperature, from the causal
    LM's own forward: the distribution tokens were drawn from. With ``with_hidden``, also the final hidden
    states (B, A, H) of the same positions (for a value head on the policy), read off the backbone's output.
    With ``packed`` (``pack_rows`` of the batch), the same from the packed rows.
    """
    if packed is not None:
        return packed_response_logits(model, packed, temperature, with_hidden=with_hidden)
    n_response = input_ids.shape[1] - n_prompt
    # logits_to_keep=A + 1: positions P - 1 ... T - 1; the last one predicts past the response and is dropped.
    keep_arg = {"logits_to_keep": n_response + 1} if keeps_logits(type(unwrap(model))) else {}
    out, hidden = forward_with_hidden(model, with_hidden, input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids_from_mask(attention_mask), use_cache=False, **keep_arg)
    logits = out.logits[:, -(n_response + 1) : -1].float() / temperature  # (B, A, V)
    return logits, hidden[:, n_prompt - 1 : -1] if with_hidden else None  # (B, A, H)


def forward_with_hidden(model: torch.nn.Module, with_hidden: bool, **inputs) -> tuple[object, torch.Tensor | None]:
    """The model's output on ``inputs`` and, with ``with_hidden``, its backbone's final hidden states (B, T, H)
    (read by a hook: the output holds the logits only)."""
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _args, output):
        captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    hook = backbone(model).register_forward_hook(keep) if with_hidden else None
    try:
        out = model(**inputs)
    finally:
        if hook is not None:
            hook.remove()
    return out, captured.get("hidden")


@dataclass(frozen=True)
class PackedRows:
    """A (prompt, response) batch without its padding: each sample's real tokens (its left-padded prompt's and
    right-padded response's, contiguous) side by side in as few rows as hold them, positions restarting at 0 at
    each sample and no attention mask, so transformers keeps attention within each sample (``packs_samples``):
    each state is the padded batch's, with no padding computed."""

    input_ids: torch.Tensor  # (R, W) W: the longest sample; a row's unused tail repeats its last token
    position_ids: torch.Tensor  # (R, W) 0, 1, ... within each sample, as position_ids_from_mask gives padded
    index: torch.Tensor  # (B, A) flat position in (R * W) of the state before each response token (0 past its end)


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int) -> PackedRows:
    """Pack a left-padded prompt + right-padded response batch (B, T) for ``packed_hidden`` and
    ``packed_response_logits``, which return what ``response_hidden`` and ``response_logits`` do on the batch."""
    mask = attention_mask.bool()
    lengths = mask.sum(1)  # (B,)
    starts = mask.long().argmax(1)  # (B,) the first real token: left padding before it
    ends = mask.shape[1] - mask.long().flip(1).argmax(1)  # (B,) one past the last real token
    if not torch.equal(ends - starts, lengths):
        raise ValueError("pack_rows: each row's real tokens must be contiguous (a left-padded prompt, then the response)")
    b, t = input_ids.shape
    n_response = t - n_prompt
    width = int(lengths.max())
    rows = first_fit(lengths.tolist(), width)
    ids = torch.empty((len(rows), width), dtype=input_ids.dtype, device=input_ids.device)  # (R, W)
    positions = torch.empty((len(rows), width), dtype=torch.long, device=input_ids.device)  # (R, W)
    index = torch.zeros((b, n_response), dtype=torch.long, device=input_ids.device)  # (B, A)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n, s = int(lengths[i]), int(starts[i])
            ids[r, at : at + n] = input_ids[i, s : s + n]
            positions[r, at : at + n] = torch.arange(n)
            # Response token a is predicted by padded column P - 1 + a, at (P - 1 + a - s) within the sample.
            n_real = n - (n_prompt - s)  # the response's real tokens
            index[i, :n_real] = r * width + at + (n_prompt - 1 - s) + torch.arange(n_real, device=index.device)
            at += n
        ids[r, at:] = ids[r, at - 1]  # the unused tail: one more segment, read by no index
        positions[r, at:] = torch.arange(width - at)
    return PackedRows(ids, positions, index)


def packed_hidden(model: torch.nn.Module, packed: PackedRows) -> torch.Tensor:
    """Final hidden states of the states that predict each response token, from packed rows: (B, A, H)."""
    hidden = backbone(model)(input_ids=packed.input_ids, position_ids=packed.position_ids,
                             use_cache=False).last_hidden_state  # (R, W, H)
    return hidden.flatten(0, 1)[packed.index]  # (B, A, H)


def packed_response_logits(model: torch.nn.Module, packed: PackedRows, temperature: float, *,
                           with_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``response_logits`` from packed rows: (B, A, V) fp32 at the temperature, and (B, A, H) with ``with_hidden``.
    A plain head is applied to the response states only; other models give logits through their own forward
    (every position's), so their transforms of the logits apply."""
    head = plain_lm_head(model)
    if head is not None:
        hidden = packed_hidden(model, packed)  # (B, A, H)
        return head(hidden).float() / temperature, hidden if with_hidden else None
    out, hidden = forward_with_hidden(model, with_hidden, input_ids=packed.input_ids, position_ids=packed.position_ids,
                                      use_cache=False)  # logits (R, W, V), hidden (R, W, H)
    logits = out.logits.flatten(0, 1)[packed.index].float() / temperature  # (B, A, V)
    return logits, hidden.flatten(0, 1)[packed.index] if with_hidden else None


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) = logit[token] - logsumexp(logits): (B, A, V), (B, A) -> (B, A).

    Unlike gather(log_softmax(logits)), no (B, A, V) log-softmax is made and kept for the backward pass:
    only the logits (which the forward made anyway) and one number per position."""
    return torch.gather(logits, 2, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class ValueHead(torch.nn.Module):
    """A scalar head on hidden states, zero-initialised so the first values are 0 (critic: policy)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()
