"""Rollout engines side by side: tokens/s of the ``static`` engine against transformers' ``generate`` (``hf``).

For each model size: a Llama (benchmarks/common.py SIZES) saved and loaded as a user's folder, a batch of
prompts of 24-32 tokens (left-padded), ``--new-tokens`` new tokens, each sampler (inverse_cdf, multinomial)
and greedy. Both engines run in this process, in turn (which one goes first alternates), ``--repeats`` times;
the median is reported. Greedy decoding is checked token for token between the engines. Per decode step the
wall time is set against the time of the step's matmuls alone (every Linear of the model on (B, in) inputs
and the LM head), which is the floor any engine on this CPU runs into.

    .venv/bin/python benchmarks/generation.py                 # 1m and 15m, batch 64, 64 new tokens
    .venv/bin/python benchmarks/generation.py --sizes 1m --repeats 1

A random-init model rarely samples EOS, so every row runs all new tokens here: the figures measure the
per-step work, not the compaction of finished rows (which the demo's trained models exercise).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from common import SIZES, build_model_dir, qa

MODES = {"greedy": dict(do_sample=False), "inverse_cdf": dict(do_sample=True, sampler="inverse_cdf"),
         "multinomial": dict(do_sample=True, sampler="multinomial")}


def prompts(tok, n: int, seed: int) -> list[list[int]]:
    """n prompts of 24-32 tokens: arithmetic questions run together, cut to a random length."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        ids = tok(" ".join(qa(rng)[0] for _ in range(8)), add_special_tokens=False)["input_ids"]
        out.append(ids[: rng.randint(24, 32)])
    return out


def matmul_ms(model, batch: int, repeats: int = 50) -> float:
    """Milliseconds of one decode step's matmuls alone: every Linear on a (batch, in) input, LM head included."""
    import torch

    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = [torch.randn(batch, w.shape[1]) for w in linears]
    with torch.inference_mode():
        for _ in range(3):
            [x @ w.T for x, w in zip(xs, linears)]
        t = time.perf_counter()
        for _ in range(repeats):
            [x @ w.T for x, w in zip(xs, linears)]
    return (time.perf_counter() - t) / repeats * 1e3


def bench_size(size: str, a: argparse.Namespace, tmp: Path) -> dict:
    import torch

    from rlhf.config import GenerationConfig
    from rlhf.models.loading import load_causal_lm
    from rlhf.rollout import make_engine

    texts = [" ".join(qa(random.Random(i))) for i in range(2000)]
    params = build_model_dir(size, texts, tmp / size, a.seed)
    model, tok = load_causal_lm(str(tmp / size))
    model.eval()
    batch = prompts(tok, a.batch_size, a.seed)
    engines = {name: make_engine(model, tok, name) for name in ("hf", "static")}
    result: dict = {"size": size, "parameters": params, "batch_size": a.batch_size, "new_tokens": a.new_tokens,
                    "matmul_ms_per_step": matmul_ms(model, a.batch_size), "modes": {}}
    for mode, kw in MODES.items():
        cfg = GenerationConfig(max_new_tokens=a.new_tokens, batch_size=a.batch_size, **kw)
        times: dict[str, list[float]] = {"hf": [], "static": []}
        tokens: dict[str, int] = {}
        out = {}
        engines["static"].generate(batch[:8], cfg, 0)  # first-call costs (allocator, lazy imports) out of the timing
        for r in range(a.repeats):
            for name in (("hf", "static") if r % 2 == 0 else ("static", "hf")):
                t = time.perf_counter()
                out[name] = engines[name].generate(batch, cfg, a.seed + r)
                times[name].append(time.perf_counter() - t)
                tokens[name] = int(out[name].mask.sum())
        row = {name: {"seconds": statistics.median(ts), "tokens": tokens[name],
                      "tokens_per_sec": tokens[name] / statistics.median(ts),
                      "ms_per_step": statistics.median(ts) / out[name].responses.shape[1] * 1e3} for name, ts in times.items()}
        row["speedup"] = row["static"]["tokens_per_sec"] / row["hf"]["tokens_per_sec"]
        if mode == "greedy":
            row["same_tokens"] = bool(torch.equal(out["hf"].responses, out["static"].responses))
        result["modes"][mode] = row
    return result


def print_results(results: list[dict]) -> None:
    print(f"\n{'size':>5} {'params':>7} {'mode':>12} {'hf tok/s':>9} {'static tok/s':>12} {'speedup':>8} "
          f"{'hf ms/step':>10} {'static ms/step':>14} {'matmul ms/step':>14}")
    for r in results:
        for mode, m in r["modes"].items():
            same = f"  same tokens: {m['same_tokens']}" if "same_tokens" in m else ""
            print(f"{r['size']:>5} {r['parameters'] / 1e6:>6.2f}M {mode:>12} {m['hf']['tokens_per_sec']:>9.0f} "
                  f"{m['static']['tokens_per_sec']:>12.0f} {m['speedup']:>7.2f}x {m['hf']['ms_per_step']:>10.2f} "
                  f"{m['static']['ms_per_step']:>14.2f} {r['matmul_ms_per_step']:>14.2f}{same}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1m,15m", help=f"comma-separated among {', '.join(SIZES)}")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs per engine and mode (alternating order); median")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    a = p.parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(a.threads)
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_size(s, a, Path(tmp)) for s in a.sizes.split(",")]
    print_results(results)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
