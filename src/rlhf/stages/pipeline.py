"""The whole pipeline, top to bottom: world -> pretrain -> SFT -> collect -> reward model -> PPO -> eval -> report.

Each stage writes its own folder under the run folder and is skipped when that folder holds a
finished output (every stage writes atomically, so a folder that exists is finished). Running the
same command again after an interruption resumes at the first unfinished stage.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from rlhf import distributed
from rlhf.config import EvalRMConfig, RunConfig
from rlhf.configlib import ConfigError, from_dict, to_dict
from rlhf.evaluation.alignment_tax import alignment_tax
from rlhf.evaluation.policy import eval_prompts, kl_to_reference, run_eval
from rlhf.evaluation.reward import run_eval_rm
from rlhf.fsutil import atomic_dir, check_out, read_json, stage_done, write_json_atomic
from rlhf.report.html import build_report
from rlhf.safety.redteam import headline, run_redteam
from rlhf.stages.collect import evaluation_pairs, run_collect
from rlhf.stages.ppo import run_ppo
from rlhf.stages.pretrain import run_pretrain
from rlhf.stages.reward import run_rm
from rlhf.stages.rounds import Round, eval_folder, policy_of, round_configs, round_figures, round_folder, run_round
from rlhf.stages.sft import run_sft
from rlhf.world import write_world

log = logging.getLogger("rlhf.run")
console = Console(stderr=True)

SUMMARY_KEYS = ("gold_score", "win_rate", "harmful_compliance", "over_refusal", "honesty", "over_hedging", "accuracy",
                "mean_length", "eos_rate")


# The stages that several processes train together; the main process runs the others while the rest wait.
TRAINING_STAGES = ("pretrain", "sft", "rm", "ppo")


def _stage(name: str, done: bool, times: dict, fn, *args, together: bool = True) -> None:
    """Run one stage unless its output exists; time it (into ``times``) and say what happened. ``together``: every
    process takes part (the training stages) or waits for the main one; else the main process runs it alone."""
    main = distributed.is_main()
    training = re.sub(r"^round \d+ ", "", name) in TRAINING_STAGES
    if done:
        if main:
            console.print(f"[dim]- {name}: finished output found, skipped[/dim]")
        return
    if main:
        console.rule(f"[bold]{name}")
    start = time.perf_counter()
    if main or training:
        fn(*args)
    if together:
        distributed.barrier()  # the stage's output is in place before any process reads it
    times[name] = round(time.perf_counter() - start, 1)
    if main:
        console.print(f"[green]- {name}: done in {times[name]:.0f}s")


def make_world(cfg: RunConfig, out: Path) -> None:
    with atomic_dir(out) as tmp:
        write_world(tmp, **to_dict(cfg.world))


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
    cfg.collect.policy = cfg.collect.policy or cfg.sft.out
    cfg.collect.prompts = cfg.collect.prompts or str(world / "prompts_train.jsonl")
    cfg.collect.out = cfg.collect.out or str(root / "prefs" / "train.jsonl")
    cfg.rm.model = cfg.rm.model or cfg.sft.out
    cfg.rm.data.path = cfg.rm.data.path or cfg.collect.out
    cfg.rm.out = cfg.rm.out or str(root / "rm")
    cfg.ppo.policy = cfg.ppo.policy or cfg.sft.out
    cfg.ppo.reward_model = cfg.ppo.reward_model or cfg.rm.out
    cfg.ppo.prompts = cfg.ppo.prompts or str(world / "prompts_train.jsonl")
    cfg.ppo.out = cfg.ppo.out or str(root / "ppo")
    cfg.ppo.resume = True  # a run interrupted mid-PPO continues from its last checkpoint
    cfg.dpo.policy = cfg.dpo.policy or cfg.sft.out
    cfg.dpo.data.path = cfg.dpo.data.path or cfg.rm.data.path
    cfg.dpo.out = cfg.dpo.out or str(root / "dpo")
    cfg.redteam.model = cfg.redteam.model or policy_of(cfg, cfg.rounds)  # the last round's policy
    cfg.redteam.against = cfg.redteam.against or cfg.pretrain.out
    cfg.redteam.out = cfg.redteam.out or str((round_folder(cfg, cfg.rounds) if cfg.rounds > 1 else root) / "redteam")
    return cfg


def run_state(path: Path) -> str | None:
    """A run folder (its config.json is a pipeline config) is resumed: finished stages are skipped."""
    cfg = read_json(path / "config.json")
    return "resumable" if isinstance(cfg, dict) and {"world", "sft", "ppo"} <= set(cfg) else None


def heldout_collect(cfg: RunConfig):
    """Preference pairs on the held-out prompts (other phrasings and entities) for evaluating the RM."""
    return evaluation_pairs(cfg.collect, str(Path(cfg.out) / "world" / "prompts_heldout.jsonl"),
                            str(Path(cfg.out) / "prefs" / "heldout.jsonl"), cfg.collect.seed + 1)


def run_pipeline(cfg: RunConfig) -> dict:
    """Run every unfinished stage, write summary.json and print the summary table; returns the summary."""
    cfg = stage_configs(cfg)
    root = Path(cfg.out)
    check_out(root, stage="run", kind="dir", state=run_state, resume=True)
    summary_path = root / "summary.json"
    times = json.loads(summary_path.read_text()).get("time_seconds", {}) if summary_path.is_file() else {}
    distributed.barrier()  # every process has looked at the folder before the main one writes to it
    if distributed.is_main():
        root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(root / "config.json", to_dict(cfg))
    world = root / "world"
    _stage("world", (world / "world.json").is_file(), times, make_world, cfg, world)
    _stage("pretrain", stage_done(cfg.pretrain.out) is not None, times, run_pretrain, cfg.pretrain)
    _stage("sft", stage_done(cfg.sft.out) is not None, times, run_sft, cfg.sft)
    held = heldout_collect(cfg)
    for name, c in (("collect", cfg.collect), ("collect heldout", held)):
        _stage(name, Path(c.out).is_file(), times, run_collect, c)
    _stage("rm", stage_done(cfg.rm.out) is not None, times, run_rm, cfg.rm)
    rm_eval = EvalRMConfig(model=cfg.rm.out, data=held.out, out=str(root / "eval" / "rm.json"),
                           max_length=cfg.rm.data.max_length, load=cfg.rm.load)
    _stage("eval rm", Path(rm_eval.out).is_file(), times, run_eval_rm, rm_eval)
    _stage("ppo", stage_done(cfg.ppo.out) is not None, times, run_ppo, cfg.ppo)
    for name, model, against in (("base", cfg.pretrain.out, None), ("sft", cfg.sft.out, cfg.pretrain.out),
                                 ("ppo", cfg.ppo.out, cfg.sft.out)):
        ev = copy.deepcopy(cfg.eval)
        ev.model, ev.against, ev.out = model, against, str(root / "eval" / f"{name}.json")
        ev.reward_model = ev.reward_model or cfg.rm.out
        _stage(f"eval {name}", Path(ev.out).is_file(), times, run_eval, ev)
    kl_path = root / "eval" / "kl.json"
    _stage("eval kl", kl_path.is_file(), times, write_policy_kl, cfg.ppo, cfg.eval, kl_path)
    for k in range(2, cfg.rounds + 1):
        run_round(cfg, round_configs(cfg, k, held.prompts), lambda name, done, fn, *a: _stage(name, done, times, fn, *a))
    _stage("redteam", (Path(cfg.redteam.out) / "redteam.json").is_file(), times, run_redteam, cfg.redteam)
    if not distributed.is_main():
        return {}
    last = eval_folder(cfg, cfg.rounds)  # the headline is the last round's policy (with one round, eval/)
    results = {name: json.loads((root / "eval" / f"{name}.json").read_text()) for name in ("base", "sft")}
    results["ppo"] = json.loads((last / "ppo.json").read_text())
    ppo = {"win_rate_vs_sft": results["ppo"]["win_rate"],
           "win_rate_vs_sft_ci95": results["ppo"].get("intervals", {}).get("win_rate"),
           "vs_sft": results["ppo"].get("comparison"),
           "kl": json.loads((last / "kl.json").read_text())["kl"],
           "kl_target": cfg.ppo.kl.target if cfg.ppo.kl.adaptive else None}
    summary = {"stages": results, "rm": json.loads(Path(rm_eval.out).read_text()), "ppo": ppo,
               "redteam": headline(json.loads((Path(cfg.redteam.out) / "redteam.json").read_text())),
               "alignment_tax": alignment_tax(results), "time_seconds": times}
    if cfg.rounds > 1:
        summary["rounds"] = [round_figures(cfg, k) for k in range(1, cfg.rounds + 1)]
    write_json_atomic(summary_path, summary)
    _stage("report", False, times, build_report, root, together=False)
    print_summary(summary)
    console.print(f"report: {root / 'report.html'}")
    return summary


def next_round(run: Path) -> RunConfig:
    """The config of a run with one more round: the red team (and the headline) move on to the new last round's
    policy; every path the run filled in stays. A run whose last round (k >= 2) stopped before its end keeps its
    rounds, so that it resumes inside that round."""
    if not run.is_dir() or run_state(run) is None:
        raise ConfigError(f"{run} is not a run folder written by `rlhf run` (its config.json is missing or is not a "
                          "pipeline config); nothing was written")
    cfg = from_dict(RunConfig, read_json(run / "config.json"))
    defaults = stage_configs(RunConfig(out=cfg.out, rounds=cfg.rounds))  # the paths the run filled in by itself
    if (cfg.redteam.model, cfg.redteam.out) == (defaults.redteam.model, defaults.redteam.out):
        cfg.redteam.model = cfg.redteam.out = None
    if cfg.rounds == 1 or (eval_folder(cfg, cfg.rounds) / "kl.json").is_file():
        cfg.rounds += 1
    return cfg


def round_of(cfg: RunConfig, k: int) -> Round:
    """Round k's stage configs, as run_pipeline runs them."""
    cfg = stage_configs(cfg)
    return round_configs(cfg, k, heldout_collect(cfg).prompts)


def write_policy_kl(ppo, ev, path: Path) -> None:
    """KL of the PPO policy to its starting policy on the eval's held-out prompts, sampled as in rollouts."""
    write_json_atomic(path, kl_to_reference(ppo.out, ppo.policy, eval_prompts(ev), ppo.generation, seed=ev.seed,
                                            load=ppo.load))


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _ci(interval) -> str:
    return f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""


def comparison_line(name: str, other: str, c: dict) -> str:
    """``PPO against SFT: worse (gold -0.013 [-0.028, 0.001] per prompt; 18 wins, 49 losses, 233 ties, 0.269
    [0.162, 0.376] of the untied)``: the verdict first, then what it rests on."""
    diff = c.get("gold_diff")
    sign = "+" if diff is not None and diff >= 0 else ""
    return (f"{name} against {other}: {c.get('verdict')} (gold {sign}{_fmt(diff)}{_ci(c.get('gold_diff_ci95'))} per prompt; "
            f"{c.get('wins')} wins, {c.get('losses')} losses, {c.get('ties')} ties, {_fmt(c.get('win_rate_untied'))}"
            f"{_ci(c.get('win_rate_untied_ci95'))} of the untied)")


def print_summary(summary: dict) -> None:
    results = summary["stages"]
    table = Table(title="held-out evaluation (gold judge)")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    for key in SUMMARY_KEYS:
        table.add_row(key, *(_fmt(r.get(key)) for r in results.values()))
    Console().print(table)
    rm = summary["rm"]
    flagged = rm.get("annotators", {}).get("flagged", [])
    ppo = summary.get("ppo")
    if ppo:
        target = f" (target {_fmt(ppo['kl_target'])})" if ppo.get("kl_target") is not None else ""
        Console().print(f"PPO: gold win rate over SFT {_fmt(ppo['win_rate_vs_sft'])}{_ci(ppo.get('win_rate_vs_sft_ci95'))}, "
                        f"KL to the SFT policy {_fmt(ppo['kl'])} nats per response{target}")
        if ppo.get("vs_sft"):
            Console().print(comparison_line("PPO", "SFT", ppo["vs_sft"]))
        rates = results.get("ppo", {}).get("intervals", {})
        if rates:
            Console().print("PPO rates with 95% intervals: " + ", ".join(
                f"{k} {_fmt(results['ppo'].get(k))}{_ci(v)}" for k, v in rates.items() if k != "win_rate"))
    red = summary.get("redteam")
    if red:
        base = f" ({_fmt(red['against']['asr'])} for {red['against']['model']})" if "against" in red else ""
        Console().print(f"red team: attack success rate {_fmt(red['asr'])} for {red['model']}{base}")
    Console().print(f"reward model on {rm['n_pairs']} held-out pairs: accuracy {_fmt(rm['accuracy'])}, "
                    f"gold accuracy {_fmt(rm['gold_accuracy'])}, ECE {_fmt(rm['ece'])}, length correlation "
                    f"{_fmt(rm['length_correlation'])}{_prompt_dependence(rm)}; annotators flagged by agreement: "
                    f"{', '.join(flagged) or 'none'}")
    if summary.get("rounds"):
        print_rounds(summary["rounds"])


def _prompt_dependence(rm: dict) -> str:
    reads = rm.get("prompt_dependence") or {}
    return f", prompt dependence {_fmt(reads['accuracy'])} (0.5: the prompt is not read)" if "accuracy" in reads else ""


def print_rounds(rounds: list[dict]) -> None:
    table = Table(title="rounds (held-out prompts, gold judge; win and KL against SFT)", box=box.SIMPLE_HEAD)
    columns = {"gold_score": "gold", "win_rate": "win", "harmful_compliance": "harmful", "over_refusal": "refusal",
               "over_hedging": "hedging", "kl_to_sft": "KL", "rm_gold_accuracy_before": "RM old",
               "rm_gold_accuracy": "RM new"}  # short headers, so that the table fits in 80 columns
    for name in ("round", *columns.values()):
        table.add_column(name, justify="right", min_width=len(name))
    for r in rounds:
        table.add_row(str(r["round"]), *(_fmt(r.get(k)) for k in columns))
    console = Console()
    console.print(table)
    console.print("RM old, RM new: gold accuracy of the previous and of the new reward model on the round's held-out pairs")
    for r in rounds:
        if r.get("verdict"):
            console.print(f"round {r['round']} against SFT: {r['verdict']} (gold {r['gold_diff']:+.3f}{_ci(r.get('gold_diff_ci95'))} "
                          f"per prompt, untied win rate {_fmt(r.get('win_rate_untied'))})")
        if r.get("alerts"):
            console.print(f"round {r['round']}: reward-hacking detectors fired: {', '.join(r['alerts'])}")
