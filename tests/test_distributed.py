"""Several processes (torchrun over gloo on CPU): 2 processes x batch b train exactly as 1 process x 2b."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_sft_file

SCRIPT = Path(__file__).with_name("ddp_fit.py")
# No ACCELERATE_USE_CPU: rlhf puts a launch on a machine without CUDA on the CPU itself (distributed.init).
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(SCRIPT.parent.parent), os.environ.get("PYTHONPATH", "")])}


def run(cmd: list[str], env: dict | None = None) -> None:
    proc = subprocess.run(cmd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=240)  # a hang fails, never blocks
    assert proc.returncode == 0, proc.stderr[-3000:]


# What `accelerate launch --config_file configs/accelerate/fsdp2.yaml` sets for the processes it starts.
FSDP2_ENV = {"ACCELERATE_USE_CPU": "1", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
             "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
             "FSDP_ACTIVATION_CHECKPOINTING": "true"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_two_processes_of_b_equal_one_process_of_2b(tiny_llama, tmp_path, micro=2):
    """The global batch 8: one process of 8 in one pass, or 2 processes of 4 each in 2 accumulation steps of 2.
    (2 processes without accumulation: the SFT stage's test below.)"""
    data = write_sft_file(tmp_path / "sft.jsonl", n=64)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run([sys.executable, str(SCRIPT), str(tiny_llama), str(data), "8", "0", one])
    run([*TORCHRUN, str(SCRIPT), str(tiny_llama), str(data), "8", str(micro), two])
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
        run([*launcher, "sft", "--model", str(tiny_llama), "--data.path", str(data), "--out", str(out),
             "--data.max_length", "64", "--train.max_steps", "4", "--train.batch_size", str(batch), "--train.lr",
             "1e-3", "--train.warmup_ratio", "0", "--train.schedule", "constant"])

    sft(tmp_path / "one", 8, [sys.executable, "-m", "rlhf.cli"])
    # `--num_processes 2` starts torchrun; batch_size is the global batch: 4 per process.
    sft(tmp_path / "two", 8, [sys.executable, "-m", "rlhf.cli", "--num_processes", "2"])
    one, two = (json.loads((tmp_path / d / "stage.json").read_text()) for d in ("one", "two"))
    assert one["steps"] == two["steps"] == 4 and (one["processes"], two["processes"]) == (1, 2)
    assert abs(one["val_loss"] - two["val_loss"]) < 1e-5
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    # One folder, one metrics file with each step once, no temporary leftovers. (That the other process wrote nothing
    # is not observable from here: its writes would land on the same files.)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    steps = [json.loads(line)["step"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == sorted(set(steps)) and steps


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_rm_stage_under_two_processes_equals_one_process(tiny_llama, tmp_path, fsdp):
    from tests.test_reward import separable_rows, write_rows

    train = write_rows(tmp_path / "train.jsonl", separable_rows(48))
    val = write_rows(tmp_path / "val.jsonl", separable_rows(16, offset=5))

    def rm(out: Path, launcher: list[str], env: dict | None = None) -> dict:
        run([*launcher, "rlhf.cli", "rm", "--model", str(tiny_llama), "--data.path", str(train), "--data.val_path",
             str(val), "--out", str(out), "--data.max_length", "64", "--train.max_steps", "4", "--train.batch_size", "8",
             "--train.lr", "1e-3", "--train.warmup_ratio", "0", "--train.schedule", "constant"], env)
        return json.loads((out / "stage.json").read_text())

    one, two = rm(tmp_path / "one", [sys.executable, "-m"]), rm(tmp_path / "two", [*TORCHRUN, "-m"], FSDP2_ENV if fsdp else None)
    assert one["members"][0]["steps"] == two["members"][0]["steps"] == 4
    assert (one["members"][0]["processes"], two["members"][0]["processes"]) == (1, 2)
    assert two["members"][0]["sharded"] == fsdp  # the backbone and the head under FSDP: weights gathered, then normalised
    assert abs(one["members"][0]["val_loss"] - two["members"][0]["val_loss"]) < 1e-5
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    initial = load_file(str(tiny_llama / "model.safetensors"))
    assert not torch.equal(wa["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])  # it trained
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_dpo_stage_under_two_processes_equals_one_process(tiny_llama, tmp_path):
    from tests.test_reward import separable_rows, write_rows

    train = write_rows(tmp_path / "train.jsonl", separable_rows(32))
    val = write_rows(tmp_path / "val.jsonl", separable_rows(8, offset=5))

    def dpo(out: Path, launcher: list[str]) -> dict:
        run([*launcher, "dpo", "--policy", str(tiny_llama), "--data.path", str(train), "--data.val_path", str(val),
             "--out", str(out), "--data.max_length", "64", "--train.max_steps", "3", "--train.batch_size", "8",
             "--train.lr", "1e-3", "--train.warmup_ratio", "0", "--train.schedule", "constant"])
        return json.loads((out / "stage.json").read_text())

    one = dpo(tmp_path / "one", [sys.executable, "-m", "rlhf.cli"])
    two = dpo(tmp_path / "two", [sys.executable, "-m", "rlhf.cli", "--num_processes", "2"])
    assert (one["steps"], one["processes"], two["steps"], two["processes"]) == (3, 1, 3, 2)
    assert abs(one["final"]["val/loss"] - two["final"]["val/loss"]) < 1e-5
    assert one["final"]["val/loss"] < one["initial"]["val/loss"]  # it trained
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_rl_under_two_processes_learns_with_global_statistics_and_rank_0_writes(algorithm, tiny_llama, flat_rm,
                                                                               prompt_file, tmp_path):
    from rlhf.report.metrics import read_metrics

    out, report = tmp_path / "ppo", tmp_path / "report"
    run([*TORCHRUN, str(SCRIPT.with_name("ddp_ppo.py")), str(tiny_llama), str(flat_rm), str(prompt_file), str(out),
         str(report), algorithm])
    ranks = [json.loads(Path(f"{report}.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["processes"] for r in ranks] == [2, 2] and ranks[0]["iterations"] == 24
    # The advantages of the 16 samples of both processes, as one process computes them on the gathered rollout.
    check = ranks[0]["advantages"]
    assert check["rows"] == 16 and check["max_diff"] < 1e-5
    if algorithm == "ppo":  # a process's own 8 samples would whiten to other advantages
        assert all(r["advantages"]["local"] > 1e-3 for r in ranks)
    else:  # each process holds whole groups of K = 4 samples of one prompt
        assert all(r["advantages"]["local"] == 1.0 for r in ranks)
    # The main process wrote the folder; the other wrote nothing in it.
    assert ranks[1]["writes"] == [] and "metrics.jsonl" in ranks[0]["writes"]
    assert (out / "stage.json").is_file() and (out / "model.safetensors").is_file()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 25))
    reward = [r["reward/lowercase"] for r in rows]
    # The margin of the one-process test (tests/test_ppo.py): past the noise of two 4-iteration means.
    assert sum(reward[-4:]) / 4 > sum(reward[:4]) / 4 + 0.08
    before, after = load_file(str(tiny_llama / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _ppo(policy, rm, prompts, out, *extra) -> list[str]:
    return [*TORCHRUN, "-m", "rlhf.cli", "ppo", "--policy", str(policy), "--reward_model", str(rm), "--prompts",
            str(prompts), "--out", str(out), "--iterations", "8", "--save_every", "2", "--batch_size", "8",
            "--mini_batch_size", "4", "--lr", "1e-3", "--generation.max_new_tokens", "8", "--generation.batch_size", "8",
            "--kl.coef", "0.05", "--kl.target", "0.5", "--kl.horizon", "50", *extra]


def test_killing_one_rank_stops_the_run_and_resume_reproduces_it(tiny_llama, flat_rm, prompt_file, tmp_path):
    import signal
    import time

    from rlhf.report.metrics import read_metrics

    run(_ppo(tiny_llama, flat_rm, prompt_file, tmp_path / "a"))
    launcher = subprocess.Popen(_ppo(tiny_llama, flat_rm, prompt_file, tmp_path / "b"), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (tmp_path / "b" / "checkpoint-4" / "state.json").is_file():
        assert launcher.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[1]), signal.SIGKILL)
    killed = time.time()
    try:
        launcher.wait(timeout=90)  # the other rank is stopped too: no hang at its next collective
    except subprocess.TimeoutExpired:
        launcher.kill()
        raise AssertionError("the run did not stop within 90 s of one rank's death")
    assert launcher.returncode != 0 and time.time() - killed < 90
    assert all(not Path(f"/proc/{w}").exists() or "zombie" in Path(f"/proc/{w}/status").read_text() for w in workers)
    assert not (tmp_path / "b" / "stage.json").exists()
    run(_ppo(tiny_llama, flat_rm, prompt_file, tmp_path / "b", "--resume"))
    a, b = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 9))
    for key in ("objective/scores", "objective/kl", "objective/kl_coef", "policy/loss", "val/loss"):
        assert b[-1][key] == pytest.approx(a[-1][key], rel=1e-4, abs=1e-6), key
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    stage = json.loads((tmp_path / "b" / "stage.json").read_text())
    assert stage["resumed_from"] == 4 and stage["processes"] == 2


CONFIGS = Path(__file__).parent.parent / "configs" / "accelerate"


def test_accelerate_configs_load_and_say_what_their_names_say():
    from accelerate.commands.config.config_args import load_config_from_file

    want = {"ddp": ("MULTI_GPU", 1, None, None), "fsdp2": ("FSDP", 1, 2, None), "zero2": ("DEEPSPEED", 1, None, 2),
            "zero2_offload": ("DEEPSPEED", 1, None, 2), "zero3": ("DEEPSPEED", 1, None, 3),
            "zero3_offload": ("DEEPSPEED", 1, None, 3), "multinode": ("MULTI_GPU", 2, None, None)}
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(want)
    for name, (kind, machines, fsdp, zero) in want.items():
        cfg = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
        assert (cfg.distributed_type.name, cfg.num_machines) == (kind, machines), name
        assert (cfg.fsdp_config or {}).get("fsdp_version") == fsdp, name
        assert (cfg.deepspeed_config or {}).get("zero_stage") == zero, name
        offload = (cfg.deepspeed_config or {}).get("offload_optimizer_device", "none")
        assert (offload == "cpu") == name.endswith("_offload"), name
    fsdp = load_config_from_file(str(CONFIGS / "fsdp2.yaml")).fsdp_config
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fsdp["fsdp_activation_checkpointing"]


def test_fsdp2_sft_on_cpu_equals_one_process(tiny_llama, tmp_path):
    """accelerate's FSDP2 path (decoder layers as units, activation checkpointing) over gloo, with accumulation:
    2 processes x 2 micro-batches of 2 take the steps 1 process of 8 takes, and the gathered weights are saved."""
    data = write_sft_file(tmp_path / "sft.jsonl", n=64)
    flags = ["sft", "--model", str(tiny_llama), "--data.path", str(data), "--data.max_length", "64",
             "--train.max_steps", "4", "--train.batch_size", "8", "--train.lr", "1e-3"]
    run([sys.executable, "-m", "rlhf.cli", *flags, "--out", str(tmp_path / "one")])
    proc = subprocess.run([*TORCHRUN, "-m", "rlhf.cli", *flags, "--train.micro_batch_size", "2", "--out", str(tmp_path / "two")],
                          env={**ENV, **FSDP2_ENV}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = " ".join((proc.stderr + proc.stdout).split())  # the log's lines are wrapped
    assert "global batch 8 = 2 processes x 2 per forward pass x 2 accumulation steps" in log
    layers = json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"]
    assert f"FSDP2 over 2 processes, {layers + 1} sharded units" in log  # each decoder layer, and the rest
    one, two = (json.loads((tmp_path / d / "stage.json").read_text()) for d in ("one", "two"))
    assert (one["sharded"], two["sharded"], two["processes"]) == (False, True, 2)
    assert abs(one["val_loss"] - two["val_loss"]) < 1e-5 and one["val_loss"] < one["initial_val_loss"]
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert sorted(wa) == sorted(wb) and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_num_processes_anywhere_on_the_line_and_refused_for_one_process_commands(capsys):
    from rlhf.cli import _take_num_processes, main

    assert _take_num_processes(["sft", "--num_processes", "4", "--model", "m"]) == (["sft", "--model", "m"], 4)
    assert _take_num_processes(["--num_processes=2", "run"]) == (["run"], 2)
    with pytest.raises(SystemExit, match="whole number"):
        _take_num_processes(["sft", "--num_processes", "two"])
    assert main(["eval", "--model", "m", "--num_processes", "2"]) == 2  # refused before anything starts
    assert "only pretrain, sft, rm, ppo, rl, dpo, run, iterate run as several processes" in capsys.readouterr().err


@pytest.mark.parametrize("grouped", [False, True])
def test_each_process_takes_its_share_of_every_global_batch(grouped):
    from types import SimpleNamespace

    from rlhf.config import TrainConfig
    from rlhf.training import Plan, _step_groups

    n, cfg = 33, TrainConfig(batch_size=8, micro_batch_size=2, epochs=2, seed=3, group_by_length=grouped)
    lengths = [i % 7 + 1 for i in range(n)] if grouped else None
    plans = [Plan.make(cfg, n, p) for p in (1, 2)]
    assert (plans[1].micro_batch_size, plans[1].grad_accum, plans[1].steps_per_epoch) == (2, 2, 4)  # the last 1 left out
    one = list(_step_groups(n, cfg, plans[0], SimpleNamespace(process_index=0, num_processes=1), lengths))
    ranks = [list(_step_groups(n, cfg, plans[1], SimpleNamespace(process_index=r, num_processes=2), lengths))
             for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 8
    full = [sum(g, []) for g in one if len(sum(g, [])) >= 2]  # one process's steps, less the batch of 1
    for step, (a, b) in enumerate(zip(*ranks)):
        mine, theirs = sum(a, []), sum(b, [])
        assert mine and theirs and not set(mine) & set(theirs)
        assert mine + theirs == full[step]  # the same global batch, split between the processes
        assert all(len(m) <= 2 for m in a + b)
