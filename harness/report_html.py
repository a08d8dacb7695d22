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

from harness.report import (
    SECONDARY,
    ablation_markdown,
    importance_target,
    quiet_importance_warning,
)
from harness.store import Store

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


def _curves(
    metrics: Sequence[str], store: Store, trials: list[dict[str, Any]]
) -> list[tuple[str, Any]]:
    """Metric against training step, one line per trial, for the objectives and the secondary
    metrics that the runs wrote."""
    import plotly.graph_objects as go

    rows = [r for r in trials if r.get("run_id")]
    names = [*metrics, *(m for m in (*SECONDARY, "train/loss") if m not in metrics)]
    out = []
    for name in names:
        fig = go.Figure()
        for r in rows:
            points = store.metrics(r["run_id"], name)
            points = [p for p in points if p["value"] is not None]
            if points:
                fig.add_trace(
                    go.Scatter(
                        x=[p["step"] for p in points],
                        y=[p["value"] for p in points],
                        mode="lines+markers",
                        name=f"trial {r['number']} ({r['state']})",
                    )
                )
        if fig.data:
            fig.update_layout(xaxis_title="step", yaxis_title=name, height=380)
            out.append((f"{name} against step", fig))
    return out


def _gallery(
    study: optuna.Study, metrics: Sequence[str], store: Store | None, trials: list[dict[str, Any]]
) -> str:
    if store is None or len(metrics) > 1:
        return ""
    try:
        best = study.best_trial
    except ValueError:
        return ""
    run_dir = best.user_attrs.get("run_dir")
    rows = [r for r in trials if r["number"] == best.number]
    run_id = rows[0].get("run_id") if rows else None
    if not run_dir or not run_id:
        return ""
    samples = [s for s in store.samples(run_id) if s["tag"] == "final"][:MAX_SAMPLES]
    figures = []
    for s in samples:
        path = Path(run_dir) / "samples" / s["path"]
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
        f"<h2>Best trial {best.number}: final samples</h2>"
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
) -> Path:
    """Write the report to ``out`` (parents created) and return its path."""
    body = markdown.markdown(
        ablation_markdown(study, metrics, directions, baseline),
        extensions=["tables", "fenced_code"],
    )
    parts = [body]
    trials = store.trials(study.study_name) if store is not None else []  # read once
    figs = _figures(study, metrics, directions)
    if figs and store is not None:  # curves too once any trial completed
        figs += _curves(metrics, store, trials)
    if figs:
        parts.append("<h1>Plots</h1>")
    for i, (title, fig) in enumerate(figs):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=i == 0))
    parts.append(_gallery(study, metrics, store, trials))
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
