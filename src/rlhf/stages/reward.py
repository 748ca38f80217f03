"""Stage 2: the reward model, trained on preference pairs with the Bradley-Terry loss.

Reads top to bottom: load the backbone with a new scalar head, encode the pairs, train (chosen and
rejected of a batch go through the model together, their shared prompt only once), measure the
reward's mean and std on policy samples and store them in the model config, save an ordinary
AutoModelForSequenceClassification folder. With ``ensemble: N`` the same is done N times with
different seeds and bootstrap resamples, into ``member_0`` ... ``member_{N-1}`` plus ``ensemble.json``.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.algos.reward import pairwise_loss, preference_accuracy
from rlhf.config import DataConfig, RewardConfig, require
from rlhf.configlib import to_dict
from rlhf.data.io import DataError, PreferenceExample, load_preferences, load_prompts, to_record
from rlhf.evaluation.agreement import annotator_report, units_from_preferences
from rlhf.data.chat import TooLong, count_control_rows, report_control_rows, stop_ids
from rlhf.fsutil import check_out, main_process_dir, write_json_atomic
from rlhf.models.loading import apply_lora, check_length, load_causal_lm, save_model
from rlhf.models.reward import (
    ENSEMBLE_FILE,
    RewardModel,
    collate_sequences,
    encode_for_reward,
    encode_reward_input,
    is_encoder,
    load_reward_backbone,
    reward_forward,
    shared_prefix_rewards,
)
from rlhf.report.metrics import MetricsLogger
from rlhf.stages.collect import stats_path
from rlhf.training import eval_batch_size, fit, make_accelerator, recomputes_activations

log = logging.getLogger("rlhf.rm")


@dataclass
class EncodedPair:
    """One comparison, tokenized: the full sequences (prompt + response) of both sides."""

    chosen: list[int]
    rejected: list[int]
    margin: float | None


def encode_pair(tok, ex: PreferenceExample, data: DataConfig, encoder: bool) -> list:
    """Both sides of one pair, [chosen, rejected] (None where a response alone does not fit), with one prompt
    window: when the longer side needs its prompt cut, the shorter side's prompt is cut to the same tokens,
    so the two are judged on the same context. TooLong under truncation='error'."""
    replies = (ex.chosen, ex.rejected)
    full = [encode_reward_input(tok, ex.prompt, reply, 1 << 30, encoder) for reply in replies]
    longest = max(len(f.input_ids) for f in full)
    if longest <= data.max_length:
        return full
    if data.truncation == "error":  # encode again under the limit only to say which part is too long
        for name, reply in zip(("chosen", "rejected"), replies):
            try:
                encode_reward_input(tok, ex.prompt, reply, data.max_length, encoder, "error")
            except TooLong as e:
                e.field = name if e.field == "completion" else "prompt"
                raise
    # Each side keeps max_length - (longest - its own length) tokens: the same prompt tokens on both sides.
    return [encode_reward_input(tok, ex.prompt, reply, data.max_length - (longest - len(f.input_ids)), encoder)
            for reply, f in zip(replies, full)]


def encode_pairs(tok, examples: list[PreferenceExample], data: DataConfig, encoder: bool
                 ) -> tuple[list[EncodedPair], dict[str, int]]:
    """Tokenize both sides. The reward is read at the end, so overlong prompts lose their oldest tokens
    (counted), the same ones on both sides; a pair whose response alone is too long is dropped and counted,
    or with truncation='error' is a bad row naming the field that is too long (data.on_error decides
    whether that stops the run)."""
    pairs, dropped, truncated = [], [], 0
    for ex in examples:
        try:
            sides = encode_pair(tok, ex, data, encoder)
        except TooLong as e:
            if data.on_error == "raise":
                raise DataError(str(e), path=data.path, location=ex.source or None, field=e.field) from None
            sides = [None, None]
        if sides[0] is None or sides[1] is None:
            dropped.append(ex.source)
            continue
        pairs.append(EncodedPair(sides[0].input_ids, sides[1].input_ids, ex.margin))
        truncated += sides[0].truncated or sides[1].truncated
    if dropped:
        log.warning("dropped %d of %d pairs longer than data.max_length=%d (first: %s)", len(dropped), len(examples),
                    data.max_length, ", ".join(dropped[:3]))
    if truncated:
        log.warning("%d of %d pairs lost their oldest prompt tokens to fit data.max_length=%d", truncated, len(examples),
                    data.max_length)
    if not pairs:
        raise DataError(f"no pairs left after truncation to data.max_length={data.max_length}", path=data.path)
    controls = count_control_rows(tok, ([m["content"] for m in ex.prompt] + [ex.chosen, ex.rejected] for ex in examples))
    report_control_rows(tok, controls, len(examples))
    return pairs, {"dropped_overlong": len(dropped), "truncated_prompts": truncated, "control_token_rows": controls}


def collate_pairs(pairs: list[EncodedPair], pad_id: int, default_margin: float) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected, in one right-padded batch: (2B, T); margins (B,)."""
    batch = collate_sequences([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["margin"] = torch.tensor([default_margin if p.margin is None else p.margin for p in pairs])  # (B,)
    return batch


def shared_prefix_length(chosen: list[int], rejected: list[int]) -> int:
    """Tokens the two sides have in common at the start (normally the prompt and more), leaving each side one."""
    n = min(len(chosen), len(rejected)) - 1
    for i in range(n):
        if chosen[i] != rejected[i]:
            return i
    return max(n, 0)


def collate_shared_pairs(pairs: list[EncodedPair], pad_id: int, default_margin: float) -> dict[str, torch.Tensor]:
    """Each pair's common prefix once and its two continuations, right-padded: prefix (B, P), suffix (2B, S)
    with chosen at even and rejected at odd rows; margins (B,). Falls back to ``collate_pairs`` when a
    pair shares nothing (left truncation can cut the two sides' prompts differently)."""
    cuts = [shared_prefix_length(p.chosen, p.rejected) for p in pairs]
    if min(cuts) == 0:
        return collate_pairs(pairs, pad_id, default_margin)
    prefix = collate_sequences([p.chosen[:k] for p, k in zip(pairs, cuts)], pad_id)
    suffix = collate_sequences([side[k:] for p, k in zip(pairs, cuts) for side in (p.chosen, p.rejected)], pad_id)
    return {"prefix_ids": prefix["input_ids"], "prefix_mask": prefix["attention_mask"],
            "suffix_ids": suffix["input_ids"], "suffix_mask": suffix["attention_mask"],
            "margin": torch.tensor([default_margin if p.margin is None else p.margin for p in pairs])}


def pair_collator(cfg: RewardConfig, pad_id: int, encoder: bool):
    """collate(pairs) -> batch for training: the shared-prompt layout where the model allows it."""
    # The prompt's forward pass serves both sides: needs a decoder's KV cache, which checkpointing turns off.
    share = cfg.share_prompt and not encoder and not recomputes_activations(cfg.train)
    collate_fn = collate_shared_pairs if share else collate_pairs

    def collate(pairs: list[EncodedPair]) -> dict[str, torch.Tensor]:
        return collate_fn(pairs, pad_id, cfg.loss.margin)

    return collate


def pair_rewards(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of a batch's chosen and rejected sides, (B,) each, from either collation."""
    if "prefix_ids" in batch:
        rewards = shared_prefix_rewards(model, batch["prefix_ids"], batch["prefix_mask"], batch["suffix_ids"],
                                        batch["suffix_mask"])  # (2B,) interleaved
        return rewards[0::2], rewards[1::2]
    c, r = reward_forward(model, batch["input_ids"], batch["attention_mask"]).chunk(2)  # chosen rows first
    return c, r


def make_loss_fn(cfg: RewardConfig):
    """loss_fn(model, batch) -> (mean pairwise loss, number of pairs), as the training loop expects."""

    def loss_fn(model, batch):
        c, r = pair_rewards(model, batch)
        return pair_loss(cfg, batch, c, r), torch.tensor(len(c))

    return loss_fn


def pair_loss(cfg: RewardConfig, batch: dict, r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """The configured pairwise loss on the rewards of a batch's chosen and rejected halves, (B,) each."""
    margin = batch["margin"] if cfg.loss.use_data_margin else cfg.loss.margin
    return pairwise_loss(r_chosen, r_rejected, margin=margin, margin_weight=cfg.loss.margin_weight,
                         center_coef=cfg.loss.center_coef)


def make_validate(cfg: RewardConfig, val_batches: list[dict], device):
    """Validation pass: mean loss, accuracy and reward scale over the held-out pairs."""

    @torch.no_grad()
    def validate(model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        loss_sum, chosen, rejected = 0.0, [], []
        for batch in val_batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            c, r = pair_rewards(model, batch)  # (B,), (B,)
            loss_sum += pair_loss(cfg, batch, c, r).item() * len(c)
            chosen.append(c.cpu())
            rejected.append(r.cpu())
        model.train(was_training)
        c, r = torch.cat(chosen), torch.cat(rejected)
        return {"val/loss": loss_sum / len(c), "val/accuracy": preference_accuracy(c, r).item(),
                "val/reward_margin": (c - r).mean().item(), "val/reward_mean": torch.cat([c, r]).mean().item()}

    return validate


def split_by_prompt(pairs: list[PreferenceExample], fraction: float, seed: int
                    ) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """(train, validation), about ``fraction`` of the pairs held out, whole prompts at a time: every label of a
    prompt (its several pairs, and one pair's several annotators) sits on one side, so validation never
    scores a pair the model was trained on under another label."""
    by_prompt: dict[str, list[PreferenceExample]] = {}
    for ex in pairs:
        by_prompt.setdefault(json.dumps(ex.prompt, sort_keys=True), []).append(ex)
    keys = list(by_prompt)
    random.Random(seed).shuffle(keys)
    target, val, train = int(len(pairs) * fraction), [], []
    for key in keys:
        (val if len(val) < target else train).extend(by_prompt[key])
    return train, val


def load_pairs(data: DataConfig, seed: int) -> tuple[list[PreferenceExample], list[PreferenceExample], int]:
    """Training and validation pairs: from val_path, or a seeded val_fraction of the training file split by
    prompt; and how many bad rows were skipped (data.on_error: skip)."""
    loaded = load_preferences(data.path, on_error=data.on_error)
    train, skipped = list(loaded), len(loaded.skipped)
    if data.val_path:
        val = load_preferences(data.val_path, on_error=data.on_error)
        return train, list(val), skipped + len(val.skipped)
    train, val = split_by_prompt(train, data.val_fraction, seed)
    return train, val, skipped


def collection_report(path: str | Path) -> dict | None:
    """The agreement report ``rlhf collect`` wrote beside a preference file, if there is one. It counts the
    annotators' ties, which the file's pairs leave out: a careful rater's ties are agreement, and a random
    clicker never ties, so it is the sharper test."""
    try:
        report = json.loads(stats_path(path).read_text())["annotators"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("flagged"), list) else None


def filter_annotators(cfg: RewardConfig, train: list[PreferenceExample]) -> tuple[list[PreferenceExample], list[str]]:
    """Drop the labels of excluded annotators and, if asked, of those the agreement statistics flag."""
    dropped = set(cfg.exclude_annotators)
    if cfg.drop_flagged_annotators:
        report, source = collection_report(cfg.data.path), f"{stats_path(cfg.data.path).name} (ties counted)"
        if report is None:  # a file from elsewhere: the pairs' own labels, ties unseen
            report, source = annotator_report(units_from_preferences(to_record(ex) for ex in train)), "the training pairs"
        dropped |= set(report["flagged"])
        log.info("annotator agreement (mean kappa, from %s): %s; flagged: %s", source,
                 {k: None if v is None else round(v, 3) for k, v in report["mean_kappa"].items()}, report["flagged"] or "none")
    kept = [ex for ex in train if ex.annotator not in dropped]
    if dropped:
        log.info("dropped %d labels from annotators %s", len(train) - len(kept), sorted(dropped))
    if not kept:
        raise ValueError(f"no training pairs left after dropping annotators {sorted(dropped)}")
    return kept, sorted(dropped)


def normalization_samples(cfg: RewardConfig, train: list[PreferenceExample]) -> tuple[list, list[str]]:
    """(prompts, responses) to measure the reward scale on: fresh policy samples, or the data's responses."""
    rng = random.Random(cfg.train.seed)
    if cfg.normalize.policy:
        from rlhf.rollout import generate

        prompts = [ex.prompt for ex in load_prompts(cfg.normalize.prompts)]
        prompts = [prompts[i % len(prompts)] for i in range(cfg.normalize.n)]
        policy, ptok = load_causal_lm(cfg.normalize.policy, cfg.load)
        return prompts, [g.text for g in generate(policy, ptok, prompts, cfg.normalize.generation, seed=cfg.train.seed)]
    seen, samples = set(), []
    for ex in train:  # each distinct (prompt, response) once: a response in several pairs is one sample
        for response in (ex.chosen, ex.rejected):
            key = (str(ex.prompt), response)
            if key not in seen:
                seen.add(key)
                samples.append((ex.prompt, response))
    samples = rng.sample(samples, min(cfg.normalize.n, len(samples)))
    return [p for p, _ in samples], [r for _, r in samples]


def reward_stats(model, tok, prompts, responses, max_length: int) -> tuple[float, float]:
    """Mean and std of the model's reward over (prompt, response) samples (those that fit max_length)."""
    rm = RewardModel([model.eval()], tok)
    seqs = [s for s in (encode_for_reward(tok, p, r, max_length, rm.encoder) for p, r in zip(prompts, responses)) if s]
    r = rm.score_sequences(seqs)[0]  # (N,)
    std = r.std().item() if r.numel() > 1 else 0.0
    return r.mean().item(), max(std, 1e-6)


def train_member(cfg: RewardConfig, index: int, train: list[PreferenceExample], val: list[PreferenceExample],
                 norm_samples: tuple[list, list[str]], out: Path) -> dict:
    """Train one reward model into ``out``; returns its summary."""
    seed = cfg.train.seed + index
    train_cfg = type(cfg.train)(**{**to_dict(cfg.train), "seed": seed})
    torch.manual_seed(seed)  # the new head's initialisation: reproducible, and different per member
    model, tok = load_reward_backbone(cfg.model, cfg.load, gradient_checkpointing=cfg.train.gradient_checkpointing)
    encoder = is_encoder(model)
    train_pairs, counts = encode_pairs(tok, train, cfg.data, encoder)
    val_pairs = encode_pairs(tok, val, cfg.data, encoder)[0] if val else []
    if cfg.ensemble > 1 and cfg.bootstrap:  # each member sees a different resample: disagreement means uncertainty
        rng = random.Random(seed)
        train_pairs = [train_pairs[rng.randrange(len(train_pairs))] for _ in train_pairs]
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, task_type="SEQ_CLS")
    collate = pair_collator(cfg, tok.pad_token_id if tok.pad_token_id is not None else 0, encoder)
    bs = eval_batch_size(cfg.train)
    val_batches = [collate(val_pairs[i : i + bs]) for i in range(0, len(val_pairs), bs)]
    acc = make_accelerator(train_cfg)
    loss_fn = make_loss_fn(cfg)
    validate = make_validate(cfg, val_batches, acc.device) if val_batches else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("reward model %d: %d pairs (%d validation); %.2fM trainable parameters", index, len(train_pairs),
             len(val_pairs), trainable / 1e6)
    model.to(acc.device)
    with MetricsLogger(out, enabled=acc.is_main_process) as logger:
        initial = validate(model) if validate else {}
        result = fit(model, train_pairs, collate, train_cfg, loss_fn=loss_fn, logger=logger, accelerator=acc,
                     desc=f"rm {index}" if cfg.ensemble > 1 else "rm", count_fn=lambda b: len(b["margin"]),
                     validate=validate, lengths=[max(len(p.chosen), len(p.rejected)) for p in train_pairs])
        final = validate(acc.unwrap_model(model)) if validate else {}
    model = acc.unwrap_model(model)
    mean, std = reward_stats(model, tok, *norm_samples, cfg.data.max_length)
    model.config.reward_mean, model.config.reward_std = mean, std  # read back by RewardModel (and PPO)
    model.config.rlhf_stop_token_ids = sorted(stop_ids(tok))  # the tokens its training responses ended with
    save_model(model, tok, out, lora_save=cfg.lora.save)
    return {
        "member": index, "seed": seed, "pairs": len(train_pairs), "val_pairs": len(val_pairs), **counts, "steps": result.steps,
        "processes": result.processes, "sharded": result.sharded, "trainable_parameters": trainable, "initial_val_accuracy": initial.get("val/accuracy"),
        "val_accuracy": final.get("val/accuracy"), "val_loss": final.get("val/loss"),
        "reward_mean": mean, "reward_std": std, "pairs_per_sec": result.units / max(result.seconds, 1e-9),
        "seconds": result.seconds,
    }


def run_rm(cfg: RewardConfig) -> dict:
    """Train the reward model (or ensemble) cfg.model on cfg.data; write cfg.out atomically; return a summary."""
    require(cfg, "model", "out", stage="rm")
    require(cfg.data, "path", stage="rm", group="data.")
    check_out(cfg.out, stage="rm", kind="dir", overwrite=cfg.overwrite,
              inputs={"model": cfg.model, "data.path": cfg.data.path, "data.val_path": cfg.data.val_path,
                      "normalize.policy": cfg.normalize.policy, "normalize.prompts": cfg.normalize.prompts})
    check_length(cfg.model, cfg.data.max_length, "data.max_length")
    train, val, skipped = load_pairs(cfg.data, cfg.train.seed)
    train, dropped_annotators = filter_annotators(cfg, train)
    norm_samples = normalization_samples(cfg, train)
    with main_process_dir(cfg.out) as tmp:  # several processes: the main one writes
        names = [f"member_{i}" for i in range(cfg.ensemble)] if cfg.ensemble > 1 else ["."]
        members = [train_member(cfg, i, train, val, norm_samples, tmp / name) for i, name in enumerate(names)]
        if cfg.ensemble > 1:
            write_json_atomic(tmp / ENSEMBLE_FILE, {"members": names, "bootstrap": cfg.bootstrap})
        accs = [m["val_accuracy"] for m in members if m["val_accuracy"] is not None]
        summary = {
            # Pairs trained on (each member's count: a bootstrap resample has as many), after overlong ones were
            # dropped; val_pairs likewise. rows: the training file's rows that reached encoding.
            "stage": "rm", "ensemble": cfg.ensemble, "pairs": members[0]["pairs"], "val_pairs": members[0]["val_pairs"],
            "rows": len(train), "skipped_rows": skipped, "dropped_annotators": dropped_annotators,
            "val_accuracy": sum(accs) / len(accs) if accs else None, "members": members,
            "seconds": sum(m["seconds"] for m in members), "config": to_dict(cfg),
        }
        write_json_atomic(tmp / "stage.json", summary)
    return summary
