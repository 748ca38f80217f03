"""Scaling: samples per second of SFT, the reward model and PPO with 1 and N processes, and the efficiency.

Each run is the real command (`rlhf sft|rm|ppo --num_processes N`) in a fresh launch, on synthetic arithmetic
data and a tiny Llama (``common.build_model_dir``). On a machine without CUDA every process gets one thread
(OMP_NUM_THREADS=1) and trains on the CPU over gloo, so 2 processes use 2 cores against 1 process's 1; with
CUDA each process takes a GPU (``--processes 1 8`` for 1 and 8 GPUs). Samples per second count the training loop
only (the stage's own clock: models loaded, output not yet written): SFT sequences, RM pairs, PPO rollout samples,
each at the same global batch whatever the number of processes. Efficiency = speed-up / processes. The sides
alternate which goes first in each repeat; medians are reported.

    python benchmarks/scaling.py                     # 15m model, 1 and 2 processes, 3 repeats
    python benchmarks/scaling.py --size 1m --processes 1 2 --repeats 5 --out scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import SIZES, answer_text, build_model_dir, question
from ppo_iteration import build_reward_dir

STAGES = ("sft", "rm", "ppo")


def write_data(folder: Path, n: int, seed: int) -> dict[str, Path]:
    """SFT rows, preference pairs (the right answer against a wrong one) and prompts, as JSONL."""
    rng = random.Random(seed)
    files = {"sft": folder / "sft.jsonl", "prefs": folder / "prefs.jsonl", "prompts": folder / "prompts.jsonl"}
    with open(files["sft"], "w") as sft, open(files["prefs"], "w") as prefs, open(files["prompts"], "w") as prompts:
        for _ in range(n):
            x, op, y, q, right = question(rng)
            worked = rng.random() < 0.5
            chosen, rejected = answer_text(x, op, y, right, worked), answer_text(x, op, y, right + rng.randint(1, 9), worked)
            sft.write(json.dumps({"prompt": q, "completion": chosen}) + "\n")
            prefs.write(json.dumps({"prompt": q, "chosen": chosen, "rejected": rejected}) + "\n")
            prompts.write(json.dumps({"prompt": q}) + "\n")
    return files


def command(stage: str, n: int, policy: Path, rm: Path, files: dict[str, Path], out: Path, a: argparse.Namespace) -> list[str]:
    base = [sys.executable, "-m", "rlhf.cli", stage, "--num_processes", str(n), "--out", str(out)]
    if stage == "sft":
        return [*base, "--model", str(policy), "--data.path", str(files["sft"]), "--data.max_length", "64",
                "--train.max_steps", str(a.steps), "--train.batch_size", str(a.batch_size), "--train.log_every", "1000",
                "--data.val_fraction", "0.01"]
    if stage == "rm":
        return [*base, "--model", str(policy), "--data.path", str(files["prefs"]), "--data.max_length", "64",
                "--train.max_steps", str(a.steps), "--train.batch_size", str(a.batch_size), "--train.log_every", "1000",
                "--data.val_fraction", "0.01", "--normalize.n", "64"]
    return [*base, "--policy", str(policy), "--reward_model", str(rm), "--prompts", str(files["prompts"]),
            "--iterations", str(a.iterations), "--batch_size", str(a.rollout), "--mini_batch_size", str(a.rollout // 2),
            "--generation.max_new_tokens", "24", "--generation.batch_size", str(a.rollout), "--save_every", "0"]


def samples_per_sec(stage: str, out: Path, a: argparse.Namespace) -> tuple[float, int]:
    """The run's samples per second of training, and how many processes it ran as."""
    summary = json.loads((out / "stage.json").read_text())
    if stage == "ppo":
        return a.iterations * a.rollout / summary["seconds"], summary["processes"]
    member = summary if stage == "sft" else summary["members"][0]
    return member["steps"] * a.batch_size / member["seconds"], member["processes"]


def run_once(stage: str, n: int, policy: Path, rm: Path, files: dict, tmp: Path, a: argparse.Namespace) -> float:
    out = tmp / f"{stage}-{n}"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([*command(stage, n, policy, rm, files, out, a), "--overwrite"], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{stage} with {n} processes failed:\n{proc.stderr[-3000:]}")
    rate, ran = samples_per_sec(stage, out, a)
    if ran != n:
        raise SystemExit(f"{stage}: asked for {n} processes, the run reports {ran}")
    return rate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=list(SIZES), default="15m", help="model shape (common.SIZES)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    p.add_argument("--steps", type=int, default=40, help="SFT and RM optimiser steps")
    p.add_argument("--batch_size", type=int, default=16, help="SFT and RM global batch")
    p.add_argument("--iterations", type=int, default=4, help="PPO iterations")
    p.add_argument("--rollout", type=int, default=32, help="PPO samples per rollout (global)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rlhf-scaling-") as tmp_name:
        tmp = Path(tmp_name)
        files = write_data(tmp, max(512, a.batch_size * a.steps), seed=0)
        texts = [json.loads(line)["prompt"] + " " + json.loads(line)["completion"] for line in open(files["sft"])]
        policy, rm = tmp / "policy", tmp / "rm_model"
        params = build_model_dir(a.size, texts, policy, seed=0)
        build_reward_dir(policy, rm, seed=0)
        results = []
        for stage in a.stages:
            rates: dict[int, list[float]] = {n: [] for n in a.processes}
            for r in range(a.repeats):
                order = a.processes if r % 2 == 0 else list(reversed(a.processes))
                for n in order:
                    rates[n].append(run_once(stage, n, policy, rm, files, tmp, a))
                    print(f"{stage} x{n} repeat {r + 1}: {rates[n][-1]:.1f} samples/s", file=sys.stderr)
            med = {n: statistics.median(v) for n, v in rates.items()}
            one = med[a.processes[0]] * a.processes[0]  # per-process rate of the smallest count
            results.append({"stage": stage, "samples_per_sec": med, "runs": rates,
                            "speedup": {n: med[n] / med[a.processes[0]] for n in a.processes},
                            "efficiency": {n: med[n] / (one * n) for n in a.processes}})
    unit = {"sft": "sequences", "rm": "pairs", "ppo": "rollout samples"}
    print(f"\nscaling, {a.size} model ({params / 1e6:.2f}M parameters), median of {a.repeats} runs, "
          f"{'GPUs' if _cuda() else 'CPU processes of 1 thread'}")
    print(f"{'stage':<5} {'unit':<16} " + " ".join(f"{f'x{n} /s':>9}" for n in a.processes) + "  "
          + " ".join(f"{f'speed-up x{n}':>12} {f'eff. x{n}':>8}" for n in a.processes[1:]))
    for r in results:
        print(f"{r['stage']:<5} {unit[r['stage']]:<16} " + " ".join(f"{r['samples_per_sec'][n]:>9.1f}" for n in a.processes)
              + "  " + " ".join(f"{r['speedup'][n]:>12.2f} {r['efficiency'][n]:>8.2f}" for n in a.processes[1:]))
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "params": params, "results": results}, indent=2))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
