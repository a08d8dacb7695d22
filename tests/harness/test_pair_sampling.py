"""Pair sampling (issue 18): no (rater, pair, prompt, seed) asked twice while an unjudged one
exists, every contestant covered, no duplicate within a batch, repeats only once everything is
judged; and ``harness judge --until-width W``, which stops at the target interval width, at
exhaustion or at the --max-votes cap and says which.

The store is filled directly (contestants and renders rows, like tests/app/arena_fixture.py);
human votes are cast through :func:`harness.voting.plan_pairs` and ``record_vote``, the judge is
a deterministic fake (like tests/harness/test_arena_pipeline.py's ``FavouriteJudge``).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evaluators.judging import PairItem, Verdict
from harness.arena_pipeline import judge_round, judge_until_width
from harness.arena_pipeline import plan_pairs as judge_plan
from harness.cli import app
from harness.store import Store
from harness.voting import issue, item_key, plan_pairs, record_vote, vote_row

NAMES = [f"m{i}" for i in range(6)]  # m0 is the best, m5 the worst
PROMPTS = ["a red circle", "a blue square", "a green star", "a yellow moon"]
SEEDS = (0, 1)


def make_store(root: Path, names: Sequence[str] = NAMES, prompts: int = 4) -> Store:
    """``names`` contestants rendered on ``prompts`` prompts x 2 seeds (one tiny shared file:
    the sampler never opens images)."""
    root.mkdir(parents=True, exist_ok=True)
    store = Store(root / "harness.duckdb")
    image = root / "img.png"
    image.write_bytes(b"not read")
    rows = []
    for cid in names:
        store.add_contestant(cid, label=cid.upper())
        for pid, prompt in enumerate(PROMPTS[:prompts]):
            for seed in SEEDS:
                rows.append((cid, pid, prompt, "seen", seed, str(image), "0" * 64, 1.7e9))
    with store.transaction() as con:
        con.executemany(
            "INSERT INTO renders (contestant_id, prompt_id, prompt, category, seed, "
            "path, sha256, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    return store


def strength(cid: str) -> int:
    return -int(cid[1:])


# -- human raters -------------------------------------------------------------------------------
def test_450_human_votes_never_repeat_while_fresh_and_cover_everyone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's case: 3 raters, 6 contestants x 4 prompts x 2 seeds (120 combinations per
    rater), 450 votes in batches of 5. A clear ranking (the better one wins 85% of the time)
    makes the information score prefer the close pairs, the situation in which one pair was
    asked 27 times and a contestant appeared in 2 of 56 votes before."""
    monkeypatch.setattr("harness.voting.GOLD_RATE", 0.0)
    store = make_store(tmp_path)
    combos = len(NAMES) * (len(NAMES) - 1) // 2 * len(PROMPTS) * len(SEEDS)
    raters = ["ana", "bo", "cy"]
    rng = random.Random(0)
    judged: dict[str, Counter] = {r: Counter() for r in raters}
    appear: Counter = Counter()
    repeats_while_fresh = votes = 0
    t = 1.8e9
    while votes < 450:
        rater = raters[(votes // 5) % 3]
        batch = plan_pairs(store, rater, 5, rng=rng)
        assert len(batch) == 5, "never an empty or short batch, even after exhaustion"
        keys = [item_key(p.left_id, p.right_id, p.prompt, p.seed) for p in batch]
        assert len(set(keys)) == len(keys), "no duplicate within a batch"
        rows = []
        for p, key in zip(batch, keys, strict=True):
            fresh_left = combos - len(judged[rater])
            if judged[rater][key] and fresh_left > 0:
                repeats_while_fresh += 1
            judged[rater][key] += 1
            appear.update((p.left_id, p.right_id))
            better = max(p.left_id, p.right_id, key=strength)
            won = better if rng.random() < 0.85 else min(p.left_id, p.right_id, key=strength)
            outcome = "left" if won == p.left_id else "right"
            t += 1
            rows.append(vote_row(issue(p, now=t), outcome, rater, "s", voted_at=t))
            votes += 1
        store.add_comparisons(rows)  # one write per batch, as fast as the test can go
    assert repeats_while_fresh == 0
    # 150 votes per rater > 120 combinations: each rater judged every combination once, and
    # the 30 repeats after that were spread (each combination at most twice).
    for rater in raters:
        assert len(judged[rater]) == combos and max(judged[rater].values()) == 2
    mean = sum(appear.values()) / len(NAMES)
    assert set(appear) == set(NAMES)
    assert min(appear.values()) >= 0.7 * mean, appear


def test_coverage_pulls_in_a_contestant_the_information_score_ignores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """m0..m4 undecided in a ring (20 even votes per neighbour pair) and m5 clearly behind m0
    (lost 10 of 10): the information score prefers the undecided ring, coverage puts m5 (10
    battles, below 0.8 x the mean) into the next pairs."""
    monkeypatch.setattr("harness.voting.GOLD_RATE", 0.0)
    store = make_store(tmp_path)
    ring = [*itertools.pairwise(NAMES[:5]), (NAMES[4], NAMES[0])]
    rows = [
        {"prompt": PROMPTS[0], "seed": 0, "left_id": a, "right_id": b,
         "outcome": "left" if k % 2 else "right", "rater_id": "bo", "rater_kind": "human",
         "time": 1.8e9 + k}
        for k in range(20) for a, b in ring
    ] + [
        {"prompt": PROMPTS[1], "seed": 0, "left_id": "m0", "right_id": "m5", "outcome": "left",
         "rater_id": "bo", "rater_kind": "human", "time": 1.9e9 + k}
        for k in range(10)
    ]  # fmt: skip
    store.add_comparisons(rows)
    batch = plan_pairs(store, "ana", 3, rng=random.Random(0))
    assert len(batch) == 3 and all("m5" in (p.left_id, p.right_id) for p in batch)


def test_when_everything_is_judged_the_least_judged_come_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exhausted: 2 contestants x 1 prompt x 2 seeds. Once both items are judged, a batch still
    has pairs (repeats, the least-judged first), never more than the items there are."""
    monkeypatch.setattr("harness.voting.GOLD_RATE", 0.0)
    store = make_store(tmp_path, ["m0", "m1"], prompts=1)
    first = plan_pairs(store, "ana", 5, rng=random.Random(0))
    assert sorted(p.seed for p in first) == [0, 1]  # 2 items: 2 pairs, not 5 duplicates
    record_vote(store, issue(first[0], now=1.8e9), "left", "ana", "s")
    (again,) = plan_pairs(store, "ana", 1, rng=random.Random(1))
    assert again.seed == first[1].seed  # the fresh one, not the judged one
    record_vote(store, issue(again, now=1.8e9 + 1), "left", "ana", "s")
    repeat = plan_pairs(store, "ana", 5, rng=random.Random(2))
    assert sorted(p.seed for p in repeat) == [0, 1]


# -- the judge ------------------------------------------------------------------------------------
class RankJudge:
    """Deterministic: the contestant with the lower number wins, always."""

    kind = "judge"
    rater_id = "judge:rank:v1"

    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self.asked: list[tuple[str, str, str, int]] = []

    def judge_pairs(self, items: Sequence[PairItem]) -> list[Verdict]:
        out = []
        for it in items:
            self.asked.append((it.left_id, it.right_id, it.prompt, it.seed))
            if not self.answer:
                out.append(Verdict(None, {"error": "server down"}))
                continue
            better = max(it.left_id, it.right_id, key=strength)
            out.append(Verdict("left" if better == it.left_id else "right", {}))
        return out


def test_judge_rounds_never_repeat_while_fresh_and_cover_everyone(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    judge = RankJudge()
    for _ in range(6):  # 6 x 20 = all 120 combinations
        judge_round(store, judge, 20, progress=False)
    keys = Counter(item_key(a, b, p, s) for a, b, p, s in judge.asked)
    assert len(keys) == 120 and max(keys.values()) == 1
    appear = Counter(c for a, b, _, _ in judge.asked for c in (a, b))
    assert min(appear.values()) >= 0.7 * 240 / 6
    items, skipped = judge_plan(store, judge.rater_id, 20)
    assert len(items) == 20 and not skipped  # exhausted: repeats, not nothing


def test_until_width_stops_when_reached(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    lines: list[str] = []
    out = judge_until_width(store, RankJudge(), 1500.0, pairs=20, rounds=200, report=lines.append)
    assert out.reached and out.reason == "reached" and out.widest <= 1500.0
    assert out.stored < 120  # stopped before exhausting the combinations
    assert len(lines) == len(out.rounds) + 1
    assert lines[0].startswith("round 1: 20 asked, 20 stored")
    assert lines[-1].startswith("reached: every 95% interval <= 1500")


def test_until_width_reports_exhaustion_and_the_cap(tmp_path: Path) -> None:
    store = make_store(tmp_path, ["m0", "m1", "m2"], prompts=1)  # 3 pairs x 2 seeds = 6
    lines: list[str] = []
    out = judge_until_width(store, RankJudge(), 1.0, pairs=4, rounds=200, report=lines.append)
    assert not out.reached and out.reason == "exhausted" and out.stored == 6
    assert lines[-1].startswith("NOT reached") and "every (pair, prompt, seed)" in lines[-1]
    store = make_store(tmp_path / "cap", ["m0", "m1", "m2"], prompts=1)
    out = judge_until_width(store, RankJudge(), 1.0, pairs=4, max_votes=5, report=lines.append)
    assert out.reason == "max_votes" and out.asked == 5 and "--max-votes" in lines[-1]
    store = make_store(tmp_path / "mute", ["m0", "m1"], prompts=1)
    out = judge_until_width(store, RankJudge(answer=False), 1.0, report=lines.append)
    assert out.reason == "no_verdicts" and len(out.rounds) == 1


def test_cli_until_width_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_store(tmp_path, ["m0", "m1", "m2"], prompts=1)
    monkeypatch.setattr("harness.arena_pipeline.build_judge", lambda *a, **k: RankJudge())
    cli = CliRunner()
    args = ["judge", "--judge", "domain", "--workdir", str(tmp_path), "--pairs", "4"]
    res = cli.invoke(app, [*args, "--until-width", "1"])
    assert res.exit_code == 3, res.output
    assert "round 1:" in res.output and "NOT reached" in res.output
    res = cli.invoke(app, [*args, "--until-width", "100000"])
    assert res.exit_code == 0 and "reached: every 95% interval" in res.output, res.output
    res = cli.invoke(app, [*args, "--max-votes", "3"])
    assert res.exit_code == 2 and "--until-width" in res.output
