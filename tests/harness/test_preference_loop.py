"""The preference loop closes, end to end, on CPU: arena votes -> DPO -> back into the arena.

A tiny finished flow run is registered in a fresh store and enters the arena twice, at 1 and at
8 Euler steps (so that one side is plainly worse). Both render the same embedded prompts and
seeds; a human rater votes through the rating app's own path (``harness.voting``: plan, issue,
record) for the 8-step side, once tie and once both_bad, and the domain judge votes a round.
The votes become a pairs file (``harness arena pairs``), Diffusion-DPO trains a LoRA on it for a
few steps (in-process ``Session``), and the tuned run is registered, added at the base's 8-step
setting, rendered on the same prompts and seeds and judged against the base alone
(``judge_round(contestants=...)``, what ``harness judge --contestant`` runs).

What is checked is the plumbing (every vote counted where it belongs, the pairs cached, the
tuned model rated from paired comparisons), not that four DPO steps improve anything.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.arena import leaderboard
from harness.arena_pipeline import (
    add_run_contestants,
    build_judge,
    embedded_prompts,
    judge_round,
    render_contestants,
)
from harness.cli import app
from harness.raters import add_rater
from harness.store import Store
from harness.voting import issue, plan_pairs, record_vote
from tests.trainers.test_preference import pref_cfg
from tests.trainers.trainer_utils import config, run_trainer
from trainers.preference.config import parse_preference_config
from trainers.preference.train import PreferenceTrainer
from trainers.rundir import RunDir
from trainers.train import Dist, Session

PROMPTS, SEEDS = 6, [0, 1]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny flow run (as in tests/trainers/test_preference.py): the model tuned."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    cfg = config(train={"steps": 10}, eval={"every": 1000, "num_images": 4, "steps": 2})
    proc = run_trainer(cfg, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_arena_votes_train_dpo_and_the_tuned_model_returns_to_the_arena(
    base: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    store = Store(work / "harness.duckdb")
    prompts = embedded_prompts(PROMPTS)

    # -- the base enters the arena at two settings, rendered on the same prompts and seeds --
    store.ingest_run_dir("base", base)
    added = add_run_contestants(store, ["base"], steps=[1, 8])
    blurry, sharp = (c.contestant_id for c in added)
    assert (blurry, sharp) == ("base@euler-1-cfg3", "base@euler-8-cfg3")
    summary = render_contestants(store, work, prompts, SEEDS, progress=False)
    assert summary.rendered == 2 * PROMPTS * len(SEEDS)

    # -- votes: a human through the rating app's path, then a domain-judge round --
    rater, _token = add_rater(store, "Ana Lima")
    planned = plan_pairs(store, rater, 8, rng=random.Random(0))
    assert len(planned) == 8 and all({p.left_id, p.right_id} == {blurry, sharp} for p in planned)
    human = ["sharp"] * 6 + ["tie", "both_bad"]
    for k, (pair, choice) in enumerate(zip(planned, human, strict=True)):
        shown = issue(pair, now=1.8e9 + k)
        outcome = ("left" if pair.left_id == sharp else "right") if choice == "sharp" else choice
        assert record_vote(store, shown, outcome, rater, "session-1").stored
    judge = build_judge("domain", store)
    judged = judge_round(store, judge, 8, progress=False)
    assert judged.stored == 8 and judged.no_verdict == 0

    votes = store.comparisons()
    outcomes = Counter(v["outcome"] for v in votes)
    assert len(votes) == 16
    assert outcomes["tie"] == 1 + judged.outcomes.get("tie", 0)
    assert outcomes["both_bad"] == 1 + judged.outcomes.get("both_bad", 0)
    human = [v for v in votes if v["rater_kind"] == "human"]
    sided = {"left", "right"}
    assert Counter("win" if v["outcome"] in sided else v["outcome"] for v in human) == {
        "win": 6,
        "tie": 1,
        "both_bad": 1,
    }
    assert all(v[f"{v['outcome']}_id"] == sharp for v in human if v["outcome"] in sided)

    # -- the votes as DPO pairs, and a few DPO steps on them --
    pairs_file = tmp_path / "pairs.pt"
    res = CliRunner().invoke(
        app, ["arena", "pairs", "--out", str(pairs_file), "--workdir", str(work)]
    )
    assert res.exit_code == 0, res.output
    used = outcomes["left"] + outcomes["right"]
    assert f"{used} pairs of 16 votes written to {pairs_file}" in res.output
    run_dir = tmp_path / "tuned"
    cfg = parse_preference_config(
        pref_cfg(base, "dpo", dpo={"pairs": "arena", "pairs_file": str(pairs_file), "beta": 50.0})
    )
    assert cfg.lora.rank == 4 and cfg.train.steps == 4
    run = RunDir(run_dir)
    run.create()
    assert Session(cfg, run, Dist(), PreferenceTrainer).run_to_end() == 0
    assert run.read_status()["status"] == "ok"
    metrics = {(r["name"], r["step"]): r["value"] for r in run.read_metrics()}
    assert metrics["pairs/read", 0] == 16
    assert metrics["pairs/tie", 0] == outcomes["tie"]
    assert metrics["pairs/both_bad", 0] == outcomes["both_bad"]
    assert metrics["pairs/used", 0] == used
    # The pair counts at step 0 do not stand in for the starting model's evaluation.
    assert ("reward/attribute/heldout", 0) in metrics and ("domain_fid", 0) in metrics
    assert ("prior_drift/domain_fid", 4) in metrics
    assert any(name == "train/dpo_implicit_acc" for name, _ in metrics)
    assert (run_dir / "preference" / "pairs.pt").is_file()

    # -- the tuned model back in the arena: same setting, prompts and seeds; judged vs the base --
    store.ingest_run_dir("tuned", run_dir)
    (tuned,) = (c.contestant_id for c in add_run_contestants(store, ["tuned"], steps=[8]))
    assert tuned == "tuned@euler-8-cfg3"
    again = render_contestants(store, work, prompts, SEEDS, progress=False)
    assert (again.rendered, again.skipped) == (PROMPTS * len(SEEDS), 2 * PROMPTS * len(SEEDS))
    # Judged against its base alone (--contestant): every new vote is tuned vs the 8-step base.
    before = len(store.comparisons())
    assert judge_round(store, judge, 8, contestants=[tuned, sharp], progress=False).stored == 8
    assert len(store.comparisons()) == before + 8
    paths = {
        (r["contestant_id"], r["prompt"], r["seed"]): r["path"]
        for r in store.query("SELECT contestant_id, prompt, seed, path FROM renders")
    }
    head_to_head = [
        v for v in store.comparisons() if {v["left_id"], v["right_id"]} == {tuned, sharp}
    ]
    assert len(head_to_head) == 8
    for v in head_to_head:  # paired: both images are the renders of the vote's prompt and seed
        for side in ("left", "right"):
            assert v[f"{side}_image"] == paths[v[f"{side}_id"], v["prompt"], v["seed"]]
    board = {row["contestant"]: row for row in leaderboard(store, rounds=50)}
    assert set(board) == {blurry, sharp, tuned}
    row = board[tuned]
    assert row["battles"] >= len(head_to_head)
    assert row["lower"] <= row["rating"] <= row["upper"]
