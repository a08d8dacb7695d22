"""harness.arena_effects and `harness leaderboard --by`: the effect of a training choice on win
odds, from a store filled directly (no trainer runs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from evaluators.contextual import categorical_design, fit_contextual_bt, outcome_scores
from harness.arena_effects import choice_effects, image_style, lookup_param
from harness.cli import app
from harness.store import Store

# contestant -> (trial, seed, sampler in the trial's params, grey level of its images)
CONTESTANTS = {
    "u-s0": (0, 0, "uniform", 100),
    "u-s1": (0, 1, "uniform", 100),
    "l-s0": (1, 0, "logit_normal", 200),
    "l-s1": (1, 1, "logit_normal", 200),
}
EFFECT = {"uniform": 0.0, "logit_normal": 1.0}


def build(root: Path, votes: int = 400, seed: int = 0) -> Store:
    """Two configurations x two seed runs; one imported contestant (no run) and one whose run
    config lacks the parameter; logit_normal is 1 nat stronger; images: flat grey squares."""
    root.mkdir(parents=True, exist_ok=True)
    store = Store(root / "harness.duckdb")
    store.create_study("toy", {"name": "toy"}, ["minimize"], ["fid"])
    for trial, sampler in ((0, "uniform"), (1, "logit_normal")):
        store.upsert_trial("toy", trial, "complete", params={"timesteps.sampler": sampler})
    renders = []
    for cid, (trial, rep, sampler, grey) in CONTESTANTS.items():
        run_id = f"toy/{trial}/s{rep}"
        # The config says otherwise: the trial's params must win.
        config = {"timesteps": {"sampler": "config-" + sampler}, "seed": rep}
        store.register_run(
            run_id, root / run_id, config, f"h{trial}{rep}", study="toy", trial=trial
        )
        store.add_contestant(cid, run_id=run_id)
        path = root / "img" / f"{cid}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (grey, grey, grey)).save(path)
        renders.append((cid, 0, "p", None, 0, str(path), cid, 1.0))
    store.register_run("other/0", root / "other", {"model": {"width": 8}}, "hx")
    store.add_contestant("no-param", run_id="other/0")
    store.add_contestant("imported")
    with store.transaction() as con:
        con.executemany(
            "INSERT INTO renders (contestant_id, prompt_id, prompt, category, seed, path, "
            "sha256, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            renders,
        )
    rng = np.random.default_rng(seed)
    names = [*CONTESTANTS, "no-param", "imported"]
    rows = []
    for k in range(votes):
        a, b = rng.choice(len(names), 2, replace=False)
        la, lb = (EFFECT.get(CONTESTANTS.get(names[x], (0, 0, "uniform"))[2]) for x in (a, b))
        p_left = 1 / (1 + np.exp(lb - la))
        # A tie between seeds of one configuration says nothing about the effect; it checks
        # that ties flow through like on the leaderboard.
        same = {names[a], names[b]} == {"u-s0", "u-s1"}
        outcome = "tie" if same else "left" if rng.random() < p_left else "right"
        rows.append(
            {
                "prompt": "p",
                "seed": 0,
                "left_id": names[a],
                "right_id": names[b],
                "outcome": outcome,
                "rater_id": "r",
                "rater_kind": "human",
                "time": float(k),
            }
        )
    store.add_comparisons(rows)
    return store


def test_lookup_param_prefers_trial_params_then_nested_config():
    config = {"timesteps": {"sampler": "mode"}, "a.b": 3}
    assert lookup_param({"timesteps.sampler": "uniform"}, config, "timesteps.sampler") == "uniform"
    assert lookup_param(None, config, "timesteps.sampler") == "mode"
    assert lookup_param({}, config, "a.b") == 3
    assert lookup_param({}, config, "timesteps.shift") is None


def test_choice_effects_pools_seeds_and_matches_the_direct_fit(tmp_path: Path):
    store = build(tmp_path / "w")
    report = choice_effects(store, "timesteps.sampler", residual_sd=None)
    assert report.baseline == "logit_normal"  # tie in contestants: first in sorted order
    assert report.left_out["contestants_without_run"] == 1
    assert report.left_out["contestants_without_param"] == 1
    assert report.contestants == 4
    base, level = report.rows
    assert base["kind"] == "baseline" and base["odds_ratio"] == 1.0
    assert level["name"] == "uniform" and level["contestants"] == 2
    # The same fit by hand on the votes between the four run contestants.
    votes = [
        v for v in store.comparisons()
        if v["left_id"] in CONTESTANTS and v["right_id"] in CONTESTANTS
    ]  # fmt: skip
    assert report.votes == len(votes)
    assert report.left_out["votes_without_param"] == 400 - len(votes)
    names = sorted(CONTESTANTS)
    x, _, _ = categorical_design([CONTESTANTS[n][2] for n in names], "logit_normal")
    fit = fit_contextual_bt(
        [names.index(v["left_id"]) for v in votes],
        [names.index(v["right_id"]) for v in votes],
        outcome_scores([v["outcome"] for v in votes]),
        x,
        ["uniform"],
        l2=0.01,
    )
    assert level["log_odds"] == pytest.approx(float(fit.coef[0]), abs=1e-9)
    assert level["se"] == pytest.approx(float(fit.se[0]), abs=1e-9)
    # Truth: uniform is 1 nat worse; 400 votes resolve it.
    assert level["lower"] <= -1.0 <= level["upper"]
    assert level["verdict"] == "worse"
    assert level["votes"] == sum(
        (CONTESTANTS[v["left_id"]][2] == "uniform") != (CONTESTANTS[v["right_id"]][2] == "uniform")
        for v in votes
    )
    # Residual strengths (the default) widen the interval: two seeds per level only.
    pooled = choice_effects(store, "timesteps.sampler", baseline="uniform")
    assert pooled.rows[1]["name"] == "logit_normal"
    assert pooled.rows[1]["se"] > level["se"]


def test_style_control_reads_the_images(tmp_path: Path):
    store = build(tmp_path / "w")
    assert image_style(str(tmp_path / "w/img/u-s0.png"))[0] == pytest.approx(100 / 255, abs=0.01)
    assert image_style(str(tmp_path / "w/img/u-s0.png"))[1] == 0.0  # grey: no saturation
    report = choice_effects(store, "timesteps.sampler", style=["brightness"], residual_sd=None)
    style = report.rows[-1]
    assert style["kind"] == "style" and style["name"] == "brightness"
    assert report.left_out["votes_without_images"] == 0
    # Brightness is collinear with the sampler here (each level has one grey): together they
    # are not identified, so the ridge splits the effect and both intervals widen.
    plain = choice_effects(store, "timesteps.sampler", residual_sd=None)
    assert report.rows[1]["se"] > plain.rows[1]["se"]
    with pytest.raises(ValueError, match=r"unknown style measure 'brightnes'.*brightness"):
        choice_effects(store, "timesteps.sampler", style=["brightnes"])


def test_unknown_param_says_what_to_check(tmp_path: Path):
    store = build(tmp_path / "w", votes=20)
    with pytest.raises(ValueError, match="no votes between contestants with a value for 'nope'"):
        choice_effects(store, "nope")


def test_cli_leaderboard_by(tmp_path: Path):
    build(tmp_path / "w")
    runner = CliRunner(env={"COLUMNS": "200"})  # no folding of the table's cells
    res = runner.invoke(
        app, ["leaderboard", "--workdir", str(tmp_path / "w"), "--by", "timesteps.sampler"]
    )
    assert res.exit_code == 0, res.output
    out = " ".join(res.stdout.split())
    assert "Effect of timesteps.sampler on win odds" in out
    # Two seeds per level and a residual sd of 0.5 nats: 1 nat is not resolved by 143 votes.
    assert "logit_normal (baseline)" in out and "uniform" in out and "not resolved" in out
    assert "left out: 1 contestants without run, 1 contestants without param" in out
    res = runner.invoke(
        app,
        ["leaderboard", "--workdir", str(tmp_path / "w"), "--by", "timesteps.sampler", "--json"],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert (
        data == choice_effects(Store(tmp_path / "w/harness.duckdb"), "timesteps.sampler").to_json()
    )
    res = runner.invoke(app, ["leaderboard", "--workdir", str(tmp_path / "w"), "--by", "nope"])
    assert res.exit_code == 2 and "no votes between contestants" in res.stderr
    res = runner.invoke(
        app, ["leaderboard", "--workdir", str(tmp_path / "w"), "--style", "brightness"]
    )
    assert res.exit_code == 2 and "--style needs --by" in res.stderr


def test_cli_leaderboard_shows_robustness(tmp_path: Path):
    build(tmp_path / "w", votes=40)
    res = CliRunner().invoke(
        app, ["leaderboard", "--workdir", str(tmp_path / "w"), "--rounds", "20"]
    )
    assert res.exit_code == 0, res.output
    out = " ".join(res.stdout.split())
    assert "* provisional: fewer than 20 battles" in out
    assert "Votes to remove to change the top:" in out and "greedy: an upper bound" in out


def test_leaderboard_rows_carry_robustness():
    from evaluators import ratings
    from harness.arena import rate_battles

    # One vote: the bootstrap alone gives a zero-width interval; the row's is wide and both
    # contestants' intervals hold 1000 (the mean), i.e. a zero difference is not ruled out.
    rows = rate_battles([("a", "b", "left")], {}, rounds=50)
    assert all(r["provisional"] for r in rows)
    assert all(r["upper"] - r["lower"] > 100 for r in rows)
    assert all(r["lower"] < 1000 < r["upper"] for r in rows)
    assert [r["rank"] for r in rows] == [1, 1]
    battles = [("a", "b", "left")] * 25 + [("b", "a", "left")] * 10 + [("a", "c", "left")] * 20
    rows = rate_battles(battles, {}, rounds=50)
    flip = ratings.top_flip(ratings.aggregate(battles))
    assert {r["top_flip_votes"] for r in rows} == {flip.votes} and flip.votes is not None
    assert {r["contestant"]: r["provisional"] for r in rows} == {"a": False, "b": False, "c": False}
    rows = rate_battles(battles[:30], {}, rounds=50)
    assert {r["contestant"]: r["provisional"] for r in rows} == {"a": False, "b": False}
