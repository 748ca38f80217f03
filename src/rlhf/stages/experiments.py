"""Controlled experiments on top of a pipeline run: reward hacking, and the alignment tax with PPO-ptx.

`rlhf experiment reward-hacking --config configs/demo.yaml` trains a reward model on the labels of the
length-biased annotator alone, runs PPO against it twice, without and with the length penalty, and
writes RUN/reward_hacking/reward_hacking.json: proxy reward, gold score and length at the start and
end of each PPO run, the detectors that fired, and held-out gold and length of each final policy.

`rlhf experiment alignment-tax --config configs/demo.yaml` runs PPO again with PPO-ptx (a language-
modelling loss on the world's pretraining prose mixed into each policy step) and writes
RUN/alignment_tax.json: capability of base, SFT, PPO and PPO-ptx and each one's change against base.

`rlhf experiment seeds --config configs/demo.yaml --seeds 1 2` reruns PPO (and its evaluation, KL and
red team) with other seeds on the same base, SFT and reward model, and writes RUN/seeds/seeds.json: the
headline figures of every seed, the run's own included, with their mean and standard deviation. One
run's figures are one draw; this says how far the next draw may land from them.

`rlhf experiment iterated --config configs/demo.yaml --rounds 2` compares the run's rounds with one round that has
as many labels (all from the SFT model, on the same prompts) and as many PPO iterations, and writes
RUN/iterated/iterated.json: what sampling each round's pairs from the latest policy is worth.

All first run (or find finished) the pipeline stages they build on.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlhf.config import RunConfig
from rlhf.configlib import ConfigError
from rlhf.data.io import read_jsonl, write_jsonl_atomic
from rlhf.evaluation.alignment_tax import alignment_tax, pct_change
from rlhf.evaluation.hacking import fired_detectors
from rlhf.evaluation.policy import comparison_figures, run_eval
from rlhf.fsutil import stage_done, write_json_atomic
from rlhf.report.metrics import read_metrics
from rlhf.stages.pipeline import run_pipeline, stage_configs, write_policy_kl
from rlhf.stages.ppo import run_ppo
from rlhf.safety.redteam import run_redteam
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
        alerts = fired_detectors(ppo.out)
        (p0, p1), (g0, g1), (l0, l1) = (_ends(metrics, k) for k in ("objective/scores", "objective/gold", "response/length"))
        runs[name] = {"length_weight": weight, "proxy_start": p0, "proxy_end": p1, "gold_start": g0, "gold_end": g1,
                      "length_start": l0, "length_end": l1, "heldout_gold": held["gold_score"],
                      "heldout_length": held["mean_length"], "alerts": alerts}
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


def eval_against_sft(cfg: RunConfig, model: str, out: Path) -> tuple[dict, dict]:
    """A policy evaluated as the pipeline evaluates PPO: held-out eval against SFT (OUT/eval.json, samples beside it)
    and KL to SFT on the same prompts (OUT/kl.json); each is kept once written."""
    ev = copy.deepcopy(cfg.eval)
    ev.model, ev.against, ev.reward_model, ev.out = model, cfg.sft.out, cfg.rm.out, str(out / "eval.json")
    result = json.loads(Path(ev.out).read_text()) if Path(ev.out).is_file() else run_eval(ev)
    kl_path = out / "kl.json"
    if not kl_path.is_file():
        ppo = copy.deepcopy(cfg.ppo)
        ppo.out = model
        write_policy_kl(ppo, cfg.eval, kl_path)
    return result, json.loads(kl_path.read_text())


SEED_METRICS = ("gold_score", "win_rate", "win_rate_untied", "gold_diff", "harmful_compliance", "over_refusal", "honesty",
                "over_hedging", "accuracy", "kl", "asr")


def _vs_sft(ev: dict) -> dict:
    """One PPO policy's held-out figures against SFT: SEED_METRICS but KL and the red team, with the comparison."""
    return {**{k: ev.get(k) for k in SEED_METRICS if k not in ("kl", "asr")}, **comparison_figures(ev)}


def _seed_figures(ev: dict, kl: dict, red: dict) -> dict:
    """The headline figures of one PPO policy: its eval against SFT, its KL to the reference, its red team."""
    return {**_vs_sft(ev), "kl": kl["kl"], "asr": red["asr"]}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0


def ppo_seeds(cfg: RunConfig, seeds: list[int]) -> dict:
    """PPO with each of `seeds` on the run's base, SFT and reward model; the spread of the headline figures."""
    run_pipeline(cfg)
    cfg = stage_configs(cfg)
    root = Path(cfg.out)
    main = cfg.ppo.seed
    figures = {main: _seed_figures(json.loads((root / "eval" / "ppo.json").read_text()),
                                   json.loads((root / "eval" / "kl.json").read_text()),
                                   json.loads((Path(cfg.redteam.out) / "redteam.json").read_text()))}
    for seed in (s for s in seeds if s != main):
        out = root / "seeds" / f"seed_{seed}"
        ppo = copy.deepcopy(cfg.ppo)
        ppo.seed, ppo.out, ppo.save_every = seed, str(out / "ppo"), 0
        if stage_done(ppo.out) is None:
            run_ppo(ppo)
        result, kl = eval_against_sft(cfg, ppo.out, out)
        red = copy.deepcopy(cfg.redteam)
        red.model, red.against, red.out = ppo.out, None, str(out / "redteam")
        if not (Path(red.out) / "redteam.json").is_file():
            run_redteam(red)
        figures[seed] = _seed_figures(result, kl, json.loads((Path(red.out) / "redteam.json").read_text()))
    spread = {k: _mean_sd([f[k] for f in figures.values() if f[k] is not None]) for k in SEED_METRICS
              if any(f[k] is not None for f in figures.values())}
    result = {"run_seed": main, "seeds": {str(s): f for s, f in figures.items()},
              "mean": {k: m for k, (m, _) in spread.items()}, "sd": {k: sd for k, (_, sd) in spread.items()}}
    write_json_atomic(root / "seeds" / "seeds.json", result)
    table = Table(title=f"PPO over {len(figures)} seeds (same base, SFT and reward model; seed {main} is the run's own)")
    for col in ("metric", *(f"seed {s}" for s in figures), "mean ± sd"):
        table.add_column(col, justify="right")
    for k, (m, sd) in spread.items():
        table.add_row(k, *("-" if f[k] is None else f"{f[k]:.3f}" for f in figures.values()), f"{m:.3f} ± {sd:.3f}")
    Console().print(table)
    Console().print("against SFT: " + ", ".join(f"seed {s} {f['verdict']}" for s, f in figures.items()))
    return result


def iterated(cfg: RunConfig) -> dict:
    """N rounds of iterated RLHF against one round with as many labels and PPO iterations (RUN/iterated/).

    The rounds arm is the run's own rounds 2..N (run first when unfinished). The one-round arm collects the same
    number of extra pairs from the SFT model on the same prompts (each round's collection again, with the SFT
    model as the policy), trains the reward model once on round 1's pairs and those, and runs PPO from SFT for
    N times the iterations: what the rounds add is only that later pairs come from later policies.
    """
    from rlhf.stages.collect import run_collect
    from rlhf.stages.pipeline import round_of
    from rlhf.stages.rounds import combine_pairs, round_figures, train_pairs_of

    if cfg.rounds < 2:
        raise ConfigError("experiment iterated: set --rounds N (N >= 2), the rounds the one-round arm is compared with")
    run_pipeline(cfg)
    cfg = stage_configs(cfg)
    root = Path(cfg.out) / "iterated"
    last = round_of(cfg, cfg.rounds)
    rm, extra = copy.deepcopy(last.rm), []
    for k in range(2, cfg.rounds + 1):  # round k's collection again, written by the SFT model
        c = copy.deepcopy(round_of(cfg, k).collect)
        c.policy, c.against_pairs, c.out = cfg.sft.out, 0, str(root / "prefs" / f"round_{k}.jsonl")
        if not Path(c.out).is_file():
            run_collect(c)
        extra.append(c.out)
    rm.data.path, rm.out, rm.normalize.policy = str(root / "prefs" / "all.jsonl"), str(root / "rm"), cfg.sft.out
    combine_pairs([train_pairs_of(cfg, 1), *extra], rm)
    if stage_done(rm.out) is None:
        run_rm(rm)
    ppo = copy.deepcopy(cfg.ppo)
    ppo.reward_model, ppo.out, ppo.iterations = rm.out, str(root / "ppo"), cfg.ppo.iterations * cfg.rounds
    if stage_done(ppo.out) is None:
        run_ppo(ppo)
    ev, kl = eval_against_sft(cfg, ppo.out, root)
    one = {**_vs_sft(ev), "kl_to_sft": kl["kl"], "win_rate_ci95": ev.get("intervals", {}).get("win_rate"),
           "alerts": fired_detectors(ppo.out)}
    rounds = round_figures(cfg, cfg.rounds)
    result = {"rounds": cfg.rounds, "labels": {"rounds": sum(len(read_jsonl(train_pairs_of(cfg, k))) for k in range(1, cfg.rounds + 1)),
                                               "one_round": len(read_jsonl(rm.data.path))},
              "ppo_iterations": ppo.iterations, "iterated": rounds, "one_round": one}
    write_json_atomic(root / "iterated.json", result)
    table = Table(title=f"{cfg.rounds} rounds against one round with as many labels ({result['labels']['rounds']} and "
                        f"{result['labels']['one_round']}) and PPO iterations ({ppo.iterations}); held-out prompts")
    for col in ("metric", f"{cfg.rounds} rounds", "1 round"):
        table.add_column(col, justify="right")
    for key in ("gold_score", "win_rate", "win_rate_untied", "gold_diff", "harmful_compliance", "over_refusal", "over_hedging",
                "honesty", "accuracy", "kl_to_sft", "verdict"):
        table.add_row(key, *(f"{v:.3f}" if isinstance(v, (int, float)) else v or "-" for v in (rounds.get(key), one.get(key))))
    Console().print(table)
    return result
