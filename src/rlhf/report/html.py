"""The self-contained HTML report of a pipeline run: one file a researcher can open, mail or archive.

Everything is inline (plots as base64 PNG, CSS in a ``<style>`` tag, no JavaScript) and a
Content-Security-Policy forbids anything else, so the file renders the same offline and years later.
Every string that comes from the run folder (model responses, prompts, config values, family names,
keys) is untrusted and escaped: a policy that learned to emit ``<script>`` must not run it in the
reader's browser. Fragments this module built itself are marked ``Html``; everything else passes
through ``_e`` when it is put in the page.

Any input may be missing (a run that has not reached PPO yet, a copied summary.json alone): its
section then says what is missing instead of failing. Only a missing run folder is an error.
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
STAGE_LABELS = {"base": "Base", "sft": "SFT", "ppo": "PPO"}
STAGE_COLORS = {"base": "#9aa0a6", "sft": "#4c78a8", "ppo": "#f58518"}
PROXY_COLOR, GOLD_COLOR = "#4c78a8", "#d62728"

# (key in an EVAL dict, label, +1 higher is better / -1 lower is better / 0 neither, decimals)
HEADLINE = (
    ("gold_score", "gold score", 1, 3),
    ("win_rate", "win rate vs. previous stage", 1, 3),
    ("harmful_compliance", "harmful compliance", -1, 3),
    ("over_refusal", "over-refusal", -1, 3),
    ("honesty", "honesty", 1, 3),
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
    run.metrics = _load(run, "ppo/metrics.jsonl", read_metrics, list) or []
    for stage in STAGES:
        rows = _load(run, f"eval/{stage}.samples.jsonl", read_jsonl, list)
        if rows:
            run.samples[stage] = rows
    run.config = _load(run, "config.json", _read_json, dict)
    return run


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


def _header(run: Run) -> Html:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    summary = run.root / "summary.json"
    finished = (datetime.datetime.fromtimestamp(summary.stat().st_mtime).astimezone().strftime("%Y-%m-%d %H:%M %Z")
                if summary.is_file() else None)
    meta = [Html(f"run folder {_tag('code', run.root.resolve())}")]
    meta += [f"summary written {finished}"] if finished else []
    meta += [f"report generated {now}"]
    nav = _join(Html(f'<a href="#{a}">{_e(t)}</a>') for a, t in SECTION_TITLES)
    return Html(f'<header><h1>RLHF run report</h1><p class="meta">{Html(" · ").join(_e(m) for m in meta)}</p>'
                f"<nav>{nav}</nav></header>")


def _headline_table(run: Run) -> Html:
    stages = [s for s in STAGES if s in run.evals]
    rows = []
    for key, label, better, digits in HEADLINE:
        cells = _best_cells([run.evals[s].get(key) for s in stages], better, digits)
        if key == "win_rate":
            cells = [Html(c + _against(run.evals[s])) for c, s in zip(cells, stages)]
        rows.append([f"{label} {'↑' if better > 0 else '↓' if better < 0 else ''}".strip(), *cells])
    axes = {s: run.evals[s]["axes"] if isinstance(run.evals[s].get("axes"), dict) else {} for s in stages}
    for axis in AXES:
        values = [axes[s].get(axis) for s in stages]
        if any(v is not None for v in values):
            rows.append([f"gold axis: {axis} ↑", *_best_cells(values, 1, 3)])
    n = [run.evals[s].get("n_prompts", run.evals[s].get("n")) for s in stages]
    rows.append(["held-out prompts", *[_fmt(v) for v in n]])
    return _table(["metric", *(STAGE_LABELS[s] for s in stages)], rows, "num")


def _against(ev: dict) -> Html:
    """``vs base``: which model a stage's win rate was measured against, from its ``against.model``."""
    other = ev.get("against")
    model = other.get("model") if isinstance(other, dict) else None
    if not model or ev.get("win_rate") is None:
        return Html("")
    return Html(f'<span class="sub">vs {_e(Path(str(model)).name)}</span>')


def _cards(items: Sequence[tuple[str, Any, str]]) -> Html:
    """Big-number cards: (label, value, note)."""
    return _join(Html(f'<div class="card"><div class="label">{_e(label)}</div><div class="value">{_e(_fmt(value))}'
                      f'</div><div class="note">{_e(note)}</div></div>') for label, value, note in items)


def _headline(run: Run) -> Html:
    ppo = run.summary.get("ppo")
    if isinstance(ppo, dict):
        target = ppo.get("kl_target")
        top = Html('<div class="cards">') + _cards([
            ("PPO win rate vs SFT", ppo.get("win_rate_vs_sft"), "gold judge, ties count half"),
            ("KL to reference", ppo.get("kl"), "nats per sequence"),
            ("KL target", target, "of the adaptive β controller" if target is not None else "none: fixed β"),
        ]) + Html("</div>")
    else:
        top = _missing("PPO has not run: summary.json has no ppo entry, so there is no win rate vs SFT or KL.")
    table = _headline_table(run) if run.evals else _missing(
        "No policy evaluations: summary.json has no stages and eval/*.json are absent", "summary.json", run)
    table = _titled("Held-out evaluation (gold judge)", table)
    return _section("headline", "Headline", top, Html('<div class="row">') + table + _times(run) + Html("</div>"))


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
    plots, absent = [], []
    for key, title, ylabel in CURVES:
        xs, ys = _series(run.metrics, key)
        if ys:
            plots.append(_curve_png(xs, ys, title, ylabel, target if key == "objective/kl" else None))
        else:
            absent.append(key)
    note = (f"{len(run.metrics)} logged steps. Thin lines are raw values, thick lines an exponential moving "
            "average.")
    note += f" Not logged: {', '.join(absent)}." if absent else ""
    grid = Html(f'<div class="grid">{_join(plots)}</div>')
    return _section("curves", "Training curves", _tag("p", note, "note"), grid)


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


def _families_png(stages: list[str], families: list[str], fams: dict[str, dict[str, dict]]) -> Html:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot()
        width = 0.8 / len(stages)
        for i, s in enumerate(stages):
            ys = [_num(fams[s].get(f, {}).get("gold_score")) for f in families]
            xs = [j + (i - (len(stages) - 1) / 2) * width for j in range(len(families))]
            ax.bar(xs, [y if y is not None else 0.0 for y in ys], width * 0.95, color=STAGE_COLORS[s],
                   label=STAGE_LABELS[s])
        ax.set_xticks(range(len(families)), families, rotation=15 if len(families) > 5 else 0)
        ax.set(ylabel="mean gold score")
        ax.grid(axis="x", visible=False)
        fig.legend(loc="outside right upper")

    return _png(draw, "gold score per prompt family and stage", size=(7.5, 3.2))


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
    per = rm.get("per_family") if isinstance(rm.get("per_family"), dict) else {}
    per = {str(f): v for f, v in per.items() if isinstance(v, dict)}
    rows = [[f, _fmt(v.get("n")), _fmt(_num(v.get("accuracy"))), _fmt(v.get("gold_pairs")),
             _fmt(_num(v.get("gold_accuracy")))] for f, v in per.items()]
    table = (_table(["family", "pairs", "accuracy", "gold pairs", "gold accuracy"], rows, "num") if rows
             else _missing("No per-family RM accuracy."))
    return _section("rm", title, _rm_overview(rm), Html("<h3>Per family</h3>"), table, _rm_annotators(rm))


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


def _config(run: Run) -> Html:
    title = "Configuration"
    if run.config is None:
        return _section("config", title, _missing("No configuration", "config.json", run))
    text = json.dumps(run.config, indent=2, ensure_ascii=False)
    summary = f"config.json: {len(run.config)} top-level entries ({', '.join(map(str, run.config))})"
    return _section("config", title, Html(f"<details><summary>{_e(summary)}</summary>{_tag('pre', text)}</details>"))


SECTION_TITLES = (("headline", "Headline"), ("curves", "Training curves"), ("overopt", "Over-optimisation"),
                  ("families", "Per family"), ("rm", "Reward model"), ("samples", "Samples"),
                  ("config", "Configuration"))
SECTIONS: tuple[Callable[[Run], Html], ...] = (
    _headline, _curves, _overopt, _families, _reward_model, _samples, _config)


def render(run: Run) -> str:
    """The whole page: header, then one section per concern, in reading order."""
    body = _header(run) + _join(section(run) for section in SECTIONS)
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
        --good:#1a7f37; --goodbg:#eaf6ec; --warn:#9a6700; --warnbg:#fff8c5; }
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
"""
