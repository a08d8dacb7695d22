"""Diffusion-DPO's flow-matching loss, the pairs file and online pairs (the arena's pairs:
tests/harness/test_preference_pairs.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trainers.preference.dpo import DpoLoss, dpo_loss, dpo_step_loss, flow_errors
from trainers.preference.pairs import (
    PairsError,
    PreferencePairs,
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
