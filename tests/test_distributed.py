"""Several processes (torchrun over gloo on CPU): 2 processes x batch b train exactly as 1 process x 2b."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import write_sft_file

SCRIPT = Path(__file__).with_name("ddp_fit.py")
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(SCRIPT.parent.parent), os.environ.get("PYTHONPATH", "")])}


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)  # a hang fails, never blocks
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_of_b_equal_one_process_of_2b(tiny_llama, tmp_path):
    data = write_sft_file(tmp_path / "sft.jsonl", n=64)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run([sys.executable, str(SCRIPT), str(tiny_llama), str(data), "8", one])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
         str(tiny_llama), str(data), "4", two])
    a, b = json.loads(Path(one + ".json").read_text()), json.loads(Path(two + ".json").read_text())
    assert (a["processes"], b["processes"]) == (1, 2)
    # The ranks' batches hold different numbers of scored tokens: the loss is normalised by the global count.
    assert len(a["losses"]) == len(b["losses"]) == 4
    assert all(abs(x - y) < 1e-5 for x, y in zip(a["losses"], b["losses"])), (a["losses"], b["losses"])
    wa, wb = load_file(one + ".safetensors"), load_file(two + ".safetensors")
    initial = load_file(str(tiny_llama / "model.safetensors"))
    assert any(not torch.equal(wa[k], initial[k]) for k in initial)  # it trained
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_sft_stage_under_two_processes_equals_one_process(tiny_llama, tmp_path):
    data = write_sft_file(tmp_path / "sft.jsonl", n=64)

    def sft(out: Path, batch: int, launcher: list[str]) -> None:
        run([*launcher, "rlhf.cli", "sft", "--model", str(tiny_llama), "--data.path", str(data), "--out", str(out),
             "--data.max_length", "64", "--train.max_steps", "4", "--train.batch_size", str(batch), "--train.lr",
             "1e-3", "--train.warmup_ratio", "0", "--train.schedule", "constant"])

    sft(tmp_path / "one", 8, [sys.executable, "-m"])
    sft(tmp_path / "two", 4, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"])
    one, two = (json.loads((tmp_path / d / "stage.json").read_text()) for d in ("one", "two"))
    assert one["steps"] == two["steps"] == 4
    assert abs(one["val_loss"] - two["val_loss"]) < 1e-5
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    # One folder, one metrics file with each step once, no temporary leftovers. (That the other process wrote nothing
    # is not observable from here: its writes would land on the same files.)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    steps = [json.loads(line)["step"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == sorted(set(steps)) and steps
