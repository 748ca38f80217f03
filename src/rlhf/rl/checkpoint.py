"""The checkpointer: atomic checkpoints of an online RL run, the resume checks, and the final model folder.

A checkpoint holds every trained tensor (the policy's weights or adapters, the critic's) as safetensors, the
optimisers' and RNG states as plain tensors (loaded with ``weights_only``), and the KL controller, the reward
normalisation, the settings and the inputs' digests as JSON: a resumed run computes what the uninterrupted one
would have, and a resume of another run is refused.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhf import distributed
from rlhf.config import PPOConfig
from rlhf.configlib import ConfigError, to_dict
from rlhf.fsutil import (atomic_dir, check_out, fingerprint, mark_stage, marked, remove_output, stage_done,
                         write_json_atomic)
from rlhf.models.loading import save_model
from rlhf.rl.models import Models

log = logging.getLogger("rlhf.ppo")

CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


class Checkpointer:
    """Saves and restores what the loop needs: trained tensors, optimisers, RNG, KL controller, normalisation."""

    def __init__(self, cfg: PPOConfig, models: Models, optimisers: dict[str, torch.optim.Optimizer], kl_ctl,
                 device: torch.device):
        self.cfg, self.m, self.optimisers, self.kl_ctl, self.device = cfg, models, optimisers, kl_ctl, device
        self.inputs = input_fingerprints(cfg)  # recorded in every checkpoint: a resume must read the same

    def _modules(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.m.policy, **({"critic": self.m.critic_module} if self.m.has_critic else {})}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trained tensor: the policy's (all weights, or the adapters) and the critic's."""
        return {f"{prefix}.{n}": p.detach().cpu().contiguous() for prefix, mod in self._modules().items()
                for n, p in mod.named_parameters() if p.requires_grad}

    def save(self, out: Path, iteration: int, monitor: dict | None = None) -> Path:
        """Write checkpoint-N atomically (weights as safetensors, optimiser and RNG state as tensors, the
        monitors' state as JSON); keep two."""
        path = out / f"checkpoint-{iteration}"
        with atomic_dir(path) as tmp:
            if monitor is not None:
                write_json_atomic(tmp / "monitor.json", monitor)
            save_file(self.trainable_state(), str(tmp / "trainable.safetensors"))
            torch.save({k: opt.state_dict() for k, opt in self.optimisers.items()}, tmp / "optimizer.pt")
            torch.save({"torch": torch.get_rng_state(), "python": torch.tensor(list(random.getstate()[1]))}, tmp / "rng.pt")
            rm = self.m.reward
            write_json_atomic(tmp / "state.json", {"iteration": iteration, "kl_controller": self.kl_ctl.state_dict(),
                                                   "reward_normalisation": {"mean": rm.means.tolist(), "std": rm.stds.tolist()},
                                                   "config": to_dict(self.cfg), "inputs": self.inputs})
        for old in sorted(checkpoints(out), key=checkpoint_step)[:-2]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def load(self, path: Path) -> int:
        """Restore a checkpoint; returns its iteration."""
        state = load_file(str(path / "trainable.safetensors"))
        with torch.no_grad():
            for prefix, mod in self._modules().items():
                params = dict(mod.named_parameters())
                for name, tensor in state.items():
                    if name.startswith(prefix + "."):
                        params[name[len(prefix) + 1:]].copy_(tensor)
        opt = torch.load(path / "optimizer.pt", weights_only=True,
                         map_location="cpu" if self.device.type == "cpu" else self.device)  # not "cpu:0", a rank's CPU
        for k, optimiser in self.optimisers.items():
            optimiser.load_state_dict(opt[k])
        rng = torch.load(path / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        random.setstate((3, tuple(int(x) for x in rng["python"]), None))
        meta = json.loads((path / "state.json").read_text())
        self.kl_ctl.load_state_dict(meta["kl_controller"])
        if "reward_normalisation" in meta:  # the statistics the run measured (or the folder's): the same rewards
            norm = meta["reward_normalisation"]
            self.m.reward.set_normalisation(torch.tensor(norm["mean"]), torch.tensor(norm["std"]))
        return int(meta["iteration"])


def save_final(models: Models, cfg: PPOConfig, out: Path, summary: dict) -> None:
    """The policy as an ordinary model folder (written to a temp folder, files moved in), then stage.json last."""
    with atomic_dir(out / "final") as tmp:
        save_model(models.policy, models.tok, tmp, lora_save=cfg.lora.save)
    for f in (out / "final").iterdir():
        os.replace(f, out / f.name)
    (out / "final").rmdir()
    write_json_atomic(out / "stage.json", summary)


def checkpoints(out: Path) -> list[Path]:
    return [p for p in out.glob("checkpoint-*") if CHECKPOINT.search(p.name) and (p / "state.json").is_file()]


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT.search(path.name).group(1))


def truncate_log(path: Path, last_step: int, key: str = "step") -> None:
    """Drop the JSONL records past the checkpoint being resumed (by their ``key``), so that the log reads as
    one uninterrupted run: each iteration once."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)[key] <= last_step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


# Settings that do not change what a resumed run computes: they may differ from the checkpoint's.
RESUME_FREE = ("out", "resume", "resume_changed", "overwrite", "iterations", "save_every", "log_every")
INPUTS = ("policy", "reward_model", "prompts", "ptx_data")


def input_fingerprints(cfg: PPOConfig) -> dict[str, dict | None]:
    """What the run reads, for the resume check: each input's resolved path and a digest of its content."""
    return {name: {"path": str(Path(v).resolve()), "digest": fingerprint(v)} if (v := getattr(cfg, name)) else None
            for name in INPUTS}


def resume_differences(saved: dict, cfg: PPOConfig) -> list[str]:
    """How the run asked for differs from the one a checkpoint was made with: inputs first, then settings."""
    diffs = []
    now = input_fingerprints(cfg)
    for name in INPUTS:
        before, after = (saved.get("inputs") or {}).get(name), now[name]
        if (before or {}).get("digest") != (after or {}).get("digest"):
            was = before["path"] if before else "none"
            diffs.append(f"{name}: {was} -> {getattr(cfg, name) or 'none'} ({'other content' if before and after else 'changed'})")
    old, new = flatten(saved.get("config") or {}), flatten(to_dict(cfg))
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in (*RESUME_FREE, *INPUTS):
            continue
        if old.get(key) != new.get(key):
            diffs.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return diffs


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def ppo_state(path: Path) -> str | None:
    """What a folder holds for check_out: a finished PPO run, one to resume, one killed early, or none."""
    if stage_done(path, "ppo") is not None:
        return "finished"
    if checkpoints(path):
        return "resumable"
    return "partial" if marked(path, "ppo") else None


def check_ppo_out(cfg: PPOConfig) -> str:
    """Before any model loads: may cfg.out be written ("new", "replace") or resumed ("resume")? A resume must
    continue the same run: other inputs or settings than the checkpoint's are refused unless resume_changed."""
    inputs = {"policy": cfg.policy, "reference": cfg.reference, "reward_model": cfg.reward_model, "prompts": cfg.prompts,
              "ptx_data": cfg.ptx_data}
    action = check_out(cfg.out, stage="ppo", kind="dir", inputs=inputs, state=ppo_state, overwrite=cfg.overwrite,
                       resume=cfg.resume)
    if action == "resume":
        found = checkpoints(Path(cfg.out))
        if not found:
            raise ConfigError(f"ppo: --resume: {cfg.out} holds no checkpoint to continue from; pass --overwrite to start again")
        last = max(found, key=checkpoint_step)
        saved = json.loads((last / "state.json").read_text())
        if "config" not in saved:
            log.warning("%s records no settings (an older checkpoint): resuming without checking them", last)
        elif diffs := resume_differences(saved, cfg):
            listed = "; ".join(diffs)
            if not cfg.resume_changed:
                raise ConfigError(f"ppo: --resume: {last} was made by a different run ({listed}); pass "
                                  "--resume_changed to continue with these changes, or --overwrite to start again")
            log.warning("resuming %s with changes (--resume_changed): %s", last, listed)
    return action


def prepare_out(cfg: PPOConfig, checkpointer: Checkpointer, action: str) -> tuple[Path, int]:
    """Create, replace or resume the output folder (as check_ppo_out decided); returns it and the iteration to
    start from."""
    out, iteration = Path(cfg.out), 0
    found = checkpoints(out) if action == "resume" else []
    distributed.barrier()  # every process has read the folder before the main one changes it
    if distributed.is_main():
        if action == "replace":
            remove_output(out)
        out.mkdir(parents=True, exist_ok=True)
        mark_stage(out, "ppo")
    if found:  # every process restores the same checkpoint
        last = max(found, key=checkpoint_step)
        iteration = checkpointer.load(last)
        log.info("resumed from %s (iteration %d)", last, iteration)
    if distributed.is_main():
        truncate_log(out / "metrics.jsonl", iteration)
        truncate_log(out / "alerts.jsonl", iteration, key="iteration")
    distributed.barrier()
    return out, iteration
