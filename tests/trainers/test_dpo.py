"""Diffusion-DPO's flow-matching loss and its preference pairs (arena votes, online groups)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.store import Store
from trainers.config import ConfigError
from trainers.preference.dpo import DpoLoss, dpo_loss, dpo_step_loss, flow_errors
from trainers.preference.pairs import (
    SKIP_REASONS,
    PairsError,
    PreferencePairs,
    arena_pairs,
    online_pairs,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# -- the loss ------------------------------------------------------------------------------------
def test_dpo_loss_hand_worked() -> None:
    beta = 2.0
    err_w, err_l = [0.5, 0.2], [0.3, 0.6]
    ref_w, ref_l = [0.4, 0.4], [0.4, 0.3]
    diff = [(w - lo) - (rw - rl) for w, lo, rw, rl in zip(err_w, err_l, ref_w, ref_l, strict=True)]
    inside = [-beta / 2 * d for d in diff]
    # pair 0: diff = 0.2 - 0.0 = 0.2 -> -0.2; pair 1: diff = -0.4 - 0.1 = -0.5 -> 0.5
    assert inside == pytest.approx([-0.2, 0.5])
    want = (math.log(1 + math.exp(0.2)) + math.log(1 + math.exp(-0.5))) / 2  # -log sigmoid(x)
    assert want == pytest.approx(sum(-math.log(_sigmoid(x)) for x in inside) / 2)
    out = dpo_loss(*(torch.tensor(x) for x in (err_w, err_l, ref_w, ref_l)), beta=beta)
    assert isinstance(out, DpoLoss)
    assert out.loss.item() == pytest.approx(want, rel=1e-6)
    assert out.implicit_acc == pytest.approx(0.5)
    assert out.reward_margin == pytest.approx(0.15, rel=1e-6)
    assert out.model_diff == pytest.approx((0.2 - 0.4) / 2, rel=1e-6)
    assert out.ref_diff == pytest.approx((0.0 + 0.1) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*(torch.tensor(x) for x in (err_w, err_l, ref_w, ref_l)), beta=0.0)


def test_dpo_loss_at_reference_is_log2_and_pushes_the_right_way() -> None:
    err_w = torch.tensor([0.3, 0.7, 0.1], requires_grad=True)
    err_l = torch.tensor([0.5, 0.2, 0.1], requires_grad=True)
    out = dpo_loss(err_w, err_l, err_w.detach().clone(), err_l.detach().clone(), beta=50.0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert out.implicit_acc == 0.0  # inside_term == 0 is not > 0
    assert out.reward_margin == 0.0
    out.loss.backward()
    assert err_w.grad is not None and err_l.grad is not None
    # descent lowers the winner's error and raises the loser's: d/d err_w = beta / 4 / B > 0
    assert (err_w.grad > 0).all() and (err_l.grad < 0).all()
    assert err_w.grad == pytest.approx(torch.full((3,), 50.0 / 4 / 3))


class _Net(torch.nn.Module):
    """v = a * x_t + b * t (per channel a), enough to check errors by hand."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.b = torch.nn.Parameter(torch.tensor(b))
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x_t.detach().clone(), t.detach().clone()))
        return self.a * x_t + self.b * t.view(-1, 1, 1, 1)


def test_flow_errors_by_hand() -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 4, generator=gen)
    eps = torch.randn(2, 3, 4, 4, generator=gen)
    t = torch.tensor([0.25, 0.9])
    net = _Net(0.5, -1.0)
    got = flow_errors(net, x0, eps, t)
    want = []
    for i in range(2):
        x_t = (1 - t[i]) * x0[i] + t[i] * eps[i]
        v = 0.5 * x_t - 1.0 * t[i]
        want.append(((v - (eps[i] - x0[i])) ** 2).mean())
    assert got.shape == (2,)
    assert torch.allclose(got, torch.stack(want), atol=1e-6)


def test_dpo_step_loss_pairs_share_noise_and_t_and_ref_gets_no_grad() -> None:
    gen = torch.Generator().manual_seed(1)
    x0_w = torch.randn(3, 3, 4, 4, generator=gen)
    x0_l = torch.randn(3, 3, 4, 4, generator=gen)
    eps = torch.randn(3, 3, 4, 4, generator=gen)
    t = torch.tensor([0.1, 0.5, 0.8])
    net, ref = _Net(0.3, 0.2), _Net(0.1, 0.0)
    out = dpo_step_loss(net, ref, x0_w, x0_l, eps, t, beta=10.0)
    # one call each, 2B items: winners then losers with the same t and the same eps
    assert len(net.calls) == 1 and len(ref.calls) == 1
    x_t, tt = net.calls[0]
    assert x_t.shape[0] == 6 and torch.equal(tt, torch.cat([t, t]))
    tb = t.view(-1, 1, 1, 1)
    assert torch.allclose(x_t[:3], (1 - tb) * x0_w + tb * eps)
    assert torch.allclose(x_t[3:], (1 - tb) * x0_l + tb * eps)
    out.loss.backward()
    assert net.a.grad is not None and net.a.grad.abs() > 0
    assert ref.a.grad is None and ref.b.grad is None
    # same errors as computed one by one
    with torch.no_grad():
        want = dpo_loss(
            flow_errors(net, x0_w, eps, t),
            flow_errors(net, x0_l, eps, t),
            flow_errors(ref, x0_w, eps, t),
            flow_errors(ref, x0_l, eps, t),
            beta=10.0,
        )
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-6)
    # winner == loser: with the same eps and t the difference is exactly 0
    same = dpo_step_loss(net, ref, x0_w, x0_w.clone(), eps, t, beta=10.0)
    assert same.model_diff == 0.0 and same.ref_diff == 0.0 and same.reward_margin == 0.0
    assert same.loss.item() == pytest.approx(math.log(2), abs=1e-7)


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


def test_preference_pairs_save_load(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    pairs = PreferencePairs(
        prompts=["x", "y"],
        winners=torch.randint(0, 256, (2, 3, 4, 4), generator=gen, dtype=torch.uint8),
        losers=torch.randint(0, 256, (2, 3, 4, 4), generator=gen, dtype=torch.uint8),
        source=["arena:human", "online"],
        counts={"read": 5, "used": 2, "tie": 3},
    )
    file = tmp_path / "pairs.pt"
    pairs.save(file)
    back = PreferencePairs.load(file)
    assert back.prompts == pairs.prompts and back.source == pairs.source
    assert back.counts == pairs.counts
    assert torch.equal(back.winners, pairs.winners) and torch.equal(back.losers, pairs.losers)
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.pt"]  # no temp file left
    with pytest.raises(PairsError, match="no preference pairs file"):
        PreferencePairs.load(tmp_path / "none.pt")
    with pytest.raises(ValueError, match="prompts"):
        PreferencePairs(["x"], pairs.winners, pairs.losers, ["online"])


# -- online pairs --------------------------------------------------------------------------------
def test_online_pairs() -> None:
    images = torch.arange(9, dtype=torch.float32).view(9, 1, 1, 1).expand(9, 3, 2, 2)
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.4, 0.4, 0.4, 2.0, -1.0, 0.0])
    prompts, winners, losers, margin = online_pairs(["p", "q", "r"], images, rewards, 3)
    assert prompts == ["p", "r"]  # q's rewards are all equal: no preference
    assert winners.shape == (2, 3, 2, 2) and losers.shape == (2, 3, 2, 2)
    assert winners[:, 0, 0, 0].tolist() == [1.0, 6.0]
    assert losers[:, 0, 0, 0].tolist() == [0.0, 7.0]
    assert margin.tolist() == pytest.approx([0.8, 3.0])
    with pytest.raises(ValueError, match="rewards"):
        online_pairs(["p", "q"], images, rewards, 3)
    with pytest.raises(ValueError, match="group_size"):
        online_pairs(["p"] * 9, images, rewards, 1)
