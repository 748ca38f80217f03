"""Where the items come from: prompts + a policy (generated live), a file of pre-generated responses, gold pairs.

Live generation reuses the pipeline's batched sampler (rlhf.rollout.generate, as `rlhf
collect` does: each prompt repeated K times in one batched pass), optionally with the constitution's
logits processor so that annotators never spend time on responses the constitution already bans.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

from rlhf.data.io import DataError, load_preferences, load_prompts, load_records
from rlhf.feedback.config import AnnotateConfig, QueueConfig
from rlhf.feedback.store import ItemSpec, Store, content_key

log = logging.getLogger("rlhf.annotate")

Prompt = list[dict]


def read_responses(path: str, k: int) -> list[tuple[Prompt, list[str]]]:
    """Rows of a pre-generated file: ``prompt`` (text or messages) and ``responses`` (at least one string)."""
    out = []
    for where, row in load_records(path):
        prompt = load_prompt_field(row, where, path)
        responses = row.get("responses")
        if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
            raise DataError(f"must be a non-empty list of strings (got {responses!r:.80})", path=path, location=where,
                            field="responses")
        out.append((prompt, responses[:k]))
    return out


def load_prompt_field(row: dict, where: str, path: str) -> Prompt:
    """The row's prompt as messages, with the same rules (and errors) as a prompt file."""
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt):
        return prompt
    raise DataError(f"must be a non-empty string or a list of messages (got {prompt!r:.80})", path=path, location=where,
                    field="prompt")


def _logits_processor(constitution: str | None, tok):
    """The constitution's banned-phrase processor, imported only when asked for (torch stays unloaded otherwise)."""
    if not constitution:
        return None
    from transformers import LogitsProcessorList

    from rlhf.safety.constitution import resolve_constitution

    return LogitsProcessorList([resolve_constitution(constitution).logits_processor(tok)])


def generate_candidates(cfg: AnnotateConfig, prompts: Sequence[Prompt]) -> list[list[str]]:
    """K sampled responses per prompt from cfg.policy, in batched passes; duplicates within a prompt removed."""
    from rlhf.rollout import generate
    from rlhf.models.loading import load_causal_lm

    model, tok = load_causal_lm(cfg.policy, cfg.load)
    k = cfg.queue.k
    repeated = [p for p in prompts for _ in range(k)]
    gens = generate(model, tok, repeated, cfg.generation, seed=cfg.queue.seed,
                    logits_processor=_logits_processor(cfg.constitution, tok))
    return [[g.text for g in gens[i * k:(i + 1) * k]] for i in range(len(prompts))]


def build_items(rows: Sequence[tuple[Prompt, list[str]]], cfg: QueueConfig) -> tuple[list[ItemSpec], int]:
    """Items for each (prompt, candidates) row and each task; returns them and how many rows were unusable.

    Pairs take the first two distinct non-empty candidates; rankings all distinct non-empty ones (at least 3,
    otherwise a ranking is a pair). Whether an item gets several annotators is decided by a hash of its
    content and the seed, so loading the same file again picks the same overlap items.
    """
    specs, unusable = [], 0
    for prompt, candidates in rows:
        distinct = list(dict.fromkeys(c.strip() for c in candidates if c.strip()))
        for kind in cfg.tasks:
            if kind == "pair" and len(distinct) >= 2:
                shown = distinct[:2]
            elif kind == "rank" and len(distinct) >= 3:
                shown = distinct
            elif kind == "demo":
                shown = distinct[:1] if cfg.demo_from_candidate else []
            else:
                unusable += 1
                continue
            overlap = random.Random(f"{cfg.seed}:{content_key(kind, prompt, shown)}").random() < cfg.overlap
            specs.append(ItemSpec(kind, prompt, shown, target=cfg.overlap_annotators if overlap else 1))
    return specs, unusable


def gold_items(path: str) -> list[ItemSpec]:
    """Gold pairs: the known better response is candidate 0 (the shown order is shuffled anyway)."""
    return [ItemSpec("pair", ex.prompt, [ex.chosen, ex.rejected], target=0, gold=0) for ex in load_preferences(path)]


def load_items(cfg: AnnotateConfig, store: Store) -> dict[str, int]:
    """Fill the database from the configured sources; prompts already in it get no new candidates."""
    known = store.known_prompts()
    if cfg.responses:
        rows = [(p, c) for p, c in read_responses(cfg.responses, cfg.queue.k) if content_key(p) not in known]
    elif cfg.prompts:
        prompts = [ex.prompt for ex in load_prompts(cfg.prompts) if content_key(ex.prompt) not in known]
        if prompts:
            log.info("generating %d candidates for %d new prompts with %s", len(prompts) * cfg.queue.k, len(prompts), cfg.policy)
        rows = list(zip(prompts, generate_candidates(cfg, prompts))) if prompts else []
    else:
        rows = []
    specs, unusable = build_items(rows, cfg.queue)
    if unusable:
        log.warning("%d tasks skipped: too few distinct non-empty candidates (raise queue.k or the temperature)", unusable)
    added = store.add_items(specs)
    gold = store.add_items(gold_items(cfg.queue.gold)) if cfg.queue.gold else 0
    return {"items_added": added, "gold_added": gold, "skipped": unusable}
