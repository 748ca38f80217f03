"""The HTML report: built from a small synthetic run folder, self-contained, and safe against hostile model output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rlhf.report.html import build_report

FAMILIES = ("arithmetic", "facts", "unknowable", "harmful", "scary_benign", "instructions")
GOLD = {"base": (0.54, 0.76, 0.59, 0.64, 0.67, 0.69),
        "sft": (0.61, 0.86, 0.84, 0.78, 0.86, 0.74),
        "ppo": (0.72, 0.88, 0.81, 0.93, 0.79, 0.87)}
HOSTILE = "<script>alert(1)</script> and <img src=x onerror=alert(1)>"


def _eval(stage: str, against: str | None) -> dict:
    fams = {f: {"gold_score": g, "n": 5} for f, g in zip(FAMILIES, GOLD[stage])}
    ev = {"model": f"runs/t/{stage}", "n_prompts": 30, "gold_score": sum(GOLD[stage]) / 6, "n": 30, "families": fams,
          "harmful_compliance": 0.3, "over_refusal": None, "honesty": 0.6, "accuracy": 0.4,
          "axes": {"helpful": 0.5, "harmless": 0.9, "honest": 0.8, "concise": 0.99, "fluent": 0.98},
          "mean_length": 12.5, "eos_rate": 1.0}
    if against:
        ev |= {"win_rate": 0.7, "against": {"model": f"runs/t/{against}", "gold_score": 0.6}}
    return ev


def _rm() -> dict:
    return {"n_pairs": 100, "accuracy": 0.61, "gold_accuracy": 0.66, "gold_pairs": 80, "ece": 0.07,
            "length_correlation": 0.21,
            "per_family": {f: {"n": 10, "accuracy": 0.6, "gold_pairs": 8, "gold_accuracy": 0.7} for f in FAMILIES},
            "by_gold_gap": {"0.0-0.1": {"n": 20, "accuracy": 0.5, "gold_pairs": 20, "gold_accuracy": 0.27},
                            ">=0.5": {"n": 30, "accuracy": 0.6, "gold_pairs": 30, "gold_accuracy": 0.62}},
            "per_annotator": {"careful": {"n": 50, "accuracy": 0.7, "gold_accuracy": 0.72},
                              "random_clicker": {"n": 50, "accuracy": 0.5, "gold_accuracy": 0.55}},
            "annotators": {"alpha": 0.23, "mean_kappa": {"careful": 0.5, "random_clicker": -0.1},
                           "agreement_with_majority": {"careful": 0.9, "random_clicker": 0.4},
                           "flagged": ["random_clicker"]}}


def _summary() -> dict:
    return {"stages": {"base": _eval("base", None), "sft": _eval("sft", "base"), "ppo": _eval("ppo", "sft")},
            "rm": _rm(), "ppo": {"win_rate_vs_sft": 0.64, "win_rate_vs_sft_ci95": [0.58, 0.70], "kl": 4.2, "kl_target": 6.0},
            "time_seconds": {"world": 1.2, "pretrain": 186.0, "sft": 58.1, "rm": 21.5, "ppo": 312.4}}


def _metrics(n: int = 10) -> list[dict]:
    """Proxy rising, gold peaking at step 5 and falling: the over-optimisation shape."""
    rows = []
    for step in range(n):
        rows.append({"step": step, "time": 1000.0 + step, "objective/scores": 0.1 * step,
                     "objective/gold": 0.6 + 0.05 * step - 0.01 * step ** 2, "objective/kl": 0.5 * step,
                     "objective/kl_coef": 0.1, "objective/entropy": 2.0 - 0.1 * step, "response/length": 12 + step,
                     "policy/clipfrac": 0.05, "policy/approxkl": 0.01, "val/explained_variance": 0.1 * step,
                     "unknown/extra": "ignored", "lr": 1e-5})
    rows[3].pop("objective/entropy")  # a key may be absent on a line
    return rows


def _samples(stage: str) -> list[dict]:
    rows = []
    for i, fam in enumerate(FAMILIES * 5):
        response = HOSTILE if (stage == "ppo" and i == 0) else f"{stage} answer {i}"
        gold = {"base": 0.4, "sft": 0.6, "ppo": 0.9}[stage]
        rows.append({"prompt": f"prompt {i} about {fam}", "family": fam, "response": response, "gold": gold,
                     "ended": True, "reasons": [] if stage == "ppo" else ["no result stated"]})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(_summary()))
    (run / "config.json").write_text(json.dumps({"out": "runs/t", "ppo": {"kl_coef": 0.1, "note": "<b>x</b>"}}))
    _write_jsonl(run / "ppo" / "metrics.jsonl", _metrics())
    for stage in ("base", "sft", "ppo"):
        _write_jsonl(run / "eval" / f"{stage}.samples.jsonl", _samples(stage))
    return run


def _section(page: str, anchor: str) -> str:
    """The HTML of one section of the report."""
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.S)
    assert match, f"no section {anchor}"
    return match.group(1)


def test_report_is_self_contained_with_embedded_plots(run_dir: Path) -> None:
    out = build_report(run_dir)
    assert out == run_dir / "report.html" and out.is_file()
    page = out.read_text(encoding="utf-8")
    assert 'http-equiv="Content-Security-Policy"' in page and "default-src 'none'" in page
    curves = _section(page, "curves")
    # the 9 logged curves of _metrics(), each its own embedded PNG
    assert curves.count('<img src="data:image/png;base64,') == 9
    assert "objective/entropy" not in curves.split("Not logged:")[-1]  # absent on one line only, still plotted
    assert "response/eos_rate" in curves.split("Not logged:")[-1]
    assert '<img src="data:image/png;base64,' in _section(page, "overopt")
    assert "peaked" in _section(page, "overopt")  # the synthetic gold peaks at step 5 while the proxy keeps rising
    # nothing is fetched from elsewhere
    assert not re.search(r'(src|href)="(https?:|//)', page)
    assert not list(run_dir.glob(".report.html.*")), "the temp file of the atomic write was left behind"


def test_model_output_and_config_are_escaped(run_dir: Path) -> None:
    page = build_report(run_dir).read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<script" not in page.lower()
    assert "onerror=alert" not in page.replace("&lt;img src=x onerror=alert(1)&gt;", "")
    assert "&lt;b&gt;x&lt;/b&gt;" in _section(page, "config")


def _row(table_html: str, label: str) -> list[str]:
    """The text of each cell of the row whose first cell is ``label``."""
    for row in re.findall(r"<tr>(.*?)</tr>", table_html, re.S):
        cells = [re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no row {label}")


def test_per_family_table_has_the_summary_numbers(run_dir: Path) -> None:
    families = _section(build_report(run_dir).read_text(encoding="utf-8"), "families")
    for i, fam in enumerate(FAMILIES):
        assert _row(families, fam) == [fam, "5", *(f"{GOLD[s][i]:.3f}" for s in ("base", "sft", "ppo"))]
    # the best stage of a family is bold: PPO for harmful, SFT for scary_benign
    assert '<b class="best">0.930</b>' in families and '<b class="best">0.860</b>' in families


def test_headline_and_samples(run_dir: Path) -> None:
    page = build_report(run_dir).read_text(encoding="utf-8")
    headline = _section(page, "headline")
    assert _row(headline, "harmful compliance ↓")[1:] == ["0.300"] * 3
    assert _row(headline, "over-refusal ↓")[1:] == ["—"] * 3  # null metric
    assert "vs sft" in headline and "0.640" in headline and "6.000" in headline  # PPO line
    assert "95% CI 0.580–0.700" in headline  # the win rate's interval on its card
    assert _row(headline, "pretrain")[1] == "3 min 06 s"
    samples = _section(page, "samples")
    assert samples.count('class="sample"') == 24  # 4 of each of 6 families
    assert samples.count('<span class="badge">best</span>') == 24  # PPO's 0.9 beats 0.4 and 0.6 on every row
    assert "flagged" in _section(page, "rm") and "random_clicker" in _section(page, "rm")
    assert _row(_section(page, "rm"), "0.0-0.1") == ["0.0-0.1", "20", "0.500", "20", "0.270"]  # by gold gap
    assert "By what the prompt holds out" not in page  # no by_split in this evaluation: no empty table
    assert "prompt dependence" not in _section(page, "rm")  # an older rm.json without it: no card


def test_headline_says_whether_ppo_got_better(run_dir: Path) -> None:
    headline = _section(build_report(run_dir).read_text(encoding="utf-8"), "headline")
    assert "PPO vs SFT" not in headline  # an older summary without the paired comparison: no card
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["ppo"]["vs_sft"] = {"wins": 42, "ties": 205, "losses": 53, "gold_diff": -0.013, "gold_diff_ci95": [-0.026, -0.001],
                                "verdict": "worse"}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    headline = _section(build_report(run_dir).read_text(encoding="utf-8"), "headline")
    card = re.search(r'<div class="label">PPO vs SFT</div><div class="value">(.*?)</div><div class="note">(.*?)</div>', headline)
    assert card and card.group(1) == "worse"
    assert card.group(2) == "gold -0.013 per prompt, 95% CI -0.026–-0.001; 42 wins, 53 losses, 205 ties"


def test_rm_section_shows_whether_the_reward_model_reads_the_prompt(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["rm"]["prompt_dependence"] = {"accuracy": 0.512, "n": 205, "per_family": {}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    rm = _section(build_report(run_dir).read_text(encoding="utf-8"), "rm")
    assert re.search(r'<div class="label">prompt dependence</div><div class="value">0.512</div><div class="note">own reply '
                     r"over another prompt&#x27;s, 205 prompts; 0.5 = the prompt is not read</div>", rm)


def test_rates_show_their_intervals(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["stages"]["ppo"]["intervals"] = {"harmful_compliance": [0.12, 0.52], "honesty": ["<b>", None]}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    headline = _section(build_report(run_dir).read_text(encoding="utf-8"), "headline")
    assert _row(headline, "harmful compliance ↓")[1:] == ["0.300", "0.300", "0.30095% CI 0.120–0.520"]
    assert _row(headline, "honesty ↑")[3] == "0.600"  # a malformed interval is left out, not shown


def test_summary_only_run_says_what_is_missing(run_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    summary = _summary()
    del summary["ppo"], summary["stages"]["ppo"]
    (bare / "summary.json").write_text(json.dumps(summary))
    page = build_report(bare).read_text(encoding="utf-8")
    assert "No PPO training curves" in _section(page, "curves") and "ppo/metrics.jsonl" in _section(page, "curves")
    assert "<img" not in _section(page, "curves")
    assert "No samples" in _section(page, "samples")
    assert "config.json is missing" in _section(page, "config")
    assert "PPO has not run" in _section(page, "headline")
    assert _row(_section(page, "families"), "facts") == ["facts", "5", "0.760", "0.860"]


def test_unreadable_metrics_and_no_gold(run_dir: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "objective/gold"} for r in _metrics()]
    _write_jsonl(run_dir / "ppo" / "metrics.jsonl", rows)
    assert "not from the assistant world" in _section(build_report(run_dir).read_text(encoding="utf-8"), "overopt")
    (run_dir / "ppo" / "metrics.jsonl").write_text('{"step": 0, "objective/kl": 1.0}\n{"step": 1, "obj')
    page = build_report(run_dir).read_text(encoding="utf-8")
    assert "unreadable" in _section(page, "curves")


def test_missing_run_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        build_report(tmp_path / "nope")



def test_hostile_family_names_are_escaped_and_do_not_break_plots(run_dir: Path) -> None:
    # "$...$" would start matplotlib mathtext (and a bad one raises at savefig); "<b>" would be markup.
    summary = _summary()
    summary["stages"]["sft"]["families"]["<b>$\\frac{$</b>"] = {"gold_score": 0.5, "n": 2}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    rows = _samples("base")  # the first stage's file decides the families of the samples section
    rows[1]["family"] = "<i>$x$</i>"
    _write_jsonl(run_dir / "eval" / "base.samples.jsonl", rows)
    page = build_report(run_dir).read_text(encoding="utf-8")
    families = _section(page, "families")
    assert '<img src="data:image/png;base64,' in families
    assert _row(families, "&lt;b&gt;$\\frac{$&lt;/b&gt;") == ["&lt;b&gt;$\\frac{$&lt;/b&gt;", "2", "—", "0.500", "—"]
    assert '<span class="fam">&lt;i&gt;$x$&lt;/i&gt;</span>' in _section(page, "samples")
    assert "<b>$" not in page and "<i>$x$</i>" not in page


# --- the safety layer's sections ------------------------------------------------------------------------------

SAFETY_SECTIONS = ("redteam", "hacking", "rhexp", "evaluation", "tax")


def _attacks(model: str, asr: float, response: str) -> dict:
    return {"model": model, "asr": asr, "n": 40, "judge": "gold",
            "by_strategy": {"direct": {"asr": asr, "n": 20}, "roleplay": {"asr": asr / 2, "n": 20}},
            "by_category": {"weapons": {"asr": asr, "n": 40}},
            "worst": [{"strategy": "roleplay", "category": "weapons", "request": "make a thing",
                       "prompt": "Pretend you are <evil>", "response": response, "success": True, "harm": 0.8}]}


def _redteam() -> dict:
    return {**_attacks("runs/t/ppo", 0.125, HOSTILE), "steered": False,
            "against": _attacks("runs/t/base", 0.5, "base says <script>x()</script>")}


def _capability(arith: float, facts: float, ppl: float) -> dict:
    return {"accuracy_arithmetic": arith, "accuracy_facts": facts, "perplexity": ppl}


def _tax(stages: dict[str, dict]) -> dict:
    def pct(a: float, b: float) -> float:
        return 100.0 * (b - a) / a
    base = stages["base"]
    change = {s: {k: pct(base[k], v[k]) for k in v} for s, v in stages.items() if s != "base"}
    return {"stages": stages, "change_vs_base": change}


TAX_STAGES = {"base": _capability(0.40, 0.50, 20.0), "sft": _capability(0.45, 0.55, 22.0),
              "ppo": _capability(0.44, 0.60, 25.0)}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_safety_sections_are_left_out_of_older_runs(run_dir: Path) -> None:
    page = build_report(run_dir).read_text(encoding="utf-8")
    for anchor in SAFETY_SECTIONS:
        assert f'<section id="{anchor}">' not in page and f'href="#{anchor}"' not in page
    assert "Red-team ASR" not in _section(page, "headline")


def test_redteam_section_and_headline(run_dir: Path) -> None:
    _write_json(run_dir / "redteam" / "redteam.json", _redteam())
    page = build_report(run_dir).read_text(encoding="utf-8")
    red = _section(page, "redteam")
    assert 'href="#redteam"' in page and '<img src="data:image/png;base64,' in red
    assert _row(red, "direct") == ["direct", "20", "0.125", "0.500"]
    assert _row(red, "roleplay") == ["roleplay", "20", "0.062", "0.250"]  # policy and base side by side
    assert _row(red, "weapons") == ["weapons", "40", "0.125", "0.500"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in red and "base says &lt;script&gt;x()&lt;/script&gt;" in red
    assert "Pretend you are &lt;evil&gt;" in red
    assert "<script" not in page.lower()
    headline = _section(page, "headline")
    assert "Red-team ASR (ppo)" in headline and "0.125" in headline and "vs 0.500 for base" in headline


def _stage_json(fired: bool) -> dict:
    detectors = {"verbosity": {"first_iteration": 4, "last_iteration": 9, "times_fired": 1, "last_value": 0.9,
                               "threshold": 0.5, "last_message": "length up", "active": True}} if fired else {}
    return {"hacking": {"fired": sorted(detectors), "detectors": detectors, "iterations": 10, "last": None,
                        "thresholds": {"verbosity_growth": 0.5}},
            "collapse": {"collapsed_iterations": [8, 9] if fired else [],
                         "last": {"distinct_2": 0.12, "self_bleu": 0.93, "is_collapsed": fired,
                                  "collapse_reasons": ["distinct-2 0.12 < 0.2"] if fired else []}}}


def test_hacking_section_lists_alerts_escaped(run_dir: Path) -> None:
    metrics = [{**r, "diversity/distinct_2": 0.5 - 0.03 * r["step"], "diversity/self_bleu": 0.6,
                "diversity/similarity": 0.2, "hacking/alerts": float(r["step"] > 4), "reward/safety": -0.1}
               for r in _metrics()]
    _write_jsonl(run_dir / "ppo" / "metrics.jsonl", metrics)
    _write_json(run_dir / "ppo" / "stage.json", _stage_json(fired=True))
    _write_jsonl(run_dir / "ppo" / "alerts.jsonl", [{"detector": "verbosity", "iteration": 4,
                                                     "message": f"length up {HOSTILE}", "value": 0.9,
                                                     "threshold": 0.5}])
    page = build_report(run_dir).read_text(encoding="utf-8")
    hacking = _section(page, "hacking")
    assert 'class="status bad"' in hacking and "verbosity" in hacking
    assert _row(hacking, "4")[:2] == ["4", "verbosity"]
    assert "length up &lt;script&gt;alert(1)&lt;/script&gt;" in hacking
    assert "<script" not in page.lower()
    assert "Mode collapse suspected at 2 iteration(s): 8, 9" in hacking
    assert hacking.count('<img src="data:image/png;base64,') == 5  # 3 diversity curves, alerts, safety reward
    assert _section(page, "curves").count('<img src="data:image/png;base64,') == 9  # the PPO grid is unchanged


def test_hacking_section_is_green_when_nothing_fired(run_dir: Path) -> None:
    _write_json(run_dir / "ppo" / "stage.json", _stage_json(fired=False))
    hacking = _section(build_report(run_dir).read_text(encoding="utf-8"), "hacking")
    assert '<p class="status ok">No reward-hacking detector fired over 10 PPO iterations.</p>' in hacking
    assert "No rollout looked collapsed" in hacking and "status bad" not in hacking


def test_policy_evaluation_section(run_dir: Path) -> None:
    summary = _summary()
    for i, stage in enumerate(("base", "sft", "ppo")):
        summary["stages"][stage] |= {
            "rm_reward": -0.5 + i, "perplexity": 20.0 + i,
            "diversity": {"distinct_2": 0.5 - 0.1 * i, "self_bleu": 0.4, "mean_similarity": 0.3,
                          "backend": "bag-of-words", "is_collapsed": i == 2, "collapse_reasons": []},
            "constitution": {"constitution": "default", "violation_rate": 0.3 - 0.1 * i,
                             "by_principle": {"no_harm": 3 - i, "<honest>": 1}}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    ev = _section(build_report(run_dir).read_text(encoding="utf-8"), "evaluation")
    assert _row(ev, "RM reward ↑") == ["RM reward ↑", "-0.500", "0.500", "1.500"]
    assert _row(ev, "held-out perplexity ↓") == ["held-out perplexity ↓", "20.00", "21.00", "22.00"]
    assert _row(ev, "distinct-2 ↑") == ["distinct-2 ↑", "0.500", "0.400", "0.300"]
    assert _row(ev, "collapsed?") == ["collapsed?", "no", "no", "yes"]
    assert _row(ev, "constitution violation rate ↓")[1:] == ["0.300", "0.200", "0.100"]
    assert _row(ev, "no_harm") == ["no_harm", "3", "2", "1"] and _row(ev, "&lt;honest&gt;")[1:] == ["1"] * 3


def test_alignment_tax_shows_percent_change(run_dir: Path) -> None:
    summary = _summary() | {"alignment_tax": _tax(TAX_STAGES)}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    page = build_report(run_dir).read_text(encoding="utf-8")
    tax = _section(page, "tax")
    assert "lower is better" in tax
    # arithmetic 0.40 -> 0.44 is +10.0%, facts 0.50 -> 0.60 +20.0%, perplexity 20 -> 25 +25.0%
    assert _row(tax, "PPO") == ["PPO", "0.440 (+10.0%)", "0.600 (+20.0%)", "25.000 (+25.0%)"]
    assert _row(tax, "Base") == ["Base", "0.400", "0.500", "20.000"]
    assert "PPO-ptx" not in tax
    assert "+10.0%" in _section(page, "headline") and "+25.0%" in _section(page, "headline")
    # the experiment's file wins over summary.json, and a change it lacks is computed from the stages
    ptx = _tax({**TAX_STAGES, "ppo_ptx": _capability(0.48, 0.55, 21.0)})
    del ptx["change_vs_base"]["ppo_ptx"]["perplexity"]
    _write_json(run_dir / "alignment_tax.json", ptx)
    tax = _section(build_report(run_dir).read_text(encoding="utf-8"), "tax")
    assert _row(tax, "PPO-ptx") == ["PPO-ptx", "0.480 (+20.0%)", "0.550 (+10.0%)", "21.000 (+5.0%)"]


def test_reward_hacking_experiment_section(run_dir: Path) -> None:
    runs = {"hacked": {"proxy_start": 0.1, "proxy_end": 1.2, "gold_start": 0.7, "gold_end": 0.6, "length_start": 10,
                       "length_end": 30.5, "heldout_gold": 0.62, "heldout_length": 29.0, "alerts": ["verbosity"]},
            "length_penalty": {"proxy_start": 0.1, "proxy_end": 0.4, "gold_start": 0.7, "gold_end": 0.75,
                               "length_start": 10, "length_end": 12, "heldout_gold": 0.74, "heldout_length": 12.0,
                               "alerts": []}}
    _write_json(run_dir / "reward_hacking" / "reward_hacking.json",
                {"annotator": "length_lover", "runs": runs, "sft": {"heldout_gold": 0.7, "heldout_length": 11.0}})
    exp = _section(build_report(run_dir).read_text(encoding="utf-8"), "rhexp")
    assert _row(exp, "hacked") == ["hacked", "0.10 → 1.20", "0.700 → 0.600", "10.0 → 30.5", "0.620", "29.0",
                                   "verbosity"]
    assert _row(exp, "length_penalty")[-1] == "—" and _row(exp, "SFT (reference)")[4] == "0.700"


def test_unreadable_safety_file_says_so(run_dir: Path) -> None:
    (run_dir / "redteam").mkdir()
    (run_dir / "redteam" / "redteam.json").write_text('{"asr": 0.1, ')
    red = _section(build_report(run_dir).read_text(encoding="utf-8"), "redteam")
    assert "redteam/redteam.json is unreadable" in red
