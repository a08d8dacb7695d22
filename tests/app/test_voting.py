"""The rating logic without Streamlit: tokens, pair planning, exactly-once votes, undo, gold
pairs, the leaderboard's filters, image lookup by id, and no lost vote or result while other
processes write the same DuckDB file."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness import app_data as data
from harness.arena import leaderboard as arena_leaderboard
from harness.raters import (
    RaterError,
    add_rater,
    authenticate,
    hash_token,
    rater_id_for,
    verify_token,
)
from harness.store import StoreError
from harness.voting import (
    GOLD_NOISE_ID,
    add_gold_noise,
    comparison_id,
    issue,
    plan_pairs,
    record_vote,
    reliability,
    session_summary,
    undo_vote,
)

ROOT = Path(__file__).resolve().parents[2]


# -- tokens ---------------------------------------------------------------------------------------
def test_tokens_are_stored_only_as_salted_hashes(arena) -> None:
    stored = arena.store.query("SELECT token_hash FROM raters WHERE rater_id = ?", [arena.rater_id])
    digest = stored[0]["token_hash"]
    assert arena.token not in digest and digest.startswith("sha256$")
    assert verify_token(arena.token, digest)
    assert not verify_token(arena.token + "x", digest)
    # Same token, fresh salt: a different stored value, both verify.
    assert hash_token(arena.token) != hash_token(arena.token)
    assert authenticate(arena.store, arena.token).rater_id == "ana-lima"
    assert authenticate(arena.store, "") is None and authenticate(arena.store, None) is None


def test_rater_registration_rules(arena) -> None:
    assert rater_id_for("  Bo  Chen ") == "bo-chen"
    with pytest.raises(RaterError, match="not usable"):
        rater_id_for("../etc")
    with pytest.raises(RaterError, match="--new-token"):
        add_rater(arena.store, "Ana Lima")
    _, token = add_rater(arena.store, "Ana Lima", rotate=True)
    assert authenticate(arena.store, arena.token) is None  # the old link died
    assert authenticate(arena.store, token).name == "Ana Lima"
    with pytest.raises(RaterError, match="taken by a domain rater"):
        add_rater(arena.store, "domain")


def test_cli_raters_add_prints_a_working_link(arena) -> None:
    from harness.cli import app

    runner = CliRunner()
    result = runner.invoke(
        app, ["raters", "add", "Bo Chen", "--workdir", str(arena.workdir), "--port", "9000"]
    )
    assert result.exit_code == 0, result.output
    link = result.output.strip().splitlines()[-1]
    assert link.startswith("http://localhost:9000/rate?token=")
    assert authenticate(arena.store, link.split("token=")[1]).rater_id == "bo-chen"
    again = runner.invoke(app, ["raters", "add", "Bo Chen", "--workdir", str(arena.workdir)])
    assert again.exit_code == 2 and "--new-token" in again.output
    listed = runner.invoke(app, ["raters", "list", "--workdir", str(arena.workdir)])
    assert "bo-chen (Bo Chen): 0 votes" in listed.output


# -- pairs and votes ------------------------------------------------------------------------------
def test_planned_pairs_are_paired_renders_of_regular_contestants(arena, monkeypatch) -> None:
    monkeypatch.setattr("harness.voting.GOLD_RATE", 0.0)
    pairs = plan_pairs(arena.store, arena.rater_id, 8, rng=random.Random(0))
    assert len(pairs) == 8
    renders = {
        (r["contestant_id"], r["prompt_id"], r["seed"])
        for r in arena.store.query("SELECT contestant_id, prompt_id, seed FROM renders")
    }
    for p in pairs:
        assert p.left_id != p.right_id and GOLD_NOISE_ID not in (p.left_id, p.right_id)
        assert (p.left_id, p.prompt_id, p.seed) in renders
        assert (p.right_id, p.prompt_id, p.seed) in renders
    keys = [(frozenset((p.left_id, p.right_id)), p.prompt_id) for p in pairs]
    assert len(set(keys)) == len(keys)  # no pair on the same prompt twice in a batch
    assert {p.left_id for p in pairs} != {pairs[0].left_id}  # sides vary


def test_the_pair_sampler_asks_for_the_least_measured_pair(arena, monkeypatch) -> None:
    """After many even human votes on c-good vs c-mid and c-mid vs c-bad, the pair never
    compared (c-good vs c-bad: undecided too, and only measured through c-mid, so with twice
    the variance) is the most useful one (evaluators.ratings.next_pairs)."""
    monkeypatch.setattr("harness.voting.GOLD_RATE", 0.0)
    rows = []
    for k in range(30):
        for left, right in (("c-good", "c-mid"), ("c-mid", "c-bad")):
            rows.append(
                {"prompt": "a red circle", "seed": 0, "left_id": left, "right_id": right,
                 "outcome": "left" if k % 2 else "right", "rater_id": "bo",
                 "rater_kind": "human", "time": 1.8e9 + k}
            )  # fmt: skip
    arena.store.add_comparisons(rows)
    first = plan_pairs(arena.store, arena.rater_id, 1, rng=random.Random(1))[0]
    assert {first.left_id, first.right_id} == {"c-good", "c-bad"}


def test_votes_are_stored_once_with_their_issue_time(arena) -> None:
    planned = plan_pairs(arena.store, arena.rater_id, 1, rng=random.Random(2))[0]
    pair = issue(planned, now=1.8e9)
    first = record_vote(arena.store, pair, "left", arena.rater_id, "s1", voted_at=1.8e9 + 2.5)
    again = record_vote(arena.store, pair, "left", arena.rater_id, "s1", voted_at=1.8e9 + 3)
    assert first.stored and not again.stored and first.comparison_id == again.comparison_id
    with pytest.raises(StoreError, match="already recorded"):
        record_vote(arena.store, pair, "right", arena.rater_id, "s1")
    rows = arena.store.comparisons("human")
    assert len(rows) == 1 and rows[0]["comparison_id"] == comparison_id(pair, arena.rater_id)
    extra = rows[0]["extra"]
    assert extra["latency_s"] == 2.5 and extra["nonce"] == pair.nonce
    assert rows[0]["time"] == 1.8e9 and rows[0]["session"] == "s1"
    left_sha = arena.store.query(
        "SELECT sha256 FROM renders WHERE contestant_id = ? AND prompt_id = ? AND seed = ?",
        [pair.left_id, pair.prompt_id, pair.seed],
    )[0]["sha256"]
    assert rows[0]["left_image"] == left_sha
    # Undo is limited to the rater's own session.
    assert not undo_vote(arena.store, first.comparison_id, arena.rater_id, "other-session")
    assert not undo_vote(arena.store, first.comparison_id, "someone-else", "s1")
    assert undo_vote(arena.store, first.comparison_id, arena.rater_id, "s1")
    assert arena.store.comparisons("human") == []


def test_gold_votes_count_for_reliability_only(arena, monkeypatch) -> None:
    monkeypatch.setattr("harness.voting.GOLD_RATE", 1.0)
    before = arena_leaderboard(arena.store, rounds=50)
    pairs = [issue(p, now=1.8e9 + k) for k, p in enumerate(
        plan_pairs(arena.store, arena.rater_id, 4, rng=random.Random(3)))]  # fmt: skip
    assert all(p.gold_expected for p in pairs) and len(pairs) == 4
    for k, p in enumerate(pairs):  # right, right, right, wrong
        outcome = p.gold_expected if k < 3 else "both_bad"
        record_vote(arena.store, p, outcome, arena.rater_id, "s")
    rel = {r["rater_id"]: r for r in reliability(arena.store)}[arena.rater_id]
    assert (rel["gold"], rel["gold_correct"], rel["gold_accuracy"], rel["votes"]) == (4, 3, 0.75, 0)
    summary = session_summary(arena.store, arena.rater_id, "s")
    assert (summary["votes"], summary["gold"], summary["gold_correct"]) == (4, 4, 3)
    assert arena_leaderboard(arena.store, rounds=50) == before  # the CLI leaderboard too
    assert data.leaderboard(arena.store, data.Filters(rater_kind="human"))[0] == []


def test_gold_noise_is_idempotent(arena) -> None:
    assert add_gold_noise(arena.store, arena.workdir / "noise") == 0  # the fixture added it
    rows = arena.store.query(
        "SELECT count(*) AS n FROM renders WHERE contestant_id = ?", [GOLD_NOISE_ID]
    )
    assert rows[0]["n"] == 4


# -- leaderboard data -----------------------------------------------------------------------------
def test_app_leaderboard_matches_the_cli_and_the_matrix_is_consistent(arena) -> None:
    rows, matrix = data.leaderboard(arena.store, data.Filters(), rounds=200)
    cli = arena_leaderboard(arena.store, rounds=200)
    assert [{k: r[k] for k in cli[0]} for r in rows] == cli
    rate = matrix["rate"]
    n = len(matrix["names"])
    for i in range(n):
        for j in range(n):
            if matrix["battles"][i][j]:
                assert rate[i][j] + rate[j][i] == pytest.approx(1.0)
    # c-good beat c-mid once and tied once: 1.5 of 2.
    assert rate[0][1] == pytest.approx(0.75)


def test_leaderboard_filters_select_the_right_votes(arena) -> None:
    assert len(data.battles(arena.store, data.Filters())) == 5
    assert len(data.battles(arena.store, data.Filters(category="seen"))) == 3
    assert len(data.battles(arena.store, data.Filters(study="toy"))) == 5
    assert data.battles(arena.store, data.Filters(study="other")) == []
    assert len(data.battles(arena.store, data.Filters(raters=("domain",)))) == 5
    assert data.battles(arena.store, data.Filters(rater_kind="judge")) == []
    with pytest.raises(ValueError, match="not one of"):
        data.Filters(rater_kind="humans")


def test_images_are_served_only_when_registered(arena) -> None:
    sample = arena.store.query("SELECT run_id, path FROM samples LIMIT 1")[0]
    assert data.sample_image(arena.store, sample["run_id"], sample["path"])[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="no registered sample"):
        data.sample_image(arena.store, sample["run_id"], "../../harness.duckdb")
    # Even a row in the store cannot lead outside the run's samples/ directory.
    with arena.store.transaction() as con:
        con.execute(
            "INSERT INTO samples (run_id, path, sha256) VALUES (?, '../config.json', 'x')",
            [sample["run_id"]],
        )
    with pytest.raises(FileNotFoundError, match="outside"):
        data.sample_image(arena.store, sample["run_id"], "../config.json")


# -- concurrency ----------------------------------------------------------------------------------
_WRITER = textwrap.dedent(
    """
    import sys, time
    from harness.store import Store
    store = Store(sys.argv[1], timeout=120)
    kind, n = sys.argv[2], int(sys.argv[3])
    for k in range(n):
        if kind == "metrics":  # a study ingesting a trainer's metrics
            with store.transaction() as con:
                con.execute("INSERT INTO metrics VALUES ('toy/0', ?, 'concurrent', ?, ?)",
                            [1000 + k, float(k), time.time()])
        else:  # a judge storing its verdicts
            store.add_comparisons([{"prompt": "a red circle", "seed": 0, "left_id": "c-good",
                "right_id": "c-mid", "outcome": "left", "rater_id": "judge:test",
                "rater_kind": "judge", "time": 1.9e9 + k}])
    print("done", store.stats.retries)
    """
)


@pytest.mark.slow
def test_no_vote_or_result_is_lost_while_others_write(arena, monkeypatch) -> None:
    """Two processes write metrics and judge verdicts to the same DuckDB file while votes are
    cast through the app's vote function: every write of every process is there at the end."""
    monkeypatch.setattr("harness.voting.GOLD_RATE", 0.2)
    n_writes, n_votes = 60, 30
    db = str(arena.workdir / "harness.duckdb")
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, db, kind, str(n_writes)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for kind in ("metrics", "judge")
    ]  # fmt: skip
    rng = random.Random(4)
    voted = 0
    while voted < n_votes:
        for planned in plan_pairs(arena.store, arena.rater_id, 5, rng=rng):
            if voted == n_votes:
                break
            pair = issue(planned, now=2.0e9 + voted)
            outcome = rng.choice(["left", "right", "tie", "both_bad"])
            assert record_vote(arena.store, pair, outcome, arena.rater_id, "conc").stored
            voted += 1
    waits = arena.store.stats.retries
    for w in writers:
        out, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
        waits += int(out.split()[-1])
    print(f"lock waits retried: {waits}")  # > 0 shows the processes really collided
    count = arena.store.query(
        "SELECT (SELECT count(*) FROM metrics WHERE name = 'concurrent') AS metrics, "
        "(SELECT count(*) FROM comparisons WHERE rater_id = 'judge:test') AS judge, "
        "(SELECT count(*) FROM comparisons WHERE rater_id = ?) AS votes",
        [arena.rater_id],
    )[0]
    assert count == {"metrics": n_writes, "judge": n_writes, "votes": n_votes}
    assert session_summary(arena.store, arena.rater_id, "conc")["votes"] == n_votes
