"""DPO: the policy trained directly on preference pairs against a frozen reference (Rafailov et al. 2023).

Reads top to bottom: load the pairs as `rlhf rm` does (same loader, validation, errors and validation split),
encode each as one prompt and two responses in the policy's chat format, compute the reference's log-probs of
every response once (the policy before training is the reference: no second copy; with LoRA, the same weights
with adapters off), train with the DPO / IPO / cDPO loss, save an ordinary model folder that `rlhf eval` takes.

A batch runs each pair's prompt once and continues it with both responses from its KV cache (as the reward
model's shared-prompt forward does). Shapes: B pairs, P prompt tokens (left-padded), A response tokens
(right-padded); chosen responses at even rows and rejected at odd rows of the (2B, A) response batch.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from rlhf import distributed
from rlhf.algos.dpo import dpo_loss
from rlhf.config import DataConfig, DPOConfig, RewardConfig, require
from rlhf.configlib import to_dict
from rlhf.data.chat import IGNORE_INDEX, TooLong, encode_sft, pad_left
from rlhf.data.io import DataError, PreferenceExample
from rlhf.fsutil import check_out, main_process_dir, write_json_atomic
from rlhf.models.loading import apply_lora, check_length, load_causal_lm, save_model
from rlhf.models.policy import keeps_logits, cache_kwarg, gather_logprobs, response_logits, unwrap
from rlhf.models.reward import collate_sequences
from rlhf.report.metrics import MetricsLogger
from rlhf.stages.reward import filter_annotators, load_pairs
from rlhf.training import eval_batch_size, fit, make_accelerator, recomputes_activations

log = logging.getLogger("rlhf.dpo")


@dataclass
class DPOPair:
    """One comparison in the policy's format: the shared prompt and the two responses (each ending as SFT taught),
    with the reference's summed log-probs of each response."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0


def split_prompt(tok, ex: PreferenceExample, response: str) -> tuple[list[int], list[int]]:
    """(prompt tokens, response tokens) of one side, as SFT encodes it (the response is the trained part)."""
    enc = encode_sft(tok, ex.prompt, response, 1 << 30, turns="last")
    start = next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    return enc.input_ids[:start], enc.input_ids[start:]


def encode_dpo_pair(tok, ex: PreferenceExample, data: DataConfig) -> DPOPair | None:
    """A pair cut to data.max_length: the prompt loses its oldest tokens (the same on both sides); None when a
    response alone does not fit; TooLong (naming the field) under truncation='error'."""
    prompt, chosen = split_prompt(tok, ex, ex.chosen)
    _, rejected = split_prompt(tok, ex, ex.rejected)
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= data.max_length:
        return DPOPair(prompt, chosen, rejected)
    if data.truncation == "error":
        field = ("chosen" if len(chosen) >= len(rejected) else "rejected") if longest >= data.max_length else "prompt"
        raise TooLong(f"the prompt is {len(prompt)} tokens and the longer response {longest}: longer than "
                      f"data.max_length {data.max_length} (truncation: error)", field)
    if longest >= data.max_length:
        return None
    return DPOPair(prompt[len(prompt) + longest - data.max_length :], chosen, rejected)


def encode_dpo_pairs(tok, examples: list[PreferenceExample], data: DataConfig) -> tuple[list[DPOPair], int]:
    """Every pair that fits (data.on_error decides whether one that cannot stops the run); and how many were dropped."""
    pairs, dropped = [], 0
    for ex in examples:
        try:
            pair = encode_dpo_pair(tok, ex, data)
        except TooLong as e:
            if data.on_error == "raise":
                raise DataError(str(e), path=data.path, location=ex.source or None, field=e.field) from None
            pair = None
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
    if dropped:
        log.warning("dropped %d of %d pairs whose response does not fit data.max_length=%d", dropped, len(examples),
                    data.max_length)
    if not pairs:
        raise DataError(f"no pairs left after truncation to data.max_length={data.max_length}", path=data.path)
    return pairs, dropped


def collate_dpo(pairs: list[DPOPair], pad_id: int) -> dict[str, torch.Tensor]:
    """prompt (B, P) left-padded; responses (2B, A) right-padded, chosen at even rows; reference log-probs (2B,)."""
    prompt = pad_left([p.prompt for p in pairs], pad_id)
    responses = collate_sequences([side for p in pairs for side in (p.chosen, p.rejected)], pad_id)
    return {"prompt_ids": prompt["input_ids"], "prompt_mask": prompt["attention_mask"],
            "response_ids": responses["input_ids"], "response_mask": responses["attention_mask"],
            "ref_logprobs": torch.tensor([r for p in pairs for r in (p.ref_chosen, p.ref_rejected)])}


def shared_prompt_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (2B, A, V) of each response token, the prompt run once for both of its responses: its last position
    predicts the first response token, the responses' own positions the rest."""
    prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
    responses, response_mask = batch["response_ids"], batch["response_mask"]
    cache = DynamicCache(config=unwrap(model).config)
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)  # (B, P)
    keep = {"logits_to_keep": 1} if keeps_logits(type(unwrap(model))) else {}
    first = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                  **keep, **cache_kwarg(unwrap(model), cache)).logits[:, -1]  # (B, V): left padding ends every row
    if cache.get_seq_length() != prompt_ids.shape[1]:
        raise RuntimeError(f"{type(unwrap(model)).__name__} did not fill the KV cache; set dpo.share_prompt false")
    cache.batch_repeat_interleave(2)  # (2B, heads, P, d): one copy per response
    prompt_len = prompt_mask.sum(1).repeat_interleave(2)  # (2B,)
    positions = prompt_len[:, None] + torch.arange(responses.shape[1], device=responses.device)  # (2B, A)
    mask = torch.cat([prompt_mask.repeat_interleave(2, dim=0), response_mask], dim=1)  # (2B, P + A)
    rest = model(input_ids=responses, attention_mask=mask, position_ids=positions, use_cache=True,
                 **cache_kwarg(unwrap(model), cache)).logits  # (2B, A, V): position a predicts token a + 1
    return torch.cat([first.repeat_interleave(2, dim=0)[:, None], rest[:, :-1]], dim=1).float()


def response_logprobs(model, batch: dict[str, torch.Tensor], share_prompt: bool) -> torch.Tensor:
    """Summed log-probs (2B,) of each response given its prompt."""
    responses, mask = batch["response_ids"], batch["response_mask"]
    if share_prompt:
        logits = shared_prompt_logits(model, batch)
    else:  # both full sequences: the prompt twice
        ids = torch.cat([batch["prompt_ids"].repeat_interleave(2, dim=0), responses], dim=1)  # (2B, P + A)
        am = torch.cat([batch["prompt_mask"].repeat_interleave(2, dim=0), mask], dim=1)
        logits = response_logits(model, ids, am, batch["prompt_ids"].shape[1], 1.0)[0]  # (2B, A, V)
    return (gather_logprobs(logits, responses) * mask).sum(1)


@torch.no_grad()
def add_reference_logprobs(model, pairs: list[DPOPair], pad_id: int, batch_size: int, share_prompt: bool,
                           device: torch.device) -> None:
    """The reference's log-probs of every response, once, before training: the untrained policy (with LoRA, its
    adapters disabled), in eval mode. Several processes share the batches and exchange the results."""
    was_training = model.training
    model.eval()
    off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    mine: dict[int, tuple[float, float]] = {}
    with off:
        step = batch_size * distributed.processes()
        for start in range(batch_size * distributed.rank(), len(pairs), step):
            chunk = pairs[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate_dpo(chunk, pad_id).items()}
            lp = response_logprobs(model, batch, share_prompt).cpu()  # (2b,)
            mine.update(zip(range(start, start + len(chunk)), zip(lp[0::2].tolist(), lp[1::2].tolist())))
    for part in distributed.gather_objects(mine):
        for i, (c, r) in part.items():
            pairs[i].ref_chosen, pairs[i].ref_rejected = c, r
    model.train(was_training)


class DPOLoss:
    """loss_fn(model, batch) for the training loop, keeping the TRL-named statistics of the batches since the last
    call to ``stats()``."""

    def __init__(self, cfg: DPOConfig, share_prompt: bool):
        self.cfg, self.share_prompt = cfg, share_prompt
        self.sums: dict[str, float] = {}
        self.n = 0

    def terms(self, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy, ref = response_logprobs(model, batch, self.share_prompt), batch["ref_logprobs"]  # (2B,) each
        if self.cfg.loss_type == "ipo":  # per-token means (the IPO paper's log-likelihoods)
            lengths = batch["response_mask"].sum(1).clamp(min=1)
            policy, ref = policy / lengths, ref / lengths
        return dpo_loss(policy[0::2], policy[1::2], ref[0::2], ref[1::2], self.cfg.beta, self.cfg.loss_type,
                        self.cfg.label_smoothing)

    def __call__(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        loss, stats = self.terms(model, batch)
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.item()
        self.n += 1
        return loss, torch.tensor(len(batch["ref_logprobs"]) // 2)

    def stats(self) -> dict[str, float]:
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return out


def make_validate(loss: DPOLoss, val_batches: list[dict], device):
    """Validation: mean loss and rewards/* over the held-out pairs, as val/..."""

    @torch.no_grad()
    def validate(model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        sums, n = {}, 0
        for batch in val_batches:
            b = len(batch["ref_logprobs"]) // 2
            value, stats = loss.terms(model, {k: v.to(device) for k, v in batch.items()})
            for k, v in {"loss": value, **stats}.items():
                sums[k] = sums.get(k, 0.0) + v.item() * b
            n += b
        model.train(was_training)
        return {f"val/{k}": v / n for k, v in sums.items()}

    return validate


def run_dpo(cfg: DPOConfig) -> dict:
    """Train cfg.policy on the preference pairs cfg.data; write cfg.out atomically; return a summary."""
    require(cfg, "policy", "out", stage="dpo")
    require(cfg.data, "path", stage="dpo", group="data.")
    check_out(cfg.out, stage="dpo", kind="dir", overwrite=cfg.overwrite,
              inputs={"policy": cfg.policy, "data.path": cfg.data.path, "data.val_path": cfg.data.val_path})
    check_length(cfg.policy, cfg.data.max_length, "data.max_length")
    train, val, skipped = load_pairs(cfg.data, cfg.train.seed)
    # The same annotator filter as the reward model's, so DPO and RLHF learn from the same labels.
    as_rm = RewardConfig(data=cfg.data, exclude_annotators=cfg.exclude_annotators,
                         drop_flagged_annotators=cfg.drop_flagged_annotators)
    train, dropped_annotators = filter_annotators(as_rm, train)
    model, tok = load_causal_lm(cfg.policy, cfg.load, gradient_checkpointing=cfg.train.gradient_checkpointing)
    start = time.perf_counter()  # the stage's seconds: reference log-probs and training, as PPO counts its loop
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    train_pairs, dropped = encode_dpo_pairs(tok, train, cfg.data)
    val_pairs = encode_dpo_pairs(tok, val, cfg.data)[0] if val else []
    acc = make_accelerator(cfg.train)
    model.to(acc.device)
    share = cfg.share_prompt and not recomputes_activations(cfg.train)
    pad_id = tok.pad_token_id
    bs = eval_batch_size(cfg.train)
    add_reference_logprobs(model, train_pairs + val_pairs, pad_id, bs, share, acc.device)
    loss = DPOLoss(cfg, share)
    val_batches = [collate_dpo(val_pairs[i : i + bs], pad_id) for i in range(0, len(val_pairs), bs)]
    validate = make_validate(loss, val_batches, acc.device) if val_batches else None
    log.info("dpo: %d pairs (%d validation), beta %g, loss %s", len(train_pairs), len(val_pairs), cfg.beta, cfg.loss_type)
    with main_process_dir(cfg.out) as tmp:  # several processes: the main one writes
        with MetricsLogger(tmp, enabled=acc.is_main_process) as logger:
            initial = validate(model) if validate else {}
            result = fit(model, train_pairs, lambda rows: collate_dpo(rows, pad_id), cfg.train, loss_fn=loss,
                         logger=logger, accelerator=acc, desc="dpo", count_fn=lambda b: len(b["ref_logprobs"]) // 2,
                         validate=validate, lengths=[len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in train_pairs],
                         train_stats=loss.stats)
            final = validate(acc.unwrap_model(model)) if validate else {}
        model = acc.unwrap_model(model)
        save_model(model, tok, tmp, lora_save=cfg.lora.save)
        summary = {"stage": "dpo", "pairs": len(train_pairs), "val_pairs": len(val_pairs), "rows": len(train),
                   "skipped_rows": skipped, "dropped_overlong": dropped, "dropped_annotators": dropped_annotators,
                   "steps": result.steps, "processes": result.processes, "sharded": result.sharded, "seconds": time.perf_counter() - start, "train_seconds": result.seconds,
                   "initial": initial, "final": final, "pairs_per_sec": result.units / max(result.seconds, 1e-9), "config": to_dict(cfg)}
        write_json_atomic(tmp / "stage.json", summary)
    return summary
