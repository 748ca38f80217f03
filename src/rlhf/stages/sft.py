"""Stage 1: supervised fine-tuning on demonstrations.

Any causal LM folder plus an SFT dataset gives a fine-tuned model folder. The loss covers response
tokens only: prompt tokens carry the label IGNORE_INDEX (-100), so the model learns to answer, not
to imitate users.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from rlhf.config import DataConfig, SFTConfig, require
from rlhf.configlib import to_dict
from rlhf.data.chat import Encoded, TooLong, count_control_rows, encode_sft, pack_right, pad_right, report_control_rows
from rlhf.data.io import DataError, SFTExample, load_sft
from rlhf.fsutil import check_out, main_process_dir, write_json_atomic
from rlhf.models.loading import apply_lora, check_length, load_causal_lm, save_model
from rlhf.models.policy import packs_samples
from rlhf.report.metrics import MetricsLogger
from rlhf.training import eval_batch_size, evaluate_loss, fit, lm_loss, make_accelerator

log = logging.getLogger("rlhf.sft")


def encode_examples(tok, examples: list[SFTExample], data: DataConfig) -> tuple[list[Encoded], dict[str, int]]:
    """Tokenize with the chat template and the truncation policy; report (and count) what was cut or dropped."""
    encoded, dropped, truncated = [], [], 0
    for ex in examples:
        e = encode_sft(tok, ex.prompt, ex.completion, data.max_length, data.truncation, turns=data.assistant_turns)
        if e is None:
            dropped.append(ex.source)
        else:
            encoded.append(e)
            truncated += e.truncated
    if dropped:
        log.warning("dropped %d of %d samples with no response token left after %s truncation to %d tokens (first: %s)",
                    len(dropped), len(examples), data.truncation, data.max_length, ", ".join(dropped[:3]))
    if truncated:
        log.warning("%d of %d samples lost their oldest prompt tokens to fit data.max_length=%d", truncated, len(examples),
                    data.max_length)
    if not encoded:
        raise DataError(f"no trainable samples left after truncation to data.max_length={data.max_length}", path=data.path)
    controls = count_control_rows(tok, ([m["content"] for m in ex.prompt] + [ex.completion] for ex in examples))
    report_control_rows(tok, controls, len(examples))
    return encoded, {"dropped_overlong": len(dropped), "truncated_prompts": truncated, "control_token_rows": controls}


def load_split(tok, data: DataConfig, seed: int) -> tuple[list[SFTExample], list[SFTExample], int]:
    """Training and validation examples: from val_path, or a seeded val_fraction of the training file; and how
    many bad rows were skipped (data.on_error: skip)."""

    def too_long(ex: SFTExample) -> tuple[str, str] | None:  # only checked when truncation='error'
        try:
            encode_sft(tok, ex.prompt, ex.completion, data.max_length, "error", turns=data.assistant_turns)
        except TooLong as e:
            return e.field, str(e)
        return None

    check = too_long if data.truncation == "error" else None
    loaded = load_sft(data.path, on_error=data.on_error, validate=check)
    train, skipped = list(loaded), len(loaded.skipped)
    if data.val_path:
        val = load_sft(data.val_path, on_error=data.on_error, validate=check)
        return train, list(val), skipped + len(val.skipped)
    random.Random(seed).shuffle(train)
    n_val = int(len(train) * data.val_fraction)
    return train[n_val:], train[:n_val], skipped


def run_sft(cfg: SFTConfig) -> dict:
    """Fine-tune cfg.model on cfg.data; write cfg.out atomically; return a summary."""
    require(cfg, "model", "out", stage="sft")
    require(cfg.data, "path", stage="sft", group="data.")
    check_out(cfg.out, stage="sft", kind="dir", overwrite=cfg.overwrite,
              inputs={"model": cfg.model, "data.path": cfg.data.path, "data.val_path": cfg.data.val_path})
    check_length(cfg.model, cfg.data.max_length, "data.max_length")
    model, tok = load_causal_lm(cfg.model, cfg.load, gradient_checkpointing=cfg.train.gradient_checkpointing)
    train_ex, val_ex, skipped = load_split(tok, cfg.data, cfg.train.seed)
    train, counts = encode_examples(tok, train_ex, cfg.data)
    val = encode_examples(tok, val_ex, cfg.data)[0] if val_ex else []
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)

    pack = cfg.padding_free and packs_samples(model)

    def collate(rows: list[Encoded]):
        return (pack_right if pack else pad_right)(rows, tok.pad_token_id)

    bs = eval_batch_size(cfg.train)
    val_batches = [collate(val[i : i + bs]) for i in range(0, len(val), bs)]
    acc = make_accelerator(cfg.train)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("SFT on %d samples (%d validation); %.2fM trainable parameters", len(train), len(val), trainable / 1e6)
    model.to(acc.device)
    with main_process_dir(cfg.out) as tmp:  # several processes: the main one writes
        with MetricsLogger(tmp, enabled=acc.is_main_process) as logger:
            initial_val = evaluate_loss(model, val_batches, lm_loss, acc.device) if val_batches else None
            result = fit(model, train, collate, cfg.train, loss_fn=lm_loss, val_batches=val_batches,
                         logger=logger, accelerator=acc, desc="sft", lengths=[len(r.input_ids) for r in train])
        save_model(acc.unwrap_model(model), tok, tmp, lora_save=cfg.lora.save)
        summary = {
            "stage": "sft", "samples": len(train), "val_samples": len(val), "trainable_parameters": trainable,
            "steps": result.steps, "processes": result.processes, "sharded": result.sharded, "initial_val_loss": initial_val,
            "val_loss": result.val_losses[-1] if result.val_losses else None,
            "best_val_loss": result.best_val_loss if result.val_losses else None,
            "stopped_early": result.stopped_early, "tokens_per_sec": result.tokens_per_sec,
            "skipped_rows": skipped, **counts,
            "seconds": result.seconds, "config": to_dict(cfg),
        }
        write_json_atomic(Path(tmp) / "stage.json", summary)
    return summary
