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
import random
import statistics
import tempfile
import time
from pathlib import Path

from common import (FitClock, build_model_dir, chosen_sizes, compare, make_parser, parse, print_table as _print_table,
                    qa, run_as_worker, run_repeats, run_worker, sample_order, step_timing, trl_causal_lm_inputs,
                    trl_fit_args, trl_step_clock, write_results)

# ----------------------------------------------------------------------------------------------------
# Setup (parent process): data (the tokenizer and models: common.build_model_dir)
# ----------------------------------------------------------------------------------------------------


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """TRL conversational prompt/completion rows; a third carry an earlier Q/A turn (longer prompts)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = []
        if rng.random() < 1 / 3:
            q0, a0 = qa(rng)
            prompt += [{"role": "user", "content": q0}, {"role": "assistant", "content": a0}]
        q, a = qa(rng)
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


# ----------------------------------------------------------------------------------------------------
# Workers (one fresh process per side and repeat)
# ----------------------------------------------------------------------------------------------------


def worker_ours(a: argparse.Namespace) -> dict:
    from rlhf.config import DataConfig, TrainConfig
    from rlhf.data.chat import pad_right
    from rlhf.data.io import load_sft
    from rlhf.models.loading import load_causal_lm
    from rlhf.stages.sft import encode_examples
    from rlhf.training import fit, lm_loss

    model, tok = load_causal_lm(a.model)
    # The last assistant turn only, as TRL's completion_only_loss trains a prompt/completion row (an earlier turn of
    # the prompt is context on both sides).
    items, _ = encode_examples(tok, list(load_sft(a.rows)), DataConfig(path=a.rows, max_length=a.max_length,
                                                                      assistant_turns="last"))
    cfg = TrainConfig(max_steps=a.steps, batch_size=a.batch_size, lr=a.lr, weight_decay=0.0,
                      warmup_ratio=0.0, schedule="cosine", min_lr_ratio=0.1, max_grad_norm=1.0, log_every=1,
                      seed=a.seed, mixed_precision="no", gradient_checkpointing=False)
    batch_tokens: list[int] = []

    def collate(rows):
        batch = pad_right(rows, tok.pad_token_id)
        batch_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    clock = FitClock()
    t_start = time.perf_counter()
    res = fit(model, items, collate, cfg, loss_fn=lm_loss, logger=clock, desc="ours")
    total = time.perf_counter() - t_start
    out = step_timing(clock.times, batch_tokens, a, t_start)
    out.update(side="ours", total_seconds=total, mean_loss=statistics.fmean(clock.losses), threads=clock.threads,
               fit_tokens_per_sec=res.tokens_per_sec,
               sequences=[(e.input_ids, e.labels) for e in (items[i] for i in sample_order(len(items), a.seed))])
    return out


def worker_trl(a: argparse.Namespace) -> dict:
    from trl import SFTConfig, SFTTrainer

    tok, model, rows, dataset = trl_causal_lm_inputs(a)
    with tempfile.TemporaryDirectory() as out_dir:
        args = SFTConfig(**trl_fit_args(a, out_dir), max_length=a.max_length, packing=False, padding_free=False,
                         completion_only_loss=True)
        batch_tokens: list[int] = []

        def settings(args, model):  # what the peer actually ran with
            return {
                "bf16": args.bf16, "fp16": args.fp16, "mixed_precision": trainer.accelerator.mixed_precision,
                "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", None)),
                "completion_only_loss": trainer.completion_only_loss, "packing": args.packing,
                "padding_free": args.padding_free, "optimizer": args.optim,
                "param_dtype": str(next(model.parameters()).dtype),
            }

        clock = trl_step_clock(settings)
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
    out = step_timing(clock.times, batch_tokens, a, t_start)
    prepared = trainer.train_dataset
    out.update(side="trl", total_seconds=total, mean_loss=result.training_loss, threads=clock.threads,
               settings=clock.settings,
               sequences=list(zip(prepared["input_ids"], prepared["labels"])))
    return out


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------


def bench_size(size: str, rows: list[dict], a: argparse.Namespace, tmp: Path) -> dict:
    model_dir, rows_path = tmp / f"model_{size}", tmp / "sft.jsonl"
    texts = [m["content"] for r in rows for m in r["prompt"] + r["completion"]]
    params = build_model_dir(size, texts, model_dir, a.seed)
    runs = run_repeats(size, a, lambda side: run_worker(__file__, side, model_dir, rows_path, a, tmp), "tokens_per_sec", "tok/s")
    ours, trl = runs["ours"][0], runs["trl"][0]
    longest = max(len(ids) for ids, _ in ours["sequences"])
    return {
        "size": size, "params": params, "steps": a.steps, "warmup": a.warmup, "batch_size": a.batch_size,
        "max_length": a.max_length, "longest_sample": longest, "threads": {s: runs[s][0]["threads"] for s in runs},
        **compare(runs, "tokens_per_sec"),
        "timed_tokens": ours["timed_tokens"],
        "timed_seconds": {s: [x["timed_seconds"] for x in runs[s]] for s in runs},
        "total_train_seconds": {s: [x["total_seconds"] for x in runs[s]] for s in runs},
        "mean_loss": {s: runs[s][0]["mean_loss"] for s in runs},
        "trl_settings": trl["settings"],
        "same_tokens": [list(map(list, x)) for x in ours["sequences"]] == [list(map(list, x)) for x in trl["sequences"]],
        "same_batches": ours["batch_tokens"] == trl["batch_tokens"],
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = make_parser(__doc__, batch_help="sequences per optimiser step",
                    data_help="SFT file to use instead of the synthetic arithmetic set")
    return parse(p, argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    if run_as_worker(a, {"ours": worker_ours, "trl": worker_trl}):
        return
    sizes = chosen_sizes(a)
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
        write_results(a.out, a, results)


def print_table(results: list[dict], a: argparse.Namespace) -> None:
    _print_table(results, a, title="SFT throughput", key="tokens_per_sec", unit="tok/s",
                 checks=("same_tokens", "same_batches"), note="tokens are non-pad tokens of the timed steps' batches")


if __name__ == "__main__":
    main()
