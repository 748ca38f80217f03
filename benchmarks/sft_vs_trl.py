"""SFT throughput: our loop (rlhf.training.fit) against TRL's SFTTrainer, same model, data and steps.

    .venv/bin/python benchmarks/sft_vs_trl.py                # 1m and 15m, 30 steps, batch 16, 3 repeats (~3 min)
    .venv/bin/python benchmarks/sft_vs_trl.py --sizes 15m --steps 60 --repeats 5 --out bench.json

What is built (once, in a temporary folder; nothing is downloaded):
  - a synthetic SFT set of ``batch_size * steps`` prompt/completion pairs (arithmetic questions, some with
    an earlier Q/A turn in the prompt, answers with or without a worked step), or ``--data FILE`` (any
    format ``rlhf.data.io.load_sft`` reads), written as TRL's conversational prompt/completion JSONL;
  - our byte-level BPE tokenizer (``rlhf.models.tokenizer.train_tokenizer``: pad distinct from EOS, chat
    template) trained on that text;
  - one LlamaForCausalLM per size from a config (``save_pretrained``), vocab 2048, untied head:
    ``1m`` = hidden 128 x 3 layers (~1.0M parameters), ``15m`` = hidden 384 x 8 layers (~15.7M).

Each side runs in its own fresh Python process (so TRL's imports and patches cannot touch ours, and the
other way round) with ``torch.set_num_threads(--threads)``, fp32, no gradient checkpointing, no packing,
no padding-free, no evaluation, no saving, no logging during training, completion-only loss, right
padding to the longest sample of the batch, micro-batch ``--batch-size``, no gradient accumulation,
AdamW lr ``--lr`` with cosine decay to 10% and no warmup (the two schedules are then identical), gradient
clipping at 1.0, the same seed, and ``--max-length`` (set so that nothing is truncated; the script checks).

  - ours: ``rlhf.models.loading.load_causal_lm`` -> ``rlhf.stages.sft.encode_examples`` (chat template,
    prompt labels -100) -> ``rlhf.training.fit(loss_fn=lm_loss)`` with ``rlhf.data.chat.pad_right`` as the
    collate: exactly what ``run_sft`` does, minus its validation split, initial validation loss, metrics
    file and the final save.
  - TRL: ``SFTTrainer(model, SFTConfig(...), train_dataset, processing_class=tokenizer)`` on the same
    model folder (``AutoModelForCausalLM.from_pretrained``, sdpa attention), then ``trainer.train()``.

Same batches on both sides: ``fit`` draws its sample order from ``torch.randperm(n, Generator(seed))``;
the TRL dataset is laid out in that order and read with ``train_sampling_strategy="sequential"``. The
non-pad tokens of every batch each side actually trained on are recorded from its collate function and
compared (``same_batches`` in the output); the tokenization of the two sides is compared too
(``same_tokens``).

What is timed, identically on both sides: wall-clock (``time.perf_counter``) from the end of optimiser
step ``--warmup`` to the end of step ``--steps``, where "end of a step" is the moment after
``optimizer.step(); scheduler.step(); zero_grad()``: for ours, the per-step ``logger.log`` call of
``fit`` (log_every=1, a recording stub, no file); for TRL, ``TrainerCallback.on_step_end``. So model
loading, tokenization, dataset preparation, optimiser creation, the first ``--warmup`` steps and
everything after the last step are excluded, while data loading/collation, forward, loss, backward,
clipping, optimiser and per-step bookkeeping (progress bars, metrics) of the timed steps are included.
tokens/s = non-pad tokens (attention_mask sum) of the batches of steps warmup+1..steps / that time.
The table's "mean loss" (over all steps) is a sanity check that both sides did the same computation.

Each side runs ``--repeats`` times, alternating which side goes first; the table reports the best run per
side (noise from other processes only ever slows a run down) and, beside it, the ratio of the medians.
The CPU time other processes used during each run (``other_load``, in cores, from /proc/stat minus the
worker's own rusage) is recorded, and a warning is printed when it is not negligible.

Fairness caveats: see benchmarks/README.md.
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
import tempfile
import time
from pathlib import Path

VOCAB_SIZE = 2048
SIZES = {  # LlamaConfig shapes; parameter counts are computed and printed
    "1m": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, intermediate_size=256),
    "15m": dict(hidden_size=384, num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=6, intermediate_size=1024),
}


# ----------------------------------------------------------------------------------------------------
# Setup (parent process): data, tokenizer, models
# ----------------------------------------------------------------------------------------------------

_ASK = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Please tell me what {a} {op} {b} equals.",
        "{a} {op} {b} = ?", "Quick question: how much is {a} {op} {b}?")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _qa(rng: random.Random) -> tuple[str, str]:
    a, b, op = rng.randint(0, 99), rng.randint(0, 99), rng.choice(list(_OPS))
    q, r = rng.choice(_ASK).format(a=a, op=op, b=b), _OPS[op](a, b)
    ans = f"{a} {op} {b} = {r}. The answer is {r}." if rng.random() < 0.5 else f"The answer is {r}."
    return q, ans


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """TRL conversational prompt/completion rows; a third carry an earlier Q/A turn (longer prompts)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = []
        if rng.random() < 1 / 3:
            q0, a0 = _qa(rng)
            prompt += [{"role": "user", "content": q0}, {"role": "assistant", "content": a0}]
        q, a = _qa(rng)
        rows.append({"prompt": [*prompt, {"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]})
    return rows


def rows_from_file(path: str, n: int, seed: int) -> list[dict]:
    """Any file load_sft reads, as n TRL conversational rows (seeded sample, repeated if too short)."""
    from rlhf.data.io import load_sft

    examples = list(load_sft(path))
    random.Random(seed).shuffle(examples)
    examples = (examples * (n // len(examples) + 1))[:n]
    return [{"prompt": [dict(m) for m in ex.prompt], "completion": [{"role": "assistant", "content": ex.completion}]}
            for ex in examples]


def build_model_dir(size: str, rows: list[dict], folder: Path, seed: int) -> int:
    """A tiny LlamaForCausalLM plus our tokenizer, saved as an ordinary HF folder; returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from rlhf.models.tokenizer import train_tokenizer

    hf_logging.disable_progress_bar()

    texts = [m["content"] for r in rows for m in r["prompt"] + r["completion"]]
    tok = train_tokenizer(texts, VOCAB_SIZE)
    if len(tok) > VOCAB_SIZE:
        raise SystemExit(f"tokenizer has {len(tok)} tokens, more than the model's {VOCAB_SIZE}")
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SIZES[size],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# Workers (one fresh process per side and repeat)
# ----------------------------------------------------------------------------------------------------


def _sample_order(n: int, seed: int) -> list[int]:
    """The order in which rlhf.training.fit visits n samples in its first epoch (checked: same_batches)."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _timing(times: list[float], batch_tokens: list[int], a: argparse.Namespace, t_start: float) -> dict:
    """Tokens/s over steps warmup+1..steps from end-of-step timestamps and per-batch non-pad tokens."""
    if len(times) < a.steps or len(batch_tokens) < a.steps:
        raise RuntimeError(f"expected {a.steps} steps, saw {len(times)} step ends and {len(batch_tokens)} batches")
    t0 = times[a.warmup - 1] if a.warmup else t_start
    seconds = times[a.steps - 1] - t0
    tokens = sum(batch_tokens[a.warmup : a.steps])
    return {"timed_tokens": tokens, "timed_seconds": seconds, "tokens_per_sec": tokens / seconds,
            "batch_tokens": batch_tokens[: a.steps]}


def worker_ours(a: argparse.Namespace) -> dict:
    import torch

    from rlhf.config import DataConfig, TrainConfig
    from rlhf.data.chat import pad_right
    from rlhf.data.io import load_sft
    from rlhf.models.loading import load_causal_lm
    from rlhf.stages.sft import encode_examples
    from rlhf.training import fit, lm_loss

    model, tok = load_causal_lm(a.model)
    items = encode_examples(tok, list(load_sft(a.rows)), DataConfig(path=a.rows, max_length=a.max_length))
    cfg = TrainConfig(max_steps=a.steps, batch_size=a.batch_size, grad_accum=1, lr=a.lr, weight_decay=0.0,
                      warmup_ratio=0.0, schedule="cosine", min_lr_ratio=0.1, max_grad_norm=1.0, log_every=1,
                      seed=a.seed, mixed_precision="no", gradient_checkpointing=False)
    batch_tokens: list[int] = []

    def collate(rows):
        batch = pad_right(rows, tok.pad_token_id)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    class StepClock:  # stands in for MetricsLogger: fit calls .log(step, ...) after every optimiser step
        def __init__(self):
            self.times, self.losses, self.threads = [], [], None

        def log(self, step, **metrics):
            self.times.append(time.perf_counter())
            self.threads = torch.get_num_threads()
            if "train/loss" in metrics:
                self.losses.append(metrics["train/loss"])

    clock = StepClock()
    t_start = time.perf_counter()
    res = fit(model, items, collate, cfg, loss_fn=lm_loss, logger=clock, desc="ours")
    total = time.perf_counter() - t_start
    out = _timing(clock.times, batch_tokens, a, t_start)
    out.update(side="ours", total_seconds=total, mean_loss=statistics.fmean(clock.losses), threads=clock.threads,
               fit_tokens_per_sec=res.tokens_per_sec,
               sequences=[(e.input_ids, e.labels) for e in (items[i] for i in _sample_order(len(items), a.seed))])
    return out


def worker_trl(a: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from rlhf.data.io import read_jsonl

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa")
    rows = read_jsonl(a.rows)
    dataset = Dataset.from_list([rows[i] for i in _sample_order(len(rows), a.seed)])  # fit's order, read sequentially
    with tempfile.TemporaryDirectory() as out_dir:
        args = SFTConfig(
            output_dir=out_dir, use_cpu=True, seed=a.seed, data_seed=a.seed,
            max_steps=a.steps, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
            learning_rate=a.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
            warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            bf16=False, fp16=False, gradient_checkpointing=False,  # TRL turns both on by default
            max_length=a.max_length, packing=False, padding_free=False, completion_only_loss=True,
            train_sampling_strategy="sequential", dataloader_num_workers=0,
            logging_strategy="no", logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to="none",
        )
        batch_tokens: list[int] = []

        class StepClock(TrainerCallback):
            def __init__(self):
                self.times, self.threads, self.settings = [], None, {}

            def on_step_end(self, args, state, control, **kwargs):
                self.times.append(time.perf_counter())
                self.threads = torch.get_num_threads()

            def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
                self.settings = {  # what the peer actually ran with
                    "bf16": args.bf16, "fp16": args.fp16, "mixed_precision": trainer.accelerator.mixed_precision,
                    "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", None)),
                    "completion_only_loss": trainer.completion_only_loss, "packing": args.packing,
                    "padding_free": args.padding_free, "optimizer": args.optim,
                    "param_dtype": str(next(model.parameters()).dtype),
                }

        clock = StepClock()
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[clock])
        collator = trainer.data_collator

        def counting_collator(examples):
            batch = collator(examples)
            batch_tokens.append(int(batch["attention_mask"].sum()))
            return batch

        trainer.data_collator = counting_collator
        t_start = time.perf_counter()
        result = trainer.train()
        total = time.perf_counter() - t_start
    out = _timing(clock.times, batch_tokens, a, t_start)
    prepared = trainer.train_dataset
    out.update(side="trl", total_seconds=total, mean_loss=result.training_loss, threads=clock.threads,
               settings=clock.settings,
               sequences=list(zip(prepared["input_ids"], prepared["labels"])))
    return out


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------


def _busy_cpu_seconds() -> float | None:
    """CPU-seconds the whole machine has spent busy (from /proc/stat; None where there is none)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_worker(side: str, model_dir: Path, rows_path: Path, a: argparse.Namespace, tmp: Path) -> dict:
    """One side in a fresh process. Also measures how busy the machine was with other work meanwhile."""
    result = tmp / f"result_{side}.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--model", str(model_dir), "--rows", str(rows_path),
           "--result", str(result), "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch-size", str(a.batch_size),
           "--max-length", str(a.max_length), "--threads", str(a.threads), "--lr", str(a.lr), "--seed", str(a.seed)]
    busy0, ru0, t0 = _busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    busy1, ru1, wall = _busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter() - t0
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


def bench_size(size: str, rows: list[dict], a: argparse.Namespace, tmp: Path) -> dict:
    model_dir, rows_path = tmp / f"model_{size}", tmp / "sft.jsonl"
    params = build_model_dir(size, rows, model_dir, a.seed)
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for r in range(a.repeats):
        for side in (("ours", "trl") if r % 2 == 0 else ("trl", "ours")):  # alternate who goes first
            runs[side].append(run_worker(side, model_dir, rows_path, a, tmp))
            last = runs[side][-1]
            load = "" if last["other_load"] is None else f"  (other load {last['other_load']:.2f} cores)"
            print(f"  {size} repeat {r + 1}/{a.repeats} {side:4s}: {last['tokens_per_sec']:>9,.0f} tok/s{load}", file=sys.stderr)
    ours, trl = runs["ours"][0], runs["trl"][0]
    longest = max(len(ids) for ids, _ in ours["sequences"])
    best = {s: max(x["tokens_per_sec"] for x in runs[s]) for s in runs}  # noise only ever slows a run down
    med = {s: statistics.median(x["tokens_per_sec"] for x in runs[s]) for s in runs}
    return {
        "size": size, "params": params, "steps": a.steps, "warmup": a.warmup, "batch_size": a.batch_size,
        "max_length": a.max_length, "longest_sample": longest, "threads": {s: runs[s][0]["threads"] for s in runs},
        "ours_tokens_per_sec": best["ours"], "trl_tokens_per_sec": best["trl"], "ratio": best["ours"] / best["trl"],
        "median_ratio": med["ours"] / med["trl"],
        "ours_runs": [x["tokens_per_sec"] for x in runs["ours"]], "trl_runs": [x["tokens_per_sec"] for x in runs["trl"]],
        "other_load": {s: [x["other_load"] for x in runs[s]] for s in runs},
        "timed_tokens": ours["timed_tokens"],
        "timed_seconds": {s: [x["timed_seconds"] for x in runs[s]] for s in runs},
        "total_train_seconds": {s: [x["total_seconds"] for x in runs[s]] for s in runs},
        "mean_loss": {s: runs[s][0]["mean_loss"] for s in runs},
        "trl_settings": trl["settings"],
        "same_tokens": [list(map(list, x)) for x in ours["sequences"]] == [list(map(list, x)) for x in trl["sequences"]],
        "same_batches": ours["batch_tokens"] == trl["batch_tokens"],
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1m,15m", help=f"comma-separated model sizes among {', '.join(SIZES)}")
    p.add_argument("--steps", type=int, default=30, help="optimiser steps per run (both sides)")
    p.add_argument("--warmup", type=int, default=3, help="leading steps excluded from the timing")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per optimiser step")
    p.add_argument("--max-length", type=int, default=128, help="max tokens per sample (must truncate nothing)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on both sides")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine to 10%%, no warmup)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating which goes first; best is reported")
    p.add_argument("--data", default=None, help="SFT file to use instead of the synthetic arithmetic set")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--verbose", action="store_true", help="show the workers' output (progress bars, warnings)")
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not 0 <= a.warmup < a.steps:
        p.error("--warmup must be >= 0 and < --steps")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.worker:
        out = (worker_ours if a.worker == "ours" else worker_trl)(a)
        Path(a.result).write_text(json.dumps(out))
        return
    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    n = a.batch_size * a.steps  # every sample is trained on exactly once, by both sides
    rows = rows_from_file(a.data, n, a.seed) if a.data else synthetic_rows(n, a.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="sft_vs_trl_") as tmp_name:
        tmp = Path(tmp_name)
        from rlhf.data.io import write_jsonl_atomic

        write_jsonl_atomic(tmp / "sft.jsonl", rows)
        for size in sizes:
            res = bench_size(size, rows, a, tmp)
            if res["longest_sample"] > a.max_length:
                raise SystemExit(f"samples up to {res['longest_sample']} tokens: raise --max-length")
            results.append(res)
    print_table(results, a)
    if a.out:
        Path(a.out).write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if k not in ("worker", "model", "rows", "result")},
                                           "torch": torch.__version__, "results": results}, indent=2))


def print_table(results: list[dict], a: argparse.Namespace) -> None:
    print(f"\nSFT throughput, {a.steps} steps ({a.warmup} warm-up steps not timed), batch {a.batch_size}, "
          f"{a.threads} threads, fp32, best of {a.repeats} run(s) per side")
    print(f"{'size':>5} {'params':>8} {'ours tok/s':>11} {'TRL tok/s':>10} {'ratio':>6} {'median ratio':>12}  {'mean loss ours/TRL':>19}  checks")
    for r in results:
        checks = ", ".join(f"{k} {'ok' if r[k] else 'DIFFER'}" for k in ("same_tokens", "same_batches"))
        print(f"{r['size']:>5} {r['params'] / 1e6:>7.2f}M {r['ours_tokens_per_sec']:>11,.0f} {r['trl_tokens_per_sec']:>10,.0f} "
              f"{r['ratio']:>6.2f} {r['median_ratio']:>12.2f}  {r['mean_loss']['ours']:>9.4f}/{r['mean_loss']['trl']:<9.4f}  {checks}")
    print("ratio = ours / TRL (higher is better for ours); tokens are non-pad tokens of the timed steps' batches")
    loads = [x for r in results for s in ("ours", "trl") for x in r["other_load"][s] if x is not None]
    if loads and max(loads) > 0.25:
        print(f"warning: other processes used up to {max(loads):.2f} cores during some runs; numbers are noisy "
              "(see other_load in --out, or raise --repeats)")


if __name__ == "__main__":
    main()
