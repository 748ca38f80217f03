"""Peak memory of one PPO iteration: the whole rollout scored at once against micro-batches.

A ~15M-parameter Llama (the ``15m`` shape of ``common.SIZES``) with a 32k-token vocabulary, as real
models have: what dominates an RLHF step's memory is the (batch, response length, vocabulary) logits,
not the weights. One iteration (rollout of ``--batch-size`` prompts with ``--new-tokens`` new tokens,
reward model, reference, critic, then one epoch of minibatches of 16) runs in a fresh process for each
setting: ``--micro-batch-size`` null (every sequence of the rollout in one forward pass, minibatches of
16 whole) and the given value (rollout and update in micro-batches, gradients accumulated). Reported:
the process's peak resident memory (``ru_maxrss``) after loading, after the rollout and at the end of
the iteration, and the iteration's own increase.

    python benchmarks/ppo_memory.py                      # batch 64, 128 new tokens, micro-batch 8
    python benchmarks/ppo_memory.py --micro-batch-size 4 --out results.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common


def worker(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from rlhf.configlib import from_dict
    from rlhf.config import PPOConfig
    from rlhf.stages.ppo import RLRun

    micro = None if a.worker == "whole" else a.micro_batch_size
    cfg = from_dict(PPOConfig, dict(
        policy=a.model, reward_model=a.reward_model, prompts=a.rows, out=str(Path(a.result).with_suffix(".run")),
        iterations=1, batch_size=a.batch_size, mini_batch_size=16, ppo_epochs=1, micro_batch_size=micro,
        missing_eos_score=None, generation=dict(do_sample=True, max_new_tokens=a.new_tokens, batch_size=a.batch_size)))
    def peak() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)

    run = RLRun(cfg)
    loaded, start = peak(), time.perf_counter()
    run.learner.set_lr(run.iteration)
    ro, stats = run.rollout()  # the iteration of RLRun.step, in its two halves
    after_rollout = peak()
    run.update(ro)
    return {"setting": a.worker, "micro_batch_size": micro, "peak_after_load_mib": loaded,
            "peak_after_rollout_mib": after_rollout, "peak_mib": peak(), "seconds": time.perf_counter() - start,
            "response_tokens": int(ro.response_mask.sum()), "response_length": stats["response/length"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=64, help="prompts per rollout")
    p.add_argument("--new-tokens", type=int, default=128, help="max_new_tokens of the rollout")
    p.add_argument("--micro-batch-size", type=int, default=8, help="ppo.micro_batch_size of the second run")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size of the model")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the results as JSON here")
    for hidden in common.HIDDEN_ARGS:
        p.add_argument(f"--{hidden.replace('_', '-')}", dest=hidden, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        Path(a.result).write_text(json.dumps(worker(a)))
        return
    import random

    from ppo_iteration import build_reward_dir

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = random.Random(a.seed)
        texts = [" ".join(common.qa(rng)) for _ in range(2000)]
        params = common.build_model_dir("15m", texts, tmp / "policy", a.seed, vocab_size=a.vocab)
        build_reward_dir(tmp / "policy", tmp / "rm", a.seed)
        rows = tmp / "prompts.jsonl"
        rows.write_text("".join(json.dumps({"prompt": common.question(rng)[3]}) + "\n" for _ in range(a.batch_size)))
        results = []
        for setting in ("whole", "micro"):
            result = tmp / f"{setting}.json"
            cmd = [sys.executable, __file__, "--worker", setting, "--model", str(tmp / "policy"), "--reward-model",
                   str(tmp / "rm"), "--rows", str(rows), "--result", str(result), "--batch-size", str(a.batch_size),
                   "--new-tokens", str(a.new_tokens), "--micro-batch-size", str(a.micro_batch_size),
                   "--threads", str(a.threads)]
            subprocess.run(cmd, check=True)
            results.append(json.loads(result.read_text()))
    print(f"PPO iteration, {params / 1e6:.1f}M-parameter Llama, vocabulary {a.vocab}, batch {a.batch_size}, "
          f"{a.new_tokens} new tokens, minibatches of 16")
    print(f"{'setting':<18}{'peak RSS':>12}{'after load':>12}{'after rollout':>15}{'iteration':>12}{'seconds':>10}")
    for r in results:
        name = "whole batch" if r["micro_batch_size"] is None else f"micro-batch {r['micro_batch_size']}"
        print(f"{name:<18}{r['peak_mib']:>8.0f} MiB{r['peak_after_load_mib']:>8.0f} MiB{r['peak_after_rollout_mib']:>11.0f} MiB"
              f"{r['peak_mib'] - r['peak_after_load_mib']:>8.0f} MiB{r['seconds']:>10.1f}")
    whole, micro = results
    print(f"peak RSS ratio (whole / micro): {whole['peak_mib'] / micro['peak_mib']:.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps({"params": params, "args": vars(a), "results": results}, indent=2))


if __name__ == "__main__":
    main()
