"""Leaderboard page: Bradley-Terry ratings with 95% intervals, rank, votes, win rate; filters
by rater kind, judge, prompt category and study; the win-rate matrix; a contestant's
provenance (never its renders: raters judge them blind); rater reliability on gold pairs."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
import streamlit as st

from app import common
from harness.app_data import Filters
from harness.store import RATER_KINDS

ALL = "all"


def filters_ui(options: dict[str, list[str]]) -> Filters:
    """The filter row; returns the chosen filters."""
    c1, c2, c3, c4 = st.columns([1, 2, 1, 1])
    kind = c1.selectbox(
        "Rater kind",
        [ALL, *RATER_KINDS],
        key="lb_kind",
        help="Whose votes: people, MLLM judges, the domain judge, or all combined",
    )
    pool = (
        options.get(kind, [])
        if kind != ALL
        else [r for k in RATER_KINDS for r in options.get(k, [])]
    )
    raters = c2.multiselect("Judge / rater", pool, key="lb_raters", placeholder="all")
    category = c3.selectbox("Prompt category", [ALL, *options["categories"]], key="lb_cat")
    study = c4.selectbox("Study", [ALL, *options["studies"]], key="lb_study")
    return Filters(
        rater_kind=None if kind == ALL else kind,
        raters=tuple(raters),
        category=None if category == ALL else category,
        study=None if study == ALL else study,
    )


def table_ui(rows: list[dict[str, Any]]) -> str | None:
    """The leaderboard table; returns the contestant whose row is selected (default: the top)."""
    votes = sum(r["battles"] for r in rows) // 2
    flip = rows[0].get("top_flip_votes")
    cap = rows[0].get("top_flip_cap")
    robustness = (
        f"Removing {flip} vote{'s' if flip != 1 else ''} changes the top"
        if flip is not None
        else f"No {cap} removed votes change the top"
    )
    st.caption(
        f"{len(rows)} contestants, {votes} votes. Bradley-Terry ratings (400 points = 10:1 odds, "
        "mean 1000) with 95% bootstrap intervals; contestants whose intervals overlap share a "
        "rank. Ties and 'both bad' count half. Provisional: fewer than 20 votes (interval at "
        f"least the ridge fit's normal one). {robustness} (found greedily: an upper bound, the "
        "true minimum is at most this). Click a row for its provenance."
    )
    table = [
        {
            "rank": r["rank"],
            "contestant": r["contestant"],
            "label": r["label"] or "",
            "rating": round(r["rating"], 1),
            "95% interval": f"{r['lower']:.0f} to {r['upper']:.0f}",
            "votes": r["battles"],
            "win rate": r["win_rate"],
            "elo": round(r["elo"], 1),
            "provisional": bool(r.get("provisional")),
        }
        for r in rows
    ]
    event = st.dataframe(
        table,
        hide_index=True,
        on_select="rerun",
        selection_mode="single-row",
        key="lb_table",
        column_config={
            "win rate": st.column_config.ProgressColumn(format="percent", min_value=0, max_value=1),
        },
    )
    picked = getattr(getattr(event, "selection", None), "rows", None) or []
    # A selection made under other filters may point past the end of this table.
    return (
        rows[picked[0]]["contestant"] if picked and picked[0] < len(rows) else rows[0]["contestant"]
    )


def effects_ui(db: str, filters: Filters) -> None:
    """The effect of a training choice on win odds (``harness leaderboard --by PARAM``)."""
    params = common.choice_params(db)
    if not params:
        st.caption("No contestant comes from a study's trial: no training choices to compare.")
        return
    c1, c2 = st.columns([2, 1])
    param = c1.selectbox("Training choice", params, key="lb_effect_param")
    style = c2.multiselect(
        "Control for style",
        ["brightness", "saturation"],
        key="lb_effect_style",
        placeholder="none",
        help="add the images' brightness / saturation difference as covariates, as LMArena's "
        "style control does: does the choice still win once style is accounted for?",
    )
    report = common.choice_effects(db, param, filters.rater_kind, tuple(style))
    if "error" in report:
        st.info(report["error"])
        return
    table = []
    for r in report["rows"]:
        if r["kind"] == "baseline":
            ratio = "1 (reference)"
        else:
            ratio = (
                f"{r['odds_ratio']:.2f} [{r['odds_ratio_lower']:.2f}, {r['odds_ratio_upper']:.2f}]"
            )
        table.append(
            {
                "value": (f"style: {r['name']}" if r["kind"] == "style" else r["name"]),
                "odds ratio of winning [95%]": ratio,
                "log-odds ± SE": f"{r['log_odds']:+.2f} ± {r['se']:.2f}",
                "votes": r["votes"],
                "contestants": r["contestants"],
                "verdict": r["verdict"],
            }
        )
    st.dataframe(table, hide_index=True, key="lb_effects")
    left_out = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in report["left_out"].items() if v)
    st.caption(
        f"Contextual Bradley-Terry over {report['votes']} votes and {report['contestants']} "
        f"contestants: each value against {report['baseline']}, seed replicas pooled, a "
        f"ridge-shrunk residual per contestant (sd {report['residual_sd']} nats); 95% Wald "
        "intervals; 'not resolved' when the interval includes 1. Of the filters above only "
        "the rater kind applies here." + (f" Left out: {left_out}." if left_out else "")
    )


def matrix_ui(matrix: dict[str, Any]) -> None:
    """Heatmap of pairwise win rates (row beats column)."""
    names = matrix["names"]
    text = [
        [f"{rate:.0%}<br>n={n}" if n else "" for rate, n in zip(rr, nn, strict=True)]
        for rr, nn in zip(matrix["rate"], matrix["battles"], strict=True)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=matrix["rate"],
            x=names,
            y=names,
            text=text,
            texttemplate="%{text}",
            colorscale="RdBu",
            zmin=0,
            zmax=1,
            colorbar={"title": "win rate"},
            hovertemplate="%{y} beats %{x}: %{z:.0%}<extra></extra>",
        )
    )
    fig.update_layout(
        height=120 + 45 * len(names),
        xaxis_title="opponent",
        yaxis_title="contestant",
        yaxis_autorange="reversed",
        margin={"t": 20},
    )
    st.plotly_chart(fig, key="lb_matrix")


def contestant_ui(db: str, cid: str) -> None:
    """Provenance of one contestant (its renders are not shown: see below)."""
    info = common.contestant(db, cid)
    if info is None:
        st.info(f"Contestant {cid} is not registered (votes were imported with its id only).")
        return
    st.subheader(f"{cid}" + (f" ({info['label']})" if info["label"] else ""))
    prov = {
        "run": info["run_id"] or "external image set",
        "study / trial": f"{info['study']} / {info['trial']}" if info["study"] else "-",
        "config hash": info["config_hash"] or "-",
        "sampler": info["solver"] or "-",
        "steps": common.fmt(info["steps"]),
        "guidance": common.fmt(info["guidance"]),
        "shift": common.fmt(info["shift"]),
        "renders": str(len(info["renders"])),
    }
    st.table([{"provenance": k, "value": v} for k, v in prov.items()], hide_index=True)
    if info["run_id"]:
        st.page_link(
            "views/runs.py",
            label=f"Open run {info['run_id']}",
            icon=":material/arrow_forward:",
            query_params={"run": info["run_id"]},
        )
    # No renders here: they are the images raters judge blind, and this page is public; a
    # rater who saw a contestant's render of a prompt would recognise its side.
    if info["renders"]:
        st.caption(
            f"{len(info['renders'])} renders in the arena rotation (not shown: raters judge "
            "them without knowing whose they are)."
        )


def reliability_ui(db: str) -> None:
    """Per human rater: votes and accuracy on gold pairs."""
    rows = common.reliability(db)
    if not rows:
        st.caption("No human raters yet: `harness raters add NAME` prints a personal link.")
        return
    st.dataframe(
        [
            {
                "rater": r["rater_id"],
                "name": r["name"],
                "votes": r["votes"],
                "gold pairs": r["gold"],
                "gold right": r["gold_correct"],
                "reliability": r["gold_accuracy"],
                "median seconds": r["median_latency_s"],
            }
            for r in rows
        ],
        hide_index=True,
        key="lb_reliability",
        column_config={
            "reliability": st.column_config.ProgressColumn(
                format="percent",
                min_value=0,
                max_value=1,
                help="share of gold pairs (known answer: an image vs pure noise) answered right",
            ),
            "median seconds": st.column_config.NumberColumn(format="%.1f"),
        },
    )


def main() -> None:
    st.title("Arena leaderboard")
    store = common.store()
    if store is None:
        return
    db = common.db_path()
    filters = filters_ui(common.filter_options(db))
    rows, matrix = common.leaderboard(db, filters)
    if not rows:
        st.info("No votes match these filters yet.")
    else:
        cid = table_ui(rows)
        with st.expander("Win-rate matrix", expanded=len(rows) <= 12):
            matrix_ui(matrix)
        with st.expander("Effect of a training choice on win odds", expanded=True):
            effects_ui(db, filters)
        if cid is not None:
            contestant_ui(db, cid)
    st.subheader("Raters")
    reliability_ui(db)


main()
