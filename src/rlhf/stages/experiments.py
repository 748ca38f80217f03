"""Controlled experiments on top of a pipeline run: reward hacking, and the alignment tax with PPO-ptx.

`rlhf experiment reward-hacking --config configs/demo.yaml` trains a reward model on the labels of the
length-biased annotator alone, runs PPO against it twice, without and with the length penalty, and
writes RUN/reward_hacking/reward_hacking.json: proxy reward, gold score and length at the start and
end of each PPO run, the detectors that fired, and held-out gold and length of each final policy.

`rlhf experiment alignment-tax --config configs/demo.yaml` runs PPO again with PPO-ptx (a language-
modelling loss on the world's pretraining prose mixed into each policy step) and writes
RUN/alignment_tax.json: capability of base, SFT, PPO and PPO-ptx and each one's change against base.

Both first run (or find finished) the pipeline stages they build on.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlhf.config import RunConfig
from rlhf.data.io import read_jsonl, write_jsonl_atomic
from rlhf.evaluation.alignment_tax import alignment_tax, pct_change
from rlhf.evaluation.policy import run_eval
from rlhf.fsutil import stage_done, write_json_atomic
from rlhf.report.metrics import read_metrics
from rlhf.stages.pipeline import run_pipeline, stage_configs
from rlhf.stages.ppo import run_ppo
from rlhf.stages.reward import run_rm

log = logging.getLogger("rlhf.experiment")

BIASED_ANNOTATOR = "length_lover"
WINDOW = 5  # iterations averaged at each end of a PPO run: one batch is noisy


def _ends(metrics: list[dict], key: str) -> tuple[float, float]:
    """Mean of `key` over the first and the last WINDOW iterations."""
    vals = [m[key] for m in metrics if key in m]
    return sum(vals[:WINDOW]) / len(vals[:WINDOW]), sum(vals[-WINDOW:]) / len(vals[-WINDOW:])


def _ppo_then_eval(cfg: RunConfig, ppo_cfg, name: str, root: Path) -> dict:
    """Run PPO (unless finished) and the held-out eval of its policy; returns the eval result."""
    if stage_done(ppo_cfg.out) is None:
        run_ppo(ppo_cfg)
    ev = copy.deepcopy(cfg.eval)
    ev.model, ev.out, ev.reward_model = ppo_cfg.out, str(root / "eval" / f"{name}.json"), ppo_cfg.reward_model
    return json.loads(Path(ev.out).read_text()) if Path(ev.out).is_file() else run_eval(ev)


def reward_hacking(cfg: RunConfig, *, length_weight: float = 2.0, length_target: int = 12, kl_coef: float = 0.05,
                   iterations: int = 120, lr: float = 5e-5) -> dict:
    """PPO against a reward model that learned one annotator's love of length, without and with the length penalty."""
    run_pipeline(cfg)
    cfg = stage_configs(cfg)
    root = Path(cfg.out) / "reward_hacking"
    prefs = root / "prefs_length_lover.jsonl"
    if not prefs.is_file():
        rows = [r for r in read_jsonl(cfg.collect.out) if r.get("annotator") == BIASED_ANNOTATOR]
        write_jsonl_atomic(prefs, rows)
        log.info("%d pairs labelled by %s", len(rows), BIASED_ANNOTATOR)
    rm = copy.deepcopy(cfg.rm)
    rm.data.path, rm.data.val_path, rm.out, rm.drop_flagged_annotators = str(prefs), None, str(root / "rm"), False
    if stage_done(rm.out) is None:
        run_rm(rm)

    runs = {}
    for name, weight in (("hacked", 0.0), ("length_penalty", length_weight)):
        ppo = copy.deepcopy(cfg.ppo)
        ppo.reward_model, ppo.out, ppo.save_every = rm.out, str(root / f"ppo_{name}"), 0
        ppo.iterations, ppo.lr = iterations, lr  # longer and faster than the demo: time to find the hack
        ppo.kl.coef, ppo.kl.adaptive = kl_coef, False  # a weak, fixed leash: room to exploit the RM
        ppo.safety.safety_weight, ppo.safety.redteam_share = 0.0, 0.0  # isolate the length effect
        ppo.safety.length_weight, ppo.safety.length_target = weight, length_target
        held = _ppo_then_eval(cfg, ppo, name, root)
        metrics = read_metrics(Path(ppo.out) / "metrics.jsonl")
        alerts = [json.loads(line)["detector"] for line in (Path(ppo.out) / "alerts.jsonl").read_text().splitlines()
                  ] if (Path(ppo.out) / "alerts.jsonl").is_file() else []
        (p0, p1), (g0, g1), (l0, l1) = (_ends(metrics, k) for k in ("objective/scores", "objective/gold", "response/length"))
        runs[name] = {"length_weight": weight, "proxy_start": p0, "proxy_end": p1, "gold_start": g0, "gold_end": g1,
                      "length_start": l0, "length_end": l1, "heldout_gold": held["gold_score"],
                      "heldout_length": held["mean_length"], "alerts": sorted(set(alerts))}
    sft = json.loads((Path(cfg.out) / "eval" / "sft.json").read_text())
    result = {"annotator": BIASED_ANNOTATOR, "pairs": len(read_jsonl(prefs)), "kl_coef": kl_coef,
              "iterations": iterations, "lr": lr,
              "length_target": length_target, "runs": runs,
              "sft": {"heldout_gold": sft["gold_score"], "heldout_length": sft["mean_length"]}}
    write_json_atomic(root / "reward_hacking.json", result)
    _print_hacking(result)
    return result


def _print_hacking(result: dict) -> None:
    table = Table(title=f"reward hacking: RM trained on {result['annotator']} labels only ({result['pairs']} pairs)")
    for col in ("run", "proxy start->end", "gold start->end", "length start->end", "held-out gold", "detectors fired"):
        table.add_column(col)
    for name, r in result["runs"].items():
        table.add_row(name, f"{r['proxy_start']:+.2f} -> {r['proxy_end']:+.2f}", f"{r['gold_start']:.3f} -> {r['gold_end']:.3f}",
                      f"{r['length_start']:.1f} -> {r['length_end']:.1f}", f"{r['heldout_gold']:.3f}", ", ".join(r["alerts"]) or "-")
    table.add_row("sft", "", "", "", f"{result['sft']['heldout_gold']:.3f}", "")
    Console().print(table)


def ptx_alignment_tax(cfg: RunConfig, *, ptx_coef: float = 1.0) -> dict:
    """The demo's PPO run again with PPO-ptx on pretraining prose; capability of every stage against base."""
    run_pipeline(cfg)
    cfg = stage_configs(cfg)
    root = Path(cfg.out)
    ppo = copy.deepcopy(cfg.ppo)
    ppo.out, ppo.ptx_coef, ppo.ptx_data = str(root / "ppo_ptx"), ptx_coef, str(root / "world" / "pretrain.jsonl")
    results = {name: json.loads((root / "eval" / f"{name}.json").read_text()) for name in ("base", "sft", "ppo")}
    results["ppo_ptx"] = _ppo_then_eval(cfg, ppo, "ppo_ptx", root)
    tax = alignment_tax(results)
    tax["change_vs_sft"] = {n: {k: pct_change(tax["stages"]["sft"][k], v) for k, v in tax["stages"][n].items()}
                            for n in ("ppo", "ppo_ptx")}  # the tax RL charges, with and without the mitigation
    tax = {**tax, "ptx_coef": ptx_coef,
           "gold_score": {n: r["gold_score"] for n, r in results.items()},
           "harmful_compliance": {n: r["harmful_compliance"] for n, r in results.items()}}
    write_json_atomic(root / "alignment_tax.json", tax)
    table = Table(title=f"alignment tax (change vs SFT for the PPO runs, else vs base; PPO-ptx coefficient {ptx_coef})")
    for col in ("stage", "arithmetic acc", "facts acc", "perplexity (lower is better)", "gold score"):
        table.add_column(col)
    for name, cap in tax["stages"].items():
        ch = tax["change_vs_sft"].get(name) or tax["change_vs_base"].get(name, {})
        cell = lambda k: f"{cap[k]:.3f}" + (f" ({ch[k]:+.1f}%)" if ch.get(k) is not None else "")  # noqa: E731
        table.add_row(name, cell("accuracy_arithmetic"), cell("accuracy_facts"), cell("perplexity"), f"{tax['gold_score'][name]:.3f}")
    Console().print(table)
    return tax
