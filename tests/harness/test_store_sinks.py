"""The store as the evaluators' sinks (scores, judgments) and the arena writes that moved into
it: renders, rater tokens, undoing a vote. The store imports no numpy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from evaluators.judging import JudgeKind
from evaluators.sinks import JudgmentCache, JudgmentRow, ScoreSink
from harness.store import RATER_KINDS, RaterError, Store, StoreError


@pytest.fixture
def store() -> Store:
    return Store(":memory:")


def test_the_store_satisfies_the_evaluators_protocols(store: Store) -> None:
    sink: ScoreSink = store
    cache: JudgmentCache = store
    assert isinstance(sink, ScoreSink) and isinstance(cache, JudgmentCache)


def test_rater_kinds_are_human_and_the_judge_kinds() -> None:
    kinds = ("human", *get_args(JudgeKind))
    assert kinds == RATER_KINDS


def judgment(key: str, **changes: object) -> JudgmentRow:
    row = JudgmentRow(
        judgment_key=key,
        judge="domain",
        model="m",
        mode="absolute",
        rubric_version="1",
        prompt="p",
        images=["sha"],
        parsed=True,
        result={"matched": 5},
        time=1.0,
    )
    return row | changes  # type: ignore[return-value]


def test_judgments_are_replaced_or_kept(store: Store) -> None:
    assert store.upsert_judgments([judgment("k")]) == 1
    store.upsert_judgments([judgment("k", result={"matched": 4}, time=2.0)], replace=False)
    assert store.cached_judgments(["k", "nope"])["k"]["result"] == {"matched": 5}
    store.upsert_judgments([judgment("k", result={"matched": 3}, raw="{}", time=3.0)])
    (row,) = store.judgments(judge="domain", mode="absolute")
    assert row["result"] == {"matched": 3} and row["raw"] == "{}" and row["error"] is None
    assert store.judgments(model="other") == [] and store.upsert_judgments([]) == 0
    with pytest.raises(StoreError, match="judgment result is not storable as JSON"):
        store.upsert_judgments([judgment("bad", result={"x": float("nan")})])


def render(prompt_id: int, **extra: object) -> dict[str, object]:
    return {
        "contestant_id": "a",
        "prompt_id": prompt_id,
        "prompt": "p",
        "seed": 0,
        "path": f"/r/{prompt_id}.png",
        "sha256": "h",
        **extra,
    }


def test_renders_are_added_once(store: Store) -> None:
    assert store.add_renders([render(0, extra={"steps": 8}, time=5.0), render(1)]) == 2
    assert store.add_renders([render(1, path="/elsewhere.png"), render(2)]) == 1
    rows = store.query("SELECT prompt_id, path, extra, time FROM renders ORDER BY prompt_id")
    assert [r["path"] for r in rows] == ["/r/0.png", "/r/1.png", "/r/2.png"]
    assert rows[0]["extra"] == '{"steps": 8}' and rows[0]["time"] == 5.0
    with pytest.raises(StoreError, match=r"rows\[0\]: unknown field\(s\) colour"):
        store.add_renders([render(3, colour="red")])
    with pytest.raises(StoreError, match=r"rows\[1\]: missing field\(s\) sha256"):
        store.add_renders([render(3), render(4, sha256=None)])
    assert store.add_renders([]) == 0


def test_rater_tokens_and_undo(store: Store) -> None:
    assert store.add_rater_token("ana", "hash1", name="Ana")
    with pytest.raises(RaterError, match="already has a voting link"):
        store.add_rater_token("ana", "hash2", name="Ana")
    assert not store.add_rater_token("ana", "hash2", name="Ana", rotate=True)
    assert store.raters()[0]["token_hash"] == "hash2"
    store.add_rater("judge:m:v1", "judge")
    with pytest.raises(RaterError, match="taken by a judge rater"):
        store.add_rater_token("judge:m:v1", "h", name="J")
    store.add_contestant("a")
    store.add_contestant("b")
    vote = {"prompt": "p", "seed": 0, "left_id": "a", "right_id": "b", "outcome": "left",
            "rater_id": "ana", "rater_kind": "human", "time": 1.0, "session": "s1"}  # fmt: skip
    store.add_comparisons([vote])
    (cid,) = [c["comparison_id"] for c in store.comparisons()]
    assert not store.delete_comparison(cid, rater_id="ana", session="other")
    assert store.delete_comparison(cid, rater_id="ana", session="s1")
    assert store.comparisons() == []


def test_the_store_imports_no_numpy() -> None:
    code = "import sys, harness.store; print(sorted({'numpy', 'scipy', 'torch'} & {*sys.modules}))"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
