"""Chat formatting: render conversations with the tokenizer's own chat template, mask prompts, pad.

The prompt is rendered with ``add_generation_prompt=True``: exactly the tokens the model sees before
it generates. A response is what the conversation's rendering adds after that prefix (for almost every
template, the assistant text and its end-of-turn token). The pieces are tokenized separately so that
training sees the same token boundary as generation. In a multi-turn conversation every assistant turn
is such a piece, and SFT trains on each of them (``data.assistant_turns``: all, or the last only).

Control tokens in user text. The chat template marks turns with control tokens (``<|im_start|>``,
``<|im_end|>``, ...); text that merely contains those strings (a prompt quoting a template, a scraped
reply) must not become them, or a user could forge a turn, or a reply train a pad or EOS in its middle.
So each occurrence inside a message is swapped for a private-use placeholder before rendering and
tokenized as plain text afterwards; everything else is tokenized exactly as before.
(``load.special_tokens_in_text: control`` keeps plain tokenization for users who mean the tokens.)

Truncation policy (``data.truncation``), for samples longer than ``max_length`` tokens:
  - ``left``: drop the oldest prompt tokens and keep the response whole. A response that alone does
    not fit leaves no room for a prompt: the sample is dropped and counted.
  - ``right``: cut the end of the sequence. The response may lose its EOS; a sample with no response
    token left is dropped and counted.
  - ``error``: the sample is a bad row, reported with its file, line and the field that is too long
    (``data.on_error`` decides whether that stops the run or skips the row).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.algos.core import IGNORE_INDEX

log = logging.getLogger("rlhf.data")

Message = dict
SPECIALS_ATTR = "rlhf_special_tokens_in_text"  # set by rlhf.models.loading.load_tokenizer from load.special_tokens_in_text
STOPS_ATTR = "rlhf_stop_ids"  # set by rlhf.models.loading: the tokenizer's EOS and the model's generation EOS ids
_PLACEHOLDER = re.compile("\ue000([\ue100-\uf8ff])\ue000")  # private-use characters: no template or tokenizer special


def control_tokens(tok: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The strings of the tokenizer's special (control) tokens, longest first."""
    found = {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    found |= {t for t in tok.all_special_tokens if t}
    return tuple(sorted(found, key=len, reverse=True))


def _control_pattern(tok: PreTrainedTokenizerBase) -> re.Pattern | None:
    """One regex over the control-token strings (Llama-3 has 256), kept on the tokenizer until its
    vocabulary grows (a pad token added)."""
    cached = getattr(tok, "_rlhf_control_pattern", None)
    if cached is None or cached[0] != len(tok):
        specials = control_tokens(tok)
        cached = (len(tok), re.compile("|".join(re.escape(t) for t in specials)) if specials else None)
        tok._rlhf_control_pattern = cached
    return cached[1]


def specials_as_text(tok: PreTrainedTokenizerBase) -> bool:
    return getattr(tok, SPECIALS_ATTR, "text") == "text"


def has_control_text(tok: PreTrainedTokenizerBase, texts: Iterable[str]) -> bool:
    """Any of the texts holds a control token's string."""
    pattern = _control_pattern(tok)
    return pattern is not None and any(pattern.search(t) for t in texts)


def count_control_rows(tok: PreTrainedTokenizerBase, rows: Iterable[Iterable[str]]) -> int:
    """How many rows (each given as its texts) hold a control token's string."""
    return sum(has_control_text(tok, texts) for texts in rows)


def report_control_rows(tok: PreTrainedTokenizerBase, n: int, total: int) -> None:
    """Say how many rows hold control-token strings, and how they were encoded."""
    if n:
        how = ("as plain text (load.special_tokens_in_text: text)" if specials_as_text(tok)
               else "as control tokens (load.special_tokens_in_text: control)")
        log.warning("%d of %d rows hold the tokenizer's control tokens (%s) in their text; encoded %s", n, total,
                    ", ".join(control_tokens(tok)[:4]), how)


def _shield(tok: PreTrainedTokenizerBase, messages: Sequence[Message]) -> tuple[list[Message], list[str]]:
    """Messages with each control-token string in their content swapped for a placeholder, and the strings."""
    originals: list[str] = []
    pattern = _control_pattern(tok) if specials_as_text(tok) else None
    if pattern is None:
        return list(messages), originals

    def swap(match: re.Match) -> str:
        originals.append(match.group(0))
        return f"\ue000{chr(0xE100 + len(originals) - 1)}\ue000"

    return [{**m, "content": pattern.sub(swap, m["content"])} for m in messages], originals


def _encode(tok: PreTrainedTokenizerBase, text: str, originals: Sequence[str] = ()) -> list[int]:
    """Tokens of rendered text; placeholders become their original strings, tokenized as plain text."""
    if not originals:
        return encode_text(tok, text)
    ids: list[int] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        ids += encode_text(tok, text[pos : m.start()])
        ids += tok(originals[ord(m.group(1)) - 0xE100], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        pos = m.end()
    return ids + encode_text(tok, text[pos:])


def _render(tok: PreTrainedTokenizerBase, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def render_prompt(tok: PreTrainedTokenizerBase, prompt: Sequence[Message]) -> str:
    """The text the model sees before it writes its response (control tokens in user text as written)."""
    return _render(tok, prompt, add_generation_prompt=True)


def encode_text(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Tokens of already-rendered text; the template has placed any BOS itself."""
    return tok(text, add_special_tokens=False)["input_ids"] if text else []


def encode_prompt(tok: PreTrainedTokenizerBase, prompt: Sequence[Message]) -> list[int]:
    """The tokens the model sees before it writes its response: the rendered prompt, user text kept as text."""
    shielded, originals = _shield(tok, prompt)
    return _encode(tok, render_prompt(tok, shielded), originals)


def conversation_segments(tok: PreTrainedTokenizerBase, messages: Sequence[Message], turns: str = "all"
                          ) -> list[tuple[list[int], bool]]:
    """A conversation that ends with an assistant turn as token pieces ``(ids, is_assistant_turn)``.

    Each assistant turn is what the rendering of the conversation up to it adds after the rendering of
    what came before with the generation prompt. Turns whose rendering is not such a continuation
    (templates that rewrite earlier turns) are folded into the context; for the final turn the
    response is then its text plus EOS after the rendered prompt, as generation would see it.
    ``turns="last"`` marks only the final assistant turn.
    """
    shielded, originals = _shield(tok, messages)
    full = _render(tok, shielded)
    last = len(shielded) - 1
    prompt_text = _render(tok, shielded[:last], add_generation_prompt=True)
    if not full.startswith(prompt_text):  # plain continuation instead
        return _end_at_first_stop([(_encode(tok, prompt_text, originals), False),
                                   (_encode(tok, shielded[last]["content"], originals), True)], tok)
    cuts, pos = [], 0
    earlier = [i for i, m in enumerate(shielded[:last]) if m["role"] == "assistant"] if turns == "all" else []
    for i in earlier:
        before, upto = _render(tok, shielded[:i], add_generation_prompt=True), _render(tok, shielded[: i + 1])
        if len(before) >= pos and upto.startswith(before) and full.startswith(upto) and len(upto) <= len(prompt_text):
            cuts.append((len(before), len(upto)))
            pos = len(upto)
    cuts.append((len(prompt_text), len(full)))
    segments, pos = [], 0
    for start, end in cuts:
        if start > pos:
            segments.append((_encode(tok, full[pos:start], originals), False))
        segments.append((_encode(tok, full[start:end], originals), True))
        pos = end
    return _end_at_first_stop(segments, tok)


def _eos(tok: PreTrainedTokenizerBase) -> list[int]:
    return [tok.eos_token_id] if tok.eos_token_id is not None else []


def stop_ids(tok: PreTrainedTokenizerBase) -> set[int]:
    """Every token that ends a response: the tokenizer's EOS and (when the model is known) its generation EOS ids."""
    return set(getattr(tok, STOPS_ATTR, None) or _eos(tok))


def _end_at_first_stop(segments: list[tuple[list[int], bool]], tok: PreTrainedTokenizerBase) -> list[tuple[list[int], bool]]:
    """One rule for the end of a response everywhere: an assistant turn ends with its first stop token.

    What a template writes after it (ChatML's newline after <|im_end|>) is context for a later turn, and
    after the final turn it is dropped: generation stops at the first stop token, and the reward model is
    read there. A turn without a stop token gets the tokenizer's EOS, so that the model learns to stop."""
    stops, out = stop_ids(tok), []
    for k, (ids, trained) in enumerate(segments):
        if not trained:
            out.append((ids, trained))
            continue
        end = next((i for i, t in enumerate(ids) if t in stops), None)
        if end is None:
            out.append((ids + _eos(tok) if k == len(segments) - 1 else ids, True))
            continue
        out.append((ids[: end + 1], True))
        if ids[end + 1 :] and k < len(segments) - 1:
            out.append((ids[end + 1 :], False))
    return out


def split_prompt_response(tok: PreTrainedTokenizerBase, prompt: Sequence[Message], completion: str) -> tuple[list[int], list[int]]:
    """Token ids of the rendered prompt and of the response that follows it (ending in EOS)."""
    segments = conversation_segments(tok, [*prompt, {"role": "assistant", "content": completion}], turns="last")
    return [i for ids, _ in segments[:-1] for i in ids], segments[-1][0]


@dataclass
class Encoded:
    """One tokenized SFT sample; labels are IGNORE_INDEX on prompt (and user-turn) tokens."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    """The oldest tokens were dropped to fit max_length (truncation='left')."""


class TooLong(ValueError):
    """A sample longer than max_length under truncation='error'; ``field`` is the part that is too long."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def encode_sft(
    tok: PreTrainedTokenizerBase, prompt: Sequence[Message], completion: str, max_length: int, truncation: str = "left",
    turns: str = "all",
) -> Encoded | None:
    """Tokenize one sample and apply the truncation policy; None means dropped (no response left).

    ``turns``: train on every assistant turn of a multi-turn prompt ("all") or on the completion only ("last").
    Under truncation='error' a TooLong names the field: "completion" when the response alone does not
    fit, else "prompt".
    """
    segments = conversation_segments(tok, [*prompt, {"role": "assistant", "content": completion}], turns)
    ids = [i for s, _ in segments for i in s]
    labels = [i if trained else IGNORE_INDEX for s, trained in segments for i in s]
    n_response = len(segments[-1][0])
    if len(ids) <= max_length:
        return Encoded(ids, labels)
    if truncation == "error":
        n_prompt = len(ids) - n_response
        field = "completion" if n_response >= max_length else "prompt"
        raise TooLong(f"the prompt is {n_prompt} tokens and the response {n_response}: {len(ids)} in all, longer than "
                      f"data.max_length {max_length} (truncation: error)", field)
    if truncation == "left":
        if n_response >= max_length:
            return None
        return Encoded(ids[len(ids) - max_length:], labels[len(ids) - max_length:], truncated=True)
    ids, labels = ids[:max_length], labels[:max_length]  # right
    return Encoded(ids, labels) if any(t != IGNORE_INDEX for t in labels) else None


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


def first_fit(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Rows of sample indices whose lengths fit in ``width`` together: longest first, each into the first row with
    room (first-fit decreasing). Ties keep the samples' order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if free >= lengths[i]), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(width)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def pack_right(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Collate for training without padding's waste (``pad_id`` is unused): the batch's samples packed into as few rows as hold them,
    each row as wide as the longest sample (first fit, longest first). Each sample's ``position_ids`` start at 0,
    and no ``attention_mask`` is given: transformers then reads the restarts as sample boundaries and masks
    attention within each sample only (TRL's padding-free format), so every sample sees exactly what it sees
    padded, and the same samples make the same step. A row's unused tail is one more segment, not scored.
    ``token_mask`` (1 on the samples' tokens) is for counting only: the model is not given it."""
    width = max(len(e.input_ids) for e in batch)
    rows = [[batch[i] for i in row] for row in first_fit([len(e.input_ids) for e in batch], width)]
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (R, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (R, T)
    positions = torch.zeros((len(rows), width), dtype=torch.long)  # (R, T)
    real = torch.zeros((len(rows), width), dtype=torch.long)  # (R, T)
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, start : start + n] = torch.tensor(e.input_ids)
            labels[r, start : start + n] = torch.tensor(e.labels)
            labels[r, start] = IGNORE_INDEX  # the previous sample's last token does not predict it (unscored padded too)
            positions[r, start : start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(width - start)
        # The tail repeats the row's last token rather than the pad id: transformers warns of padding without an
        # attention mask when a row ends in the pad token, and the tail is its own unscored segment either way.
        ids[r, start:] = ids[r, start - 1]
        real[r, :start] = 1
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "token_mask": real}


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Collate for generation: left padding so every prompt ends where generation begins."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, P)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}
