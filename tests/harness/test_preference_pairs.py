"""The arena's votes as preference pairs (harness/preference_pairs.py): winners, losers and every
left-out count from a real store; errors name the store and the fix."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.preference_pairs import arena_pairs
from harness.store import Store
from trainers.config import ConfigError
from trainers.preference.pairs import SKIP_REASONS, PairsError

# -- arena pairs ---------------------------------------------------------------------------------
PX = 8


def _png(path: Path, value: int, px: int = PX) -> np.ndarray:
    """A PNG whose pixels identify it (value, a row ramp, 255 - value), returned as [3, H, W]."""
    arr = np.zeros((px, px, 3), dtype=np.uint8)
    arr[..., 0] = value
    arr[..., 1] = np.arange(px, dtype=np.uint8)[:, None] * 7
    arr[..., 2] = 255 - value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr.transpose(2, 0, 1)


def _arena(tmp_path: Path, votes: list[tuple]) -> tuple[Path, dict[tuple[str, int], np.ndarray]]:
    """A store with contestants a, b, c (c's p1 render file is deleted; big's p0 is 16 px),
    their renders of prompts p0..p2 at seed 0, and ``votes`` of (left, right, outcome, prompt
    index, rater kind, extra)."""
    path = tmp_path / "harness.duckdb"
    store = Store(path)
    pixels: dict[tuple[str, int], np.ndarray] = {}
    rows = []
    for k, cid in enumerate(("a", "b", "c", "big")):
        store.add_contestant(cid, label=cid)
        for pid in range(3):
            png = tmp_path / "renders" / cid / f"p{pid}_s0.png"
            px = 16 if cid == "big" else PX
            pixels[cid, pid] = _png(png, 40 * k + 10 * pid, px)
            digest = hashlib.sha256(png.read_bytes()).hexdigest()
            rows.append(
                {"contestant_id": cid, "prompt_id": pid, "prompt": f"prompt {pid}", "seed": 0,
                 "path": str(png), "sha256": digest}
            )  # fmt: skip
    store.add_renders(rows)
    (tmp_path / "renders" / "c" / "p1_s0.png").unlink()
    store.add_comparisons(
        [
            {"prompt": f"prompt {pid}", "seed": 0, "left_id": left, "right_id": right,
             "outcome": outcome, "rater_id": f"{kind}-rater", "rater_kind": kind,
             "time": 1.7e9 + i, **({"extra": extra} if extra else {})}
            for i, (left, right, outcome, pid, kind, extra) in enumerate(votes)
        ]
    )  # fmt: skip
    return path, pixels


VOTES = [
    ("a", "b", "left", 0, "human", None),  # pair: a wins
    ("b", "a", "right", 1, "judge", None),  # pair: a wins (right side)
    ("a", "c", "tie", 0, "human", None),
    ("c", "b", "both_bad", 2, "human", None),
    ("b", "a", "left", 0, "human", {"gold": True, "gold_expected": "left"}),
    ("b", "c", "left", 2, "domain", None),  # rater kind not asked for
    ("a", "c", "left", 1, "human", None),  # c's render of prompt 1 is missing
    ("c", "b", "left", 2, "human", None),  # pair: c wins
    ("a", "big", "left", 0, "human", None),  # 16 px: resolution
]


def test_arena_pairs_from_a_store(tmp_path: Path) -> None:
    path, px = _arena(tmp_path, VOTES)
    pairs = arena_pairs(path, rater_kinds=("human", "judge"))
    assert pairs.counts == {
        "read": 9,
        "used": 3,
        "rater_kind": 1,
        "gold": 1,
        "contestant": 0,
        "tie": 1,
        "both_bad": 1,
        "missing_image": 1,
        "resolution": 1,
    }
    assert set(pairs.counts) == {"read", "used", *SKIP_REASONS}
    assert len(pairs) == 3
    assert pairs.prompts == ["prompt 0", "prompt 1", "prompt 2"]
    assert pairs.source == ["arena:human", "arena:judge", "arena:human"]
    assert pairs.winners.dtype == torch.uint8 and pairs.winners.shape == (3, 3, PX, PX)
    for i, (win, lose) in enumerate([(("a", 0), ("b", 0)), (("a", 1), ("b", 1)),
                                     (("c", 2), ("b", 2))]):  # fmt: skip
        assert np.array_equal(pairs.winners[i].numpy(), px[win])
        assert np.array_equal(pairs.losers[i].numpy(), px[lose])

    # only votes between a and b; then 16 px asked for: every human pair has an 8 px image
    only_ab = arena_pairs(path, rater_kinds=("human", "judge"), contestants=["a", "b"])
    assert len(only_ab) == 2 and only_ab.counts["contestant"] == 5
    with pytest.raises(PairsError, match="resolution"):
        arena_pairs(path, rater_kinds=("human",), resolution=16)
    with pytest.raises(PairsError, match="did you mean 'big'"):
        arena_pairs(path, contestants=["a", "bgi"])


def test_arena_pairs_uses_the_vote_image_without_a_render(tmp_path: Path) -> None:
    path, _ = _arena(tmp_path, [("a", "c", "right", 1, "human", None)])
    with pytest.raises(PairsError, match="1 missing_image"):
        arena_pairs(path)
    store = Store(path)
    own = _png(tmp_path / "elsewhere" / "c1.png", 200)
    store.add_comparisons(
        [{"prompt": "prompt 1", "seed": 0, "left_id": "a", "right_id": "c", "outcome": "right",
          "rater_id": "ana", "rater_kind": "human", "time": 1.8e9,
          "right_image": str(tmp_path / "elsewhere" / "c1.png")}]
    )  # fmt: skip
    pairs = arena_pairs(path)
    assert len(pairs) == 1 and np.array_equal(pairs.winners[0].numpy(), own)


def test_arena_pairs_errors(tmp_path: Path) -> None:
    path, _ = _arena(
        tmp_path, [("a", "b", "tie", 0, "human", None), ("b", "c", "tie", 2, "judge", None)]
    )
    with pytest.raises(PairsError, match="2 tie") as err:
        arena_pairs(path)
    msg = str(err.value)
    assert str(path) in msg and "read 2 comparison" in msg and "harness judge" in msg
    assert isinstance(err.value, ConfigError)
    missing = tmp_path / "nowhere.duckdb"
    with pytest.raises(PairsError, match="no results store"):
        arena_pairs(missing)
    assert not missing.exists()  # not created by looking
    with pytest.raises(PairsError, match="did you mean 'judge'"):
        arena_pairs(path, rater_kinds=("jduge",))


def test_the_pairs_command_writes_the_file_the_trainer_reads(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from harness.cli import app
    from trainers.preference.pairs import PreferencePairs

    _arena(tmp_path, VOTES)
    out = tmp_path / "pairs.pt"
    cli = CliRunner()
    args = ["arena", "pairs", "--out", str(out), "--workdir", str(tmp_path)]
    res = cli.invoke(app, [*args, "--rater-kind", "human", "--rater-kind", "judge"])
    assert res.exit_code == 0, res.output
    assert "3 pairs of 9 votes" in res.output and "1 tie, 1 both_bad" in res.output
    pairs = PreferencePairs.load(out)
    assert len(pairs) == 3 and pairs.counts["gold"] == 1
    res = cli.invoke(app, [*args, "--contestant", "a", "--contestant", "zz"])
    assert res.exit_code == 2 and "'zz'" in res.output
    assert "Traceback" not in res.output
