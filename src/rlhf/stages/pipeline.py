"""The whole pipeline, top to bottom: world -> pretrain -> SFT -> eval.

Each stage writes its own folder under the run folder and is skipped when that folder holds a
finished output (every stage writes atomically, so a folder that exists is finished). Running the
same command again after an interruption resumes at the first unfinished stage.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlhf.config import RunConfig
from rlhf.configlib import to_dict
from rlhf.evaluation.policy import run_eval
from rlhf.fsutil import atomic_dir, stage_done, write_json_atomic
from rlhf.stages.pretrain import run_pretrain
from rlhf.stages.sft import run_sft
from rlhf.world import write_world

log = logging.getLogger("rlhf.run")
console = Console(stderr=True)

SUMMARY_KEYS = ("gold_score", "win_rate", "harmful_compliance", "over_refusal", "honesty", "accuracy", "mean_length", "eos_rate")


def _stage(name: str, done: bool, fn, *args):
    """Run one stage unless its output exists; time it and say what happened."""
    if done:
        console.print(f"[dim]- {name}: finished output found, skipped[/dim]")
        return None
    console.rule(f"[bold]{name}")
    start = time.perf_counter()
    result = fn(*args)
    console.print(f"[green]- {name}: done in {time.perf_counter() - start:.0f}s")
    return result


def make_world(cfg: RunConfig, out: Path) -> None:
    w = cfg.world
    with atomic_dir(out) as tmp:
        write_world(tmp, seed=w.seed, n_pretrain=w.n_pretrain, n_sft=w.n_sft, n_sft_val=w.n_sft_val,
                    n_prompts_train=w.n_prompts_train, n_prompts_heldout=w.n_prompts_heldout)


def stage_configs(cfg: RunConfig) -> RunConfig:
    """Fill each stage's paths from the run folder (paths set in the YAML are kept)."""
    cfg = copy.deepcopy(cfg)
    root = Path(cfg.out)
    world = root / "world"
    cfg.pretrain.corpus = cfg.pretrain.corpus or str(world / "pretrain.jsonl")
    cfg.pretrain.out = cfg.pretrain.out or str(root / "base")
    cfg.sft.model = cfg.sft.model or cfg.pretrain.out
    cfg.sft.data.path = cfg.sft.data.path or str(world / "sft_train.jsonl")
    if cfg.sft.data.val_path is None and cfg.sft.data.path == str(world / "sft_train.jsonl"):
        cfg.sft.data.val_path = str(world / "sft_val.jsonl")
    cfg.sft.out = cfg.sft.out or str(root / "sft")
    return cfg


def run_pipeline(cfg: RunConfig) -> dict:
    """Run every unfinished stage and print the base-vs-SFT table; returns the two eval results."""
    cfg = stage_configs(cfg)
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    world = root / "world"
    _stage("world", (world / "world.json").is_file(), make_world, cfg, world)
    _stage("pretrain", stage_done(cfg.pretrain.out) is not None, run_pretrain, cfg.pretrain)
    _stage("sft", stage_done(cfg.sft.out) is not None, run_sft, cfg.sft)
    results = {}
    for name, model, against in (("base", cfg.pretrain.out, None), ("sft", cfg.sft.out, cfg.pretrain.out)):
        ev = copy.deepcopy(cfg.eval)
        ev.model, ev.against, ev.out = model, against, str(root / "eval" / f"{name}.json")
        _stage(f"eval {name}", Path(ev.out).is_file(), run_eval, ev)
        results[name] = json.loads(Path(ev.out).read_text())
    write_json_atomic(root / "summary.json", {k: {m: v.get(m) for m in SUMMARY_KEYS} for k, v in results.items()})
    print_summary(results)
    return results


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def print_summary(results: dict) -> None:
    table = Table(title="held-out evaluation (gold judge)")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    for key in SUMMARY_KEYS:
        table.add_row(key, *(_fmt(r.get(key)) for r in results.values()))
    Console().print(table)
