"""Common random numbers in the flow trainer: configurations that differ only in training
choices, trained with the same seed, see the same initial weights, batches, caption dropout,
uniforms behind t and noise; with another seed they do not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import trainers.train as train_mod
from tests.trainers.trainer_utils import config
from trainers.config import parse_config
from trainers.flow import FlowLoss
from trainers.rundir import RunDir
from trainers.train import Dist, FlowTrainer, purpose_generator, step_generators

STEPS = 3


def small(seed: int = 0, **overrides: dict[str, Any]) -> dict[str, Any]:
    cfg = config(
        data={"kind": "shapes", "resolution": 16, "size": 64, "seed": 0},
        train={"steps": 10, "batch_size": 8, "checkpoint_every": 1000, "warmup_steps": 2},
        text={"cfg_dropout": 0.5},
        **overrides,
    )
    cfg["seed"] = seed
    return cfg


def trainer(cfg: dict[str, Any], run_dir: Path) -> FlowTrainer:
    run = RunDir(run_dir)
    run.create()
    return FlowTrainer(parse_config(cfg), run, Dist())


def draws(t: FlowTrainer, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """What the first STEPS training steps drew: batch indices, dropout, u, eps, t."""
    recorded: list[FlowLoss] = []
    real = train_mod.flow_matching_loss

    def spy(*args: Any, **kwargs: Any) -> FlowLoss:
        out = real(*args, **kwargs)
        recorded.append(out)
        return out

    monkeypatch.setattr(train_mod, "flow_matching_loss", spy)
    out = []
    for step in range(STEPS):
        idx, drop = t.draw_batch(step)
        t.train_step()
        f = recorded[-1]
        out.append({"idx": idx, "drop": drop, "u": f.u, "eps": f.eps, "t": f.t})
    monkeypatch.undo()
    return out


def assert_same_init(a: FlowTrainer, b: FlowTrainer) -> None:
    sa, sb = a.net.denoiser.state_dict(), b.net.denoiser.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture
def tiny_repa_encoder(monkeypatch: pytest.MonkeyPatch) -> str:
    from trainers.repa import ENCODERS, Encoder
    from trainers.repa_encoder import PatchEncoder

    def build() -> Encoder:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            net = PatchEncoder(width=8, dim=24).eval().requires_grad_(False)
        return Encoder(net, net.dim, net)

    monkeypatch.setitem(ENCODERS, "tiny-test", build)
    return "tiny-test"


@pytest.mark.parametrize(
    "other",
    [
        {"timesteps": {"sampler": "uniform"}},
        {"timesteps": {"sampler": "logit_normal", "shift": 3.0}},
        {"timesteps": {"sampler": "mode", "mode_scale": 0.5}},
        {"timesteps": {"sampler": "cosmap", "shift": 0.5}},
        {"repa": {"weight": 0.5, "layer": 1, "encoder": "tiny-test", "projector_dim": 32}},
    ],
    ids=["sampler", "shift", "mode", "cosmap+shift", "repa"],
)
def test_same_seed_pairs_every_draw(
    other: dict[str, Any],
    tiny_repa_encoder: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base_cfg = small(timesteps={"sampler": "logit_normal"})
    base = trainer(base_cfg, tmp_path / "a")
    variant = trainer(small(**other), tmp_path / "b")
    assert parse_config(base_cfg).hash() != parse_config(small(**other)).hash()
    assert_same_init(base, variant)
    da, db = draws(base, monkeypatch), draws(variant, monkeypatch)
    for step, (a, b) in enumerate(zip(da, db, strict=True)):
        for key in ("idx", "drop", "u", "eps"):
            assert torch.equal(a[key], b[key]), (step, key)
    assert any(d["drop"].any() and not d["drop"].all() for d in da)  # the mask is exercised
    if "timesteps" in other:  # the choice does change t: the draws are paired, not equal
        assert not all(torch.equal(a["t"], b["t"]) for a, b in zip(da, db, strict=True))


def test_other_seed_changes_every_draw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = trainer(small(seed=0), tmp_path / "a")
    b = trainer(small(seed=1), tmp_path / "b")
    sa, sb = a.net.denoiser.state_dict(), b.net.denoiser.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)
    da, db = draws(a, monkeypatch), draws(b, monkeypatch)
    for key in ("idx", "drop", "u", "eps"):
        assert not all(torch.equal(x[key], y[key]) for x, y in zip(da, db, strict=True)), key


def test_purpose_streams_are_distinct_and_reproducible() -> None:
    def first(g: torch.Generator) -> torch.Tensor:
        return torch.rand(16, generator=g)

    gens = step_generators(5, 3, 0)
    streams = [first(gens.dropout), first(gens.timesteps), first(gens.noise)]
    streams += [first(step_generators(5, 4, 0).noise), first(step_generators(5, 3, 1).noise)]
    streams += [first(step_generators(6, 3, 0).noise)]
    for i in range(len(streams)):
        for j in range(i):
            assert not torch.equal(streams[i], streams[j]), (i, j)
    assert torch.equal(first(purpose_generator(5, 3, 0, "noise")), streams[2])
    assert torch.equal(first(step_generators(5, 3, 0).timesteps), streams[1])
