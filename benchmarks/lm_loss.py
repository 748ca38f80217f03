"""The pretraining / SFT loss, fused against unfused: step time and peak memory of one training step.

``rlhf.training.lm_loss`` runs the LM head and the cross-entropy as one chunked operation for models whose
logits are a plain head over the backbone (``rlhf.algos.core.linear_cross_entropy``); the peer is the same
model's own forward (its (B, T, V) logits: ``logits_lm_loss``), what the loss was before. Two shapes:

- ``demo``: the demo's base model (Llama, hidden 192, 4 layers, vocabulary 2,048), a batch of 32 x 128 tokens;
- ``128k``: a Llama-3-sized vocabulary (128,256) on a 2-layer model of hidden size 256, 4 x 512 tokens.

Each side runs in its own process (so its peak resident memory is its own), a forward, backward and AdamW
step per step; the two sides alternate ``--repeats`` times and the medians of the steps after the first
``--warmup`` are reported, with the peak RSS above what the process held after building the model.

    .venv/bin/python benchmarks/lm_loss.py [--shapes demo,128k] [--steps 10] [--warmup 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SHAPES = {
    "demo": dict(model=dict(vocab_size=2048, hidden_size=192, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=512), batch=(32, 128)),
    "128k": dict(model=dict(vocab_size=128256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=512), batch=(4, 512)),
}


def worker(shape: str, side: str, steps: int, warmup: int, threads: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.training import lm_loss, logits_lm_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = SHAPES[shape]
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=1024, tie_word_embeddings=True, **spec["model"]))
    ids = torch.randint(0, spec["model"]["vocab_size"], spec["batch"])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    loss_fn = lm_loss if side == "fused" else logits_lm_loss
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        loss, _ = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": statistics.median(times[warmup:]), "extra_rss_mb": (peak - before) / 1024, "losses": losses}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="demo,128k", help=f"comma-separated among {', '.join(SHAPES)}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="processes per side (alternating order); median")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--worker", nargs=2, metavar=("SHAPE", "SIDE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(*a.worker, a.steps, a.warmup, a.threads)))
        return
    results = {}
    for shape in a.shapes.split(","):
        runs: dict[str, list[dict]] = {"unfused": [], "fused": []}
        for r in range(a.repeats):
            for side in (("unfused", "fused") if r % 2 == 0 else ("fused", "unfused")):
                out = subprocess.run([sys.executable, __file__, "--worker", shape, side, "--steps", str(a.steps),
                                      "--warmup", str(a.warmup), "--threads", str(a.threads)],
                                     check=True, capture_output=True, text=True).stdout
                runs[side].append(json.loads(out.strip().splitlines()[-1]))
        row = {side: {"seconds": statistics.median(x["seconds"] for x in rs),
                      "extra_rss_mb": statistics.median(x["extra_rss_mb"] for x in rs),
                      "final_loss": rs[0]["losses"][-1]} for side, rs in runs.items()}
        row["speedup"] = row["unfused"]["seconds"] / row["fused"]["seconds"]
        results[shape] = row
    print(f"\n{'shape':>6} {'unfused s/step':>14} {'fused s/step':>12} {'speedup':>8} {'unfused MB':>10} {'fused MB':>9}"
          f"  final loss unfused / fused")
    for shape, r in results.items():
        print(f"{shape:>6} {r['unfused']['seconds']:>14.3f} {r['fused']['seconds']:>12.3f} {r['speedup']:>7.2f}x "
              f"{r['unfused']['extra_rss_mb']:>10.0f} {r['fused']['extra_rss_mb']:>9.0f}"
              f"  {r['unfused']['final_loss']:.6f} / {r['fused']['final_loss']:.6f}")
    print("MB: peak resident memory above what the process held after building the model and batch")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
