"""The supervised training loop shared by pretraining, SFT and the reward model.

One loop, small and explicit: AdamW, warmup then cosine/linear decay, gradient accumulation
weighted by scored tokens, gradient clipping, validation, early stopping that keeps the best
weights, a progress bar, metrics. Devices, mixed precision and multiple processes come from
accelerate; the loop itself reads the same on a laptop CPU and on GPUs.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from rlhf.algos.core import causal_lm_loss
from rlhf.config import TrainConfig
from rlhf.report.metrics import MetricsLogger
from rlhf.report.progress import progress_bar

# loss_fn(model, batch) -> (mean loss over the batch's scored units, number of scored units)
LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Learning-rate multiplier at optimiser ``step`` (0-based): linear warmup, then decay to min_ratio."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases, norms (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95 if cfg.weight_decay else 0.999))


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    return Accelerator(mixed_precision="bf16" if cfg.bf16 else "no")


@dataclass
class FitResult:
    """What a training run did, for the stage summary and the tests."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    train_loss: float = float("nan")
    val_losses: list[float] = field(default_factory=list)
    best_val_loss: float = float("inf")
    stopped_early: bool = False

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def _micro_batches(n: int, batch_size: int, generator: torch.Generator, rank: int, world: int) -> list[list[int]]:
    """Shuffled sample indices cut into micro-batches; each process takes every world-th one."""
    order = torch.randperm(n, generator=generator).tolist()
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return batches[rank::world]


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], loss_fn: LossFn, device: torch.device) -> float:
    """Token-weighted mean loss over validation batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for batch in batches:
        loss, n = loss_fn(model, {k: v.to(device) for k, v in batch.items()})
        total += loss.item() * n.item()
        count += n.item()
    model.train(was_training)
    return total / max(count, 1.0)


def count_units(batch: dict[str, torch.Tensor]) -> int:
    """Scored tokens in a causal-LM batch: labels not IGNORE_INDEX after the one-token shift."""
    return int((batch["labels"][:, 1:] != -100).sum()) if "labels" in batch else len(next(iter(batch.values())))


def fit(
    model: torch.nn.Module,
    train_items: Sequence[Any],
    collate: Callable[[list[Any]], dict[str, torch.Tensor]],
    cfg: TrainConfig,
    *,
    loss_fn: LossFn,
    val_batches: Sequence[dict[str, torch.Tensor]] = (),
    logger: MetricsLogger | None = None,
    accelerator: Accelerator | None = None,
    desc: str = "train",
    count_fn: Callable[[dict[str, torch.Tensor]], int] = count_units,
) -> FitResult:
    """Train ``model`` in place; returns what happened. The best weights are kept with early stopping."""
    acc = accelerator or make_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = acc.prepare(model, optimizer)
    per_epoch = math.ceil(math.ceil(len(train_items) / cfg.batch_size) / acc.num_processes / cfg.grad_accum)
    total = cfg.max_steps or cfg.epochs * per_epoch
    warmup = int(cfg.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg.schedule, cfg.min_lr_ratio)
    )
    every = cfg.eval_every or per_epoch
    res, best_state, bad_evals = FitResult(), None, 0
    gen = torch.Generator().manual_seed(cfg.seed)
    start, recent_loss = time.perf_counter(), []
    model.train()
    with progress_bar(desc, total, enabled=acc.is_main_process) as bar:
        while res.steps < total and not res.stopped_early:
            batches = _micro_batches(len(train_items), cfg.batch_size, gen, acc.process_index, acc.num_processes)
            for g in range(0, len(batches), cfg.grad_accum):
                if res.steps >= total:
                    break
                group = [collate([train_items[i] for i in b]) for b in batches[g : g + cfg.grad_accum]]
                loss_value = _accumulate_step(model, group, loss_fn, count_fn, acc)
                if cfg.max_grad_norm:
                    grad_norm = float(acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
                else:
                    grad_norm = float("nan")
                optimizer.step()
                sched.step()
                optimizer.zero_grad(set_to_none=True)
                res.steps += 1
                res.tokens += sum(int(b["attention_mask"].sum()) if "attention_mask" in b else 0 for b in group)
                recent_loss.append(loss_value)
                res.seconds = time.perf_counter() - start
                bar.update(loss=loss_value, tok_s=res.tokens_per_sec)
                if logger and (res.steps % cfg.log_every == 0 or res.steps == total):
                    logger.log(res.steps, **{"train/loss": sum(recent_loss) / len(recent_loss), "lr": sched.get_last_lr()[0],
                                             "grad_norm": grad_norm, "tokens_per_sec": res.tokens_per_sec})
                    recent_loss.clear()
                res.train_loss = loss_value
                if val_batches and (res.steps % every == 0 or res.steps == total):
                    best_state, bad_evals = _validate(model, val_batches, loss_fn, acc, res, logger, best_state, bad_evals)
                    if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                        res.stopped_early = True
                        break
    if best_state is not None and cfg.early_stopping_patience:
        with torch.no_grad():
            for name, p in acc.unwrap_model(model).named_parameters():
                if name in best_state:
                    p.copy_(best_state[name])
    res.seconds = time.perf_counter() - start
    return res


def _accumulate_step(model, group, loss_fn: LossFn, count_fn, acc: Accelerator) -> float:
    """Forward/backward over one optimiser step's micro-batches, weighted by their scored tokens."""
    counts = [count_fn(b) for b in group]
    total_units = max(sum(counts), 1)
    loss_value = 0.0
    for i, (batch, n) in enumerate(zip(group, counts)):
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        sync = i == len(group) - 1  # all-reduce gradients once per optimiser step, not per micro-batch
        ctx = acc.no_sync(model) if not sync else contextlib.nullcontext()
        with ctx, acc.autocast():
            loss, _ = loss_fn(model, batch)
            scaled = loss * (n / total_units)
            acc.backward(scaled)
        loss_value += scaled.item()
    return loss_value


def _validate(model, val_batches, loss_fn, acc, res: FitResult, logger, best_state, bad_evals):
    val = evaluate_loss(model, val_batches, loss_fn, acc.device)
    res.val_losses.append(val)
    if logger:
        logger.log(res.steps, **{"val/loss": val})
    if val < res.best_val_loss:
        res.best_val_loss = val
        # Only trainable tensors: with LoRA that is the adapters, not a second copy of the model.
        best_state = {n: p.detach().cpu().clone() for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad}
        return best_state, 0
    return best_state, bad_evals + 1


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM loss over the batch's scored tokens (labels not IGNORE_INDEX), and their count."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    return causal_lm_loss(out.logits, batch["labels"])
