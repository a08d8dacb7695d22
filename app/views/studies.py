"""Study pages: the trials table (from DuckDB), the ablation report (the same Markdown as
``harness study report``: effects over seeds, rank table, from :mod:`harness.report`), the
plots (the HTML report's effect and per-seed figures and Optuna's, from
:mod:`harness.report_html`, plus parallel coordinates) and metric-vs-step curves."""

from __future__ import annotations

from typing import Any

import streamlit as st

from app import common
from evaluators.redact import redact_text, redact_url
from harness import app_data as data


@st.cache_data(ttl=common.TTL_S, show_spinner=False)
def _studies(db: str) -> list[dict[str, Any]]:
    return data.studies(common._store(db))


@st.cache_data(ttl=common.TTL_S, show_spinner=False)
def _trials(db: str, study: str) -> list[dict[str, Any]]:
    return common._store(db).trials(study)


@st.cache_data(ttl=common.TTL_S, show_spinner="Reading the Optuna study...")
def _report(db: str, workdir: str, name: str) -> dict[str, Any]:
    """The ablation Markdown and the plotly figures, or the reason they are unavailable."""
    from pathlib import Path

    import optuna
    from optuna import visualization as vis

    from harness.effects import analyse
    from harness.report import ablation_markdown
    from harness.report_html import _curves, _effect_figures, _figures

    store = common._store(db)
    row = data.study_row(store, name)
    metrics, directions = list(row["objectives"]), list(row["directions"])
    spec = row["spec"] or {}
    url = data.optuna_storage(Path(workdir), spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except Exception as err:  # a missing study, an unreachable database: say so, keep the page
        where, why = redact_url(url), redact_text(str(err))
        return {"error": f"Optuna study {name!r} could not be read from {where}: {why}"}
    design = spec.get("design", "search")
    sampler = (spec.get("optuna") or {}).get("sampler", "tpe")
    analysis = analyse(
        study,
        metrics,
        directions,
        spec.get("baseline"),
        design,
        sampler,
        spec.get("repeats"),
        workdir=Path(workdir),  # run directories are recorded relative to it
    )
    figs = _effect_figures(analysis)
    if design == "search":  # a fixed design's history and slices say nothing (report_html)
        figs += _figures(study, metrics, directions)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.params]
    if len(done) >= 2:
        target = (lambda t: t.values[0]) if len(metrics) > 1 else None
        figs.append(
            (
                f"Parallel coordinates ({metrics[0]})",
                vis.plot_parallel_coordinate(study, target=target, target_name=metrics[0]),
            )
        )
    markdown = ablation_markdown(
        study,
        metrics,
        directions,
        spec.get("baseline"),
        design=design,
        sampler=sampler,
        analysis=analysis,
    )
    return {"markdown": markdown, "figures": figs, "curves": _curves(metrics, analysis)}


def trials_ui(trials: list[dict[str, Any]], objectives: list[str]) -> None:
    table = []
    for t in trials:
        row = {"trial": t["number"], "state": t["state"]}
        for k, name in enumerate(objectives):
            row[name] = t["values"][k] if t["values"] else None
        row.update({f"param {k}": common.fmt(v) for k, v in (t["params"] or {}).items()})
        row["error"] = (t["error"] or "")[:200]
        row["run"] = t["run_id"]
        table.append(row)
    st.dataframe(table, hide_index=True, key="st_trials")


def main() -> None:
    st.title("Studies")
    store = common.store()
    if store is None:
        return
    db = common.db_path()
    studies = _studies(db)
    if not studies:
        st.info("No studies in this work directory yet: `harness study run studies/timestep.yaml`.")
        return
    names = [s["name"] for s in studies]
    asked = st.query_params.get("study")
    if asked is not None and asked not in names:
        st.error(
            f"No study {asked!r} in this work directory (a mistyped or deleted name?). Pick "
            f"one of its {len(names)} studies below."
        )
    name = st.selectbox(
        "Study",
        names,
        index=names.index(asked) if asked in names else (0 if asked is None else None),
        placeholder="Choose a study",
        key="st_study",
    )
    if name is None:
        return
    if name != asked:
        st.query_params["study"] = name  # the URL names the study on screen
    s = studies[names.index(name)]
    st.caption(
        f"{s['trials']} trials: {s['complete']} complete, {s['running']} running, "
        f"{s['pruned']} pruned, {s['failed']} failed. Objective: "
        + ", ".join(f"{o} ({d})" for o, d in zip(s["objectives"], s["directions"], strict=True))
    )
    tabs = st.tabs(["Trials", "Ablation", "Plots", "Curves"])
    with tabs[0]:
        trials_ui(_trials(db, name), list(s["objectives"]))
    report = _report(db, str(common.workdir()), name)
    if "error" in report:
        for tab in tabs[1:]:
            tab.warning(report["error"])
        return
    tabs[1].markdown(report["markdown"])
    with tabs[2]:
        if not report["figures"]:
            st.info("Plots appear once a trial has completed.")
        for k, (title, fig) in enumerate(report["figures"]):
            st.subheader(title)
            st.plotly_chart(fig, key=f"st_fig_{k}")
    with tabs[3]:
        if not report["curves"]:
            st.info("No metrics logged yet.")
        for k, (title, fig) in enumerate(report["curves"]):
            st.subheader(title)
            st.plotly_chart(fig, key=f"st_curve_{k}")


main()
