"""The study report as one self-contained HTML file: the Markdown ablation report, plots, and the
best trial's samples.

Plots: the objective's history (Optuna's ``plot_optimization_history``; the Pareto front for
several objectives), parameter slices (``plot_slice``), parameter importances
(``plot_param_importances``), and metric-vs-step curves per trial read from the DuckDB store.
plotly.js is inlined once, so the file opens offline and can be mailed or archived as is.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import markdown
import optuna
from optuna.trial import TrialState

from harness.effects import Analysis, Configuration, analyse, seed_dirs
from harness.report import (
    SECONDARY,
    ablation_markdown,
    importance_target,
    quiet_importance_warning,
)
from harness.store import Store
from harness.workpaths import store_work_root

MAX_SAMPLES = 16

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.gallery figure { margin: 0; width: 128px; font-size: 11px; }
.gallery img { width: 128px; height: 128px; image-rendering: pixelated; border: 1px solid #ccc; }
"""


def _figures(
    study: optuna.Study, metrics: Sequence[str], directions: Sequence[str]
) -> list[tuple[str, Any]]:
    """(title, plotly figure) for every Optuna plot that the study's data supports."""
    from optuna import visualization as vis

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not done:
        return []
    figs: list[tuple[str, Any]] = []
    multi = len(metrics) > 1

    def first(t: optuna.trial.FrozenTrial) -> float:
        return t.values[0]

    if multi:
        figs.append(("Pareto front", vis.plot_pareto_front(study, target_names=list(metrics))))
    else:
        figs.append(
            ("Objective history", vis.plot_optimization_history(study, target_name=metrics[0]))
        )
    if any(t.params for t in done):
        figs.append(
            (
                f"Parameter slices ({metrics[0]})",
                vis.plot_slice(study, target=first if multi else None, target_name=metrics[0]),
            )
        )
    if len(done) >= 3 and any(len(t.params) for t in done):
        try:
            with quiet_importance_warning():
                imp = vis.plot_param_importances(
                    study,
                    target=importance_target(directions) if multi else None,
                    target_name=metrics[0],
                )
            figs.append((f"Parameter importances ({metrics[0]})", imp))
        except (RuntimeError, ValueError):
            pass  # e.g. a single distinct value per parameter; the Markdown says why
    return figs


def _curves(metrics: Sequence[str], analysis: Analysis) -> list[tuple[str, Any]]:
    """Metric against training step: per configuration, the mean over its seeds (a line) and
    each seed (faint markers), for the objectives and the secondary metrics the runs wrote."""
    import plotly.graph_objects as go

    names = [*metrics, *(m for m in (*SECONDARY, "train/loss") if m not in metrics)]
    runs = {
        c.label: [_read_curves(c, i) for i in range(len(c.seeds))] for c in analysis.configurations
    }
    out = []
    for name in names:
        fig = go.Figure()
        for i, (label, seeds) in enumerate(runs.items()):
            colour = _COLOURS[i % len(_COLOURS)]
            per_seed = [c.get(name, {}) for c in seeds]
            steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
            if not steps:
                continue
            mean = [sum(c[s] for c in per_seed) / len(per_seed) for s in steps]
            fig.add_trace(
                go.Scatter(x=steps, y=mean, mode="lines", name=label, line={"color": colour})
            )
            for c in per_seed:
                fig.add_trace(
                    go.Scatter(
                        x=list(c),
                        y=list(c.values()),
                        mode="markers",
                        marker={"color": colour, "size": 5, "opacity": 0.45},
                        name=f"{label} (seeds)",
                        legendgroup=label,
                        showlegend=False,
                    )
                )
        # A metric evaluated once per run (at the end) has no curve: its values are in the
        # per-seed dot plot, not drawn against a single step.
        steps = {x for tr in fig.data for x in tr.x}
        if len(steps) > 1:
            fig.update_layout(xaxis_title="step", yaxis_title=name, height=380)
            out.append((f"{name} against step (line: mean over seeds; dots: seeds)", fig))
    return out


_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def _read_curves(c: Configuration, k: int) -> dict[str, dict[int, float]]:
    """Metric name -> {step: value} of configuration ``c``'s seed ``k``."""
    from trainers.rundir import RunDir

    out: dict[str, dict[int, float]] = {}
    for r in RunDir(c.seeds[k].run_dir).read_metrics():
        if r["value"] is not None:
            out.setdefault(r["name"], {})[r["step"]] = r["value"]
    return out


def _effect_figures(analysis: Analysis) -> list[tuple[str, Any]]:
    """A forest plot of the effects (one panel per metric: the estimate and its interval per
    configuration, 0 marked) and a per-seed dot plot of each configuration's final metrics."""
    import plotly.graph_objects as go

    out = []
    metrics = analysis.metrics
    # An effect without an interval (one seed) is an anecdote: it is not drawn as one.
    effects = [e for e in analysis.effects if e["ci_low"] is not None]
    if effects:
        fig = _panels(metrics)
        for j, m in enumerate(metrics, start=1):
            rows = [e for e in effects if e["metric"] == m]
            fig.add_trace(
                go.Scatter(
                    x=[e["estimate"] for e in rows],
                    y=[e["configuration"] for e in rows],
                    error_x={
                        "type": "data",
                        "symmetric": False,
                        "array": [_gap(e["ci_high"], e["estimate"]) for e in rows],
                        "arrayminus": [_gap(e["estimate"], e["ci_low"]) for e in rows],
                    },
                    mode="markers",
                    marker={"color": ["#2ca02c" if e["resolved"] else "#888" for e in rows]},
                    showlegend=False,
                ),
                row=1,
                col=j,
            )
            fig.add_vline(x=0, line_dash="dot", row=1, col=j)
        fig.update_layout(height=160 + 70 * len({e["configuration"] for e in effects}))
        title = (
            f"Effects against {analysis.baseline.label if analysis.baseline else '-'} "
            "(95% interval; green: resolved)"
        )
        out.append((title, fig))
    if analysis.configurations:
        fig = _panels(metrics)
        for j, m in enumerate(metrics, start=1):
            for i, c in enumerate(analysis.configurations):
                values = c.values(m)
                fig.add_trace(
                    go.Scatter(
                        x=values,
                        y=[c.label] * len(values),
                        mode="markers",
                        marker={"color": _COLOURS[i % len(_COLOURS)], "size": 9, "opacity": 0.7},
                        showlegend=False,
                        hovertext=[f"seed {s.seed}" for s in c.seeds if m in s.final],
                    ),
                    row=1,
                    col=j,
                )
        fig.update_layout(height=160 + 60 * len(analysis.configurations))
        out.append(("Final metrics, one dot per training seed", fig))
    return out


def _panels(metrics: Sequence[str]) -> Any:
    """One panel per metric side by side, sharing the configuration axis (labelled once)."""
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=len(metrics),
        subplot_titles=list(metrics),
        shared_yaxes=True,
        horizontal_spacing=0.03,
    )
    fig.update_layout(margin={"l": 170, "r": 20, "t": 60, "b": 40})
    return fig


def _gap(a: float | None, b: float | None) -> float:
    return 0.0 if a is None or b is None else float(a - b)


def _gallery(
    study: optuna.Study,
    metrics: Sequence[str],
    store: Store | None,
    trials: list[dict[str, Any]],
    workdir: Path | None = None,
) -> str:
    if store is None or len(metrics) > 1:
        return ""
    try:
        best = study.best_trial
    except ValueError:
        return ""
    dirs = seed_dirs(best.user_attrs, workdir)
    rows = [r for r in trials if r["number"] == best.number]
    run_id = rows[0].get("run_id") if rows else None  # the trial's first seed run
    if not dirs or not run_id:
        return ""
    run_dir = dirs[0]
    samples = [s for s in store.samples(run_id) if s["tag"] == "final"][:MAX_SAMPLES]
    figures = []
    for s in samples:
        path = run_dir / "samples" / s["path"]
        if not path.exists():
            continue
        data = base64.b64encode(path.read_bytes()).decode()
        caption = html.escape(f"{s['prompt']} (seed {s['seed']})")
        figures.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    if not figures:
        return ""
    return (
        f"<h2>Best configuration (trial {best.number}): final samples of seed 0</h2>"
        f"<p>From <code>{html.escape(str(run_dir))}/samples/final/</code>.</p>"
        f'<div class="gallery">{"".join(figures)}</div>'
    )


def write_report_html(
    study: optuna.Study,
    metrics: Sequence[str],
    directions: Sequence[str],
    out: str | Path,
    store: Store | None = None,
    baseline: Mapping[str, Any] | None = None,
    analysis: Analysis | None = None,
    workdir: Path | None = None,
) -> Path:
    """Write the report to ``out`` (parents created) and return its path. ``workdir``: the
    work directory run directories are recorded relative to (default: the store's folder)."""
    if workdir is None and store is not None:
        workdir = store_work_root(store)
    analysis = analysis or analyse(study, metrics, directions, baseline, workdir=workdir)
    md = ablation_markdown(
        study,
        metrics,
        directions,
        baseline,
        design=analysis.design,
        sampler=analysis.sampler,
        analysis=analysis,
        workdir=workdir,
    )
    # The effect plots go right after the tables they draw, before the best configuration's
    # config and the trial list.
    cut = md.find("\n## Best configuration")
    head, tail = (md, "") if cut < 0 else (md[:cut], md[cut:])
    parts = [markdown.markdown(head, extensions=["tables", "fenced_code"])]
    trials = store.trials(study.study_name) if store is not None else []  # read once
    first = _effect_figures(analysis)
    # A grid or ofat design fixed its configurations: Optuna's history (a best-so-far curve over
    # trial numbers) and slices (one point per configuration) say nothing there.
    rest = _figures(study, metrics, directions) if analysis.design == "search" else []
    if first or rest:
        rest += _curves(metrics, analysis)
    for i, (title, fig) in enumerate(first):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=i == 0))
    parts.append(markdown.markdown(tail, extensions=["tables", "fenced_code"]))
    if rest:
        parts.append("<h1>Plots</h1>")
    for i, (title, fig) in enumerate(rest):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=not first and i == 0))
    parts.append(_gallery(study, metrics, store, trials, workdir))
    doc = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>Study {html.escape(study.study_name)}</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(parts)}</body></html>"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(out)
    return out
