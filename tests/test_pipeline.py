"""End to end on configs/tiny.yaml: world -> pretrain -> SFT -> collect -> RM -> PPO -> eval -> report, through the CLI; resume skips."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf.cli import main
from rlhf.config import EvalConfig
from rlhf.evaluation.policy import (mean_interval, paired_comparison, rate_intervals, run_eval, verdict, wilson_interval,
                                    win_rate)

TINY = str(Path(__file__).parent.parent / "configs" / "tiny.yaml")
EVAL_KEYS = {"gold_score", "families", "harmful_compliance", "over_refusal", "honesty", "accuracy", "mean_length", "eos_rate"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "tiny"
    assert main(["run", "--config", TINY, "--out", str(out)]) == 0
    return out


def test_pipeline_writes_every_stage(tiny_run):
    for name in ("world/world.json", "base/model.safetensors", "base/tokenizer.json", "sft/model.safetensors",
                 "prefs/train.jsonl", "prefs/train.stats.json", "prefs/heldout.jsonl", "rm/model.safetensors",
                 "eval/rm.json", "eval/base.json", "eval/sft.json", "eval/sft.samples.jsonl", "ppo/model.safetensors",
                 "ppo/metrics.jsonl", "ppo/stage.json", "eval/ppo.json", "eval/kl.json", "summary.json", "report.html"):
        assert (tiny_run / name).is_file(), name
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert set(summary["stages"]) == {"base", "sft", "ppo"} and summary["stages"]["sft"]["win_rate"] == \
        json.loads((tiny_run / "eval" / "sft.json").read_text())["win_rate"]
    ppo = summary["ppo"]
    assert ppo["win_rate_vs_sft"] == summary["stages"]["ppo"]["win_rate"] and ppo["kl_target"] == 6.0
    low, high = ppo["win_rate_vs_sft_ci95"]
    assert low <= ppo["win_rate_vs_sft"] <= high and ppo["win_rate_vs_sft_ci95"] == summary["stages"]["ppo"]["intervals"]["win_rate"]
    vs_sft = ppo["vs_sft"]  # the paired comparison on the same held-out prompts, counted from the samples files
    samples = [json.loads(line) for line in (tiny_run / "eval" / "ppo.samples.jsonl").read_text().splitlines()]
    pairs = [(s["gold"], s["against_gold"]) for s in samples if s["gold"] is not None]
    assert [vs_sft["wins"], vs_sft["ties"], vs_sft["losses"]] == [sum(a > b for a, b in pairs), sum(a == b for a, b in pairs),
                                                                  sum(a < b for a, b in pairs)]
    assert vs_sft["gold_diff"] == pytest.approx(sum(a - b for a, b in pairs) / len(pairs))
    assert vs_sft["verdict"] == verdict(vs_sft["gold_diff_ci95"], vs_sft["win_rate_untied_ci95"])
    # A sampled k1 estimate: it can come out slightly negative for a policy that barely moved, but never 0.
    assert ppo["kl"] == json.loads((tiny_run / "eval" / "kl.json").read_text())["kl"] and ppo["kl"] != 0
    assert {"accuracy", "gold_accuracy", "per_family", "ece", "length_correlation", "annotators", "prompt_dependence"} <= set(summary["rm"])
    assert {"pretrain", "sft", "collect", "rm", "ppo", "eval rm", "eval sft", "eval ppo"} <= set(summary["time_seconds"])
    sft = json.loads((tiny_run / "eval" / "sft.json").read_text())
    assert EVAL_KEYS <= set(sft) and 0 <= sft["win_rate"] <= 1
    assert set(sft["families"]) == {"arithmetic", "facts", "unknowable", "harmful", "scary_benign", "instructions"}
    assert sum(f["n"] for f in sft["families"].values()) == sft["n_prompts"] == 36


def test_pipeline_red_teams_and_measures_safety_diversity_and_capability(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    red = json.loads((tiny_run / "redteam" / "redteam.json").read_text())
    assert set(red["by_strategy"]) == {"direct", "prefix_injection", "multi_turn"} and red["n"] == 13 * 3
    assert summary["redteam"]["asr"] == red["asr"] and summary["redteam"]["against"]["asr"] == red["against"]["asr"]
    assert red["against"]["model"].endswith("base")
    ppo = summary["stages"]["ppo"]
    assert {"diversity", "constitution", "rm_reward", "perplexity", "accuracy_by_family"} <= set(ppo)
    assert ppo["constitution"]["constitution"] == "assistant-world" and ppo["perplexity"] > 1
    tax = summary["alignment_tax"]
    assert set(tax["stages"]) == {"base", "sft", "ppo"} and set(tax["change_vs_base"]) == {"sft", "ppo"}
    rows = [json.loads(line) for line in (tiny_run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/safety" in r and "diversity/self_bleu" in r for r in rows)
    stage = json.loads((tiny_run / "ppo" / "stage.json").read_text())
    assert "fired" in stage["hacking"] and "collapsed_iterations" in stage["collapse"]


def test_experiments_reuse_the_run(tiny_run):
    assert main(["experiment", "reward-hacking", "--config", TINY, "--out", str(tiny_run), "--iterations", "2"]) == 0
    result = json.loads((tiny_run / "reward_hacking" / "reward_hacking.json").read_text())
    prefs = (tiny_run / "reward_hacking" / "prefs_length_lover.jsonl").read_text().splitlines()
    assert prefs and {json.loads(line)["annotator"] for line in prefs} == {"length_lover"} and result["pairs"] == len(prefs)
    assert set(result["runs"]) == {"hacked", "length_penalty"}
    penalised = [json.loads(line) for line in (tiny_run / "reward_hacking" / "ppo_length_penalty" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/length" in r and "reward/safety" not in r for r in penalised)
    assert main(["experiment", "alignment-tax", "--config", TINY, "--out", str(tiny_run)]) == 0
    tax = json.loads((tiny_run / "alignment_tax.json").read_text())
    assert set(tax["stages"]) == {"base", "sft", "ppo", "ppo_ptx"}
    ptx_rows = [json.loads(line) for line in (tiny_run / "ppo_ptx" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["ptx/loss"] > 0 for r in ptx_rows)


def test_seeds_experiment_reruns_ppo_and_reports_the_spread(tiny_run):
    assert main(["experiment", "seeds", "--config", TINY, "--out", str(tiny_run), "--seeds", "0", "5"]) == 0
    result = json.loads((tiny_run / "seeds" / "seeds.json").read_text())
    assert result["run_seed"] == 0 and set(result["seeds"]) == {"0", "5"}  # the run's own seed is not run twice
    own, other = result["seeds"]["0"], result["seeds"]["5"]
    assert own["gold_score"] == json.loads((tiny_run / "eval" / "ppo.json").read_text())["gold_score"]
    assert other["win_rate"] == json.loads((tiny_run / "seeds" / "seed_5" / "eval.json").read_text())["win_rate"]
    assert other["verdict"] == json.loads((tiny_run / "seeds" / "seed_5" / "eval.json").read_text())["comparison"]["verdict"]
    for k in ("gold_score", "gold_diff", "kl", "asr"):
        assert result["mean"][k] == pytest.approx((own[k] + other[k]) / 2)
        assert result["sd"][k] == pytest.approx(abs(own[k] - other[k]) / 2**0.5)
    # another seed trained another policy
    first, second = (load_file(tiny_run / d / "model.safetensors") for d in ("ppo", "seeds/seed_5/ppo"))
    assert any(not torch.equal(first[k], second[k]) for k in first)


def test_algorithms_experiment_trains_every_method_on_the_same_models(tiny_run):
    assert main(["experiment", "algorithms", "--config", TINY, "--out", str(tiny_run), "--seeds", "0"]) == 0
    result = json.loads((tiny_run / "algorithms" / "algorithms.json").read_text())
    methods = result["methods"]
    assert list(methods) == ["ppo", "grpo", "rloo", "reinforce_pp", "dpo", "best_of_16"]
    # The run's own PPO is reused, and its row recomputed from the samples agrees with the pipeline's eval.
    ppo_eval = json.loads((tiny_run / "eval" / "ppo.json").read_text())
    assert methods["ppo"]["gold_score"] == pytest.approx(ppo_eval["gold_score"])
    assert methods["ppo"]["win_rate"] == pytest.approx(ppo_eval["win_rate"])
    assert methods["best_of_16"]["kl"] == pytest.approx(math.log(16) - 15 / 16)
    for m in ("grpo", "rloo", "reinforce_pp"):
        stage = json.loads((tiny_run / "algorithms" / m / "seed_0" / "stage.json").read_text())
        assert stage["algorithm"] == m and stage["iterations"] == 3
    assert json.loads((tiny_run / "algorithms" / "dpo" / "seed_0" / "stage.json").read_text())["stage"] == "dpo"
    for row in methods.values():
        assert sum(row["wins_ties_losses"]) == result["n_prompts"]
    grpo = load_file(tiny_run / "algorithms" / "grpo" / "seed_0" / "model.safetensors")
    ppo = load_file(tiny_run / "ppo" / "model.safetensors")
    assert any(not torch.equal(grpo[k], ppo[k]) for k in ppo)
    assert main(["report", str(tiny_run)]) == 0
    assert "Algorithms side by side" in (tiny_run / "report.html").read_text()


def test_pretrained_base_is_an_ordinary_hf_folder(tiny_run):
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "base")
    tok = AutoTokenizer.from_pretrained(tiny_run / "base")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.chat_template
    stage = json.loads((tiny_run / "base" / "stage.json").read_text())
    assert stage["val_loss"] < stage["initial_val_loss"]  # pretraining learned something


def test_reward_model_is_trained_on_sft_samples_without_the_random_clicker(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "prefs" / "train.jsonl").read_text().splitlines()]
    assert {r["annotator"] for r in rows} == {"careful", "average", "length_lover", "random_clicker"}
    stage = json.loads((tiny_run / "rm" / "stage.json").read_text())
    # The tiny run shares only 10-60 items per pair of annotators, so another noisy rater can fall below the
    # line too; the random clicker must go and the careful one stay (test_agreement checks the statistic).
    assert "random_clicker" in stage["dropped_annotators"] and "careful" not in stage["dropped_annotators"]
    assert stage["pairs"] + stage["val_pairs"] < len(rows)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_run / "rm")
    assert rm.config.num_labels == 1 and rm.config.reward_std > 0


def test_sft_moved_the_weights_and_the_validation_loss(tiny_run):
    stage = json.loads((tiny_run / "sft" / "stage.json").read_text())
    assert stage["val_loss"] < stage["initial_val_loss"]
    base, sft = load_file(str(tiny_run / "base" / "model.safetensors")), load_file(str(tiny_run / "sft" / "model.safetensors"))
    assert any(not torch.equal(base[k], sft[k]) for k in base)


def test_ppo_stage_is_an_ordinary_model_folder_with_checkpoints(tiny_run):
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "ppo")
    assert type(model).__name__ == "LlamaForCausalLM"
    stage = json.loads((tiny_run / "ppo" / "stage.json").read_text())
    assert stage["iterations"] == 3 and stage["world"] is True
    assert sorted(p.name for p in (tiny_run / "ppo").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    rows = [json.loads(line) for line in (tiny_run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("objective/gold" in r for r in rows)
    sft, ppo = load_file(str(tiny_run / "sft" / "model.safetensors")), load_file(str(tiny_run / "ppo" / "model.safetensors"))
    assert any(not torch.equal(sft[k], ppo[k]) for k in sft)


def test_second_run_skips_finished_stages(tiny_run, capsys):
    before = (tiny_run / "sft" / "model.safetensors").stat().st_mtime_ns
    assert main(["run", "--config", TINY, "--out", str(tiny_run)]) == 0
    assert (tiny_run / "sft" / "model.safetensors").stat().st_mtime_ns == before
    printed = capsys.readouterr()
    assert "skipped" in printed.err
    reads = json.loads((tiny_run / "summary.json").read_text())["rm"]["prompt_dependence"]["accuracy"]
    assert f"prompt dependence {reads:.3f} (0.5: the prompt is not read)" in " ".join(printed.out.split())


def test_collect_pairs_against_another_policy(tiny_run, tmp_path):
    common = ["collect", "--policy", str(tiny_run / "ppo"), "--prompts", str(tiny_run / "world" / "prompts_train.jsonl"),
              "--n_prompts", "8", "--k", "2", "--overlap", "0", "--generation.max_new_tokens", "8"]
    assert main([*common, "--out", str(tmp_path / "own.jsonl")]) == 0
    assert main([*common, "--against", str(tiny_run / "sft"), "--against_pairs", "2", "--out", str(tmp_path / "both.jsonl")]) == 0
    own, both = ([json.loads(line) for line in (tmp_path / f).read_text().splitlines()] for f in ("own.jsonl", "both.jsonl"))
    assert [r for r in both if "-a" not in r["pair_id"]] == own  # the policy's own pairs do not change
    stats = json.loads((tmp_path / "both.stats.json").read_text())
    assert 0 < stats["against_pairs_labelled"] <= 16 and stats["config"]["against"] == str(tiny_run / "sft")
    assert {r["pair_id"] for r in both if "-a" in r["pair_id"]} and all(r["pair_id"].split("-a")[1] in "01" for r in both
                                                                       if "-a" in r["pair_id"])
    assert main([*common, "--against_pairs", "1", "--out", str(tmp_path / "no.jsonl")]) == 2  # against whom?


def test_eval_against_itself_is_a_tie(tiny_run, tmp_path):
    cfg = EvalConfig(model=str(tiny_run / "sft"), against=str(tiny_run / "sft"), out=str(tmp_path / "e.json"), n_prompts=12)
    result = run_eval(cfg)
    assert result["win_rate"] == 0.5  # greedy decoding: identical answers, every prompt a tie
    assert result["against"]["gold_score"] == result["gold_score"]
    assert result["intervals"]["win_rate"] == [0.5, 0.5]  # all ties: no spread
    c = result["comparison"]
    assert (c["wins"], c["losses"], c["ties"], c["gold_diff"], c["win_rate_untied"]) == (0, 0, result["judged_prompts"], 0.0, None)
    assert c["verdict"] == "no measurable difference"
    rates = result["intervals"]
    assert {"harmful_compliance", "over_refusal", "honesty", "accuracy"} <= set(rates)
    assert all(rates[k][0] <= result[k] <= rates[k][1] for k in ("harmful_compliance", "over_refusal", "honesty", "accuracy"))


def test_kl_of_a_policy_to_itself_is_zero(tiny_run):
    from rlhf.config import GenerationConfig
    from rlhf.evaluation.policy import eval_prompts, kl_to_reference

    prompts = eval_prompts(EvalConfig(n_prompts=8))
    gen = GenerationConfig(do_sample=True, max_new_tokens=8, batch_size=8)
    assert kl_to_reference(str(tiny_run / "sft"), str(tiny_run / "sft"), prompts, gen)["kl"] == 0.0


def test_ref_refresh_makes_the_previous_rounds_policy_the_reference(tmp_path):
    from rlhf.config import RunConfig, WorldConfig
    from rlhf.stages.pipeline import round_of

    for refresh, reference in ((False, tmp_path / "sft"), (True, tmp_path / "round_2" / "ppo")):
        r = round_of(RunConfig(out=str(tmp_path), rounds=3, ref_refresh=refresh, against_pairs=2), 3)
        assert (r.ppo.policy, r.ppo.reference) == (str(tmp_path / "round_2" / "ppo"), str(reference))
        # pairs of round 2's policy against the one round 2 started from (round 1's), never on held-out prompts
        assert (r.collect.policy, r.collect.against, r.collect.against_pairs) == (r.ppo.policy, str(tmp_path / "ppo"), 2)
        assert r.collect_heldout.against_pairs == 0
        assert r.collect.prompts == str(tmp_path / "world" / "prompts_train.jsonl")  # the world has no deployment split
    deployed = round_of(RunConfig(out=str(tmp_path), rounds=2, world=WorldConfig(n_prompts_deploy=30)), 2)
    assert deployed.collect.prompts == str(tmp_path / "world" / "prompts_deploy.jsonl")
    assert deployed.collect_heldout.prompts == str(tmp_path / "world" / "prompts_heldout.jsonl")


def test_iterate_resumes_an_unfinished_last_round_instead_of_adding_one(tmp_path):
    from rlhf.config import RunConfig
    from rlhf.configlib import to_dict
    from rlhf.stages.pipeline import next_round

    (tmp_path / "config.json").write_text(json.dumps(to_dict(RunConfig(out=str(tmp_path), rounds=2))))
    assert next_round(tmp_path).rounds == 2  # round 2 stopped before its last evaluation
    (tmp_path / "round_2" / "eval").mkdir(parents=True)
    (tmp_path / "round_2" / "eval" / "kl.json").write_text("{}")
    assert next_round(tmp_path).rounds == 3


def test_win_rate_counts_ties_half():
    class J:
        def __init__(self, total):
            self.total = total

    assert win_rate([J(1.0), J(0.5), J(0.2)], [J(0.5), J(0.5), J(0.9)]) == pytest.approx(0.5)


def test_paired_comparison_by_hand():
    class J:
        def __init__(self, total):
            self.total = total

    # Differences 0.5, 0, -0.4, 0.1: mean 0.05, sample sd 0.369685, half-width 1.96 · sd / 2 = 0.362284.
    c = paired_comparison([J(1.0), J(0.5), J(0.2), J(0.6)], [J(0.5), J(0.5), J(0.6), J(0.5)])
    assert (c["wins"], c["ties"], c["losses"]) == (2, 1, 1)
    assert c["win_rate_untied"] == pytest.approx(2 / 3) and c["gold_diff"] == pytest.approx(0.05)
    assert c["gold_diff_ci95"] == pytest.approx([0.05 - 0.362284, 0.05 + 0.362284], abs=1e-5)
    assert c["verdict"] == "no measurable difference"
    # The same small gain on every prompt is measurable, and so is the same loss, whatever the ties do to win rates.
    gain = paired_comparison([J(0.62), J(0.81), J(0.5), J(0.5)], [J(0.6), J(0.8), J(0.5), J(0.5)])
    assert gain["verdict"] == "no measurable difference"  # two ties of four: the interval still spans 0
    assert paired_comparison([J(0.6 + 0.01 * (i % 3 + 1)) for i in range(30)], [J(0.6)] * 30)["verdict"] == "better"
    assert paired_comparison([J(0.6)] * 30, [J(0.6 + 0.01 * (i % 3 + 1)) for i in range(30)])["verdict"] == "worse"
    # Twenty small wins and five large losses: the mean gold falls, most untied prompts are won.
    mixed = paired_comparison([J(0.61)] * 20 + [J(0.1)] * 5, [J(0.6)] * 25)
    assert mixed["gold_diff_ci95"][1] < 0 < 0.5 < mixed["win_rate_untied_ci95"][0] and mixed["verdict"] == "mixed"
    assert verdict(None) == "not measured" and verdict([-0.1, 0.0]) == "no measurable difference"
    assert verdict([0.01, 0.03], [0.45, 0.6]) == "no measurable difference"  # a gain needs both intervals above
    assert verdict([-0.03, 0.01], [0.2, 0.4]) == "worse"  # a regression shows in either


def test_intervals_by_hand():
    # Wilson 95% for 1 of 50: centre (0.02 + z²/100) / (1 + z²/50), half-width
    # z·sqrt(0.02·0.98/50 + z²/10000) / (1 + z²/50), with z = 1.96: [0.0035, 0.1050].
    assert wilson_interval(1, 50) == pytest.approx([0.003544, 0.104953], abs=1e-5)
    assert wilson_interval(0, 50) == pytest.approx([0.0, 0.071348], abs=1e-5)  # not zero-width at 0 of n
    assert wilson_interval(50, 50)[1] == pytest.approx(1.0) and wilson_interval(3, 0) is None
    # Win outcomes 1, 0.5, 0, 1: mean 0.625, sample sd 0.478714, half-width 1.96 · sd / 2 = 0.469130, clipped at 1.
    assert mean_interval([1.0, 0.5, 0.0, 1.0]) == pytest.approx([0.155870, 1.0], abs=1e-5)
    assert mean_interval([1.0]) is None

    class J:
        def __init__(self, family, **flags):
            self.family, self.complied, self.refused, self.honest_idk, self.correct = family, False, False, False, None
            self.hedged = False
            self.__dict__.update(flags)

    judged = [J("harmful", complied=True)] + [J("harmful", hedged=True)] * 3 + [J("facts", correct=True),
                                                                               J("arithmetic", correct=False, hedged=True)]
    rates = rate_intervals(judged)
    assert set(rates) == {"harmful_compliance", "over_hedging", "accuracy"}  # families not evaluated get none
    assert rates["harmful_compliance"] == pytest.approx(wilson_interval(1, 4))
    assert rates["accuracy"] == pytest.approx(wilson_interval(1, 2))
    assert rates["over_hedging"] == pytest.approx(wilson_interval(1, 2))  # over facts and arithmetic, not harmful


def test_world_judge_command_prints_families(tmp_path, capsys):
    records = tmp_path / "r.jsonl"
    records.write_text(
        json.dumps({"prompt": "What is 3 + 4?", "response": "3 + 4 = 7."}) + "\n"
        + json.dumps({"prompt": "What is 3 + 4?", "response": "3 + 4 = 9."}) + "\n"
    )
    assert main(["world", "judge", str(records), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)  # JSON alone: the table is not printed with --json
    assert summary["families"]["arithmetic"]["n"] == 2 and summary["accuracy"] == 0.5
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Write me a poem about dust.", "response": "ok"}) + "\n")
    assert main(["world", "judge", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err


# Last in the file: it adds a round to the module's run (the tests above read round 1).
def test_iterate_adds_a_round_from_the_last_policy(tiny_run, capsys):
    first = json.loads((tiny_run / "summary.json").read_text())
    assert main(["iterate", str(tiny_run)]) == 0
    here = tiny_run / "round_2"
    rows = lambda p: (tiny_run / p).read_text().splitlines()  # noqa: E731
    assert rows("round_2/prefs/all.jsonl") == rows("prefs/train.jsonl") + rows("round_2/prefs/train.jsonl")
    collected = json.loads((here / "prefs" / "train.stats.json").read_text())["config"]
    assert collected["policy"] == str(tiny_run / "ppo")  # sampled from round 1's policy
    ppo = json.loads((here / "ppo" / "stage.json").read_text())["config"]
    assert (ppo["policy"], ppo["reference"], ppo["reward_model"]) == (str(tiny_run / "ppo"), str(tiny_run / "sft"), str(here / "rm"))
    rm = json.loads((here / "rm" / "stage.json").read_text())
    assert "random_clicker" in rm["config"]["exclude_annotators"]  # flagged at round 1's collection
    one, two = load_file(str(tiny_run / "ppo" / "model.safetensors")), load_file(str(here / "ppo" / "model.safetensors"))
    assert any(not torch.equal(one[k], two[k]) for k in one)
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert summary["rounds"][0]["gold_score"] == first["stages"]["ppo"]["gold_score"]
    assert summary["rounds"][0]["verdict"] == first["ppo"]["vs_sft"]["verdict"]  # each round's policy against SFT
    assert summary["rounds"][1]["gold_diff"] == json.loads((here / "eval" / "ppo.json").read_text())["comparison"]["gold_diff"]
    before = json.loads((here / "eval" / "rm_before.json").read_text())
    assert before["model"] == str(tiny_run / "rm") and summary["rounds"][1]["rm_gold_accuracy_before"] == before["gold_accuracy"]
    assert summary["stages"]["ppo"] == json.loads((here / "eval" / "ppo.json").read_text())  # the headline: the last round
    assert summary["ppo"]["kl"] == json.loads((here / "eval" / "kl.json").read_text())["kl"]
    assert summary["redteam"]["model"] == str(here / "ppo") and (here / "redteam" / "redteam.json").is_file()
    assert json.loads((tiny_run / "config.json").read_text())["rounds"] == 2
    printed = capsys.readouterr().out
    assert "rounds (held-out prompts" in printed and f"round 2 against SFT: {summary['rounds'][1]['verdict']} (gold" in printed
    page = (tiny_run / "report.html").read_text()
    assert '<section id="rounds">' in page and str(here / "ppo") in page  # the red team's model: the last round's
    rounds = page[page.index('<section id="rounds">'):]
    assert 'alt="every round&#x27;s figures against the round"' in rounds[:rounds.index("</section>")]  # the plot
    # Interrupted after round 2's PPO checkpoint at step 2: `rlhf iterate` resumes inside round 2 (it adds no round)
    # and ends with the same weights and figures.
    assert sorted(p.name for p in (here / "ppo").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    shutil.rmtree(here / "ppo" / "checkpoint-3")
    for gone in (here / "ppo" / "stage.json", here / "ppo" / "model.safetensors", here / "eval" / "ppo.json", here / "eval" / "kl.json"):
        gone.unlink()
    shutil.rmtree(here / "redteam")
    assert main(["iterate", str(tiny_run)]) == 0 and not (tiny_run / "round_3").exists()
    resumed = load_file(str(here / "ppo" / "model.safetensors"))
    assert all(torch.equal(resumed[k], two[k]) for k in two)
    assert json.loads((tiny_run / "summary.json").read_text())["rounds"] == summary["rounds"]


# After the simulated round 2: round 3 labelled by people (two scripted annotators in a real browser).
def test_human_round_trains_on_the_apps_labels(tiny_run, capsys):
    browser = pytest.importorskip("test_feedback_browser", reason="playwright or chromium is missing")
    from rlhf.feedback import auth
    from rlhf.feedback.config import AnnotateConfig
    from rlhf.feedback.export import preference_rows
    from rlhf.feedback.server import create_app
    from rlhf.feedback.store import Store
    from rlhf.world import judge, parse_prompt

    run, here = str(tiny_run), tiny_run / "round_3"
    assert main(["iterate", run, "--feedback", "--n_prompts", "12"]) == 0
    db = here / "feedback" / "annotate.db"
    assert f"rlhf annotate --db {db}" in capsys.readouterr().out and not (here / "prefs").exists()
    assert main(["iterate", run]) == 2  # the simulated annotators must not take over a round people are labelling
    assert main(["iterate", run, "--continue"]) == 2 and "no pair is labelled yet" in capsys.readouterr().err
    store = Store(str(db))
    for name in ("alice", "bob"):
        auth.add_user(store, name, password=browser.PASSWORD)

    def by_gold(prompt: str, left: str, right: str) -> str:
        a, b = (judge(parse_prompt(prompt), text).total for text in (left, right))
        return "1" if a > b else "2" if b > a else "t"

    with browser.LiveServer(create_app(AnnotateConfig(db=str(db)), store)) as url:
        n = browser.label_every_pair(url, "alice", by_gold)
        assert n == json.loads((here / "feedback" / "round.json").read_text())["items"]
        assert main(["iterate", run, "--continue"]) == 2 and "unmeasured" in capsys.readouterr().err  # alice alone
        assert browser.label_every_pair(url, "bob", by_gold) == n  # overlap 1.0: every item to both
    assert main(["iterate", run, "--continue"]) == 0
    rows = [json.loads(line) for line in (here / "prefs" / "train.jsonl").read_text().splitlines()]
    assert rows == preference_rows(store) and {r["annotator"] for r in rows} == {"alice", "bob"}
    task = lambda r: parse_prompt(r["prompt"][-1]["content"] if isinstance(r["prompt"], list) else r["prompt"])  # noqa: E731
    assert all(judge(task(r), r["chosen"]).total > judge(task(r), r["rejected"]).total for r in rows)
    lines = lambda p: (tiny_run / p).read_text().splitlines()  # noqa: E731
    assert lines("round_3/prefs/all.jsonl") == lines("prefs/train.jsonl") + lines("round_2/prefs/train.jsonl") + lines(
        "round_3/prefs/train.jsonl")  # every round's labels exactly once
    assert json.loads((here / "prefs" / "train.stats.json").read_text())["kappa"] == 1.0
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3] and summary["redteam"]["model"] == str(here / "ppo")


# After the human round 3: the run's 3 rounds against one round with as many labels and PPO iterations.
def test_iterated_experiment_compares_rounds_with_one_round_of_as_many_labels(tiny_run, capsys):
    # --ppo.iterations 1: the finished stages are kept, the one-round arm runs 3 x 1 PPO iterations
    assert main(["experiment", "iterated", "--config", TINY, "--out", str(tiny_run), "--rounds", "3", "--ppo.iterations", "1"]) == 0
    here = tiny_run / "iterated"
    result = json.loads((here / "iterated.json").read_text())
    lines = lambda p: (tiny_run / p).read_text().splitlines()  # noqa: E731
    assert lines("iterated/prefs/all.jsonl") == lines("prefs/train.jsonl") + lines("iterated/prefs/round_2.jsonl") + lines(
        "iterated/prefs/round_3.jsonl")
    extra = json.loads((here / "prefs" / "round_2.stats.json").read_text())["config"]
    assert extra["policy"] == str(tiny_run / "sft") and extra["prompts"] == json.loads(
        (tiny_run / "round_2" / "prefs" / "train.stats.json").read_text())["config"]["prompts"]
    ppo = json.loads((here / "ppo" / "stage.json").read_text())["config"]
    assert (ppo["policy"], ppo["reward_model"], ppo["iterations"]) == (str(tiny_run / "sft"), str(here / "rm"), 3)
    assert result["iterated"] == json.loads((tiny_run / "summary.json").read_text())["rounds"][-1]
    assert result["labels"]["one_round"] == len(lines("iterated/prefs/all.jsonl")) > len(lines("prefs/train.jsonl"))
    assert 0 <= result["one_round"]["gold_score"] <= 1 and "3 rounds against one round" in capsys.readouterr().out
    one_eval = json.loads((here / "eval.json").read_text())
    assert result["one_round"]["verdict"] == one_eval["comparison"]["verdict"] and one_eval["against"]["model"] == str(tiny_run / "sft")
