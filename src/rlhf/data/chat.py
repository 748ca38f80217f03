"""Chat formatting: render conversations with the tokenizer's own chat template, mask prompts, pad.

The prompt is rendered with ``add_generation_prompt=True``: exactly the tokens the model sees before
it generates. The response is what the full conversation's rendering adds after that prefix (for
almost every template, the assistant text and its end-of-turn token). Prompt and response are
tokenized separately so that training sees the same token boundary as generation.

Truncation policy (``data.truncation``), for samples longer than ``max_length`` tokens:
  - ``left``: drop the oldest prompt tokens and keep the response whole. A response that alone does
    not fit leaves no room for a prompt: the sample is dropped and counted.
  - ``right``: cut the end of the sequence. The response may lose its EOS; a sample with no response
    token left is dropped and counted.
  - ``error``: the sample is a bad row, reported with its file and line (``data.on_error`` decides
    whether that stops the run or skips the row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.algos.core import IGNORE_INDEX

Message = dict


def render_prompt(tok: PreTrainedTokenizerBase, prompt: Sequence[Message]) -> str:
    """The text the model sees before it writes its response."""
    return tok.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def encode_text(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Tokens of already-rendered text; the template has placed any BOS itself."""
    return tok(text, add_special_tokens=False)["input_ids"]


def split_prompt_response(tok: PreTrainedTokenizerBase, prompt: Sequence[Message], completion: str) -> tuple[list[int], list[int]]:
    """Token ids of the rendered prompt and of the response that follows it (ending in EOS)."""
    prompt_text = render_prompt(tok, prompt)
    full_text = tok.apply_chat_template([*prompt, {"role": "assistant", "content": completion}], tokenize=False)
    if full_text.startswith(prompt_text):
        response_text = full_text[len(prompt_text):]
    else:  # templates that rewrite earlier turns once an answer exists: plain continuation instead
        response_text = completion + (tok.eos_token or "")
    prompt_ids, response_ids = encode_text(tok, prompt_text), encode_text(tok, response_text)
    if tok.eos_token_id is not None and tok.eos_token_id not in response_ids:
        response_ids.append(tok.eos_token_id)  # the model must learn to stop
    return prompt_ids, response_ids


@dataclass
class Encoded:
    """One tokenized SFT sample; labels are IGNORE_INDEX on prompt tokens."""

    input_ids: list[int]
    labels: list[int]


class TooLong(ValueError):
    """A sample longer than max_length under truncation='error'."""


def encode_sft(
    tok: PreTrainedTokenizerBase, prompt: Sequence[Message], completion: str, max_length: int, truncation: str = "left"
) -> Encoded | None:
    """Tokenize one sample and apply the truncation policy; None means dropped (no response left)."""
    p, r = split_prompt_response(tok, prompt, completion)
    if len(p) + len(r) > max_length:
        if truncation == "error":
            raise TooLong(f"sample is {len(p) + len(r)} tokens, longer than data.max_length {max_length}")
        if truncation == "left":
            if len(r) >= max_length:
                return None
            p = p[len(p) + len(r) - max_length:]
        else:  # right
            r = r[: max(max_length - len(p), 0)]
            if not r:
                return None
    return Encoded(input_ids=p + r, labels=[IGNORE_INDEX] * len(p) + r)


def pad_right(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Collate for training: right padding; pad positions are masked out and not scored."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Collate for generation: left padding so every prompt ends where generation begins."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, P)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}
