"""Run page: status and failure reason, the resolved config, loss and metric curves, sample
grids across training steps and the final samples (every sample, captioned with its prompt),
its final metrics. ``?run=RUN_ID`` opens a run directly (the leaderboard links here); the id is
looked up in the store, never used as a path, and an unknown id says so instead of showing
another run."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
import streamlit as st

from app import common
from harness import app_data as data


@st.cache_data(ttl=common.TTL_S, show_spinner=False)
def _runs(db: str) -> list[dict[str, Any]]:
    return data.runs(common._store(db))


@st.cache_data(ttl=common.TTL_S, show_spinner=False)
def _run(db: str, run_id: str) -> dict[str, Any] | None:
    return data.run(common._store(db), run_id)


@st.cache_data(ttl=common.TTL_S, show_spinner=False)
def _metrics(db: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    rows = common._store(db).metrics(run_id)
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["value"] is not None:
            out.setdefault(r["name"], []).append((r["step"], r["value"]))
    return out


@st.cache_data(ttl=common.TTL_S, show_spinner=False)
def _samples(db: str, run_id: str) -> list[dict[str, Any]]:
    return data.sample_sets(common._store(db), run_id)


def status_ui(run: dict[str, Any]) -> None:
    status = run["status"] or {}
    state = run["state"] or status.get("status") or "unknown"
    c = st.columns(4)
    c[0].metric("State", state)
    c[1].metric("Study / trial", f"{run['study']} / {run['trial']}" if run["study"] else "by hand")
    c[2].metric("Step", common.fmt(status.get("step")))
    c[3].metric("Config hash", (run["config_hash"] or "-")[:12])
    reason = run["error"] or status.get("reason")
    if state == "failed" or (status.get("status") == "failed"):
        st.error(f"Failed: {reason or 'no reason recorded'}")
        if run["stderr_tail"]:
            st.code(run["stderr_tail"], language=None)
    elif reason:
        st.caption(f"Trainer said: {reason}")


def curves_ui(metrics: dict[str, list[tuple[int, float]]]) -> None:
    if not metrics:
        st.info("No metrics logged yet.")
        return
    names = sorted(metrics)
    default = [n for n in ("train/loss", "eval/flow_loss") if n in metrics] or names[:1]
    chosen = st.multiselect("Metrics", names, default=default, key="run_metrics")
    for name in chosen:
        steps, values = zip(*metrics[name], strict=True)
        fig = go.Figure(
            go.Scatter(
                x=steps, y=values, mode="lines+markers" if len(steps) < 50 else "lines", name=name
            )
        )
        fig.update_layout(
            height=300, xaxis_title="step", yaxis_title=name, margin={"t": 30}, title=name
        )
        st.plotly_chart(fig, key=f"run_curve_{name}")


def samples_ui(db: str, run_id: str, samples: list[dict[str, Any]]) -> None:
    if not samples:
        st.info("No samples registered for this run yet.")
        return
    tags: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        tags.setdefault(s["tag"] or f"step {s['step']}", []).append(s)
    final = tags.pop("final", None)
    if tags:
        st.subheader("Samples across training")
        labels = list(tags)
        tag = (
            labels[0]
            if len(labels) == 1
            else st.select_slider(
                "Sample set (training step)", labels, value=labels[-1], key="run_tag"
            )
        )
        _grid(db, run_id, tags[tag])
    if final:
        st.subheader("Final samples")
        _grid(db, run_id, final)


def _grid(db: str, run_id: str, rows: list[dict[str, Any]]) -> None:
    images, caps, missing = [], [], []
    for s in rows:
        try:
            images.append(common.sample_png(db, run_id, s["path"]))
        except FileNotFoundError:
            missing.append(s["path"])  # the file was deleted since it was registered
            continue
        given = s.get("enhanced_prompt")
        shown = s["prompt"] if given in (None, s["prompt"]) else f"{s['prompt']} -> {given}"
        caps.append(f"{shown} (seed {s['seed']}, step {s['step']})")
    common.show_images(images, caps)
    if missing:
        st.caption(f"{len(missing)} registered samples are missing on disk: {', '.join(missing)}")


def final_metrics_ui(run: dict[str, Any], metrics: dict[str, list[tuple[int, float]]]) -> None:
    """The run's results: its trial's objective values and each metric's last logged value."""
    st.subheader("Results")
    if run["values"]:
        st.caption("Trial objective values: " + ", ".join(common.fmt(v) for v in run["values"]))
    if not metrics:
        st.info("No metrics logged yet.")
        return
    rows = []
    for name in sorted(metrics):
        step, value = max(metrics[name])  # the latest step
        rows.append({"metric": name, "final value": common.fmt(value), "at step": step})
    st.dataframe(rows, hide_index=True, key="run_final")


def main() -> None:
    st.title("Runs")
    store = common.store()
    if store is None:
        return
    db = common.db_path()
    runs = _runs(db)
    if not runs:
        st.info("No runs registered yet.")
        return
    ids = [r["run_id"] for r in runs]
    asked = st.query_params.get("run")
    if asked is not None and asked not in ids:
        st.error(
            f"No run {asked!r} in this work directory (a mistyped or deleted id?). Pick one "
            f"of its {len(ids)} runs below."
        )
    run_id = st.selectbox(
        "Run",
        ids,
        index=ids.index(asked) if asked in ids else (0 if asked is None else None),
        placeholder="Choose a run",
        key="run_pick",
        format_func=lambda i: f"{i} ({runs[ids.index(i)]['state'] or 'no trial'})",
    )
    if run_id is None:
        return
    if run_id != asked:
        st.query_params["run"] = run_id  # the URL names the run on screen
    run = _run(db, run_id)
    if run is None:
        st.warning(f"Run {run_id} disappeared from the store.")
        return
    status_ui(run)
    metrics = _metrics(db, run_id)
    final_metrics_ui(run, metrics)
    st.subheader("Settings")
    st.json(run["config"], expanded=2)
    curves_ui(metrics)
    samples_ui(db, run_id, _samples(db, run_id))


main()
