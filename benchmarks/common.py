"""Shared pieces of the benchmarks (``*_vs_trl.py``, ``ppo_iteration.py``; not a benchmark itself).

Model shapes and building, the synthetic arithmetic texts, the per-side worker processes and their
step clocks, step timing, the repeats (rotating which side goes first), the command-line options the scripts share, and
the result table. The scripts run as ``python benchmarks/NAME.py``, so their folder is first on
``sys.path`` and this module is imported as ``common``. Only the standard library is imported at the
top: torch, transformers and rlhf are imported where they are used (the workers import them after
their own ``torch.set_num_threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

VOCAB_SIZE = 2048
SIZES = {  # LlamaConfig shapes; parameter counts are computed and printed
    "1m": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, intermediate_size=256),
    "15m": dict(hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=6, intermediate_size=1024),
}
HIDDEN_ARGS = ("worker", "model", "rows", "result", "reward_model")  # parent -> worker only; not written to --out
FIT_FLAGS = ("steps", "warmup", "batch_size", "max_length", "threads", "lr", "seed")  # options the fit benchmarks pass on


# ----------------------------------------------------------------------------------------------------
# Synthetic data: arithmetic questions and answers
# ----------------------------------------------------------------------------------------------------

ASK = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Please tell me what {a} {op} {b} equals.",
       "{a} {op} {b} = ?", "Quick question: how much is {a} {op} {b}?")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def question(rng: random.Random) -> tuple[int, str, int, str, int]:
    """(a, op, b, question text, right answer)."""
    a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice(list(OPS))
    return a, op, b, rng.choice(ASK).format(a=a, op=op, b=b), OPS[op](a, b)


def answer_text(a: int, op: str, b: int, result: int, worked: bool) -> str:
    """An answer stating ``result``, with or without the worked step."""
    return f"{a} {op} {b} = {result}. The answer is {result}." if worked else f"The answer is {result}."


def qa(rng: random.Random) -> tuple[str, str]:
    """A question and its right answer, worked half of the time."""
    a, op, b, q, r = question(rng)
    return q, answer_text(a, op, b, r, rng.random() < 0.5)


def cycle_sample(items: list, n: int, seed: int) -> list:
    """n items of a user's data file: a seeded shuffle, repeated when the file is too short."""
    items = list(items)
    random.Random(seed).shuffle(items)
    return (items * (n // len(items) + 1))[:n]


# ----------------------------------------------------------------------------------------------------
# Setup (parent process): tokenizer and model folder
# ----------------------------------------------------------------------------------------------------


def build_model_dir(size: str, texts: list[str], folder: Path, seed: int, vocab_size: int = VOCAB_SIZE) -> int:
    """A tiny LlamaForCausalLM plus our tokenizer (trained on ``texts``), saved as an ordinary HF folder;
    returns the parameter count. A ``vocab_size`` above the tokenizer's gives the model a real model's
    embedding and LM-head size (rows no token reaches), for memory figures."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from rlhf.models.tokenizer import train_tokenizer

    hf_logging.disable_progress_bar()

    tok = train_tokenizer(texts, VOCAB_SIZE)
    if len(tok) > vocab_size:
        raise SystemExit(f"tokenizer has {len(tok)} tokens, more than the model's {vocab_size}")
    config = LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SIZES[size],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# Workers: sample order, step clocks, timing
# ----------------------------------------------------------------------------------------------------


def sample_order(n: int, seed: int) -> list[int]:
    """The order in which rlhf.training.fit visits n samples in its first epoch (checked: same_batches)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class FitClock:
    """Stands in for MetricsLogger: fit calls .log(step, ...) after every optimiser step (with log_every=1)."""

    def __init__(self):
        import torch

        self._get_threads = torch.get_num_threads
        self.times, self.losses, self.threads = [], [], None

    def log(self, step, **metrics):
        self.times.append(time.perf_counter())
        self.threads = self._get_threads()
        if "train/loss" in metrics:
            self.losses.append(metrics["train/loss"])


def trl_step_clock(settings: Callable | None = None):
    """A TrainerCallback that records the end of every optimiser step (``on_step_end``) and the thread
    count; at the end of training, ``settings(args, model)``: what the peer actually ran with."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.threads, self.settings = [], None, {}

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())
            self.threads = torch.get_num_threads()

        def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.settings = settings(args, model) if settings else {}

    return StepClock()


def trl_fit_args(a: argparse.Namespace, out_dir: str) -> dict:
    """The TrainingArguments the supervised peers (SFT, reward model, DPO) share with our fit: fp32, no gradient
    checkpointing (TRL turns both on by default), the same steps, batch, lr and schedule (cosine to 10%, no
    warmup), clipping, seed, fit's sample order read sequentially; no logging, saving or evaluation."""
    return dict(output_dir=out_dir, use_cpu=True, seed=a.seed, data_seed=a.seed, max_steps=a.steps,
                per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1, learning_rate=a.lr,
                lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0,
                weight_decay=0.0, max_grad_norm=1.0, bf16=False, fp16=False, gradient_checkpointing=False,
                train_sampling_strategy="sequential", dataloader_num_workers=0, logging_strategy="no",
                logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to="none")


def trl_causal_lm_inputs(a: argparse.Namespace):
    """The TRL side's tokenizer, fp32 sdpa causal LM and dataset, the rows in fit's sample order (read sequentially)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.data.io import read_jsonl

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    rows = read_jsonl(a.rows)
    return tok, model, rows, Dataset.from_list([rows[i] for i in sample_order(len(rows), a.seed)])


def run_as_worker(a: argparse.Namespace, workers: dict[str, Callable[[argparse.Namespace], dict]]) -> bool:
    """Set the thread count; in a worker process (``--worker SIDE``) run that side and write its result: True."""
    import torch

    torch.set_num_threads(a.threads)
    if not a.worker:
        return False
    Path(a.result).write_text(json.dumps(workers[a.worker](a)))
    return True


def step_timing(times: list[float], counts: list[int], a: argparse.Namespace, t_start: float, unit: str = "tokens") -> dict:
    """``unit``/s over steps warmup+1..steps from end-of-step timestamps and per-batch counts of ``unit``."""
    if len(times) < a.steps or len(counts) < a.steps:
        raise RuntimeError(f"expected {a.steps} steps, saw {len(times)} step ends and {len(counts)} batches")
    t0 = times[a.warmup - 1] if a.warmup else t_start
    seconds = times[a.steps - 1] - t0
    total = sum(counts[a.warmup : a.steps])
    return {f"timed_{unit}": total, "timed_seconds": seconds, f"{unit}_per_sec": total / seconds,
            f"batch_{unit}": counts[: a.steps]}


# ----------------------------------------------------------------------------------------------------
# Driver: one fresh process per side and repeat
# ----------------------------------------------------------------------------------------------------


def busy_cpu_seconds() -> float | None:
    """CPU-seconds the whole machine has spent busy (from /proc/stat; None where there is none)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def forward_flags(a: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """``--name value`` for each option in ``names`` (underscores become dashes)."""
    return [x for n in names for x in (f"--{n.replace('_', '-')}", str(getattr(a, n)))]


def run_worker(script: str, side: str, model_dir: Path, rows_path: Path, a: argparse.Namespace, tmp: Path, *,
               flags: tuple[str, ...] = FIT_FLAGS, extra: tuple[str, ...] = ()) -> dict:
    """One side in a fresh process (``script --worker side`` plus the options ``flags`` and ``extra``). Also
    measures how busy the machine was with other work meanwhile."""
    result = tmp / f"result_{side}.json"
    cmd = [sys.executable, os.path.abspath(script), "--worker", side, "--model", str(model_dir), "--rows", str(rows_path),
           "--result", str(result), *forward_flags(a, flags), *extra]
    busy0, ru0, t0 = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    busy1, ru1, wall = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout)
        raise SystemExit(f"{side} worker failed (exit {proc.returncode})")
    if a.verbose:
        sys.stderr.write(proc.stdout)
    out = json.loads(result.read_text())
    own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    # Cores' worth of CPU that other processes used while this worker ran (noisy neighbours; ~0 is clean).
    out["other_load"] = None if busy0 is None else max(0.0, (busy1 - busy0 - own) / wall)
    return out


def run_repeats(size: str, a: argparse.Namespace, run: Callable[[str], dict], key: str, unit: str,
                fmt: str = ",.0f", sides: tuple[str, ...] = ("ours", "trl")) -> dict[str, list[dict]]:
    """``run(side)`` a.repeats times per side, rotating which side goes first (two sides: alternating);
    progress on stderr."""
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    width = max(len(s) for s in sides)
    for r in range(a.repeats):
        k = r % len(sides)
        for side in sides[k:] + sides[:k]:
            runs[side].append(run(side))
            last = runs[side][-1]
            load = "" if last["other_load"] is None else f"  (other load {last['other_load']:.2f} cores)"
            print(f"  {size} repeat {r + 1}/{a.repeats} {side:{width}s}: {last[key]:>9{fmt}} {unit}{load}", file=sys.stderr)
    return runs


def ratios(runs: dict[str, list[dict]], key: str, num: str, den: str) -> dict:
    """Best ``num`` / best ``den`` (noise only ever slows a run down) and the ratio of their medians."""
    best = {s: max(x[key] for x in runs[s]) for s in (num, den)}
    med = {s: statistics.median(x[key] for x in runs[s]) for s in (num, den)}
    return {"ratio": best[num] / best[den], "median_ratio": med[num] / med[den]}


def compare(runs: dict[str, list[dict]], key: str) -> dict:
    """Best run per side (noise only ever slows a run down), their ratio, the ratio of the medians, all runs."""
    best = {s: max(x[key] for x in runs[s]) for s in runs}
    return {
        f"ours_{key}": best["ours"], f"trl_{key}": best["trl"], **ratios(runs, key, "ours", "trl"),
        "ours_runs": [x[key] for x in runs["ours"]], "trl_runs": [x[key] for x in runs["trl"]],
        "other_load": {s: [x["other_load"] for x in runs[s]] for s in runs},
    }


# ----------------------------------------------------------------------------------------------------
# Command line and output
# ----------------------------------------------------------------------------------------------------


def make_parser(doc: str, *, batch_help: str, data_help: str, sides: tuple[str, ...] = ("ours", "trl"),
                steps_help: str = "optimiser steps per run (both sides)", fit_options: bool = True
                ) -> argparse.ArgumentParser:
    """The options every benchmark takes (plus the hidden ones the parent passes to its workers). ``fit_options``:
    also --max-length and --lr (cosine schedule) of the supervised benchmarks."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1m,15m", help=f"comma-separated model sizes among {', '.join(SIZES)}")
    p.add_argument("--steps", type=int, default=30, help=steps_help)
    p.add_argument("--warmup", type=int, default=3, help="leading steps excluded from the timing")
    p.add_argument("--batch-size", type=int, default=16, help=batch_help)
    if fit_options:
        p.add_argument("--max-length", type=int, default=128, help="max tokens per sample (must truncate nothing)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on both sides")
    if fit_options:
        p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine to 10%%, no warmup)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs per side, rotating which side goes first; best is reported")
    p.add_argument("--data", default=None, help=data_help)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--verbose", action="store_true", help="show the workers' output (progress bars, warnings)")
    p.add_argument("--worker", choices=sides, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def add_quick(p: argparse.ArgumentParser, quick: dict, argv=None) -> None:
    """``--quick``: the defaults ``quick`` for a smoke run (options given explicitly still win)."""
    p.add_argument("--quick", action="store_true",
                   help="smoke run: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in quick.items()) + " unless given")
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        p.set_defaults(**quick)


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    a = p.parse_args(argv)
    if not 0 <= a.warmup < a.steps:
        p.error("--warmup must be >= 0 and < --steps")
    return a


def chosen_sizes(a: argparse.Namespace) -> list[str]:
    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    return sizes


def write_results(path: str, a: argparse.Namespace, results: list[dict]) -> None:
    import torch

    Path(path).write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if k not in HIDDEN_ARGS},
                                      "torch": torch.__version__, "results": results}, indent=2))


def print_table(results: list[dict], a: argparse.Namespace, *, title: str, key: str, unit: str, checks: tuple[str, ...],
                note: str, fmt: str = ",.0f", batch: str = "") -> None:
    """Best ``key`` (shown as ``unit``) per side, best and median ratio, mean losses, checks; then a warning
    when other processes were busy during some runs."""
    print(f"\n{title}, {a.steps} steps ({a.warmup} warm-up steps not timed), batch {a.batch_size}{batch}, "
          f"{a.threads} threads, fp32, best of {a.repeats} run(s) per side")
    w_ours, w_trl = max(11, len(unit) + 6), max(10, len(unit) + 5)
    print(f"{'size':>5} {'params':>8} {'ours ' + unit:>{w_ours}} {'TRL ' + unit:>{w_trl}} {'ratio':>6} {'median ratio':>12}  "
          f"{'mean loss ours/TRL':>19}  checks")
    for r in results:
        marks = ", ".join(f"{k} {'ok' if r[k] else 'DIFFER'}" for k in checks)
        print(f"{r['size']:>5} {r['params'] / 1e6:>7.2f}M {r['ours_' + key]:>{w_ours}{fmt}} {r['trl_' + key]:>{w_trl}{fmt}} "
              f"{r['ratio']:>6.2f} {r['median_ratio']:>12.2f}  {r['mean_loss']['ours']:>9.4f}/{r['mean_loss']['trl']:<9.4f}  {marks}")
    print(f"ratio = ours / TRL (higher is better for ours); {note}")
    warn_other_load(results)


def warn_other_load(results: list[dict]) -> None:
    """A warning when other processes were busy during some runs (``other_load``: {side: [cores per run]})."""
    loads = [x for r in results for runs in r["other_load"].values() for x in runs if x is not None]
    if loads and max(loads) > 0.25:
        print(f"warning: other processes used up to {max(loads):.2f} cores during some runs; numbers are noisy "
              "(see other_load in --out, or raise --repeats)")
