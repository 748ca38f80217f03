"""The alignment tax: what fine-tuning for preferences costs in capability.

Capability is measured the same way before and after each stage: accuracy on the tasks with a right
answer (arithmetic, facts) and perplexity on held-out text. For the assistant world that text is fresh
documents of its web-like pretraining corpus, drawn with a seed the pretraining never used; for a real
model, any text file the user gives (`eval.perplexity_text`). The tax is the percentage change from
base to SFT to PPO; PPO-ptx (Ouyang et al. 2022, sec. 3.5) is the usual mitigation and is measured
against a run without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from rlhf.algos.core import causal_lm_loss
from rlhf.data.chat import Encoded, encode_text, pad_right
from rlhf.report.progress import progress_bar

HELDOUT_TEXT_DOCS = 200
"""Documents of held-out world text for perplexity: enough for a stable figure, seconds to score."""


def world_heldout_text(seed: int = 0, n_docs: int = HELDOUT_TEXT_DOCS) -> list[str]:
    """Prose documents of the world's pretraining corpus drawn with a seed of their own (never trained on)."""
    from rlhf.world.corpora import derive_seed, pretrain_corpus

    docs = pretrain_corpus(3 * n_docs, derive_seed(seed, "perplexity-heldout"))  # about half are prose
    return [d["text"] for d in docs if "text" in d][:n_docs]


def load_texts(path: str) -> list[str]:
    """Texts for perplexity: {"text"} rows, or SFT records (prompt and completion joined)."""
    from rlhf.data.io import load_records

    out = []
    for _, row in load_records(path):
        if isinstance(row.get("text"), str):
            out.append(row["text"])
        elif isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            out.append(f"{row['prompt']} {row['completion']}")
    return out


@torch.no_grad()
def perplexity(model, tok, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over every token of the texts (each cut to max_length tokens)."""
    model.eval()
    device = next(model.parameters()).device
    seqs = [ids[:max_length] for ids in (encode_text(tok, t) for t in texts) if len(ids) > 1]
    total, count = 0.0, 0
    with progress_bar("perplexity", len(seqs)) as bar:
        for start in range(0, len(seqs), batch_size):
            batch = pad_right([Encoded(s, list(s)) for s in seqs[start : start + batch_size]], tok.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
            loss, n = causal_lm_loss(logits, batch["labels"])
            total, count = total + loss.item() * n.item(), count + n.item()
            bar.update(advance=len(batch["input_ids"]))
    return math.exp(total / max(count, 1))


def capability(metrics: dict) -> dict[str, float | None]:
    """The capability figures of one `rlhf eval` result."""
    acc = metrics.get("accuracy_by_family", {})
    return {"accuracy_arithmetic": acc.get("arithmetic"), "accuracy_facts": acc.get("facts"),
            "perplexity": metrics.get("perplexity")}


def pct_change(before: float | None, after: float | None) -> float | None:
    """100 * (after - before) / before; None when either is missing or before is 0."""
    if before is None or after is None or before == 0:
        return None
    return 100.0 * (after - before) / before


def alignment_tax(stages: dict[str, dict]) -> dict:
    """Capability per stage, and the percentage change of each stage from the first one (usually base)
    and from the stage before it (SFT -> PPO is the tax that RL itself charges).

    stages: ordered {name: `rlhf eval` result}. Lower perplexity is better; higher accuracy is better.
    """
    names = list(stages)
    caps = {n: capability(stages[n]) for n in names}

    def change(ref: str, n: str) -> dict:
        return {k: pct_change(caps[ref][k], v) for k, v in caps[n].items()}

    return {"stages": caps, "change_vs_" + names[0]: {n: change(names[0], n) for n in names[1:]},
            "change_vs_previous": {n: change(p, n) for p, n in zip(names, names[1:])}}
