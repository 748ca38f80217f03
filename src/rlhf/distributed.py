"""Several processes (``torchrun``, ``accelerate launch``, ``rlhf --num_processes N``): who this process is, and the
few collectives the stages need. With one process every helper is the identity, so the code reads the same.

The process group is the one accelerate starts (NCCL on GPUs, gloo on CPUs). The supervised stages hand their model
to accelerate (DDP, FSDP, DeepSpeed); the online RL loop keeps each process's models whole and sums gradients itself
(``sync_gradients``), because it calls parts of its models (the reward model's backbone and head, the policy's
hidden states for a value head, the reference without adapters) that a DDP wrapper's forward does not see.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = timedelta(hours=2)  # how long a process waits at a collective: the main process's evaluations included


def launched() -> bool:
    """This process was started by a launcher with several processes (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Start the process group (through accelerate, which picks the backend and device) with our timeout."""
    if launched() and not dist.is_initialized():
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        if not torch.cuda.is_available():  # a plain `torchrun` on a CPU machine: processes on the CPU over gloo
            os.environ.setdefault("ACCELERATE_USE_CPU", "1")
        # cpu as the Accelerator will read it: a PartialState made without it on a CPU launch is one process.
        PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=TIMEOUT)


def finish() -> None:
    """End the process group after a run that succeeded on this process: wait for the others, then destroy it.
    Without this, gloo's worker threads outlive the interpreter and a process can abort at exit (SIGABRT,
    "terminate called without an active exception") after its work is done. Not called after an error: a
    barrier there would wait for processes that may be stuck in a collective; the launcher stops them instead."""
    if dist.is_available() and dist.is_initialized():
        if processes() > 1:
            dist.barrier()
        dist.destroy_process_group()


def processes() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if processes() > 1:
        dist.barrier()


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over every process (a new tensor; ``x`` itself with one process)."""
    if processes() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def sum_over_processes(stats: dict[str, float]) -> dict[str, float]:
    """Each statistic summed over the processes, in one all-reduce (every process must hold the same keys)."""
    if processes() == 1 or not stats:
        return stats
    keys = sorted(stats)
    total = all_sum(torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=_device()))
    return dict(zip(keys, total.tolist()))


def mean_over_processes(stats: dict[str, float]) -> dict[str, float]:
    """Each statistic averaged over the processes (every process must hold the same keys)."""
    return {k: v / processes() for k, v in sum_over_processes(stats).items()}


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    if processes() == 1:
        return [obj]
    out: list[Any] = [None] * processes()
    dist.all_gather_object(out, obj)
    return out


def sync_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over the processes, in one flat all-reduce. Each process's loss is already
    weighted by its share of the global batch, so the sum is the gradient of the global batch."""
    if processes() == 1:
        return
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


@torch.no_grad()
def broadcast_parameters(params: Sequence[torch.nn.Parameter]) -> None:
    """Give every process the main process's values of ``params`` (newly initialised weights, such as LoRA's)."""
    if processes() == 1:
        return
    for p in params:
        dist.broadcast(p.data, src=0)


def _device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo CPU ones.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
