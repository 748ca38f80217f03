"""The supervised training loop shared by pretraining, SFT and the reward model.

One loop, small and explicit: AdamW, warmup then cosine/linear decay, gradient accumulation
weighted by scored tokens, gradient clipping, validation, early stopping that keeps the best
weights, a progress bar, metrics. Devices, mixed precision and multiple processes come from
accelerate; the loop itself reads the same on a laptop CPU and on GPUs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env

from rlhf.algos.core import causal_lm_loss, linear_causal_lm_loss
from rlhf.config import TrainConfig
from rlhf.configlib import ConfigError
from rlhf.models.policy import backbone, plain_lm_head
from rlhf.report.metrics import MetricsLogger
from rlhf.report.progress import progress_bar

log = logging.getLogger("rlhf.train")

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
    # The fused kernel does the whole update in one pass (about 3x faster than the loop on CPU).
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95 if cfg.weight_decay else 0.999),
                             fused=fused)


def native_bf16() -> bool:
    """bf16 runs faster than fp32 here: a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX.

    Elsewhere bf16 autocast is emulated and slower than fp32, so 'auto' keeps fp32 there.
    """
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and native_bf16())
    acc = Accelerator(mixed_precision="bf16" if bf16 else "no")
    if fsdp_launch() and acc.distributed_type == DistributedType.MULTI_CPU:
        # accelerate shards only on accelerators and runs an FSDP launch on CPUs as plain data parallelism; torch's
        # FSDP2 (fully_shard) runs over gloo as well, so a CPU launch with an FSDP config gets accelerate's FSDP2 path.
        plugin = FullyShardedDataParallelPlugin()  # the FSDP_* settings `accelerate launch` exported
        if acc.mixed_precision != "no":
            plugin.set_mixed_precision(acc.mixed_precision)
        # Both states: every AcceleratorState() made later (accelerate makes some in prepare) copies PartialState's.
        PartialState().distributed_type = acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    return acc


def fsdp_launch() -> bool:
    """This process was started with an FSDP config (``accelerate launch`` exports ACCELERATE_USE_FSDP)."""
    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def recomputes_activations(cfg: TrainConfig) -> bool:
    """The backward pass recomputes each layer's forward: train.gradient_checkpointing, or an FSDP launch's activation
    checkpointing. A KV cache filled in the forward (a shared prompt's) would be filled again: callers go without."""
    return cfg.gradient_checkpointing or (fsdp_launch() and parse_flag_from_env("FSDP_ACTIVATION_CHECKPOINTING"))


def sharded(acc: Accelerator) -> bool:
    """The prepared model's parameters are shards (FSDP): the model cannot be called outside its wrapper."""
    return acc.distributed_type == DistributedType.FSDP


@dataclass
class FitResult:
    """What a training run did, for the stage summary and the tests."""

    steps: int = 0
    tokens: int = 0
    units: int = 0
    """Scored units trained on: tokens for language models, pairs for reward models."""
    seconds: float = 0.0
    processes: int = 1
    sharded: bool = False
    """Trained under FSDP: parameters, gradients and optimiser state sharded over the processes."""
    train_loss: float = float("nan")
    val_losses: list[float] = field(default_factory=list)
    best_val_loss: float = float("inf")
    stopped_early: bool = False

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def eval_batch_size(cfg: TrainConfig) -> int:
    """Rows per validation forward pass: the micro-batch where one is set (the memory a training pass fits)."""
    return cfg.micro_batch_size or cfg.batch_size


def split_batch(batch_size: int, micro_batch_size: int | None, processes: int) -> tuple[int, int]:
    """(micro-batch per device, accumulation steps) of a global batch: batch_size = micro * accumulation * processes."""
    if batch_size % processes:
        raise ConfigError(f"train.batch_size ({batch_size}) is the global batch over all processes: it must be a "
                          f"multiple of the number of processes ({processes})")
    per_device = batch_size // processes
    micro = micro_batch_size or per_device
    if per_device % micro:
        raise ConfigError(f"train.micro_batch_size ({micro}) must divide the per-device batch (train.batch_size "
                          f"{batch_size} / {processes} processes = {per_device})")
    return micro, per_device // micro


@dataclass(frozen=True)
class Plan:
    """Derived quantities of a run, computed from the config and the data, never configured."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int
    batch_size: int  # global: items per optimiser step over all processes
    micro_batch_size: int  # items per forward pass on each device
    grad_accum: int  # micro-batches per optimiser step on each device
    processes: int

    @classmethod
    def make(cls, cfg: TrainConfig, n_items: int, processes: int) -> Plan:
        micro, accum = split_batch(cfg.batch_size, cfg.micro_batch_size, processes)
        if n_items < processes:
            raise ConfigError(f"train: {n_items} training items cannot be shared by {processes} processes")
        # A last batch smaller than the number of processes is dropped: every process takes part in every step.
        per_epoch = max(1, n_items // cfg.batch_size + (n_items % cfg.batch_size >= processes))
        total = cfg.max_steps or cfg.epochs * per_epoch
        return cls(per_epoch, total, int(cfg.warmup_ratio * total), cfg.eval_every or per_epoch, cfg.batch_size,
                   micro, accum, processes)

    def describe(self) -> str:
        return (f"global batch {self.batch_size} = {self.processes} process{'es' if self.processes > 1 else ''} x "
                f"{self.micro_batch_size} per forward pass x {self.grad_accum} accumulation step"
                f"{'s' if self.grad_accum > 1 else ''}")


GROUP_BATCHES = 50  # batches per length-sorted group (transformers' LengthGroupedSampler uses 50 too)


def epoch_batches(n: int, batch_size: int, gen: torch.Generator, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """One epoch's micro-batches of sample indices, shuffled. With ``lengths``: the shuffled order is cut into
    groups of GROUP_BATCHES batches, each group sorted by length (longest first) and cut into batches, and the
    batches shuffled: batches of similar lengths (little padding) in a random order."""
    order = torch.randperm(n, generator=gen).tolist()
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    group = GROUP_BATCHES * batch_size
    order = [i for g in range(0, n, group) for i in sorted(order[g : g + group], key=lambda i: -lengths[i])]
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def rank_share(batch: list[int], rank: int, processes: int) -> list[int]:
    """Process ``rank``'s contiguous part of a global batch; the parts differ in size by at most one."""
    size, extra = divmod(len(batch), processes)
    start = rank * size + min(rank, extra)
    return batch[start : start + size + (rank < extra)]


def _step_groups(n: int, cfg: TrainConfig, plan: Plan, acc: Accelerator, lengths: Sequence[int] | None = None
                 ) -> Iterator[list[list[int]]]:
    """This process's sample indices for each optimiser step: its share of the global batch, in micro-batches.

    Every process draws the same global batches (one seeded order per epoch, reshuffled each epoch) and takes its
    own part of each, so processes see disjoint data and N processes train on exactly what one process would."""
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    while True:
        # A batch smaller than the number of processes (an epoch's last, wherever length grouping put it) is left out.
        for batch in [b for b in epoch_batches(n, cfg.batch_size, gen, lengths) if len(b) >= plan.processes]:
            if step >= plan.total_steps:
                return
            mine = rank_share(batch, acc.process_index, acc.num_processes)
            yield [mine[i : i + plan.micro_batch_size] for i in range(0, len(mine), plan.micro_batch_size)]
            step += 1


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


def input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real tokens the model reads in a batch: every ``*_mask`` / ``attention_mask`` summed (a reward
    batch's shared prompt counts once, as it runs once)."""
    return sum(int(v.sum()) for k, v in batch.items() if k == "attention_mask" or k.endswith("_mask"))


def count_units(batch: dict[str, torch.Tensor]) -> int:
    """Scored tokens in a causal-LM batch: labels not IGNORE_INDEX after the one-token shift."""
    return int((batch["labels"][:, 1:] != -100).sum()) if "labels" in batch else len(next(iter(batch.values())))


class _BestWeights:
    """Early stopping: remember the best validation loss and the trainable weights that reached it.

    Only trainable tensors are copied (with LoRA, the adapters), kept on the CPU.
    """

    def __init__(self, patience: int):
        self.patience, self.bad, self.state = patience, 0, None

    def update(self, model: torch.nn.Module, val: float, res: FitResult) -> bool:
        """Record ``val``; True when patience has run out."""
        res.val_losses.append(val)
        if val < res.best_val_loss:
            res.best_val_loss, self.bad = val, 0
            if self.patience:
                self.state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
            return False
        self.bad += 1
        return bool(self.patience) and self.bad >= self.patience

    @torch.no_grad()
    def restore(self, model: torch.nn.Module) -> None:
        if self.state is not None:
            for name, p in model.named_parameters():
                if name in self.state:
                    p.copy_(self.state[name])


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
    validate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    lengths: Sequence[int] | None = None,
    train_stats: Callable[[], dict[str, float]] | None = None,
) -> FitResult:
    """Train ``model`` in place; returns what happened. With early stopping the best weights are kept.

    Validation is the mean ``loss_fn`` over ``val_batches``, or ``validate(model)``: a dict of metrics
    with at least "val/loss" (for stages that also measure, say, accuracy in the same pass). ``lengths``: each
    item's length in tokens, for ``cfg.group_by_length``. ``train_stats()``: the loss's own statistics since its
    last call, logged with the training loss.
    """
    acc = accelerator or make_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    # FSDP shards the parameters of the module it prepares: it trains a copy, and ``model`` stays a plain model that
    # the shards are gathered into for validation and at the end (what the stage then evaluates and saves).
    trained = copy.deepcopy(model) if sharded(acc) else model
    optimizer = build_optimizer(trained, cfg)
    plan = Plan.make(cfg, len(train_items), acc.num_processes)
    if acc.state.deepspeed_plugin is not None:  # no dataloader to read them from: DeepSpeed's batch geometry
        if plan.grad_accum > 1:  # DeepSpeed would step (and rescale the loss) at each micro-batch
            raise ConfigError(f"train.micro_batch_size: gradient accumulation under DeepSpeed is not supported yet; "
                              f"set it to the per-device batch ({plan.micro_batch_size * plan.grad_accum}) or use FSDP")
        acc.state.deepspeed_plugin.deepspeed_config.update(
            train_batch_size=plan.batch_size, train_micro_batch_size_per_gpu=plan.micro_batch_size, gradient_accumulation_steps=1)
    wrapped, optimizer = acc.prepare(LossModule(trained, loss_fn), optimizer)
    res, best, recent = FitResult(processes=acc.num_processes, sharded=sharded(acc)), _BestWeights(cfg.early_stopping_patience), []
    gather = _gatherer(wrapped, model, acc, desc, res) if res.sharded else (lambda: None)
    log.info("%s: %d optimiser steps (%d per epoch); %s", desc, plan.total_steps, plan.steps_per_epoch, plan.describe())
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan.total_steps, plan.warmup_steps, cfg.schedule, cfg.min_lr_ratio))
    start = time.perf_counter()
    trained.train()
    with progress_bar(desc, plan.total_steps, enabled=acc.is_main_process) as bar:
        for group in _step_groups(len(train_items), cfg, plan, acc, lengths if cfg.group_by_length else None):
            batches = [collate([train_items[i] for i in b]) for b in group]
            res.train_loss, units = _accumulate_step(wrapped, batches, count_fn, acc)
            res.units += units
            norm = acc.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else None
            grad_norm = float("nan") if norm is None else float(norm)  # DeepSpeed clips inside its step: no norm
            optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
            res.steps += 1
            res.tokens += sum(input_tokens(b) for b in batches)
            res.seconds = time.perf_counter() - start
            recent.append(res.train_loss)
            bar.update(loss=res.train_loss, tok_s=res.tokens_per_sec)
            last = res.steps == plan.total_steps
            if logger and (res.steps % cfg.log_every == 0 or last):
                logger.log(res.steps, **{"train/loss": sum(recent) / len(recent), "lr": sched.get_last_lr()[0],
                                         "grad_norm": grad_norm, "tokens_per_sec": res.tokens_per_sec,
                                         **(train_stats() if train_stats else {})})
                recent.clear()
            if (val_batches or validate) and (res.steps % plan.eval_every == 0 or last):
                gather()
                metrics = validate(model) if validate else {"val/loss": evaluate_loss(model, val_batches, loss_fn, acc.device)}
                if logger:
                    logger.log(res.steps, **metrics)
                if best.update(model, metrics["val/loss"], res):
                    res.stopped_early = True
                    break
    gather()
    best.restore(model)
    res.seconds = time.perf_counter() - start
    return res


def _gatherer(wrapped: torch.nn.Module, model: torch.nn.Module, acc: Accelerator, desc: str, res: FitResult) -> Callable[[], None]:
    """Under FSDP: a function that brings the trained shards into the plain ``model`` when it is behind ``res.steps``."""
    from torch.distributed.fsdp import FSDPModule

    units = sum(isinstance(m, FSDPModule) and not n.endswith("_checkpoint_wrapped_module")  # not a layer's inside
                for n, m in wrapped.named_modules())
    log.info("%s: FSDP2 over %d processes, %d sharded units", desc, acc.num_processes, units)
    held = [0]  # the step whose weights ``model`` holds (the copy started from them)

    def gather() -> None:
        if held[0] != res.steps:
            gather_full_weights(wrapped, model)
            held[0] = res.steps
    return gather


def gather_full_weights(wrapped: torch.nn.Module, model: torch.nn.Module) -> None:
    """Load the FSDP-prepared ``LossModule``'s shards, gathered whole on every process, into the plain ``model``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})


class LossModule(torch.nn.Module):
    """A model with its loss as its forward. Under DDP (or FSDP) the whole loss then runs inside the wrapper's forward,
    where gradient synchronisation is armed (and sharded parameters gathered), whatever parts of the model the loss
    calls directly: a reward model's backbone and head, a prompt's KV cache shared by a pair's two responses."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        # What FSDP's transformer-based auto wrap reads: each decoder layer its own unit.
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss_fn(self.model, batch)


def _accumulate_step(model: torch.nn.Module, group, count_fn, acc: Accelerator) -> tuple[float, int]:
    """Forward/backward over one optimiser step's micro-batches, weighted by their scored units.

    The weights are shares of the step's units over every process (all-reduced), times the number of processes
    because DDP averages the gradients: N processes x batch b take the step 1 process x N*b takes, whatever
    each process's share of the scored tokens. Returns the step's mean loss and its number of scored units, both
    over all processes."""
    counts = [count_fn(b) for b in group]
    total_units = float(sum(counts))
    if acc.num_processes > 1:
        total_units = acc.reduce(torch.tensor(total_units, device=acc.device), "sum").item()
    total_units = max(total_units, 1.0)
    loss_value = 0.0
    for i, (batch, n) in enumerate(zip(group, counts)):
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        sync = i == len(group) - 1  # all-reduce gradients once per optimiser step, not per micro-batch
        ctx = acc.no_sync(model) if not sync else contextlib.nullcontext()
        with ctx, acc.autocast():
            loss, _ = model(batch)
            share = loss * (n / total_units)  # this micro-batch's part of the step's mean loss
            acc.backward(share * acc.num_processes)
        loss_value += share.item()
    if acc.num_processes > 1:
        loss_value = acc.reduce(torch.tensor(loss_value, device=acc.device), "sum").item()
    return loss_value, int(total_units)


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM loss over the batch's scored tokens (labels not IGNORE_INDEX), and their count.

    Where the logits are a plain head over the backbone's output (``plain_lm_head``), the head and the
    cross-entropy run fused in chunks (``linear_causal_lm_loss``: the (B, T, V) logits are never made);
    else, and under DeepSpeed (whose ZeRO-3 gathers a weight only inside its module's forward), the model's
    own forward gives the logits."""
    head = plain_lm_head(model)
    if head is None or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return logits_lm_loss(model, batch)
    hidden = backbone(model)(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                             position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state  # (B, T, H)
    return linear_causal_lm_loss(hidden, head.weight, batch["labels"])


def logits_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``lm_loss`` through the model's own forward and its (B, T, V) logits, whatever the architecture."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                position_ids=batch.get("position_ids"), use_cache=False)
    return causal_lm_loss(out.logits, batch["labels"])
