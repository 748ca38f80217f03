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
            "per_annotator": {"careful": {"n": 50, "accuracy": 0.7, "gold_accuracy": 0.72},
                              "random_clicker": {"n": 50, "accuracy": 0.5, "gold_accuracy": 0.55}},
            "annotators": {"alpha": 0.23, "mean_kappa": {"careful": 0.5, "random_clicker": -0.1},
                           "agreement_with_majority": {"careful": 0.9, "random_clicker": 0.4},
                           "flagged": ["random_clicker"]}}


def _summary() -> dict:
    return {"stages": {"base": _eval("base", None), "sft": _eval("sft", "base"), "ppo": _eval("ppo", "sft")},
            "rm": _rm(), "ppo": {"win_rate_vs_sft": 0.64, "kl": 4.2, "kl_target": 6.0},
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
    assert _row(headline, "pretrain")[1] == "3 min 06 s"
    samples = _section(page, "samples")
    assert samples.count('class="sample"') == 24  # 4 of each of 6 families
    assert samples.count('<span class="badge">best</span>') == 24  # PPO's 0.9 beats 0.4 and 0.6 on every row
    assert "flagged" in _section(page, "rm") and "random_clicker" in _section(page, "rm")


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
