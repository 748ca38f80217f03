"""The policy's forward pass over the response part of a (prompt, response) batch.

Shared by PPO (rollout and update) and the evaluation of KL to the reference, so that both read
log-probs the same way. Shapes: B samples, P prompt tokens (left-padded), A response tokens
(right-padded), T = P + A, V vocabulary, H hidden size.
"""

from __future__ import annotations

import torch

from rlhf.algos.core import position_ids_from_mask


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (adapters stay active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_prompt: int
                    ) -> torch.Tensor:
    """Final hidden states of the states that predict each response token: (B, T) -> (B, A, H).

    Position P - 1 + a holds the state before response token a. Positions come from the mask, the
    same positions generation used for the left-padded prompt.
    """
    base = unwrap(model)
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state  # (B, T, H)
    return hidden[:, n_prompt - 1 : -1]


def response_logits(model: torch.nn.Module, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """Next-token logits (B, A, V) in fp32 at the sampling temperature: the distribution tokens were drawn from."""
    return unwrap(model).get_output_embeddings()(hidden).float() / temperature


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token): (B, A, V), (B, A) -> (B, A)."""
    return torch.gather(torch.log_softmax(logits, dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


class ValueHead(torch.nn.Module):
    """A scalar head on hidden states, zero-initialised so the first values are 0 (critic: policy)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()
