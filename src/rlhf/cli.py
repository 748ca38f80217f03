"""`rlhf <command>`: world, pretrain, sft, collect, rm, ppo (rl), dpo, bon, eval, eval-rm, redteam, annotate, run,
report, experiment.

Every training command takes ``--config FILE`` (a stage YAML, or a pipeline YAML whose section for
the stage is used) and per-field overrides such as ``--train.lr 3e-4``. ``rlhf COMMAND --help``
lists every field with its documentation and default.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rlhf.config import (
    BoNConfig,
    CollectConfig,
    DPOConfig,
    EvalConfig,
    EvalRMConfig,
    PPOConfig,
    PretrainConfig,
    RedteamConfig,
    RewardConfig,
    RunConfig,
    SFTConfig,
    WorldConfig,
)
from rlhf.configlib import ConfigError, add_arguments, build_config, to_dict


# Commands that several processes run together (`torchrun`, `accelerate launch`, `--num_processes`): the training
# stages, and `run`, whose other stages the main process runs while the rest wait.
DISTRIBUTED_COMMANDS = ("pretrain", "sft", "rm", "ppo", "rl", "dpo", "run", "iterate")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    from rlhf import distributed

    level = logging.DEBUG if verbose else logging.INFO if distributed.is_main() else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s",
                        handlers=[RichHandler(show_path=False, show_time=False)])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # ours show the work; theirs would only add noise


def _cmd_world(ns: argparse.Namespace) -> None:
    from rlhf.world import write_world

    if getattr(ns, "world_cmd", None) == "judge":
        _cmd_judge(ns)
        return
    from rlhf.fsutil import atomic_dir, check_out, holding

    cfg = build_config(WorldConfig, ns, section="world", whole=RunConfig)
    check_out(ns.out, stage="world", kind="dir", overwrite=ns.overwrite,
              state=holding("world.json"))
    with atomic_dir(ns.out) as tmp:
        paths = write_world(tmp, **to_dict(cfg))
    for name, path in paths.items():
        print(f"{name:<18} {Path(ns.out) / Path(path).name}")


def _cmd_judge(ns: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    from rlhf.data.io import load_records
    from rlhf.world import judge_prompt, summarise

    judgements = []
    for where, row in load_records(ns.file):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise ConfigError(f"{where}: each record needs string fields 'prompt' and 'response'")
        try:
            judgements.append(judge_prompt(row["prompt"], row["response"]))
        except ValueError as e:
            raise ConfigError(f"{where}: field 'prompt': {e}") from e
    summary = summarise(judgements)
    if ns.json:  # JSON alone, so that it can be piped
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"gold judge: {ns.file}")
    for col in ("family", "n", "gold_score"):
        table.add_column(col, justify="right" if col != "family" else "left")
    for fam, stats in summary["families"].items():
        table.add_row(fam, str(stats["n"]), f"{stats['gold_score']:.3f}")
    table.add_row("[bold]all", str(summary["n"]), f"[bold]{summary['gold_score']:.3f}")
    Console().print(table)


def _cmd_pretrain(ns: argparse.Namespace) -> None:
    from rlhf.stages.pretrain import run_pretrain

    _print_result(run_pretrain(build_config(PretrainConfig, ns, section="pretrain", whole=RunConfig)))


def _cmd_sft(ns: argparse.Namespace) -> None:
    from rlhf.stages.sft import run_sft

    _print_result(run_sft(build_config(SFTConfig, ns, section="sft", whole=RunConfig)))


def _cmd_collect(ns: argparse.Namespace) -> None:
    from rlhf.stages.collect import run_collect

    _print_result(run_collect(build_config(CollectConfig, ns, section="collect", whole=RunConfig)))


def _cmd_rm(ns: argparse.Namespace) -> None:
    from rlhf.stages.reward import run_rm

    _print_result(run_rm(build_config(RewardConfig, ns, section="rm", whole=RunConfig)))


def _cmd_ppo(ns: argparse.Namespace) -> None:
    from rlhf.stages.ppo import run_ppo

    _print_result(run_ppo(build_config(PPOConfig, ns, section="ppo", whole=RunConfig)))


def _cmd_dpo(ns: argparse.Namespace) -> None:
    from rlhf.stages.dpo import run_dpo

    _print_result(run_dpo(build_config(DPOConfig, ns, section="dpo", whole=RunConfig)))


def _cmd_bon(ns: argparse.Namespace) -> None:
    from rlhf.evaluation.best_of_n import run_bon

    result = run_bon(build_config(BoNConfig, ns))
    for row in result["curve"]:
        gold = "-" if row["gold_score"] is None else f"{row['gold_score']:.3f}"
        print(f"best-of-{row['n']:<3} KL {row['kl']:.3f}  RM {row['rm_score']:.3f}  gold {gold}")


def _cmd_report(ns: argparse.Namespace) -> None:
    from rlhf.report.html import build_report
    from rlhf.stages.pipeline import run_state

    if not Path(ns.run_dir).is_dir() or run_state(Path(ns.run_dir)) is None:
        raise ConfigError(f"{ns.run_dir} is not a run folder written by `rlhf run` (its config.json is missing or is not "
                          "a pipeline config); nothing was written")
    print(build_report(ns.run_dir))


def _cmd_eval_rm(ns: argparse.Namespace) -> None:
    from rlhf.evaluation.reward import run_eval_rm

    _print_result(run_eval_rm(build_config(EvalRMConfig, ns)))


def _cmd_eval(ns: argparse.Namespace) -> None:
    from rlhf.evaluation.policy import run_eval

    _print_result(run_eval(build_config(EvalConfig, ns, section="eval", whole=RunConfig)))


def _cmd_redteam(ns: argparse.Namespace) -> None:
    from rlhf.safety.redteam import run_redteam

    result = run_redteam(build_config(RedteamConfig, ns, section="redteam", whole=RunConfig))
    _print_result({k: v for k, v in result.items() if k != "worst"})
    if "against" in result:
        print(f"asr: {result['asr']:.3f} vs {result['against']['asr']:.3f} ({result['against']['model']})")


def _cmd_annotate(ns: argparse.Namespace) -> None:
    from rlhf.feedback.cli import run_annotate

    run_annotate(ns)


def _cmd_experiment(ns: argparse.Namespace) -> None:
    from rlhf.stages import experiments

    cfg = build_config(RunConfig, ns)
    if ns.experiment == "reward-hacking":
        experiments.reward_hacking(cfg, length_weight=ns.length_weight, length_target=ns.length_target, kl_coef=ns.kl_coef,
                                   iterations=ns.iterations, lr=ns.lr)
    elif ns.experiment == "seeds":
        experiments.ppo_seeds(cfg, ns.seeds or [1, 2])
    elif ns.experiment == "iterated":
        experiments.iterated(cfg)
    elif ns.experiment == "algorithms":
        from rlhf.stages.algorithms import compare_algorithms

        compare_algorithms(cfg, ns.seeds or sorted({cfg.ppo.seed, 1}))
    else:
        experiments.ptx_alignment_tax(cfg, ptx_coef=ns.ptx_coef)


def _cmd_run(ns: argparse.Namespace) -> None:
    from rlhf.stages.pipeline import run_pipeline

    run_pipeline(build_config(RunConfig, ns))


def _cmd_iterate(ns: argparse.Namespace) -> None:
    from rlhf.stages.human import feedback_round
    from rlhf.stages.pipeline import next_round, round_of, run_pipeline

    if ns.feedback and ns.continue_:
        raise ConfigError("--feedback starts a round for people to label and --continue finishes it: give one of them")
    cfg = next_round(Path(ns.run_dir))
    if feedback_round(cfg, round_of(cfg, cfg.rounds), start=ns.feedback, finish=ns.continue_, n_prompts=ns.n_prompts,
                      min_kappa=ns.min_kappa, ignore_agreement=ns.ignore_agreement):
        run_pipeline(cfg)


def _print_result(result: dict) -> None:
    from rlhf import distributed

    if not distributed.is_main():
        return
    shown = {k: v for k, v in result.items() if k not in ("config", "against", "final")}
    print(json.dumps(shown, indent=2, default=str))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="RLHF pipeline: SFT -> reward model -> PPO, with evaluation.",
                                     epilog="--num_processes N (anywhere on the line): run the command as N processes "
                                     "through torchrun (the training stages and `run`); one per GPU, or on a CPU over gloo")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: list[tuple[str, str, type | None, Callable]] = [
        ("world", "generate the assistant world (corpus, demonstrations, prompts); `world judge FILE` scores responses",
         WorldConfig, _cmd_world),
        ("pretrain", "train the tokenizer and the tiny base model on a corpus", PretrainConfig, _cmd_pretrain),
        ("sft", "supervised fine-tuning of a causal LM folder", SFTConfig, _cmd_sft),
        ("collect", "sample K responses per prompt from a policy and label the pairs with simulated annotators",
         CollectConfig, _cmd_collect),
        ("rm", "train a reward model (or an ensemble) on preference pairs", RewardConfig, _cmd_rm),
        ("ppo", "online RL against a reward model with a KL penalty to the initial policy: PPO, or --algorithm grpo, "
         "rloo, reinforce_pp", PPOConfig, _cmd_ppo),
        ("rl", "the same as `ppo` (the online RL stage; --algorithm ppo|grpo|rloo|reinforce_pp)", PPOConfig, _cmd_ppo),
        ("dpo", "DPO / IPO / cDPO on preference pairs against the frozen initial policy", DPOConfig, _cmd_dpo),
        ("bon", "best-of-n: n samples per prompt, the reward model's first choice; gold score against analytic KL for "
         "each n", BoNConfig, _cmd_bon),
        ("eval", "generate on held-out prompts and score with the gold judge", EvalConfig, _cmd_eval),
        ("eval-rm", "evaluate a reward model on preference pairs: accuracy, gold accuracy, calibration, length bias, "
         "annotator agreement", EvalRMConfig, _cmd_eval_rm),
        ("redteam", "attack a model with harmful requests under jailbreak strategies; attack success rate by strategy "
         "and category", RedteamConfig, _cmd_redteam),
        ("annotate", "the human-feedback web app (serve, the default); `annotate export|add-user|users|stats` manage it",
         None, _cmd_annotate),
        ("run", "the whole pipeline: world -> pretrain -> SFT -> collect -> RM -> PPO -> eval -> report", RunConfig, _cmd_run),
        ("report", "rebuild RUN_DIR/report.html (curves, per-family scores, samples, configuration)", None, _cmd_report),
        ("iterate", "add one round of iterated online RLHF to RUN_DIR: pairs from its last policy, the reward model "
         "trained again on every round's pairs, PPO continued from that policy (RUN_DIR/round_K/); with --feedback "
         "and then --continue, people label the round's pairs in `rlhf annotate`", None, _cmd_iterate),
    ]
    for name, help_text, cls, fn in commands:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter if cls is None else argparse.HelpFormatter)
        if name == "annotate":  # its options and subcommands live with the app
            from rlhf.feedback.cli import add_annotate_arguments

            add_annotate_arguments(p)
            p.set_defaults(fn=fn)
            continue
        if cls is None:
            p.add_argument("run_dir", help="run folder written by `rlhf run`")
            if name == "iterate":
                _iterate_flags(p)
            p.set_defaults(fn=fn)
            continue
        p.add_argument("--config", metavar="FILE", help="YAML config (a stage file, or a pipeline file such as configs/demo.yaml)")
        if name == "world":
            p.add_argument("--out", default="runs/world", help="output folder")
            p.add_argument("--overwrite", action="store_true", help="replace an earlier world at --out")
            world_sub = p.add_subparsers(dest="world_cmd", metavar="judge")
            j = world_sub.add_parser("judge", help="score a JSONL of {prompt, response} records and print per-family results")
            j.add_argument("file", help="JSONL file with 'prompt' and 'response' fields")
            j.add_argument("--json", action="store_true", help="print the summary as JSON instead of the table")
        add_arguments(p, cls)
        p.set_defaults(fn=fn)
    _add_experiment(sub)
    return parser


def _iterate_flags(p: argparse.ArgumentParser) -> None:
    from rlhf.stages.human import MIN_KAPPA

    p.add_argument("--feedback", action="store_true", help="people label the round's pairs: sample them into "
                   "RUN_DIR/round_K/feedback/annotate.db for `rlhf annotate`, print its commands, and stop")
    p.add_argument("--continue", dest="continue_", action="store_true", help="export the labels of a --feedback "
                   "round as its training pairs (after the agreement check) and finish the round")
    p.add_argument("--n_prompts", type=int, default=None, help="--feedback: prompts to sample pairs for (None: "
                   "collect.n_prompts)")
    p.add_argument("--min_kappa", type=float, default=MIN_KAPPA, help="--continue: the least pooled Cohen's kappa "
                   "of the annotators on shared items")
    p.add_argument("--ignore_agreement", action="store_true", help="--continue: go on below --min_kappa, or with "
                   "no item labelled twice")


def _add_experiment(sub) -> None:
    help_text = ("controlled experiments on a pipeline run: reward-hacking (RM on the length-biased annotator, PPO "
                 "without and with the length penalty), alignment-tax (PPO with and without PPO-ptx), seeds (PPO "
                 "again with other seeds: the spread of the headline figures) and algorithms (PPO, GRPO, RLOO, "
                 "REINFORCE++, DPO and best-of-16 on the same SFT model, reward model and prompts) and iterated "
                 "(--rounds N rounds against one round with as many labels and PPO iterations)")
    p = sub.add_parser("experiment", help=help_text, description=help_text)
    p.add_argument("experiment", choices=["reward-hacking", "alignment-tax", "seeds", "algorithms", "iterated"])
    p.add_argument("--config", metavar="FILE", help="pipeline YAML (e.g. configs/demo.yaml); its stages run first when unfinished")
    p.add_argument("--length_weight", type=float, default=2.0, help="reward-hacking: weight of the length penalty in the second run")
    p.add_argument("--length_target", type=int, default=12, help="reward-hacking: words before the length penalty starts")
    p.add_argument("--kl_coef", type=float, default=0.05, help="reward-hacking: fixed KL coefficient of both PPO runs")
    p.add_argument("--iterations", type=int, default=120, help="reward-hacking: PPO iterations of both runs")
    p.add_argument("--lr", type=float, default=5e-5, help="reward-hacking: PPO learning rate of both runs")
    p.add_argument("--ptx_coef", type=float, default=1.0, help="alignment-tax: PPO-ptx loss weight")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="seeds: PPO seeds to run besides the run's own (default 1 2); algorithms: the seeds of every "
                        "method (default: the run's PPO seed and 1)")
    add_arguments(p, RunConfig)
    p.set_defaults(fn=_cmd_experiment)


def _take_num_processes(argv: list[str]) -> tuple[list[str], int]:
    """``--num_processes N`` (or ``=N``) anywhere on the command line, and the command line without it."""
    rest, n, args = [], "1", iter(argv)
    for arg in args:
        if arg == "--num_processes":
            n = next(args, "")
        elif arg.startswith("--num_processes="):
            n = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    if not n.isdigit() or int(n) < 1:
        raise SystemExit(f"rlhf: error: --num_processes: must be a whole number >= 1, got {n!r}")
    return rest, int(n)


def launch(argv: list[str], n: int) -> int:
    """Run ``rlhf ARGV`` as ``n`` processes on this machine through torchrun; its exit status. On a machine without
    CUDA the processes train on the CPU over gloo, each with its share of the cores."""
    import subprocess

    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():  # each process its share of the cores (distributed.init puts them on the CPU)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m", "rlhf.cli", *argv]
    print("rlhf: " + " ".join(cmd[1:]), file=sys.stderr)
    return subprocess.run(cmd, env=env).returncode


def main(argv: Sequence[str] | None = None) -> int:
    from rlhf import distributed

    argv, n = _take_num_processes(list(sys.argv[1:] if argv is None else argv))
    ns = build_parser().parse_args(argv)
    if n > 1 and not distributed.launched():
        if ns.command not in DISTRIBUTED_COMMANDS:
            print(f"rlhf {ns.command}: error: --num_processes: only {', '.join(DISTRIBUTED_COMMANDS)} run as several "
                  "processes", file=sys.stderr)
            return 2
        return launch(argv, n)
    if distributed.launched() and ns.command not in DISTRIBUTED_COMMANDS:
        print(f"rlhf {ns.command}: error: this command runs as one process; start it without torchrun or accelerate "
              f"launch (several processes run {', '.join(DISTRIBUTED_COMMANDS)})", file=sys.stderr)
        return 2
    distributed.init()
    _setup_logging(ns.verbose)
    from rlhf.data.io import DataError

    try:
        ns.fn(ns)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"rlhf {ns.command}: error: {e}", file=sys.stderr)
        return 2
    distributed.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
