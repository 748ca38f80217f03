"""Reward-model throughput: our loop (rlhf.training.fit) against TRL's RewardTrainer, same model, data and steps.

    .venv/bin/python benchmarks/rm_vs_trl.py                # 1m and 15m, 30 steps, batch 16 pairs, 3 repeats
    .venv/bin/python benchmarks/rm_vs_trl.py --sizes 15m --steps 60 --repeats 5 --out bench.json
    .venv/bin/python benchmarks/rm_vs_trl.py --quick        # smoke run: 1m, 5 steps, 1 repeat

What is built (once, in a temporary folder; nothing is downloaded):
  - a synthetic preference set of ``batch_size * steps`` pairs (arithmetic questions, a third with an
    earlier Q/A turn in the prompt; chosen = the right answer, rejected = a wrong one, each with or without
    a worked step, so the two sides of a pair often differ in length), or ``--data FILE`` (any format
    ``rlhf.data.io.load_preferences`` reads; margins are dropped), written as TRL's conversational
    prompt/chosen/rejected JSONL;
  - our byte-level BPE tokenizer and one LlamaForCausalLM folder per size, exactly as in
    ``sft_vs_trl.py`` (``common.build_model_dir``): ``1m`` = hidden 128 x 3 layers, ``15m`` = hidden 384 x 8
    layers. As reward models (no LM head, a new 1-output ``score`` head) they have ~0.75M and ~14.9M
    parameters; the table shows the reward model's count.

Each side runs in its own fresh Python process with ``torch.set_num_threads(--threads)``, fp32, no gradient
checkpointing, no evaluation, no saving, no logging during training, plain Bradley-Terry loss
``-logsigmoid(r_chosen - r_rejected)`` (no margin term, no reward centering), no gradient accumulation,
AdamW lr ``--lr`` with cosine decay to 10% and no warmup, gradient clipping at 1.0, dropout off, the same
seed, and ``--max-length`` (set so that nothing is truncated or filtered; both sides check).

  - ours: ``rlhf.models.reward.load_reward_backbone`` (AutoModelForSequenceClassification, num_labels=1,
    sdpa) -> ``rlhf.stages.reward.encode_pairs`` -> ``rlhf.training.fit(loss_fn=make_loss_fn(RewardConfig()),
    count_fn=pairs)`` with ``pair_collator(RewardConfig())`` as the collate: what ``train_member`` does,
    minus its validation passes, bootstrap, reward normalisation statistics, metrics file and the final
    save. The prompt a pair's two sides share runs once and both continuations read its KV cache
    (``rm.share_prompt``, the default; ``--no-share-prompt`` runs both full sequences instead, in one
    right-padded forward pass of 2 x ``--batch-size`` rows).
  - TRL: ``RewardTrainer(model, RewardConfig(...), train_dataset, processing_class=tokenizer)`` with the
    model loaded as ``AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)`` (fp32,
    sdpa, pad_token_id set), then ``trainer.train()``: chosen and rejected of a batch in one right-padded
    forward pass of 2 x ``--batch-size`` full sequences.

Same starting weights: both workers call ``torch.manual_seed(--seed)`` right before loading, so the new
score head gets the same random initialisation (checked: ``same_init``, a hash of the head's weights).
Same batches: ``fit`` draws its sample order from ``torch.randperm(n, Generator(seed))``; the TRL dataset
is laid out in that order and read with ``train_sampling_strategy="sequential"``. The token ids of every
pair (``same_tokens``) and the tokens of the full sequences in every batch each side trained on
(``same_batches``, recorded from its collate function) are compared; the total token count of each
side's tokenised data is reported too (``data_tokens``).

What is timed, identically on both sides and exactly as in ``sft_vs_trl.py``: wall-clock from the end of
optimiser step ``--warmup`` to the end of step ``--steps`` (ours: fit's per-step ``logger.log`` call, a
recording stub; TRL: ``TrainerCallback.on_step_end``). pairs/s = pairs in the batches of steps
warmup+1..steps / that time (tokens/s, over the non-pad tokens of both sides of every pair, is in the
JSON). The table's "mean loss" (over all steps) is a sanity check that both sides did the same
computation.

Each side runs ``--repeats`` times, alternating which side goes first; the table reports the best run per
side and the ratio of the medians; ``other_load`` records CPU used by other processes during each run.

Fairness caveats: see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import tempfile
import time
from pathlib import Path

from common import (FitClock, add_quick, answer_text, build_model_dir, chosen_sizes, compare, make_parser, parse,
                    print_table, qa, question, run_as_worker, run_repeats, run_worker, sample_order, step_timing,
                    trl_fit_args, trl_step_clock, write_results)

QUICK = dict(sizes="1m", steps=5, warmup=1, repeats=1)  # --quick: defaults for a smoke run (explicit options win)
WRONG = (-10, -2, -1, 1, 2, 10)  # how far the rejected answer is off

# ----------------------------------------------------------------------------------------------------
# Setup (parent process): data (the tokenizer and models: common.build_model_dir)
# ----------------------------------------------------------------------------------------------------


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """TRL conversational preference rows: chosen states the right answer, rejected a wrong one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = []
        if rng.random() < 1 / 3:
            q0, a0 = qa(rng)
            prompt += [_msg("user", q0), _msg("assistant", a0)]
        x, op, y, q, r = question(rng)
        chosen = answer_text(x, op, y, r, rng.random() < 0.5)
        rejected = answer_text(x, op, y, r + rng.choice(WRONG), rng.random() < 0.5)
        rows.append({"prompt": [*prompt, _msg("user", q)], "chosen": [_msg("assistant", chosen)],
                     "rejected": [_msg("assistant", rejected)]})
    return rows


def pairs_from_file(path: str, n: int, seed: int) -> list[dict]:
    """Any file load_preferences reads, as n TRL conversational rows (seeded sample, repeated if too short)."""
    from rlhf.data.io import load_preferences

    examples = list(load_preferences(path))
    random.Random(seed).shuffle(examples)
    examples = (examples * (n // len(examples) + 1))[:n]
    return [{"prompt": [dict(m) for m in ex.prompt], "chosen": [_msg("assistant", ex.chosen)],
             "rejected": [_msg("assistant", ex.rejected)]} for ex in examples]


# ----------------------------------------------------------------------------------------------------
# Workers (one fresh process per side and repeat)
# ----------------------------------------------------------------------------------------------------


def _head_hash(model) -> str:
    """The freshly initialised score head, to check that both sides start from the same weights."""
    return hashlib.sha256(model.score.weight.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def _pair_timing(times: list[float], batch_pairs: list[int], batch_tokens: list[int], a, t_start: float) -> dict:
    out = step_timing(times, batch_pairs, a, t_start, unit="pairs")
    out.update(step_timing(times, batch_tokens, a, t_start, unit="tokens"))
    return out


def worker_ours(a: argparse.Namespace) -> dict:
    import torch

    from rlhf.config import DataConfig, RewardConfig, TrainConfig
    from rlhf.data.io import load_preferences
    from rlhf.models.reward import is_encoder, load_reward_backbone
    from rlhf.stages.reward import encode_pairs, make_loss_fn, pair_collator
    from rlhf.training import fit

    torch.manual_seed(a.seed)  # the new score head's initialisation (the TRL worker does the same)
    model, tok = load_reward_backbone(a.model)
    init = _head_hash(model)
    examples = list(load_preferences(a.rows))
    # truncation="error": an overlong pair stops the run instead of being silently cut (TRL would drop it)
    pairs, _ = encode_pairs(tok, examples, DataConfig(path=a.rows, max_length=a.max_length, truncation="error"),
                         is_encoder(model))
    rm = RewardConfig(share_prompt=a.share_prompt)  # loss: Bradley-Terry only (margin_weight 0, center_coef 0)
    cfg = TrainConfig(max_steps=a.steps, batch_size=a.batch_size, lr=a.lr, weight_decay=0.0,
                      warmup_ratio=0.0, schedule="cosine", min_lr_ratio=0.1, max_grad_norm=1.0, log_every=1,
                      seed=a.seed, mixed_precision="no", gradient_checkpointing=False)
    rm.train = cfg
    collate_rows = pair_collator(rm, tok.pad_token_id if tok.pad_token_id is not None else 0, is_encoder(model))
    batch_pairs: list[int] = []
    batch_tokens: list[int] = []

    def collate(rows):
        batch_pairs.append(len(rows))
        batch_tokens.append(sum(len(p.chosen) + len(p.rejected) for p in rows))  # the sequences scored, whole
        return collate_rows(rows)

    clock = FitClock()
    t_start = time.perf_counter()
    res = fit(model, pairs, collate, cfg, loss_fn=make_loss_fn(rm), logger=clock, desc="ours",
              count_fn=lambda b: len(b["margin"]))
    total = time.perf_counter() - t_start
    out = _pair_timing(clock.times, batch_pairs, batch_tokens, a, t_start)
    out.update(side="ours", total_seconds=total, mean_loss=statistics.fmean(clock.losses), threads=clock.threads,
               fit_pairs_per_sec=res.units / max(res.seconds, 1e-9), init=init,
               params=sum(p.numel() for p in model.parameters()), n_rows=len(examples),
               settings={"param_dtype": str(next(model.parameters()).dtype), "share_prompt": a.share_prompt,
                         "attn_implementation": getattr(model.config, "_attn_implementation", None)},
               sequences=[(p.chosen, p.rejected) for p in (pairs[i] for i in sample_order(len(pairs), a.seed))])
    return out


def worker_trl(a: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from rlhf.data.io import read_jsonl

    tok = AutoTokenizer.from_pretrained(a.model)
    torch.manual_seed(a.seed)  # the new score head's initialisation (the same as ours)
    model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model.config.pad_token_id = tok.pad_token_id  # the head reads the last non-pad token
    init = _head_hash(model)
    rows = read_jsonl(a.rows)
    dataset = Dataset.from_list([rows[i] for i in sample_order(len(rows), a.seed)])  # fit's order, read sequentially
    with tempfile.TemporaryDirectory() as out_dir:
        args = RewardConfig(**trl_fit_args(a, out_dir), max_length=a.max_length, center_rewards_coefficient=None,
                            disable_dropout=True)
        batch_pairs: list[int] = []
        batch_tokens: list[int] = []

        def settings(args, model):  # what the peer actually ran with
            return {
                "bf16": args.bf16, "fp16": args.fp16, "mixed_precision": trainer.accelerator.mixed_precision,
                "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", None)),
                "center_rewards_coefficient": args.center_rewards_coefficient, "disable_dropout": args.disable_dropout,
                "pad_to_multiple_of": args.pad_to_multiple_of, "max_length": args.max_length, "optimizer": args.optim,
                "param_dtype": str(next(model.parameters()).dtype),
                "attn_implementation": getattr(model.config, "_attn_implementation", None),
            }

        clock = trl_step_clock(settings)
        trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, callbacks=[clock])
        collator = trainer.data_collator

        def counting_collator(examples):
            batch = collator(examples)
            batch_pairs.append(len(examples))
            batch_tokens.append(int(batch["attention_mask"].sum()))
            return batch

        trainer.data_collator = counting_collator
        t_start = time.perf_counter()
        result = trainer.train()
        total = time.perf_counter() - t_start
    out = _pair_timing(clock.times, batch_pairs, batch_tokens, a, t_start)
    prepared = trainer.train_dataset
    out.update(side="trl", total_seconds=total, mean_loss=result.training_loss, threads=clock.threads, init=init,
               params=sum(p.numel() for p in model.parameters()), n_rows=len(rows), settings=clock.settings,
               sequences=list(zip(prepared["chosen_ids"], prepared["rejected_ids"])))
    return out


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------


def bench_size(size: str, rows: list[dict], a: argparse.Namespace, tmp: Path) -> dict:
    model_dir, rows_path = tmp / f"model_{size}", tmp / "pairs.jsonl"
    texts = [m["content"] for r in rows for m in r["prompt"] + r["chosen"] + r["rejected"]]
    lm_params = build_model_dir(size, texts, model_dir, a.seed)
    extra = () if a.share_prompt else ("--no-share-prompt",)
    runs = run_repeats(size, a, lambda side: run_worker(__file__, side, model_dir, rows_path, a, tmp, extra=extra),
                       "pairs_per_sec", "pairs/s", ",.1f")
    ours, trl = runs["ours"][0], runs["trl"][0]
    seqs = {s: [[list(c), list(r)] for c, r in runs[s][0]["sequences"]] for s in runs}
    if len(seqs["trl"]) != trl["n_rows"]:
        raise SystemExit(f"TRL kept {len(seqs['trl'])} of {trl['n_rows']} pairs (max_length filter): raise --max-length")
    return {
        "size": size, "params": ours["params"], "trl_params": trl["params"], "backbone_lm_params": lm_params,
        "steps": a.steps, "warmup": a.warmup, "batch_size": a.batch_size, "max_length": a.max_length,
        "longest_sample": max(len(x) for pair in seqs["ours"] for x in pair),
        "threads": {s: runs[s][0]["threads"] for s in runs},
        **compare(runs, "pairs_per_sec"),
        "tokens_per_sec": {s: max(x["tokens_per_sec"] for x in runs[s]) for s in runs},
        "timed_pairs": ours["timed_pairs"], "timed_tokens": ours["timed_tokens"],
        "data_tokens": {s: sum(len(x) for pair in seqs[s] for x in pair) for s in seqs},
        "timed_seconds": {s: [x["timed_seconds"] for x in runs[s]] for s in runs},
        "total_train_seconds": {s: [x["total_seconds"] for x in runs[s]] for s in runs},
        "mean_loss": {s: runs[s][0]["mean_loss"] for s in runs},
        "fit_pairs_per_sec": [x["fit_pairs_per_sec"] for x in runs["ours"]],
        "ours_settings": ours["settings"], "trl_settings": trl["settings"],
        "same_init": ours["init"] == trl["init"],
        "same_tokens": seqs["ours"] == seqs["trl"],
        "same_batches": ours["batch_pairs"] == trl["batch_pairs"] and ours["batch_tokens"] == trl["batch_tokens"],
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = make_parser(__doc__, batch_help="preference pairs per optimiser step (2x as many sequences per forward)",
                    data_help="preference file to use instead of the synthetic arithmetic set")
    add_quick(p, QUICK, argv)
    p.add_argument("--no-share-prompt", dest="share_prompt", action="store_false",
                   help="ours: run both full sequences of a pair (rm.share_prompt false) instead of the prompt once")
    return parse(p, argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    if run_as_worker(a, {"ours": worker_ours, "trl": worker_trl}):
        return
    sizes = chosen_sizes(a)
    n = a.batch_size * a.steps  # every pair is trained on exactly once, by both sides
    rows = pairs_from_file(a.data, n, a.seed) if a.data else synthetic_pairs(n, a.seed)
    results = []
    with tempfile.TemporaryDirectory(prefix="rm_vs_trl_") as tmp_name:
        tmp = Path(tmp_name)
        from rlhf.data.io import write_jsonl_atomic

        write_jsonl_atomic(tmp / "pairs.jsonl", rows)
        for size in sizes:
            results.append(bench_size(size, rows, a, tmp))
    print_table(results, a, title="Reward-model throughput", key="pairs_per_sec", unit="pairs/s", fmt=",.1f",
                batch=" pairs", checks=("same_init", "same_tokens", "same_batches"),
                note="pairs of the timed steps' batches (chosen + rejected each)")
    for r in results:
        t = r["data_tokens"]
        print(f"{r['size']:>5}: tokenised data {t['ours']:,} tokens ours / {t['trl']:,} TRL; longest sequence "
              f"{r['longest_sample']} (max_length {r['max_length']}); tok/s ours {r['tokens_per_sec']['ours']:,.0f} / "
              f"TRL {r['tokens_per_sec']['trl']:,.0f}")
    if a.out:
        write_results(a.out, a, results)


if __name__ == "__main__":
    main()
