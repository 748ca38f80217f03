"""DPO throughput: our DPO stage's training loop against TRL's DPOTrainer, same model, data, batch and steps.

    .venv/bin/python benchmarks/dpo_vs_trl.py               # 1m and 15m, 30 steps, batch 16 pairs, 3 repeats
    .venv/bin/python benchmarks/dpo_vs_trl.py --sizes 15m --steps 60 --repeats 5 --out dpo_bench.json
    .venv/bin/python benchmarks/dpo_vs_trl.py --quick       # smoke run: 1m, 5 steps, 1 repeat

What is built (once, in a temporary folder; nothing is downloaded): the synthetic preference set of
``rm_vs_trl.py`` (arithmetic questions, a third with an earlier Q/A turn; chosen the right answer, rejected a wrong
one) or ``--data FILE``, as TRL's conversational prompt/chosen/rejected JSONL; our tokenizer and one
LlamaForCausalLM folder per size (``common.build_model_dir``), the policy and its reference on both sides.

Each side runs in its own fresh Python process with ``torch.set_num_threads(--threads)``, fp32, no gradient
checkpointing, no evaluation, no saving, no logging during training, the sigmoid DPO loss with ``--beta``, no
gradient accumulation, AdamW lr ``--lr`` with cosine decay to 10% and no warmup, gradient clipping at 1.0, dropout
off, the same seed and sample order, and ``--max-length`` set so that nothing is truncated (both sides check).
Both compute the reference's log-probs once before training (TRL: ``precompute_ref_log_probs=True``; ours always
does, with the policy before its first step as the reference), so the timed steps are policy forward and backward
passes on both sides.

  - ours: ``rlhf.stages.dpo``: ``encode_dpo_pairs`` -> ``add_reference_logprobs`` -> ``rlhf.training.fit`` with
    ``DPOLoss`` and ``collate_dpo``: what ``run_dpo`` does, minus validation, the metrics file and the save. The
    prompt of a pair runs once and both responses continue from its KV cache (``dpo.share_prompt``, the default;
    ``--no-share-prompt`` runs both full sequences in one forward of 2 x ``--batch-size`` rows).
  - TRL: ``DPOTrainer(model, ref_model=None, args=DPOConfig(...), train_dataset, processing_class=tokenizer)``
    (it makes the reference copy itself), then ``trainer.train()``: chosen and rejected as 2 x ``--batch-size``
    full sequences in one forward pass.

What is timed: wall-clock from the end of optimiser step ``--warmup`` to the end of step ``--steps`` (ours: fit's
per-step ``logger.log``; TRL: ``TrainerCallback.on_step_end``); pairs/s = pairs of those steps / that time. The
JSON also has each side's total seconds from before tokenisation to the end of training (reference pass
included). Each side runs ``--repeats`` times, alternating which goes first; best run per side and the ratio of
the medians are shown; ``other_load`` records CPU used by other processes during each run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import (FIT_FLAGS, FitClock, add_quick, build_model_dir, chosen_sizes, compare, make_parser, parse,
                    print_table, run_as_worker, run_repeats, run_worker, step_timing, trl_causal_lm_inputs, trl_fit_args,
                    trl_step_clock, write_results)
from rm_vs_trl import pairs_from_file, synthetic_pairs

QUICK = dict(sizes="1m", steps=5, warmup=1, repeats=1)


def worker_ours(a: argparse.Namespace) -> dict:
    import torch

    from rlhf.config import DataConfig, DPOConfig, TrainConfig
    from rlhf.data.io import load_preferences
    from rlhf.models.loading import load_causal_lm
    from rlhf.stages.dpo import DPOLoss, add_reference_logprobs, collate_dpo, encode_dpo_pairs
    from rlhf.training import fit

    model, tok = load_causal_lm(a.model)
    examples = list(load_preferences(a.rows))
    t_start = time.perf_counter()
    pairs, dropped = encode_dpo_pairs(tok, examples, DataConfig(path=a.rows, max_length=a.max_length, truncation="error"))
    add_reference_logprobs(model, pairs, tok.pad_token_id, a.batch_size, a.share_prompt, torch.device("cpu"))
    cfg = TrainConfig(max_steps=a.steps, batch_size=a.batch_size, lr=a.lr, weight_decay=0.0,
                      warmup_ratio=0.0, schedule="cosine", min_lr_ratio=0.1, max_grad_norm=1.0, log_every=1,
                      seed=a.seed, mixed_precision="no", gradient_checkpointing=False)
    loss = DPOLoss(DPOConfig(beta=a.beta, train=cfg), a.share_prompt)
    batch_pairs: list[int] = []

    def collate(rows):
        batch_pairs.append(len(rows))
        return collate_dpo(rows, tok.pad_token_id)

    clock = FitClock()
    fit(model, pairs, collate, cfg, loss_fn=loss, logger=clock, desc="ours", count_fn=lambda b: len(b["ref_logprobs"]) // 2)
    out = step_timing(clock.times, batch_pairs, a, t_start, unit="pairs")
    out.update(side="ours", total_seconds=time.perf_counter() - t_start, mean_loss=statistics.fmean(clock.losses),
               threads=clock.threads, params=sum(p.numel() for p in model.parameters()), n_rows=len(examples),
               kept=len(pairs) - dropped, settings={"share_prompt": a.share_prompt, "reference": "precomputed",
                                                    "param_dtype": str(next(model.parameters()).dtype)})
    return out


def worker_trl(a: argparse.Namespace) -> dict:
    from trl import DPOConfig, DPOTrainer

    tok, model, rows, dataset = trl_causal_lm_inputs(a)
    with tempfile.TemporaryDirectory() as out_dir:
        args = DPOConfig(**trl_fit_args(a, out_dir), beta=a.beta, loss_type=["sigmoid"], max_length=a.max_length,
                         precompute_ref_log_probs=True, precompute_ref_batch_size=a.batch_size, disable_dropout=True)

        def settings(args, model):
            return {"bf16": args.bf16, "fp16": args.fp16, "mixed_precision": trainer.accelerator.mixed_precision,
                    "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", None)),
                    "precompute_ref_log_probs": args.precompute_ref_log_probs, "loss_type": list(args.loss_type),
                    "param_dtype": str(next(model.parameters()).dtype), "optimizer": str(args.optim)}

        clock = trl_step_clock(settings)
        batch_pairs: list[int] = []
        t_start = time.perf_counter()
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[clock])
        collator = trainer.data_collator

        def counting_collator(examples):
            batch_pairs.append(len(examples))
            return collator(examples)

        trainer.data_collator = counting_collator
        result = trainer.train()
        total = time.perf_counter() - t_start
    kept = len(trainer.train_dataset)
    # The precompute pass goes through the collator too: only the training batches count.
    out = step_timing(clock.times, batch_pairs[-a.steps:], a, t_start, unit="pairs")
    out.update(side="trl", total_seconds=total, mean_loss=result.training_loss, threads=clock.threads,
               params=sum(p.numel() for p in model.parameters()), n_rows=len(rows), kept=kept, settings=clock.settings)
    return out


def bench_size(size: str, rows: list[dict], a: argparse.Namespace, tmp: Path) -> dict:
    model_dir, rows_path = tmp / f"model_{size}", tmp / "pairs.jsonl"
    texts = [m["content"] for r in rows for m in r["prompt"] + r["chosen"] + r["rejected"]]
    params = build_model_dir(size, texts, model_dir, a.seed)
    extra = () if a.share_prompt else ("--no-share-prompt",)
    runs = run_repeats(size, a, lambda side: run_worker(__file__, side, model_dir, rows_path, a, tmp,
                                                        flags=(*FIT_FLAGS, "beta"), extra=extra),
                       "pairs_per_sec", "pairs/s", ",.1f")
    ours, trl = runs["ours"][0], runs["trl"][0]
    if trl["kept"] != trl["n_rows"] or ours["kept"] != ours["n_rows"]:
        raise SystemExit(f"pairs were dropped for length (ours {ours['kept']}, TRL {trl['kept']} of {ours['n_rows']}): "
                         "raise --max-length")
    return {"size": size, "params": params, "steps": a.steps, "warmup": a.warmup, "batch_size": a.batch_size,
            "max_length": a.max_length, "beta": a.beta, **compare(runs, "pairs_per_sec"),
            "total_seconds": {s: [x["total_seconds"] for x in runs[s]] for s in runs},
            "mean_loss": {s: runs[s][0]["mean_loss"] for s in runs},
            "ours_settings": ours["settings"], "trl_settings": trl["settings"],
            "same_data": ours["kept"] == trl["kept"] == len(rows),
            "same_batches": ours["batch_pairs"] == trl["batch_pairs"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = make_parser(__doc__, batch_help="preference pairs per optimiser step (2x as many sequences)",
                    data_help="preference file to use instead of the synthetic arithmetic set")
    add_quick(p, QUICK, argv)
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (both sides)")
    p.add_argument("--no-share-prompt", dest="share_prompt", action="store_false",
                   help="ours: run both full sequences of a pair (dpo.share_prompt false) instead of the prompt once")
    return parse(p, argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    if run_as_worker(a, {"ours": worker_ours, "trl": worker_trl}):
        return
    n = a.batch_size * a.steps  # every pair is trained on exactly once, by both sides
    rows = pairs_from_file(a.data, n, a.seed) if a.data else synthetic_pairs(n, a.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="dpo_vs_trl_") as tmp_name:
        tmp = Path(tmp_name)
        from rlhf.data.io import write_jsonl_atomic

        write_jsonl_atomic(tmp / "pairs.jsonl", rows)
        for size in chosen_sizes(a):
            results.append(bench_size(size, rows, a, tmp))
    print_table(results, a, title="DPO throughput", key="pairs_per_sec", unit="pairs/s", fmt=",.1f", batch=" pairs",
                checks=("same_data", "same_batches"), note="pairs of the timed steps' batches (chosen + rejected each)")
    for r in results:
        target = 1.5 if r["params"] < 5e6 else 1.2
        total = {s: min(v) for s, v in r["total_seconds"].items()}
        print(f"{r['size']:>5}: target {target}x: {'met' if r['ratio'] >= target else 'NOT met'} (ratio {r['ratio']:.2f}); "
              f"total seconds incl. tokenisation and reference pass ours {total['ours']:.1f} / TRL {total['trl']:.1f}")
    if a.out:
        write_results(a.out, a, results)


if __name__ == "__main__":
    main()
