"""The self-contained HTML report of a pipeline run: one file a researcher can open, mail or archive.

Everything is inline (plots as base64 PNG, CSS in a ``<style>`` tag, no JavaScript) and a
Content-Security-Policy forbids anything else, so the file renders the same offline and years later.
Every string that comes from the run folder (model responses, prompts, config values, family names,
keys) is untrusted and escaped: a policy that learned to emit ``<script>`` must not run it in the
reader's browser. Fragments this module built itself are marked ``Html``; everything else passes
through ``_e`` when it is put in the page.

Any input may be missing (a run that has not reached PPO yet, a copied summary.json alone): its
section then says what is missing instead of failing. The safety layer's sections (red teaming, reward
hacking and mode collapse, policy evaluation, alignment tax, the reward-hacking experiment) read files
that runs made before them lack, so without their input they are left out, navigation link and all.
Only a missing run folder is an error.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.data.io import read_jsonl
from rlhf.fsutil import write_text_atomic
from rlhf.report.metrics import read_metrics

STAGES = ("base", "sft", "ppo")
STAGE_LABELS = {"base": "Base", "sft": "SFT", "ppo": "PPO", "ppo_ptx": "PPO-ptx"}
STAGE_COLORS = {"base": "#9aa0a6", "sft": "#4c78a8", "ppo": "#f58518"}
PROXY_COLOR, GOLD_COLOR = "#4c78a8", "#d62728"

# (key in an EVAL dict, label, +1 higher is better / -1 lower is better / 0 neither, decimals)
HEADLINE = (
    ("gold_score", "gold score", 1, 3),
    ("win_rate", "win rate vs. previous stage", 1, 3),
    ("harmful_compliance", "harmful compliance", -1, 3),
    ("over_refusal", "over-refusal", -1, 3),
    ("honesty", "honesty", 1, 3),
    ("over_hedging", "over-hedging", -1, 3),
    ("accuracy", "accuracy", 1, 3),
    ("mean_length", "mean length (tokens)", 0, 1),
    ("eos_rate", "EOS rate", 1, 3),
)
AXES = ("helpful", "harmless", "honest", "concise", "fluent")

# (metrics.jsonl key, plot title, y label), in the order the grid shows them.
CURVES = (
    ("objective/scores", "Reward-model score (proxy)", "normalised RM score"),
    ("objective/gold", "Gold-judge score", "gold score"),
    ("objective/rlhf_reward", "RLHF reward (score − β·KL)", "reward"),
    ("objective/kl", "KL to reference", "nats per sequence"),
    ("objective/kl_coef", "KL coefficient β", "β"),
    ("objective/entropy", "Policy entropy", "nats per token"),
    ("response/length", "Response length", "tokens"),
    ("response/eos_rate", "Responses ending with EOS", "share"),
    ("policy/clipfrac", "Policy clip fraction", "share"),
    ("policy/approxkl", "Approx. KL, old → new policy", "nats"),
    ("val/explained_variance", "Value explained variance", "explained variance"),
    ("val/clipfrac", "Value clip fraction", "share"),
    ("policy/loss", "Policy loss", "loss"),
    ("val/loss", "Value loss", "loss"),
)
# Curves of the safety layer, in its own section: the detectors' diversity figures and the extra reward components.
SAFETY_CURVES = (
    ("diversity/distinct_2", "Distinct-2 of each rollout", "share of distinct bigrams"),
    ("diversity/self_bleu", "Self-BLEU of each rollout", "self-BLEU (higher = more alike)"),
    ("diversity/similarity", "Mean pairwise similarity", "similarity (higher = more alike)"),
    ("hacking/alerts", "Reward-hacking detectors fired so far", "detectors"),
    ("reward/safety", "Safety reward (constitution)", "mean component"),
    ("reward/length", "Length penalty", "mean component"),
    ("reward/repetition", "Repetition penalty", "mean component"),
    ("reward/diversity", "Diversity bonus", "mean component"),
)
# (path into an EVAL dict, label, better, decimals): the rows of "Policy evaluation"
EVAL_ROWS = (
    (("gold_score",), "gold score", 1, 3),
    (("rm_reward",), "RM reward", 1, 3),
    (("mean_length",), "mean length (tokens)", 0, 1),
    (("perplexity",), "held-out perplexity", -1, 2),
    (("diversity", "distinct_2"), "distinct-2", 1, 3),
    (("diversity", "self_bleu"), "self-BLEU", -1, 3),
    (("diversity", "mean_similarity"), "semantic similarity", -1, 3),
    (("diversity", "is_collapsed"), "collapsed?", 0, 0),
    (("constitution", "violation_rate"), "constitution violation rate", -1, 3),
)
EVAL_NEW_KEYS = ("rm_reward", "perplexity", "diversity", "constitution")  # an eval without any predates the section
# (capability key, label, better): the columns of "Alignment tax"
TAX_COLUMNS = (("accuracy_arithmetic", "arithmetic accuracy", 1), ("accuracy_facts", "facts accuracy", 1),
               ("perplexity", "held-out perplexity", -1))
MAX_SAMPLES = 24
MAX_CHARS = 2000  # a runaway response is cut here so that one sample cannot swamp the page
DPI = 110
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


class Html(str):
    """A fragment this module built and escaped itself; any other string is escaped when it is used.

    ``Html + str`` escapes the plain side and stays ``Html``, as markupsafe's ``Markup`` does.
    """

    def __add__(self, other: Any) -> Html:
        return Html(str.__add__(self, _e(other)))

    def __radd__(self, other: Any) -> Html:
        return Html(str.__add__(_e(other), self))


def _e(value: Any) -> Html:
    """Escape untrusted text (quotes too, so it is also safe inside attributes)."""
    return value if isinstance(value, Html) else Html(html.escape(str(value), quote=True))


def _join(parts: Iterable[Any]) -> Html:
    return Html("".join(_e(p) for p in parts))


def _tag(name: str, content: Any = "", cls: str | None = None) -> Html:
    """``<name class="cls">content</name>`` with the content escaped unless it is ``Html``."""
    attr = f' class="{_e(cls)}"' if cls else ""
    return Html(f"<{name}{attr}>{_e(content)}</{name}>")


# --- reading the run folder --------------------------------------------------------------------------------------


@dataclass
class Run:
    """What the report needs from a run folder; ``problems`` says why a file gave nothing."""

    root: Path
    summary: dict = field(default_factory=dict)
    evals: dict[str, dict] = field(default_factory=dict)  # stage -> EVAL dict
    rm: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    samples: dict[str, list[dict]] = field(default_factory=dict)  # stage -> rows, same prompts in order
    config: Any = None
    redteam: dict | None = None  # redteam/redteam.json
    hacking: dict | None = None  # ppo/stage.json "hacking": the reward-hacking detectors' summary
    collapse: dict | None = None  # ppo/stage.json "collapse": collapsed iterations and the last diversity figures
    alerts: list[dict] | None = None  # ppo/alerts.jsonl, one row per detector firing; None when there is no file
    tax: dict | None = None  # alignment_tax.json (an experiment, may add ppo_ptx), else summary.json alignment_tax
    hacking_experiment: dict | None = None  # reward_hacking/reward_hacking.json
    algorithms: dict | None = None  # algorithms/algorithms.json (`rlhf experiment algorithms`)
    problems: dict[str, str] = field(default_factory=dict)  # relative path -> "missing" / "unreadable: ..."


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _load(run: Run, rel: str, reader: Callable[[Path], Any], kind: type) -> Any:
    """The parsed file, or None with the reason recorded in ``run.problems`` (missing, unreadable, wrong shape)."""
    path = run.root / rel
    if not path.is_file():
        run.problems[rel] = "missing"
        return None
    try:
        data = reader(path)
    except (OSError, ValueError) as err:  # ValueError covers bad JSON, bad UTF-8 and DataError (file:line)
        run.problems[rel] = f"unreadable ({type(err).__name__}: {err})"
        return None
    if not isinstance(data, kind) or (kind is list and not all(isinstance(r, dict) for r in data)):
        run.problems[rel] = f"not in the expected shape (a JSON {type(data).__name__})"
        return None
    return data


def _optional(run: Run, rel: str, reader: Callable[[Path], Any] = _read_json, kind: type = dict) -> Any:
    """Like ``_load`` for an input older runs lack: a missing file is no problem, just None."""
    return _load(run, rel, reader, kind) if (run.root / rel).is_file() else None


def _list(value: Any) -> list:
    """``value`` when it is a list, else an empty one."""
    return value if isinstance(value, list) else []


def _dict(value: Any, key: str | None = None) -> dict:
    """``value[key]`` (or ``value``) when it is a dict, else an empty one: the shape check of every nested read."""
    if key is not None:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, dict) else {}


def read_run(run_dir: str | Path) -> Run:
    """Load every input the report uses; eval/*.json fill in what summary.json lacks (a run cut short)."""
    run = Run(Path(run_dir))
    if not run.root.is_dir():
        raise FileNotFoundError(f"run folder not found: {run.root}")
    run.summary = _load(run, "summary.json", _read_json, dict) or {}
    stages = run.summary.get("stages")
    stages = stages if isinstance(stages, dict) else {}
    for stage in STAGES:
        ev = stages.get(stage)
        if not isinstance(ev, dict) and (run.root / "eval" / f"{stage}.json").is_file():
            ev = _load(run, f"eval/{stage}.json", _read_json, dict)
        if isinstance(ev, dict):
            run.evals[stage] = ev
    rm = run.summary.get("rm")
    if not isinstance(rm, dict) and (run.root / "eval" / "rm.json").is_file():
        rm = _load(run, "eval/rm.json", _read_json, dict)
    run.rm = rm if isinstance(rm, dict) else None
    last = _last_round(run)  # with rounds, the PPO column, curves and detectors are the last round's policy's
    run.metrics = _load(run, f"{last}ppo/metrics.jsonl", read_metrics, list) or []
    for stage in STAGES:
        rows = _load(run, f"{last if stage == 'ppo' else ''}eval/{stage}.samples.jsonl", read_jsonl, list)
        if rows:
            run.samples[stage] = rows
    run.config = _load(run, "config.json", _read_json, dict)
    _read_safety(run, last)
    return run


def _last_round(run: Run) -> str:
    """"round_K/" for a run of K > 1 rounds (summary.json's rounds), else "": where the last policy's files are."""
    rounds = run.summary.get("rounds")
    k = rounds[-1].get("round") if isinstance(rounds, list) and rounds and isinstance(rounds[-1], dict) else None
    return f"round_{k}/" if isinstance(k, int) and k > 1 else ""


def _read_safety(run: Run, last: str) -> None:
    """The safety layer's inputs: red teaming, the PPO detectors, the alignment tax, the reward-hacking experiment
    (``last``: the folder prefix of the last round's policy, "" for a run of one round)."""
    run.redteam = _optional(run, f"{last}redteam/redteam.json")
    stage = _optional(run, f"{last}ppo/stage.json") or {}
    run.hacking = stage.get("hacking") if isinstance(stage.get("hacking"), dict) else None
    run.collapse = stage.get("collapse") if isinstance(stage.get("collapse"), dict) else None
    run.alerts = _optional(run, f"{last}ppo/alerts.jsonl", read_jsonl, list)
    tax = _optional(run, "alignment_tax.json")
    tax = tax if isinstance(tax, dict) else run.summary.get("alignment_tax")
    run.tax = tax if isinstance(tax, dict) and isinstance(tax.get("stages"), dict) else None
    run.hacking_experiment = _optional(run, "reward_hacking/reward_hacking.json")
    algorithms = _optional(run, "algorithms/algorithms.json")
    run.algorithms = algorithms if isinstance(algorithms, dict) and isinstance(algorithms.get("methods"), dict) else None


# --- formatting ----------------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A finite number, or None for null, NaN, booleans and anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    return str(value)


def _duration(seconds: float) -> str:
    """``58.1 s``, ``3 min 06 s``, ``2 h 05 min``: the precision a reader wants at each scale."""
    s = round(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{s // 60} min {s % 60:02d} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60:02d} min"


def _problem(run: Run, rel: str) -> str:
    """``ppo/metrics.jsonl is missing``: why a file gave nothing, as recorded while reading the run."""
    return f"{rel} is {run.problems.get(rel, 'missing')}"


def _missing(what: str, rels: str | Sequence[str] = (), run: Run | None = None) -> Html:
    """A visible note in place of a section whose input is absent, saying which files and why."""
    rels = [rels] if isinstance(rels, str) else list(rels)
    why = f" ({'; '.join(_problem(run, r) for r in rels)})" if rels and run else ""
    return Html(f'<p class="missing">{_e(what + why)}</p>')


def _table(head: Sequence[Any], rows: Iterable[Sequence[Any]], cls: str = "") -> Html:
    """A table whose first column is a label and the others numbers (right-aligned)."""
    th = _join(_tag("th", h) for h in head)
    body = _join(_tag("tr", _join(_tag("td", c) for c in row)) for row in rows)
    return Html(f'<table class="{_e(cls)}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>')


def _best_cells(values: Sequence[float | None], better: int, digits: int) -> list[Html]:
    """Formatted cells with the best value bold; no winner is marked on a tie of all or a neutral metric."""
    nums = [_num(v) for v in values]
    present = {v * better for v in nums if v is not None}
    top = max(present) if better and len(present) > 1 else None
    cells = []
    for raw, v in zip(values, nums):
        text = _e(_fmt(raw if v is None else v, digits))
        cells.append(Html(f'<b class="best">{text}</b>') if top is not None and v is not None and v * better == top
                     else text)
    return cells


def _arrow(label: str, better: int) -> str:
    """``gold score ↑``: a metric's label with the direction that is better (none for a neutral one)."""
    return f"{label} {'↑' if better > 0 else '↓' if better < 0 else ''}".strip()


def _model_name(model: Any) -> str:
    """``ppo`` for ``runs/demo/ppo``: the last part of a model folder, as the tables and legends show it."""
    return Path(str(model)).name if model else "?"


def _status(text: str, level: str) -> Html:
    """A coloured verdict line: ``ok`` (green), ``warn`` (amber) or ``bad`` (red)."""
    return _tag("p", text, f"status {level}")


def _titled(title: str, *parts: Any) -> Html:
    """A titled block (h3) that can sit beside another in a ``row``."""
    return Html(f"<div><h3>{_e(title)}</h3>{_join(parts)}</div>")


def _section(anchor: str, title: str, *parts: Any) -> Html:
    return Html(f'<section id="{anchor}"><h2>{_e(title)}</h2>{_join(parts)}</section>')


# --- plots -----------------------------------------------------------------------------------------------------

_RC = {
    "font.size": 8.5, "axes.titlesize": 9.5, "axes.titleweight": "bold", "axes.titlelocation": "left",
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25,
    "axes.edgecolor": "#888888", "legend.frameon": False, "legend.fontsize": 8,
    "text.parse_math": False,  # family names and keys are untrusted: a "$" must not start mathtext
}


def _png(draw: Callable[[Any], None], alt: str, size: tuple[float, float] = (4.2, 2.7)) -> Html:
    """Render a figure that ``draw(fig)`` fills to an inline ``<img>`` (base64 PNG).

    matplotlib is imported here so that importing this module stays cheap. A bare ``Figure`` on the Agg
    canvas is the headless recipe from matplotlib's docs: no pyplot, so no global backend switch in the
    caller's process and no figures left open.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=size, dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        draw(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return Html(f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">')


def _series(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the lines that carry a finite ``key``; a line without a step counts by position."""
    xs, ys = [], []
    for i, r in enumerate(records):
        y = _num(r.get(key))
        if y is not None:
            step = _num(r.get("step"))
            xs.append(step if step is not None else float(i))
            ys.append(y)
    return xs, ys


def _ema(ys: Sequence[float]) -> list[float]:
    """Debiased exponential moving average with a span of ~1/20 of the run, as TensorBoard's smoothing."""
    alpha = 2.0 / (max(2, len(ys) // 20) + 1)
    out, acc = [], 0.0
    for i, y in enumerate(ys, 1):
        acc = (1 - alpha) * acc + alpha * y
        out.append(acc / (1 - (1 - alpha) ** i))
    return out


def _draw_curve(ax: Any, xs: Sequence[float], ys: Sequence[float], color: str, label: str | None = None) -> None:
    """Raw values thin, and a smoothed line on top when there are enough points for smoothing to help."""
    smooth = len(ys) >= 10
    ax.plot(xs, ys, color=color, lw=0.9 if smooth else 1.4, alpha=0.35 if smooth else 1.0,
            marker=None if len(ys) > 30 else ".", ms=3, label=None if smooth else label)
    if smooth:
        ax.plot(xs, _ema(ys), color=color, lw=1.6, label=label)


def _curve_png(xs: list[float], ys: list[float], title: str, ylabel: str, hline: float | None) -> Html:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        _draw_curve(ax, xs, ys, PROXY_COLOR)
        if hline is not None:
            ax.axhline(hline, color="#444444", ls="--", lw=1, label=f"target {hline:g}")
            ax.legend(loc="best")
        ax.set(title=title, xlabel="PPO step", ylabel=ylabel)

    return _png(draw, title)


# --- sections --------------------------------------------------------------------------------------------------


def _header(run: Run, nav: Sequence[tuple[str, str]]) -> Html:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    summary = run.root / "summary.json"
    finished = (datetime.datetime.fromtimestamp(summary.stat().st_mtime).astimezone().strftime("%Y-%m-%d %H:%M %Z")
                if summary.is_file() else None)
    meta = [Html(f"run folder {_tag('code', run.root.resolve())}")]
    meta += [f"summary written {finished}"] if finished else []
    meta += [f"report generated {now}"]
    links = _join(Html(f'<a href="#{a}">{_e(t)}</a>') for a, t in nav)
    return Html(f'<header><h1>RLHF run report</h1><p class="meta">{Html(" · ").join(_e(m) for m in meta)}</p>'
                f"<nav>{links}</nav></header>")


def _headline_table(run: Run) -> Html:
    stages = [s for s in STAGES if s in run.evals]
    rows = []
    for key, label, better, digits in HEADLINE:
        cells = _best_cells([run.evals[s].get(key) for s in stages], better, digits)
        if key == "win_rate":
            cells = [Html(c + _against(run.evals[s])) for c, s in zip(cells, stages)]
        cells = [Html(c + _interval(run.evals[s], key)) for c, s in zip(cells, stages)]
        rows.append([_arrow(label, better), *cells])
    axes = {s: run.evals[s]["axes"] if isinstance(run.evals[s].get("axes"), dict) else {} for s in stages}
    for axis in AXES:
        values = [axes[s].get(axis) for s in stages]
        if any(v is not None for v in values):
            rows.append([f"gold axis: {axis} ↑", *_best_cells(values, 1, 3)])
    n = [run.evals[s].get("n_prompts", run.evals[s].get("n")) for s in stages]
    rows.append(["held-out prompts", *[_fmt(v) for v in n]])
    return _table(["metric", *(STAGE_LABELS[s] for s in stages)], rows, "num")


def _interval(ev: dict, key: str) -> Html:
    """``95% CI 0.004–0.105`` under a rate that the eval gave an interval for."""
    ci = _dict(ev, "intervals").get(key)
    if not (isinstance(ci, list) and len(ci) == 2 and all(_num(x) is not None for x in ci)):
        return Html("")
    return Html(f'<span class="sub">95% CI {_e(_fmt(ci[0]))}–{_e(_fmt(ci[1]))}</span>')


def _against(ev: dict) -> Html:
    """``vs base``: which model a stage's win rate was measured against, from its ``against.model``."""
    other = ev.get("against")
    model = other.get("model") if isinstance(other, dict) else None
    if not model or ev.get("win_rate") is None:
        return Html("")
    return Html(f'<span class="sub">vs {_e(_model_name(model))}</span>')


def _cards(items: Sequence[tuple[str, Any, str]]) -> Html:
    """Big-number cards: (label, value, note)."""
    return _join(Html(f'<div class="card"><div class="label">{_e(label)}</div><div class="value">{_e(_fmt(value))}'
                      f'</div><div class="note">{_e(note)}</div></div>') for label, value, note in items)


def _headline(run: Run) -> Html:
    ppo = run.summary.get("ppo")
    cards = []
    if isinstance(ppo, dict):
        target = ppo.get("kl_target")
        ci = ppo.get("win_rate_vs_sft_ci95")
        note = "gold judge, ties count half" + (f"; 95% CI {_fmt(ci[0])}–{_fmt(ci[1])}" if isinstance(ci, list) and len(ci) == 2 else "")
        cards = _verdict_card(ppo.get("vs_sft")) + [("PPO win rate vs SFT", ppo.get("win_rate_vs_sft"), note),
                 ("KL to reference", ppo.get("kl"), "nats per sequence"),
                 ("KL target", target, "of the adaptive β controller" if target is not None else "none: fixed β")]
        top = Html("")
    else:
        top = _missing("PPO has not run: summary.json has no ppo entry, so there is no win rate vs SFT or KL.")
    cards += _redteam_cards(run) + _tax_cards(run)
    top = (Html('<div class="cards">') + _cards(cards) + Html("</div>") if cards else Html("")) + top
    table = _headline_table(run) if run.evals else _missing(
        "No policy evaluations: summary.json has no stages and eval/*.json are absent", "summary.json", run)
    table = _titled("Held-out evaluation (gold judge)", table)
    return _section("headline", "Headline", top, Html('<div class="row">') + table + _times(run) + Html("</div>"))


def _verdict_card(c: Any) -> list[tuple[str, Any, str]]:
    """Did PPO get better than SFT: the paired comparison's verdict on the held-out prompts, with what it rests on."""
    if not isinstance(c, dict) or c.get("verdict") is None:
        return []
    diff, ci = _num(c.get("gold_diff")), c.get("gold_diff_ci95")
    note = f"gold {diff:+.3f} per prompt" if diff is not None else "gold difference"
    if isinstance(ci, list) and len(ci) == 2:
        note += f", 95% CI {_fmt(_num(ci[0]))}–{_fmt(_num(ci[1]))}"
    note += f"; {_fmt(c.get('wins'))} wins, {_fmt(c.get('losses'))} losses, {_fmt(c.get('ties'))} ties"
    return [("PPO vs SFT", c["verdict"], note)]


def _redteam_cards(run: Run) -> list[tuple[str, Any, str]]:
    """The red team's attack success rate of the final policy, from redteam.json or else summary.json."""
    red = run.redteam if run.redteam is not None else _dict(run.summary, "redteam")
    asr = _num(red.get("asr"))
    if asr is None:
        return []
    other = _dict(red, "against")
    note = (f"vs {_fmt(_num(other['asr']))} for {_model_name(other.get('model'))}" if _num(other.get("asr")) is not None
            else "attacks that made the policy comply")
    return [(f"Red-team ASR ({_model_name(red.get('model'))})", asr, note + "; lower is better")]


def _tax_cards(run: Run) -> list[tuple[str, Any, str]]:
    """The alignment tax of the final policy: the % change of each capability figure against the first stage."""
    base, stages, change = _tax_parts(run.tax)
    final = "ppo" if "ppo" in change else next(reversed(change), None)
    if final is None:
        return []
    cards = []
    for key, label, better in TAX_COLUMNS:
        pct = _num(_dict(change, final).get(key))
        if pct is not None:
            before, after = _dict(stages, base).get(key), _dict(stages, final).get(key)
            note = f"{_fmt(_num(before))} → {_fmt(_num(after))}; {'higher' if better > 0 else 'lower'} is better"
            cards.append((f"{label}, {_stage_label(final)} vs {_stage_label(base)}", f"{pct:+.1f}%", note))
    return cards


def _times(run: Run) -> Html:
    times = run.summary.get("time_seconds")
    times = {k: _num(v) for k, v in times.items()} if isinstance(times, dict) else {}
    times = {k: v for k, v in times.items() if v is not None}
    if not times:
        return _titled("Stage times", _missing("No stage times in summary.json."))
    total = sum(times.values()) or 1.0
    rows = [[k, _duration(v), Html(f'<span class="bar" style="width:{100 * v / total:.1f}%"></span>'
                                   f'<span class="pct">{100 * v / total:.0f}%</span>')] for k, v in times.items()]
    rows.append([Html("<b>total</b>"), Html(f"<b>{_e(_duration(sum(times.values())))}</b>"), ""])
    return _titled("Stage times", _table(["stage", "wall time", "share"], rows, "num times"))


def _curves(run: Run) -> Html:
    if not run.metrics:
        return _section("curves", "Training curves",
                        _missing("No PPO training curves: the PPO stage has not run here", "ppo/metrics.jsonl", run))
    ppo = run.summary.get("ppo")
    target = _num(ppo.get("kl_target")) if isinstance(ppo, dict) else None
    grid, absent = _curve_grid(run.metrics, CURVES, {"objective/kl": target})
    note = (f"{len(run.metrics)} logged steps. Thin lines are raw values, thick lines an exponential moving "
            "average.")
    note += f" Not logged: {', '.join(absent)}." if absent else ""
    return _section("curves", "Training curves", _tag("p", note, "note"), grid)


def _curve_grid(metrics: list[dict], curves: Iterable[tuple[str, str, str]],
                hlines: dict[str, float | None] | None = None) -> tuple[Html, list[str]]:
    """A grid of one plot per (key, title, y label) that ``metrics`` logs, and the keys it does not log."""
    plots, absent = [], []
    for key, title, ylabel in curves:
        xs, ys = _series(metrics, key)
        if ys:
            plots.append(_curve_png(xs, ys, title, ylabel, (hlines or {}).get(key)))
        else:
            absent.append(key)
    return Html(f'<div class="grid">{_join(plots)}</div>'), absent


def _binned(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """Means of equal-count bins of the points sorted by x: y as a function of x, whatever order x came in.

    KL is noisy from step to step, so smoothing in step order zigzags along x; binning along x does not.
    """
    order = sorted(range(len(xs)), key=xs.__getitem__)
    n_bins = max(1, min(20, len(xs) // 5))
    bins = [order[len(order) * b // n_bins: len(order) * (b + 1) // n_bins] for b in range(n_bins)]
    return ([sum(xs[i] for i in b) / len(b) for b in bins if b], [sum(ys[i] for i in b) / len(b) for b in bins if b])


def _overopt_png(kl: list[float], proxy: list[float], gold: list[float] | None) -> Html:
    """Proxy (left axis) and gold (right axis) against sqrt(KL), the x-axis of Gao et al. 2022."""
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        d = [math.sqrt(max(k, 0.0)) for k in kl]
        ax.scatter(d, proxy, s=6, color=PROXY_COLOR, alpha=0.3)
        ax.plot(*_binned(d, proxy), color=PROXY_COLOR, lw=1.8, marker="o", ms=3, label="proxy: RM score")
        ax.set(xlabel="√KL(policy ‖ reference)  [√nats]", ylabel="proxy RM score",
               title="Proxy and gold reward against distance from the reference")
        ax.yaxis.label.set_color(PROXY_COLOR)
        if gold is not None:
            ax2 = ax.twinx()
            ax2.spines["right"].set_visible(True)
            ax2.grid(False)
            ax2.scatter(d, gold, s=6, color=GOLD_COLOR, alpha=0.3)
            ax2.plot(*_binned(d, gold), color=GOLD_COLOR, lw=1.8, marker="o", ms=3, label="gold: judge score")
            ax2.set_ylabel("gold score", color=GOLD_COLOR)
            fig.legend(loc="outside lower center", ncols=2)

    return _png(draw, "proxy and gold reward against sqrt KL", size=(7.5, 3.6))


def _overopt_verdict(steps: list[float], kl: list[float], proxy: list[float], gold: list[float]) -> str:
    """Where the smoothed gold score peaked, and what the proxy did after it: the over-optimisation signature."""
    g, p, k = _ema(gold), _ema(proxy), _ema(kl)
    peak = max(range(len(g)), key=g.__getitem__)
    at = f"step {steps[peak]:g}, √KL ≈ {math.sqrt(max(k[peak], 0.0)):.2f}"
    if peak == len(g) - 1 or g[-1] >= g[peak] - 0.01:
        return (f"No over-optimisation visible: the smoothed gold score is at or near its best at the end of "
                f"training ({g[peak]:.3f} at {at}; last {g[-1]:.3f}).")
    trend = "kept rising" if p[-1] > p[peak] else "did not rise either"
    return (f"The smoothed gold score peaked at {g[peak]:.3f} ({at}) and fell to {g[-1]:.3f} by the last step, while "
            f"the proxy {trend} ({p[peak]:.3f} → {p[-1]:.3f})"
            + (": the policy is exploiting the reward model." if p[-1] > p[peak] else "."))


def _overopt(run: Run) -> Html:
    title = "Over-optimisation (Gao et al. 2022)"
    rows = [r for r in run.metrics if _num(r.get("objective/kl")) is not None and _num(r.get("objective/scores"))
            is not None]
    if not rows:
        why = "No PPO metrics with both objective/kl and objective/scores"
        return _section("overopt", title, _missing(why, "ppo/metrics.jsonl", run) if not run.metrics
                        else _missing(why + "."))
    both = [r for r in rows if _num(r.get("objective/gold")) is not None]
    intro = ("Gao et al. (2022, arXiv:2210.10760) found that as a policy moves away from its reference, the proxy "
             "reward it is trained on keeps rising while the true (gold) reward peaks and then falls. x is √KL, the "
             "distance measure of that paper (negative KL estimates count as 0); dots are single PPO steps, lines the "
             "means of equal-count bins along √KL.")
    if len(both) < 2:
        plot = _overopt_png(_series(rows, "objective/kl")[1], _series(rows, "objective/scores")[1], None)
        note = _missing("No gold scores in ppo/metrics.jsonl: the PPO prompts were not from the assistant world, "
                        "so only the proxy is shown.")
        return _section("overopt", title, _tag("p", intro, "note"), plot, note)
    steps, kl = _series(both, "objective/kl")
    proxy, gold = _series(both, "objective/scores")[1], _series(both, "objective/gold")[1]
    verdict = _tag("p", _overopt_verdict(steps, kl, proxy, gold), "verdict")
    return _section("overopt", title, _tag("p", intro, "note"), _overopt_png(kl, proxy, gold), verdict)


# (key, label, better: 1 higher / -1 lower / 0 neither, digits); seconds are shown whole, without an interval.
ALGORITHM_COLUMNS = (("gold_score", "gold score", 1, 3), ("win_rate", "win rate vs SFT", 1, 3),
                     ("win_rate_untied", "untied win rate", 1, 3), ("harmful_compliance", "harmful compliance", -1, 3),
                     ("over_refusal", "over-refusal", -1, 3), ("over_hedging", "over-hedging", -1, 3),
                     ("honesty", "honesty", 1, 3), ("accuracy", "accuracy", 1, 3), ("kl", "KL to SFT", 0, 3),
                     ("seconds", "seconds", -1, 0))


def _interval_cell(value: Any, ci: Any, bold: bool, digits: int) -> Html:
    text = _e(_fmt(_num(value), digits))
    if bold:
        text = Html(f'<b class="best">{text}</b>')
    if digits and isinstance(ci, list) and len(ci) == 2 and all(_num(c) is not None for c in ci):
        text = Html(f'{text}<span class="sub">[{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}]</span>')
    return text


def _bon_png(curves: dict, metrics: list[dict]) -> Html:
    """Two panels over sqrt KL to SFT: best-of-n's gold score on the held-out prompts (analytic KL), and beside it
    PPO's rollout gold score on its training prompts (a different prompt mix, so a panel of its own)."""
    def draw(fig: Any) -> None:
        left, right = fig.subplots(1, 2, sharex=True)
        for k, (seed, curve) in enumerate(curves.items()):
            pts = [(math.sqrt(max(_num(r.get("kl")) or 0.0, 0.0)), _num(r.get("gold_score")), r.get("n")) for r in curve
                   if _num(r.get("gold_score")) is not None]
            left.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1.4, label=f"seed {seed}")
            for x, y, n in pts if k == 0 else ():  # the n of each point, once
                left.annotate(f"n={n}", (x, y), fontsize=7, xytext=(2, 3), textcoords="offset points")
        left.set(xlabel="√KL to the SFT policy  [√nats]", ylabel="gold score (sampled, T=1)",
                 title="Best-of-n, held-out prompts")
        left.legend()
        rows = [r for r in metrics if _num(r.get("objective/kl")) is not None and _num(r.get("objective/gold")) is not None]
        if rows:
            d = [math.sqrt(max(_num(r["objective/kl"]), 0.0)) for r in rows]
            right.plot(*_binned(d, [_num(r["objective/gold"]) for r in rows]), color=GOLD_COLOR, lw=1.8, marker="o", ms=3)
        right.set(xlabel="√KL to the SFT policy  [√nats]", title="PPO rollouts, training prompts (with attacks)")

    return _png(draw, "best-of-n and PPO gold score against sqrt KL", size=(8.5, 3.4))


ROUND_COLUMNS = (("gold_score", "gold score ↑"), ("win_rate", "win rate over SFT ↑"), ("win_rate_untied", "untied win rate ↑"),
                 ("harmful_compliance", "harmful compliance ↓"),
                 ("over_refusal", "over-refusal ↓"), ("over_hedging", "over-hedging ↓"), ("kl_to_sft", "KL to SFT"),
                 ("rm_gold_accuracy_before", "RM gold accuracy, before"), ("rm_gold_accuracy", "RM gold accuracy"))


def _rounds(run: Run) -> Html:
    """Iterated online RLHF: each round's policy on the held-out prompts and its reward model (summary.json rounds)."""
    rounds = run.summary.get("rounds")
    rounds = [r for r in rounds if isinstance(r, dict)] if isinstance(rounds, list) else []
    if len(rounds) < 2:
        return Html("")
    note = ("Each round after the first samples pairs from the previous round's policy, trains the reward model again "
            "on every round's pairs and continues PPO from that policy. RM gold accuracy is measured on pairs of the "
            "round's starting policy on held-out prompts: before is the previous round's reward model, which that "
            "policy was trained against.")
    rows = [[_fmt(r.get("round")), *(_fmt(_num(r.get(k))) for k, _ in ROUND_COLUMNS),
             ", ".join(str(a) for a in _list(r.get("alerts"))) or "-"] for r in rounds]
    head = ["round", *(label for _, label in ROUND_COLUMNS), "hacking detectors fired"]
    return _section("rounds", "Rounds", _tag("p", note, "note"), _table(head, rows, "num"),
                    _rounds_png(rounds))


def _rounds_png(rounds: list[dict]) -> Html:
    """The rounds table against the round: the rates and scores (0..1) on the left, KL to SFT on the right."""
    def draw(fig: Any) -> None:
        left, right = fig.subplots(1, 2, width_ratios=(3, 1))
        for key, label in ROUND_COLUMNS:
            pts = [(_num(r.get("round")), _num(r.get(key))) for r in rounds]
            pts = [(x, y) for x, y in pts if x is not None and y is not None]
            ax = right if key == "kl_to_sft" else left
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", ms=3, lw=1.4, label=label)
        left.set(xlabel="round", ylabel="held-out prompts, gold judge", title="Each round's policy and reward model")
        left.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
        right.set(xlabel="round", ylabel="nats", title="KL to SFT")
        for ax in (left, right):
            ax.xaxis.get_major_locator().set_params(integer=True)

    return _png(draw, "every round's figures against the round", size=(9.0, 3.2))


def _algorithms(run: Run) -> Html:
    res = run.algorithms
    if not res:
        return Html("")
    methods = res["methods"]
    head = ["method", *(_arrow(label, better) for _, label, better, _ in ALGORITHM_COLUMNS)]
    best = {k: max((m.get(k) * better for m in methods.values() if _num(m.get(k)) is not None), default=None)
            for k, _, better, _ in ALGORITHM_COLUMNS if better}
    rows = [[name, *(_interval_cell(row.get(k), (row.get("ci95") or {}).get(k),
                                    bool(better) and _num(row.get(k)) is not None and row[k] * better == best[k], digits)
                     for k, _, better, digits in ALGORITHM_COLUMNS)] for name, row in methods.items()]
    intro = (f"Every method from the same SFT model and reward model, evaluated on the same "
             f"{_fmt(res.get('n_prompts'))} held-out prompts by the gold judge, over seeds {res.get('seeds')}; 95% "
             f"intervals pool the seeds' prompts; seconds are the mean training time. Generated samples per online "
             f"run: {_fmt(res.get('samples_per_online_run'))}. {res.get('notes', '')}")
    parts = [_tag("p", intro, "note"), _table(head, rows, "num")]
    if res.get("best_of_n_curve"):
        parts.append(_bon_png(res["best_of_n_curve"], run.metrics))
    return _section("algorithms", "Algorithms side by side", *parts)


def _families_of(groups: Iterable[Iterable[Any]]) -> list[str]:
    """Family names in order of first appearance (None, for prompts from a user's file, shown as "-")."""
    seen: dict[str, None] = {}
    for group in groups:
        for fam in group:
            seen.setdefault("-" if fam is None else str(fam), None)
    return list(seen)


def _family_scores(run: Run) -> tuple[list[str], list[str], dict[str, dict[str, dict]]]:
    """(stages, families, stage -> family -> {"gold_score", "n"}) from the EVAL dicts."""
    fams = {s: ev["families"] for s, ev in run.evals.items() if isinstance(ev.get("families"), dict)}
    fams = {s: {str(f): v for f, v in d.items() if isinstance(v, dict)} for s, d in fams.items()}
    stages = [s for s in STAGES if s in fams]
    return stages, _families_of(fams[s] for s in stages), fams


def _bars_png(groups: list[str], series: Sequence[tuple[str, str, Sequence[Any]]], ylabel: str, alt: str) -> Html:
    """Grouped bars: one group per name in ``groups``, one bar per (label, colour, values) series; None draws 0."""
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        width = 0.8 / len(series)
        for i, (label, color, values) in enumerate(series):
            ys = [_num(v) for v in values]
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
            ax.bar(xs, [y if y is not None else 0.0 for y in ys], width * 0.95, color=color, label=label)
        crowded = sum(len(g) for g in groups) > 60  # ~characters that fit under the axis side by side
        ax.set_xticks(range(len(groups)), groups, rotation=30 if crowded else 15 if len(groups) > 5 else 0,
                      ha="right" if crowded else "center", rotation_mode="anchor")
        ax.set(ylabel=ylabel)
        ax.grid(axis="x", visible=False)
        fig.legend(loc="outside right upper")

    return _png(draw, alt, size=(7.5, 3.2))


def _families_png(stages: list[str], families: list[str], fams: dict[str, dict[str, dict]]) -> Html:
    series = [(STAGE_LABELS[s], STAGE_COLORS[s], [fams[s].get(f, {}).get("gold_score") for f in families])
              for s in stages]
    return _bars_png(families, series, "mean gold score", "gold score per prompt family and stage")


def _families(run: Run) -> Html:
    title = "Gold score per prompt family"
    stages, families, fams = _family_scores(run)
    if not families:
        return _section("families", title, _missing("No per-family scores: the evaluations have no families",
                                                    "summary.json", run))
    rows = []
    for f in families:
        values = [fams[s].get(f, {}).get("gold_score") for s in stages]
        n = next((fams[s][f].get("n") for s in stages if f in fams[s]), None)
        rows.append([f, _fmt(n), *_best_cells(values, 1, 3)])
    head = ["family", "prompts", *(STAGE_LABELS[s] for s in stages)]
    return _section("families", title, _families_png(stages, families, fams), _table(head, rows, "num families"))


def _rm_overview(rm: dict) -> Html:
    pairs = f"{_fmt(rm.get('gold_pairs'))} pairs with a gold preference" if rm.get("gold_pairs") is not None else ""
    items = [("pairs", rm.get("n_pairs"), "held-out preference pairs"),
             ("accuracy", rm.get("accuracy"), "agreement with the annotators' labels"),
             ("gold accuracy", rm.get("gold_accuracy"), pairs or "agreement with the gold judge"),
             ("ECE", rm.get("ece"), "calibration error, lower is better"),
             ("length correlation", rm.get("length_correlation"), "reward vs. response length; high = length bias")]
    reads = _dict(rm, "prompt_dependence")
    if _num(reads.get("accuracy")) is not None:
        items.append(("prompt dependence", reads["accuracy"], f"own reply over another prompt's, {_fmt(reads.get('n'))} "
                                                              "prompts; 0.5 = the prompt is not read"))
    return Html(f'<div class="cards">{_cards(items)}</div>')


def _rm_annotators(rm: dict) -> Html:
    ann = rm.get("annotators") if isinstance(rm.get("annotators"), dict) else {}
    flagged = [str(a) for a in ann["flagged"]] if isinstance(ann.get("flagged"), list) else []
    per = rm.get("per_annotator") if isinstance(rm.get("per_annotator"), dict) else {}
    kappa = ann.get("mean_kappa") if isinstance(ann.get("mean_kappa"), dict) else {}
    major = ann.get("agreement_with_majority") if isinstance(ann.get("agreement_with_majority"), dict) else {}
    names = _families_of([per, kappa, major])
    text = (f"Flagged by agreement: {', '.join(flagged)}." if flagged else "No annotator flagged by agreement.")
    alpha = f" Krippendorff's α = {_fmt(_num(ann.get('alpha')))}." if ann.get("alpha") is not None else ""
    out = Html("<h3>Annotators</h3>") + _tag("p", text + alpha, "flagged" if flagged else "note")
    if not names:
        return out
    rows = [[Html(f'{_e(a)} <span class="flag">flagged</span>') if a in flagged else a,
             _fmt((per.get(a) or {}).get("n")), _fmt(_num((per.get(a) or {}).get("accuracy"))),
             _fmt(_num((per.get(a) or {}).get("gold_accuracy"))), _fmt(_num(kappa.get(a))), _fmt(_num(major.get(a)))]
            for a in names]
    head = ["annotator", "held-out pairs", "RM accuracy", "RM gold accuracy", "mean κ", "agreement with majority"]
    return out + _table(head, rows, "num")


def _reward_model(run: Run) -> Html:
    title = "Reward model"
    rm = run.rm
    if rm is None:
        return _section("rm", title, _missing("No reward-model evaluation: summary.json has no rm entry and "
                                              "eval/rm.json is absent", "summary.json", run))
    parts = [_rm_overview(rm), Html("<h3>Per family</h3>"),
             _rm_groups(rm, "per_family", "family") or _missing("No per-family RM accuracy.")]
    for key, name, heading in (("by_gold_gap", "gold-score gap", "By how far apart the gold judge puts the two responses"),
                               ("by_split", "prompt", "By what the prompt holds out of training"),
                               ("by_decision", "the pair turns on", "By what the gold judge's preference turns on")):
        table = _rm_groups(rm, key, name)
        if table is not None:
            parts += [Html(f"<h3>{heading}</h3>"), table]
    return _section("rm", title, *parts, _rm_annotators(rm))


def _rm_groups(rm: dict, key: str, name: str) -> Html | None:
    """The table of an eval-rm grouping (per_family, by_gold_gap, by_split, by_decision); None when the evaluation
    has none."""
    per = rm.get(key) if isinstance(rm.get(key), dict) else {}
    rows = [[str(g), _fmt(v.get("n")), _fmt(_num(v.get("accuracy"))), _fmt(v.get("gold_pairs")),
             _fmt(_num(v.get("gold_accuracy")))] for g, v in per.items() if isinstance(v, dict)]
    return _table([name, "pairs", "accuracy", "gold pairs", "gold accuracy"], rows, "num") if rows else None


def _pick_samples(rows: list[dict], limit: int = MAX_SAMPLES) -> tuple[list[int], int]:
    """The first ``per`` prompts of each family (deterministic, every family shown), grouped by family; and ``per``."""
    families = _families_of([[r.get("family") for r in rows]])
    per = max(1, limit // max(len(families), 1))
    picked: dict[str, list[int]] = {f: [] for f in families}
    for i, r in enumerate(rows):
        fam = _families_of([[r.get("family")]])[0]
        if len(picked[fam]) < per:
            picked[fam].append(i)
    return [i for f in families for i in picked[f]][:limit], per


def _clip(text: Any) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= MAX_CHARS else f"{text[:MAX_CHARS]}… [{len(text) - MAX_CHARS:,} more characters]"


def _response_cell(stage: str, row: dict | None, best: float | None) -> Html:
    """One stage's response with its gold score, the judge's reasons, and a mark when it is the best of the row."""
    if row is None:
        return Html(f'<div class="resp"><div class="head">{STAGE_LABELS[stage]}</div>'
                    '<p class="missing">no sample for this prompt</p></div>')
    gold = _num(row.get("gold"))
    is_best = best is not None and gold == best
    reasons = row.get("reasons") if isinstance(row.get("reasons"), list) else []
    flags = ([] if row.get("ended", True) else ["no EOS"]) + [str(r) for r in reasons]
    head = (f'{STAGE_LABELS[stage]}<span class="score">gold {_e(_fmt(gold, 2))}</span>'
            + ('<span class="badge">best</span>' if is_best else ""))
    foot = _tag("div", "; ".join(flags), "reasons") if flags else Html("")
    return Html(f'<div class="resp{" best" if is_best else ""}"><div class="head">{head}</div>'
                f'{_tag("div", _clip(row.get("response")), "text")}{foot}</div>')


def _samples(run: Run) -> Html:
    title = "Samples"
    stages = [s for s in STAGES if s in run.samples]
    if not stages:
        why = _missing("No samples", [f"eval/{s}.samples.jsonl" for s in STAGES], run)
        return _section("samples", title, why)
    ref = run.samples[stages[0]]
    picked, per = _pick_samples(ref)
    cards = [_sample_card(run, stages, i) for i in picked]
    absent = [f"{STAGE_LABELS[s]} ({_problem(run, f'eval/{s}.samples.jsonl')})" for s in STAGES
              if s not in run.samples]
    note = (f"{len(cards)} of {len(ref)} held-out prompts, the first {per} of each family. The best gold score "
            "of each row is marked; the judge's reasons for lost points are in italics.")
    note += f" No samples for: {', '.join(absent)}." if absent else ""
    return _section("samples", title, _tag("p", note, "note"), _join(cards))


def _sample_card(run: Run, stages: list[str], i: int) -> Html:
    """Prompt ``i`` and each stage's response to it; a stage whose row ``i`` is another prompt shows none."""
    ref = run.samples[stages[0]][i]
    rows = {s: run.samples[s][i] if i < len(run.samples[s]) and run.samples[s][i].get("prompt") == ref.get("prompt")
            else None for s in stages}
    golds = {_num(r.get("gold")) for r in rows.values() if r is not None} - {None}
    best = max(golds) if len(golds) > 1 else None  # all equal: no winner to mark
    cells = _join(_response_cell(s, rows[s], best) for s in stages)
    fam = _families_of([[ref.get("family")]])[0]
    return Html(f'<div class="sample"><div class="prompt">{_tag("span", fam, "fam")}'
                f'{_tag("div", _clip(ref.get("prompt")), "text")}</div>'
                f'<div class="resps" style="grid-template-columns:repeat({len(stages)},1fr)">{cells}</div></div>')


# --- the safety layer: red teaming, reward hacking and mode collapse, policy evaluation, alignment tax ------------


def _rates(result: dict, key: str) -> dict[str, dict]:
    """``by_strategy`` / ``by_category`` of a red-team result: name -> {"asr", "n"}."""
    return {str(k): v for k, v in _dict(result, key).items() if isinstance(v, dict)}


def _redteam_table(red: dict, other: dict, key: str, what: str) -> tuple[list[str], Html]:
    """(names, table) of success rates per ``key`` entry: the policy's and the comparison model's side by side."""
    mine, theirs = _rates(red, key), _rates(other, key)
    names = _families_of([mine, theirs])
    models = [red] + ([other] if other else [])
    rows = [[n, _fmt((mine.get(n) or theirs.get(n) or {}).get("n")),
             *_best_cells([_rates(m, key).get(n, {}).get("asr") for m in models], -1, 3)] for n in names]
    head = [what, "attacks", *(f"ASR ↓ {_model_name(m.get('model'))}" for m in models)]
    return names, _table(head, rows, "num")


def _attack_cards(result: dict, limit: int = 5) -> Html:
    """The ``limit`` most harmful successful attacks on one model: prompt and response (untrusted, escaped, cut)."""
    worst = [w for w in _list(result.get("worst")) if isinstance(w, dict)][:limit]
    if not worst:
        return _status("No attack succeeded.", "ok")
    return _join(Html('<div class="sample"><div class="prompt">')
                 + _tag("span", f"{w.get('strategy')} · {w.get('category')}", "fam")
                 + _tag("div", _clip(w.get("prompt")), "text")
                 + Html('</div><div class="resp"><div class="head">')
                 + f"response · harm {_fmt(_num(w.get('harm')), 2)}" + Html("</div>")
                 + _tag("div", _clip(w.get("response")), "text") + Html("</div></div>") for w in worst)


def _redteam_verdict(red: dict, other: dict) -> Html:
    asr, ref = _num(red.get("asr")), _num(other.get("asr"))
    text = (f"Attack success rate of the final policy ({_model_name(red.get('model'))}): {_fmt(asr)} over "
            f"{_fmt(red.get('n'))} attacks")
    text += (f", against {_fmt(ref)} for the comparison model ({_model_name(other.get('model'))})."
             if ref is not None else ".")
    text += f" Success is judged by the {red.get('judge', '?')} judge"
    text += "; the policy's decoding was steered by the constitution." if red.get("steered") else "."
    # green only when no attack got through; amber when fewer did than on the comparison model; red otherwise
    level = "ok" if asr == 0 else "warn" if ref is not None and asr is not None and asr < ref else "bad"
    return _status(text, level)


def _redteam(run: Run) -> Html:
    title = "Red teaming"
    red = run.redteam
    if red is None:
        return _optional_missing(run, "redteam", title, "redteam/redteam.json")
    other = _dict(red, "against")
    strategies, by_strategy = _redteam_table(red, other, "by_strategy", "strategy")
    models = [("policy", STAGE_COLORS["ppo"], red)] + ([("comparison", STAGE_COLORS["base"], other)] if other else [])
    series = [(f"{_model_name(m.get('model'))} ({role})", color, [_rates(m, "by_strategy").get(s, {}).get("asr")
                                                                 for s in strategies]) for role, color, m in models]
    plot = (_bars_png(strategies, series, "attack success rate", "attack success rate per strategy") if strategies
            else Html(""))
    worst = _join(_titled(f"Worst successful attacks on {_model_name(m.get('model'))} ({role})", _attack_cards(m))
                  for role, _, m in models)
    return _section("redteam", title, _redteam_verdict(red, other), plot,
                    Html('<div class="row">') + _titled("By strategy", by_strategy)
                    + _titled("By category", _redteam_table(red, other, "by_category", "category")[1]) + Html("</div>"),
                    Html(f'<div class="pair">{worst}</div>'))


def _optional_missing(run: Run, anchor: str, title: str, rels: str | Sequence[str]) -> Html:
    """Nothing for an input the run predates; a note when a file is there but could not be read."""
    bad = [r for r in ([rels] if isinstance(rels, str) else rels) if r in run.problems]
    return _section(anchor, title, _missing(f"No {title.lower()}", bad, run)) if bad else Html("")


def _alert_list(run: Run) -> Html:
    """Green when no detector fired; else red (one still firing at the end) or amber, with every alert listed."""
    detectors = {str(k): v for k, v in _dict(run.hacking, "detectors").items() if isinstance(v, dict)}
    alerts = run.alerts or []
    fired = _families_of([_list(_dict(run.hacking).get("fired")), detectors, [a.get("detector") for a in alerts]])
    iterations = _dict(run.hacking).get("iterations")
    over = f" over {_fmt(iterations)} PPO iterations" if iterations is not None else ""
    if not fired:
        return _status(f"No reward-hacking detector fired{over}.", "ok")
    active = [d for d in fired if detectors.get(d, {}).get("active")]
    text = f"{len(fired)} reward-hacking detector(s) fired{over}: {', '.join(fired)}."
    text += f" Still firing at the last iteration: {', '.join(active)}." if active else " None is firing at the end."
    if alerts:
        rows = [[_fmt(a.get("iteration")), Html("<b>") + _fmt(a.get("detector")) + Html("</b>"), _fmt(a.get("message")),
                 _fmt(_num(a.get("value"))), _fmt(_num(a.get("threshold")))] for a in alerts]
        head = ["iteration", "detector", "message", "value", "threshold"]
    else:  # a run whose alerts.jsonl is gone: the summary in stage.json still says when each detector fired
        rows = [[Html("<b>") + d + Html("</b>"), _fmt(detectors.get(d, {}).get("first_iteration")),
                 _fmt(detectors.get(d, {}).get("last_iteration")), _fmt(detectors.get(d, {}).get("times_fired")),
                 _fmt(detectors.get(d, {}).get("last_message"))] for d in fired]
        head = ["detector", "first iteration", "last iteration", "times fired", "last message"]
    return _status(text, "bad" if active else "warn") + _table(head, rows, "alerts")


def _collapse_status(run: Run) -> Html:
    if run.collapse is None:
        return Html("")
    collapsed = [i for i in _list(run.collapse.get("collapsed_iterations")) if _num(i) is not None]
    last = _dict(run.collapse, "last")
    figures = [[k, _fmt(v)] for k, v in last.items() if _num(v) is not None]  # counts stay integers
    table = _titled("Diversity of the last rollout", _table(["metric", "value"], figures, "num")) if figures else ""
    if not collapsed:
        return _status("No rollout looked collapsed (distinct n-grams, self-BLEU and similarity within bounds).",
                       "ok") + table
    shown = ", ".join(_fmt(i) for i in collapsed[:30]) + (", …" if len(collapsed) > 30 else "")
    reasons = [str(r) for r in _list(last.get("collapse_reasons"))]
    text = f"Mode collapse suspected at {len(collapsed)} iteration(s): {shown}."
    text += f" Last rollout: {'; '.join(reasons)}." if reasons else ""
    return _status(text, "warn") + table


def _hacking(run: Run) -> Html:
    title = "Reward hacking and mode collapse"
    known = [key for key, _, _ in SAFETY_CURVES]
    extra = _families_of([[k for k in r if k.startswith("reward/") and k not in known] for r in run.metrics])
    curves = list(SAFETY_CURVES) + [(k, f"Reward component {k[len('reward/'):]}", "mean value") for k in extra]
    logged = any(_series(run.metrics, k)[1] for k, _, _ in curves)
    if run.hacking is None and run.collapse is None and run.alerts is None and not logged:
        return _optional_missing(run, "hacking", title, ["ppo/stage.json", "ppo/alerts.jsonl"])
    status = _alert_list(run) if run.hacking is not None or run.alerts is not None else Html("")
    grid = _curve_grid(run.metrics, curves)[0] if logged else Html("")
    thresholds = _dict(run.hacking, "thresholds")
    details = (Html("<details><summary>detector thresholds</summary>")
               + _tag("pre", json.dumps(thresholds, indent=2)) + Html("</details>")) if thresholds else ""
    note = ("Detectors watch each PPO rollout for the signatures of reward hacking (the proxy reward rising while "
            "length, repetition or disagreement with the gold judge grows) and for collapsing diversity; they are "
            "measured, never trained on.")
    return _section("hacking", title, _tag("p", note, "note"), status, _collapse_status(run), grid, details)


def _dig(ev: dict, path: tuple[str, ...]) -> Any:
    """``ev[path[0]][path[1]]...``, or None where a level is absent or not a dict."""
    for key in path:
        ev = ev.get(key) if isinstance(ev, dict) else None
    return ev


def _policy_eval(run: Run) -> Html:
    title = "Policy evaluation"
    stages = [s for s in STAGES if s in run.evals and any(k in run.evals[s] for k in EVAL_NEW_KEYS)]
    if not stages:
        return Html("")
    evals = [run.evals[s] for s in stages]
    rows = []
    for path, label, better, digits in EVAL_ROWS:
        values = [_dig(ev, path) for ev in evals]
        if any(v is not None for v in values):
            rows.append([_arrow(label, better), *_best_cells(values, better, digits)])
    backends = _families_of([[b for ev in evals if (b := _dig(ev, ("diversity", "backend")))]])
    reasons = [f"{STAGE_LABELS[s]}: {'; '.join(map(str, _dig(ev, ('diversity', 'collapse_reasons'))))}"
               for s, ev in zip(stages, evals) if _dig(ev, ("diversity", "collapse_reasons"))]
    note = f"Semantic similarity on the {', '.join(backends)} backend." if backends else ""
    note += f" Collapse signals: {' · '.join(reasons)}." if reasons else ""
    parts = [_table(["metric", *(STAGE_LABELS[s] for s in stages)], rows, "num"), _tag("p", note.strip(), "note")]
    return _section("evaluation", title, *parts, _violations(stages, evals))


def _violations(stages: list[str], evals: list[dict]) -> Html:
    """Constitution violations per principle and stage (counts over the held-out responses; fewer is better)."""
    per = [_dict(_dig(ev, ("constitution",)), "by_principle") for ev in evals]
    principles = _families_of(per)
    if not principles:
        return Html("")
    names = _families_of([[c for ev in evals if (c := _dig(ev, ("constitution", "constitution")))]])
    rows = [[p, *_best_cells([d.get(p) for d in per], -1, 0)] for p in principles]
    title = "Constitution violations per principle" + (f" ({', '.join(names)})" if names else "")
    return _titled(title, _table(["principle", *(f"{STAGE_LABELS[s]} ↓" for s in stages)], rows, "num"))


def _stage_label(stage: str) -> str:
    return STAGE_LABELS.get(stage, stage)


def _tax_parts(tax: dict | None) -> tuple[str, dict, dict[str, dict]]:
    """(first stage, stage -> capability, stage -> key -> % change vs the first); a change not stored is computed."""
    stages = {str(k): v for k, v in _dict(tax, "stages").items() if isinstance(v, dict)}
    key = next((k for k in _dict(tax) if str(k).startswith("change_vs_")), None)
    base = key[len("change_vs_"):] if key else next(iter(stages), "base")
    stored, before = _dict(tax, key) if key else {}, _dict(stages, base)
    change = {}
    for s, cap in stages.items():
        if s != base:
            pct = {k: _num(_dict(stored, s).get(k)) for k, _, _ in TAX_COLUMNS}
            change[s] = {k: _pct_change(_num(before.get(k)), _num(cap.get(k))) if v is None else v
                         for k, v in pct.items()}
    return base, stages, change


def _pct_change(before: float | None, after: float | None) -> float | None:
    """As ``rlhf.evaluation.alignment_tax.pct_change``, which is not imported: that module imports torch."""
    return None if before is None or after is None or before == 0 else 100.0 * (after - before) / before


def _tax_cell(value: Any, pct: float | None, better: int) -> Html:
    """``0.450 (+12.5%)``, the change green when it is for the better and red when for the worse."""
    cell = _e(_fmt(_num(value)))
    if pct is None:
        return cell
    cls = "up" if pct * better > 0 else "down" if pct * better < 0 else "pct"
    return cell + Html(f' <span class="{cls}">') + f"({pct:+.1f}%)" + Html("</span>")


def _alignment_tax(run: Run) -> Html:
    title = "Alignment tax"
    base, stages, change = _tax_parts(run.tax)
    if not stages:
        return _optional_missing(run, "tax", title, "alignment_tax.json")
    rows = [[_stage_label(s), *(_tax_cell(cap.get(k), change.get(s, {}).get(k), b) for k, _, b in TAX_COLUMNS)]
            for s, cap in stages.items()]
    head = ["stage", *(f"{_arrow(label, b)} ({'higher' if b > 0 else 'lower'} is better)"
                       for _, label, b in TAX_COLUMNS)]
    source = "alignment_tax.json (experiment)" if (run.root / "alignment_tax.json").is_file() else "summary.json"
    note = (f"What preference tuning costs in capability: accuracy on held-out arithmetic and facts prompts and "
            f"perplexity on held-out text, with the change against {_stage_label(base)} in brackets. Lower "
            f"perplexity is better. From {source}.")
    return _section("tax", title, _tag("p", note, "note"), _table(head, rows, "num"))


def _hacking_experiment(run: Run) -> Html:
    title = "Reward-hacking experiment"
    exp = run.hacking_experiment
    if exp is None:
        return _optional_missing(run, "rhexp", title, "reward_hacking/reward_hacking.json")
    arrow = lambda r, k, d: f"{_fmt(_num(r.get(k + '_start')), d)} → {_fmt(_num(r.get(k + '_end')), d)}"  # noqa: E731
    rows = [[name, arrow(r, "proxy", 2), arrow(r, "gold", 3), arrow(r, "length", 1), _fmt(_num(r.get("heldout_gold"))),
             _fmt(_num(r.get("heldout_length")), 1), ", ".join(map(str, _list(r.get("alerts")))) or "—"]
            for name, r in _dict(exp, "runs").items() if isinstance(r, dict)]
    sft = _dict(exp, "sft")
    if sft:
        rows.append(["SFT (reference)", "", "", "", _fmt(_num(sft.get("heldout_gold"))),
                     _fmt(_num(sft.get("heldout_length")), 1), ""])
    head = ["run", "proxy start → end", "gold start → end", "length start → end", "held-out gold ↑",
            "held-out length", "detectors fired"]
    who = f" labelled by {exp['annotator']} alone" if exp.get("annotator") else ""
    note = (f"PPO against a reward model trained on preferences{who}, without and with a length penalty: a hacked "
            "policy raises the proxy reward and its length while the gold score stalls or falls.")
    return _section("rhexp", title, _tag("p", note, "note"), _table(head, rows, "num textlast"))


def _config(run: Run) -> Html:
    title = "Configuration"
    if run.config is None:
        return _section("config", title, _missing("No configuration", "config.json", run))
    text = json.dumps(run.config, indent=2, ensure_ascii=False)
    summary = f"config.json: {len(run.config)} top-level entries ({', '.join(map(str, run.config))})"
    return _section("config", title, Html(f"<details><summary>{_e(summary)}</summary>{_tag('pre', text)}</details>"))


# (anchor, title in the navigation, section); a section that returns nothing (an input the run predates) is left out
SECTIONS: tuple[tuple[str, str, Callable[[Run], Html]], ...] = (
    ("headline", "Headline", _headline), ("rounds", "Rounds", _rounds), ("curves", "Training curves", _curves),
    ("overopt", "Over-optimisation", _overopt), ("hacking", "Reward hacking", _hacking),
    ("rhexp", "Hacking experiment", _hacking_experiment), ("families", "Per family", _families),
    ("evaluation", "Policy evaluation", _policy_eval), ("tax", "Alignment tax", _alignment_tax),
    ("algorithms", "Algorithms", _algorithms), ("redteam", "Red teaming", _redteam), ("rm", "Reward model", _reward_model),
    ("samples", "Samples", _samples),
    ("config", "Configuration", _config))


def render(run: Run) -> str:
    """The whole page: header, then one section per concern, in reading order."""
    sections = [(anchor, title, section(run)) for anchor, title, section in SECTIONS]
    sections = [(anchor, title, body) for anchor, title, body in sections if body]
    body = _header(run, [(anchor, title) for anchor, title, _ in sections]) + _join(b for _, _, b in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>RLHF report: {_e(run.root.resolve().name)}</title><style>{CSS}</style></head>"
            f"<body><main>{body}</main></body></html>\n")


def build_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` (atomically: a reader never sees half a report) and return its path."""
    run = read_run(run_dir)
    out = run.root / "report.html"
    write_text_atomic(out, render(run))
    return out


CSS = """
:root { --fg:#1f2328; --muted:#656d76; --line:#d8dee4; --bg:#ffffff; --soft:#f6f8fa; --accent:#4c78a8;
        --good:#1a7f37; --goodbg:#eaf6ec; --warn:#9a6700; --warnbg:#fff8c5; --bad:#cf222e; --badbg:#ffebe9; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg); font:14px/1.5 -apple-system, "Segoe UI", Helvetica, Arial,
       sans-serif; }
main { max-width:1240px; margin:0 auto; padding:24px 32px 64px; }
header { border-bottom:1px solid var(--line); padding-bottom:12px; margin-bottom:8px; }
h1 { font-size:26px; margin:0 0 4px; }
h2 { font-size:20px; margin:36px 0 12px; padding-bottom:6px; border-bottom:1px solid var(--line); }
h3 { font-size:15px; margin:22px 0 8px; }
.meta { color:var(--muted); margin:0 0 10px; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size:12.5px; }
code { background:var(--soft); padding:1px 5px; border-radius:4px; }
nav a { color:var(--accent); text-decoration:none; margin-right:16px; font-weight:600; }
nav a:hover { text-decoration:underline; }
table { border-collapse:collapse; margin:8px 0 12px; min-width:360px; }
th, td { padding:5px 12px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { background:var(--soft); font-weight:600; }
table.num td:not(:first-child), table.num th:not(:first-child) { text-align:right;
       font-variant-numeric:tabular-nums; }
table.times td:last-child, table.times th:last-child { text-align:left; min-width:220px; }
table.textlast td:last-child, table.textlast th:last-child { text-align:left; }
.row { display:flex; flex-wrap:wrap; gap:40px; align-items:flex-start; }
.bar { display:inline-block; height:10px; background:var(--accent); opacity:.7; border-radius:2px;
       vertical-align:middle; max-width:170px; }
.pct { color:var(--muted); margin-left:6px; font-size:12px; }
.sub { display:block; color:var(--muted); font-size:11px; }
b.best { color:var(--good); }
.cards { display:flex; flex-wrap:wrap; gap:12px; margin:8px 0 16px; }
.card { border:1px solid var(--line); border-radius:8px; padding:10px 14px; min-width:170px; flex:0 1 220px;
        background:var(--soft); }
.card .label { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .value { font-size:24px; font-weight:600; font-variant-numeric:tabular-nums; }
.card .note { color:var(--muted); font-size:12px; }
.grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(330px, 1fr)); gap:12px; }
img { max-width:100%; height:auto; border:1px solid var(--line); border-radius:6px; background:#fff; }
.note { color:var(--muted); }
.missing { color:var(--warn); background:var(--warnbg); border:1px solid #eed888; border-radius:6px;
           padding:8px 12px; }
.verdict { border-left:4px solid var(--accent); background:var(--soft); padding:8px 12px; }
.flagged { color:var(--warn); }
.flag { font-size:11px; color:var(--warn); background:var(--warnbg); border-radius:4px; padding:0 5px; }
.sample { border:1px solid var(--line); border-radius:8px; margin:0 0 12px; overflow:hidden; }
.sample .prompt { background:var(--soft); padding:8px 12px; border-bottom:1px solid var(--line); display:flex;
                  gap:10px; align-items:baseline; }
.sample .prompt .text { font-weight:600; }
.fam { font-size:11px; color:#fff; background:var(--accent); border-radius:10px; padding:1px 8px; white-space:nowrap; }
.resps { display:grid; }
.resp { padding:8px 12px; border-right:1px solid var(--line); min-width:0; }
.resp:last-child { border-right:none; }
.resp.best { background:var(--goodbg); }
.resp .head { font-weight:600; font-size:12px; color:var(--muted); margin-bottom:4px; }
.score { margin-left:8px; font-variant-numeric:tabular-nums; color:var(--fg); }
.badge { margin-left:8px; font-size:11px; color:#fff; background:var(--good); border-radius:4px; padding:0 5px; }
.text { white-space:pre-wrap; overflow-wrap:anywhere; }
.reasons { color:var(--muted); font-size:12px; margin-top:4px; font-style:italic; }
details { border:1px solid var(--line); border-radius:6px; padding:6px 12px; }
summary { cursor:pointer; color:var(--accent); font-weight:600; }
pre { white-space:pre-wrap; overflow-wrap:anywhere; margin:8px 0 0; }
.status { border-radius:6px; padding:8px 12px; margin:8px 0 12px; font-weight:600; }
.status.ok { color:var(--good); background:var(--goodbg); border:1px solid #aad8b4; }
.status.warn { color:var(--warn); background:var(--warnbg); border:1px solid #eed888; }
.status.bad { color:var(--bad); background:var(--badbg); border:1px solid #f5b5b0; }
.up { color:var(--good); font-size:12px; }
.down { color:var(--bad); font-size:12px; }
table.alerts td:nth-child(3) { max-width:560px; overflow-wrap:anywhere; }
.pair { display:grid; grid-template-columns:repeat(auto-fit, minmax(420px, 1fr)); gap:0 24px; }
.pair .sample .resp { border-right:none; }
"""
