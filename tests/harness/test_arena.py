"""Tests for harness.arena (JSONL import, leaderboard) and the `harness arena import` and
`harness leaderboard` commands. Fast: small stores, a few hundred simulated votes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from evaluators import ratings
from harness import store as store_module
from harness.arena import ComparisonFileError, import_comparisons, leaderboard, parse_time
from harness.cli import app
from harness.store import Store, StoreError

T0 = 1_790_000_000.0
T0_ISO = "2026-09-21T14:13:20Z"  # the same instant


def line(**overrides: Any) -> dict[str, Any]:
    """One valid JSONL vote between contestants "a" and "b"."""
    rec = {
        "prompt": "a red circle",
        "seed": 0,
        "left": "a",
        "right": "b",
        "winner": "left",
        "rater": "ana",
        "time": T0,
    }
    return {k: v for k, v in {**rec, **overrides}.items() if v is not None}


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records),
        encoding="utf-8",
    )
    return path


def with_contestants(store: Store, *ids: str) -> Store:
    for c in ids:
        store.add_contestant(c)
    return store


def simulate(
    strengths: dict[str, float], per_pair: int, rater: str, kind: str, seed: int
) -> list[dict[str, Any]]:
    """Bradley-Terry votes (strengths in nats), 10 % ties, random sides, increasing times."""
    rng = np.random.default_rng(seed)
    names, out = list(strengths), []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            p_a = 1.0 / (1.0 + np.exp(strengths[b] - strengths[a]))
            for k in range(per_pair):
                left, right = (a, b) if rng.random() < 0.5 else (b, a)
                u = rng.random()
                winner = (
                    "tie"
                    if u < 0.1
                    else ("left" if (rng.random() < p_a) == (left == a) else "right")
                )
                out.append(
                    line(
                        left=left,
                        right=right,
                        winner=winner,
                        seed=k,
                        rater=rater,
                        rater_kind=kind,
                        time=T0 + len(out),
                    )
                )
    return out


def test_outcomes_and_kinds_are_the_rating_engines():
    assert store_module.OUTCOMES == ratings.OUTCOMES


# -- import ---------------------------------------------------------------------------------------
def test_import_valid_file_with_iso_and_epoch_times(tmp_path: Path):
    store = with_contestants(Store(":memory:"), "a", "b", "c")
    path = write_jsonl(
        tmp_path / "votes.jsonl",
        [
            line(time=T0, left_image="runs/a/p0.png", right_image="sha256:beef", session="s1"),
            "",  # blank lines are skipped
            line(seed=1, winner="tie", time=T0_ISO),
            line(seed=2, right="c", winner="both_bad", time="2026-09-21T16:13:21+02:00"),
            line(seed=3, winner="right", rater="gpt", rater_kind="judge", time=T0 + 3),
            line(seed=4, rater="net", rater_kind="domain", time=int(T0) + 4, extra={"p": 0.7}),
        ],
    )
    result = import_comparisons(store, path)
    assert (result.rows, result.inserted, result.already_present) == (5, 5, 0)
    rows = store.comparisons()
    assert [r["time"] for r in rows] == [T0, T0, T0 + 1, T0 + 3, T0 + 4]
    first = next(r for r in rows if r["seed"] == 0)
    assert (first["rater_kind"], first["session"], first["left_image"]) == (
        "human",
        "s1",
        "runs/a/p0.png",
    )
    assert [r["outcome"] for r in sorted(rows, key=lambda r: r["seed"])] == [
        "left",
        "tie",
        "both_bad",
        "right",
        "left",
    ]
    assert {r["rater_id"]: r["kind"] for r in store.raters()} == {
        "ana": "human",
        "gpt": "judge",
        "net": "domain",
    }
    assert store.comparisons("domain")[0]["extra"] == {"p": 0.7}

    again = import_comparisons(store, path)
    assert (again.inserted, again.already_present) == (0, 5)
    # The same vote with its time written the other way (ISO vs epoch) is the same vote.
    same = write_jsonl(tmp_path / "same.jsonl", [line(time=T0_ISO), line(seed=1, winner="tie")])
    assert import_comparisons(store, same).already_present == 2
    # ... and with another outcome it is a conflict, not a second vote.
    flipped = write_jsonl(tmp_path / "flip.jsonl", [line(seed=5), line(seed=1, winner="left")])
    with pytest.raises(StoreError, match=r"flip.jsonl:2: .*already recorded .* 'tie', not 'left'"):
        import_comparisons(store, flipped)
    assert len(store.comparisons()) == 5


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ('{"prompt": "x", "seed": 0, "le', "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (line(winner="lft"), "'winner' 'lft' is not one of left, right, tie, both_bad"),
        (line(winner=None), "missing 'winner'"),
        ({**line(), "winer": "left"}, "unknown key 'winer' (did you mean 'winner'?)"),
        (line(seed="0"), "'seed' must be int, got '0'"),
        (line(seed=True), "'seed' must be int, got True"),
        (line(right="a"), "'left' and 'right' are the same contestant 'a'"),
        (line(rater_kind="person"), "'rater_kind' 'person' is not one of human, judge, domain"),
        (line(time="2026-09-21 12:53"), "has no UTC offset"),
        (line(time="yesterday"), "'time' 'yesterday' is not ISO 8601"),
        (line(time=T0 * 1000), "milliseconds?"),
        (line(rater=""), "'rater' is empty"),
    ],
)
def test_bad_line_stores_nothing_and_names_file_and_line(tmp_path: Path, bad: Any, problem: str):
    store = with_contestants(Store(":memory:"), "a", "b")
    path = write_jsonl(tmp_path / "votes.jsonl", [line(), "", line(seed=1), bad, line(seed=2)])
    with pytest.raises(ComparisonFileError) as err:
        import_comparisons(store, path)
    message = str(err.value)
    assert f"{path}:4: " in message and problem in message, message
    assert "nothing was imported" in message
    assert store.comparisons() == [] and store.raters() == []


def test_every_bad_line_is_listed(tmp_path: Path):
    path = write_jsonl(tmp_path / "v.jsonl", [line(winner="x"), line(), "{", line(seed="s")])
    with pytest.raises(ComparisonFileError, match="3 malformed line") as err:
        import_comparisons(Store(":memory:"), path)
    assert [f"{path}:{n}: " in str(err.value) for n in (1, 2, 3, 4)] == [True, False, True, True]


def test_unknown_contestants_need_add_contestants(tmp_path: Path):
    store = with_contestants(Store(":memory:"), "a", "b")
    path = write_jsonl(tmp_path / "votes.jsonl", [line(), line(seed=1, right="bb")])
    with pytest.raises(StoreError, match=rf"{path}:2: field 'right_id': unknown contestant 'bb'"):
        import_comparisons(store, path)
    assert store.comparisons() == []
    result = import_comparisons(store, path, add_contestants=True)
    assert (result.inserted, result.contestants_added) == (2, 1)
    assert [c["contestant_id"] for c in store.contestants()] == ["a", "b", "bb"]


def test_missing_file_is_an_import_error(tmp_path: Path):
    with pytest.raises(ComparisonFileError, match="cannot read comparisons file"):
        import_comparisons(Store(":memory:"), tmp_path / "nope.jsonl")


def test_parse_time():
    assert parse_time(T0_ISO) == parse_time(T0) == parse_time(int(T0)) == T0
    assert parse_time("2026-09-21T16:13:20+02:00") == T0
    assert parse_time("2026-09-21T14:13:20.500+00:00") == T0 + 0.5
    with pytest.raises(ValueError, match="finite"):
        parse_time(float("nan"))


# -- leaderboard ----------------------------------------------------------------------------------
TRUE = {"c0": 1.2, "c1": 0.4, "c2": -0.4, "c3": -1.2}  # nats: best first


@pytest.fixture
def arena_store(tmp_path: Path) -> Store:
    """Humans vote by TRUE; the judge by the reverse order (a biased judge)."""
    store = Store(tmp_path / "harness.duckdb")
    store.add_contestant("c0", label="logit-normal")
    humans = simulate(TRUE, 120, "ana", "human", seed=1)
    reverse = dict(zip(TRUE, reversed(TRUE.values()), strict=True))
    judge = simulate(reverse, 60, "gpt", "judge", seed=2)
    path = write_jsonl(tmp_path / "votes.jsonl", humans + judge)
    import_comparisons(store, path, add_contestants=True)
    return store


def test_leaderboard_recovers_order_per_rater_kind(arena_store: Store):
    human = leaderboard(arena_store, "human", rounds=200)
    assert [r["contestant"] for r in human] == list(TRUE)
    assert [r["rank"] for r in human] == [1, 2, 3, 4]  # 0.8 nats apart: told apart
    assert all(r["lower"] <= r["rating"] <= r["upper"] for r in human)
    assert all(r["battles"] == 3 * 120 for r in human)
    assert human[0]["label"] == "logit-normal" and human[1]["label"] is None
    assert [r["contestant"] for r in sorted(human, key=lambda r: -r["elo"])] == list(TRUE)
    # Ratings are on the Arena scale: a gap of 0.8 nats is about 139 points.
    gaps = np.diff([r["rating"] for r in human])
    assert np.all(np.abs(gaps + 0.8 * ratings.POINTS_PER_NAT) < 50), gaps

    judge = leaderboard(arena_store, "judge", rounds=200)
    assert [r["contestant"] for r in judge] == list(reversed(TRUE))
    assert all(r["battles"] == 3 * 60 for r in judge)

    combined = leaderboard(arena_store, rounds=200)
    assert {r["contestant"]: r["battles"] for r in combined} == dict.fromkeys(TRUE, 3 * 180)
    assert leaderboard(arena_store, "domain") == []
    with pytest.raises(StoreError, match="did you mean 'judge'"):
        leaderboard(arena_store, "judges")  # type: ignore[arg-type]


def test_leaderboard_is_seeded(arena_store: Store):
    one = leaderboard(arena_store, "human", rounds=50, seed=3)
    assert one == leaderboard(arena_store, "human", rounds=50, seed=3)
    assert one != leaderboard(arena_store, "human", rounds=50, seed=4)


# -- CLI ------------------------------------------------------------------------------------------
def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_import_and_leaderboard(tmp_path: Path):
    work = tmp_path / "work"
    votes = write_jsonl(tmp_path / "votes.jsonl", simulate(TRUE, 30, "ana", "human", seed=0))
    res = invoke("arena", "import", votes, "--workdir", work)
    assert res.exit_code == 2 and "unknown contestant" in res.stderr and res.stdout == ""
    assert "--add-contestants" in res.stderr

    res = invoke("arena", "import", votes, "--workdir", work, "--add-contestants")
    assert res.exit_code == 0, res.output
    assert "180 comparisons read, 180 new, 0 already stored; 4 new contestants" in res.stdout
    res = invoke("arena", "import", votes, "--workdir", work)
    assert res.exit_code == 0 and "0 new, 180 already stored" in res.stdout

    res = invoke("leaderboard", "--workdir", work, "--rounds", "50")
    assert res.exit_code == 0, res.output
    assert "all raters, 180 comparisons" in res.stdout
    assert all(name in res.stdout for name in TRUE)
    assert res.stdout.index("c0") < res.stdout.index("c3")

    res = invoke(
        "leaderboard", "--workdir", work, "--rounds", "50", "--rater-kind", "human", "--json"
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["contestant"] for r in rows] == list(TRUE)
    assert set(rows[0]) == {
        "contestant",
        "label",
        "rating",
        "lower",
        "upper",
        "rank",
        "battles",
        "elo",
        "provisional",
        "top_flip_votes",
        "top_flip_cap",
    }

    res = invoke("leaderboard", "--workdir", work, "--rater-kind", "judge", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout) == []
    res = invoke("leaderboard", "--workdir", work, "--rater-kind", "judge")
    assert res.exit_code == 0 and "no comparisons" in res.stdout


def test_cli_bad_input_exits_2(tmp_path: Path):
    work = tmp_path / "work"
    bad = write_jsonl(tmp_path / "bad.jsonl", [line(), line(seed=1, winner="draw")])
    res = invoke("arena", "import", bad, "--workdir", work, "--add-contestants")
    assert res.exit_code == 2 and res.stdout == ""
    assert f"{bad}:2: 'winner' 'draw' is not one of" in res.stderr
    assert Store(work / "harness.duckdb").comparisons() == []

    res = invoke("arena", "import", tmp_path / "missing.jsonl", "--workdir", work)
    assert res.exit_code == 2 and "cannot read comparisons file" in res.stderr

    res = invoke("leaderboard", "--workdir", work, "--rater-kind", "humans")
    assert res.exit_code == 2 and "did you mean 'human'" in res.stderr
    res = invoke("leaderboard", "--workdir", tmp_path / "elsewhere")
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = invoke("leaderboard", "--workdir", work, "--rounds", "0")
    assert res.exit_code == 2


def test_cli_help():
    for args in (["--help"], ["arena", "import", "--help"], ["leaderboard", "--help"]):
        res = invoke(*args)
        assert res.exit_code == 0, res.output
    assert "--add-contestants" in invoke("arena", "import", "--help").stdout
    help_text = invoke("leaderboard", "--help").stdout
    assert all(opt in help_text for opt in ("--rater-kind", "--rounds", "--json", "--workdir"))
