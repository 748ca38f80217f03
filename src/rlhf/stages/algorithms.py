"""`rlhf experiment algorithms`: every method on the same SFT model, reward model and prompts, scored by the gold judge.

From a pipeline run's SFT model and reward model: PPO (the run's own for its seed), GRPO, RLOO and REINFORCE++
with the PPO stage's settings (the same iterations and samples per iteration, so the same number of generated
samples; K = ppo.num_generations_grouped samples per prompt for the grouped methods), DPO on the reward model's
preference file, and best-of-16 from the SFT model. Every trained policy is evaluated as the pipeline evaluates PPO
(held-out prompts, greedy, against SFT) and its KL to SFT measured on the same prompts as the pipeline's; best-of-n
is judged on its picked samples, with the analytic KL. Each method runs with every seed; the table pools the
seeds' per-prompt outcomes for its 95% intervals and lists the per-seed values beside.

Writes RUN/algorithms/algorithms.json. Nothing is tuned per method here: every online method takes the PPO
section's settings as they are; DPO takes the dpo section's.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlhf.config import BoNConfig, RunConfig
from rlhf.data.io import read_jsonl
from rlhf.evaluation.best_of_n import best_of_n_kl, run_bon
from rlhf.evaluation.policy import mean_interval, normal_interval, rate_intervals
from rlhf.fsutil import stage_done, write_json_atomic
from rlhf.report.html import build_report
from rlhf.stages.dpo import run_dpo
from rlhf.stages.experiments import eval_against_sft
from rlhf.stages.pipeline import run_pipeline, stage_configs
from rlhf.stages.ppo import run_ppo
from rlhf.world import RATES, judge_prompt, summarise

log = logging.getLogger("rlhf.experiment")

ONLINE = ("ppo", "grpo", "rloo", "reinforce_pp")
GROUP_SIZE = 4  # K for GRPO and RLOO: the batch keeps its size, so a rollout holds batch_size / 4 prompts
BON_N = 16
COLUMNS = ("gold_score", "win_rate", "win_rate_untied", *(name for name, _, _ in RATES), "kl", "seconds")


def train_online(cfg: RunConfig, algorithm: str, seed: int, root: Path) -> str:
    """An online RL policy with the PPO section's settings (the run's own PPO for its seed); its folder."""
    if algorithm == "ppo" and seed == cfg.ppo.seed:
        return cfg.ppo.out
    rl = copy.deepcopy(cfg.ppo)  # resume: true, as the pipeline's: an interrupted experiment continues
    rl.algorithm, rl.seed, rl.save_every = algorithm, seed, 20
    rl.num_generations = GROUP_SIZE if algorithm in ("grpo", "rloo") else 1
    rl.out = str(root / algorithm / f"seed_{seed}")
    if stage_done(rl.out) is None:
        run_ppo(rl)
    return rl.out


def train_dpo(cfg: RunConfig, seed: int, root: Path) -> str:
    dpo = copy.deepcopy(cfg.dpo)
    dpo.train.seed, dpo.out = seed, str(root / "dpo" / f"seed_{seed}")
    if stage_done(dpo.out) is None:
        run_dpo(dpo)
    return dpo.out


def stage_seconds(folder: str) -> float:
    """The training time a stage recorded (models loaded to final weights)."""
    return json.loads((Path(folder) / "stage.json").read_text())["seconds"]


def best_of_n_policy(cfg: RunConfig, seed: int, root: Path) -> tuple[dict, list[dict]]:
    """Best-of-16 from SFT on the eval's prompts, sampled as rollouts are: its result and picked samples."""
    out = root / "bon" / f"seed_{seed}.json"
    if not out.is_file():
        run_bon(BoNConfig(policy=cfg.sft.out, reward_model=cfg.rm.out, out=str(out), n_prompts=cfg.eval.n_prompts,
                          ns=[1, 2, 4, 8, BON_N], seed=cfg.eval.seed, sampling_seed=seed, generation=cfg.ppo.generation,
                          load=cfg.eval.load))
    return json.loads(out.read_text()), read_jsonl(out.with_name(out.stem + ".samples.jsonl"))


def pooled_row(samples: list[list[dict]], sft: list[dict], kls: list[list[float]], seconds: list[float]) -> dict:
    """One method's figures over its seeds: means with 95% intervals from the pooled per-prompt outcomes."""
    judged = [judge_prompt(s["prompt"], s["response"]) for run in samples for s in run]
    figures = summarise(judged)
    intervals = rate_intervals(judged)
    totals = [j.total for j in judged]
    theirs = [s["gold"] for _ in samples for s in sft]
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(totals, theirs)]
    untied = [o for o in outcomes if o != 0.5]
    pooled_kl = [k for run in kls for k in run]
    row = {"gold_score": figures["gold_score"], "win_rate": sum(outcomes) / len(outcomes),
           "win_rate_untied": sum(untied) / len(untied) if untied else None,
           **{name: figures.get(name) for name, _, _ in RATES},
           "kl": sum(pooled_kl) / len(pooled_kl) if pooled_kl else None, "seconds": sum(seconds) / len(seconds),
           "wins_ties_losses": [outcomes.count(1.0), outcomes.count(0.5), outcomes.count(0.0)]}
    ci = {"gold_score": normal_interval(totals), "win_rate": mean_interval(outcomes),
          "win_rate_untied": mean_interval(untied) if untied else None, **intervals,
          "kl": normal_interval(pooled_kl) if pooled_kl else None, "seconds": normal_interval(seconds)}
    return {**row, "ci95": ci}


def compare_algorithms(cfg: RunConfig, seeds: list[int]) -> dict:
    """Every method with every seed on the run's SFT model and reward model; writes RUN/algorithms/algorithms.json."""
    run_pipeline(cfg)
    cfg = stage_configs(cfg)
    root = Path(cfg.out) / "algorithms"
    sft = read_jsonl(Path(cfg.out) / "eval" / "sft.samples.jsonl")
    table, per_seed, bon_curves = {}, {}, {}
    for method in (*ONLINE, "dpo", f"best_of_{BON_N}"):
        samples, kls, seconds, seed_rows = [], [], [], {}
        for seed in seeds:
            if method.startswith("best_of"):
                result, rows = best_of_n_policy(cfg, seed, root)
                bon_curves[str(seed)], secs = result["curve"], result["seconds"]
                kl = [best_of_n_kl(BON_N)] * len(rows)
            else:
                model = train_dpo(cfg, seed, root) if method == "dpo" else train_online(cfg, method, seed, root)
                out = root / method / f"seed_{seed}" / "eval"
                kl = eval_against_sft(cfg, model, out)[1]["per_sequence"]
                rows = read_jsonl(out / "eval.samples.jsonl")
                secs = stage_seconds(model)
            samples.append(rows)
            kls.append(kl)
            seconds.append(secs)
            seed_rows[str(seed)] = {k: v for k, v in pooled_row([rows], sft, [kl], [secs]).items() if k != "ci95"}
        table[method] = pooled_row(samples, sft, kls, seconds)
        per_seed[method] = seed_rows
    result = {"seeds": seeds, "group_size": GROUP_SIZE, "samples_per_online_run": cfg.ppo.iterations * cfg.ppo.batch_size,
              "n_prompts": len(sft), "methods": table, "per_seed": per_seed, "best_of_n_curve": bon_curves,
              "notes": ("Online methods: the ppo section's settings for all (iterations, batch, lr, KL controller, "
                        "safety terms); grpo and rloo draw K samples per prompt from batch_size / K prompts. DPO: the "
                        "dpo section, on the reward model's preference file. Best-of-16: SFT sampled as in rollouts, "
                        "KL analytic.")}
    write_json_atomic(root / "algorithms.json", result)
    print_table(result)
    build_report(cfg.out)  # its "Algorithms" section reads the file just written
    return result


def print_table(result: dict) -> None:
    table = Table(title=f"algorithms on the same SFT model, reward model and {result['n_prompts']} held-out prompts "
                        f"(seeds {result['seeds']}; 95% intervals)")
    for col in ("method", *COLUMNS):
        table.add_column(col, justify="right")
    for method, row in result["methods"].items():
        cells = []
        for k in COLUMNS:
            v, ci = row.get(k), row["ci95"].get(k)
            cells.append("-" if v is None else f"{v:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        table.add_row(method, *cells)
    Console(width=max(Console().width, 200)).print(table)  # eleven columns with intervals: never cut
