"""DMD and ADD distillation methods: losses on hand-worked cases, one training step, resume.

Stand-in networks are linear, ``v = a x + b t + c mean(pooled)``, so every estimate has a closed
form; the expected values are computed in numpy from the same generator draws.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import trainers.distill.add as add_mod
from trainers.distill.add import (
    Add,
    ProjectionHead,
    distill_loss,
    generator_adv_loss,
    hinge_d_loss,
    r1_penalty,
)
from trainers.distill.base import Batch, Context, expand
from trainers.distill.config import DistillConfig
from trainers.distill.dmd import (
    Dmd,
    _student_x0,
    dmd_gradient,
    dmd_loss,
    fake_score_loss,
    regression_loss,
)
from trainers.flow import bcast
from trainers.repa import Encoder
from trainers.text import TextEmbeddings
from trainers.timesteps import sampling_schedule

CAPTIONS = ["a", "bb", "ccc", "dddd"]


class Lin(nn.Module):
    """``v = a x + b t + c mean(pooled)``, scalars a, b, c."""

    def __init__(self, a: float, b: float, c: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x: Tensor, t: Tensor, text: TextEmbeddings) -> Tensor:
        return self.a * x + self.b * bcast(t, x) + self.c * bcast(text.pooled.mean(-1), x)


def pooled_of(caption: str) -> float:
    return len(caption) / 4.0  # "" -> 0: the unconditional branch has no text term


def encode(captions: list[str]) -> TextEmbeddings:
    n = len(captions)
    pooled = torch.tensor([[pooled_of(c)] * 4 for c in captions], dtype=torch.float32)
    return TextEmbeddings(torch.zeros(n, 2, 4), pooled, torch.ones(n, 2, dtype=torch.bool))


def make_ctx(
    method: str,
    settings: dict[str, Any],
    *,
    shape=(3, 4, 4),
    steps=3,
    shift=2.0,
    guidance=2.0,
    student=(0.3, 0.2, 0.1),
    teacher=(0.5, -0.4, 0.6),
) -> Context:
    cfg = DistillConfig(
        teacher="unused",
        distill={"method": method, "steps": steps, "guidance": guidance, method: settings},
        train={"steps": 10, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0},
    )
    return Context(
        cfg=cfg,
        student=Lin(*student).train(),
        teacher=Lin(*teacher).requires_grad_(False).eval(),
        encode=encode,
        shift=shift,
        sample_shape=shape,
        device=torch.device("cpu"),
        captions=list(CAPTIONS),
    )


def make_batch(captions: list[str], shape: tuple[int, int, int], seed: int = 5) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand((len(captions), *shape), generator=g) * 2 - 1) * 0.8
    return Batch(x0, captions, encode(captions), expand(encode([""]), len(captions)))


def np_grid(steps: int, shift: float) -> list[float]:
    t = np.linspace(1.0, 0.0, steps + 1)
    return list(shift * t / (1.0 + (shift - 1.0) * t))


def np_lin(
    abc: tuple[float, float, float], x: np.ndarray, t: np.ndarray, p: np.ndarray
) -> np.ndarray:
    a, b, c = abc
    return a * x + b * t[:, None, None, None] + c * p[:, None, None, None]


def np_student_x0(gen: torch.Generator, abc, p, n, shape, steps, shift, real=None):
    """Independent re-implementation of the student sample from the same draws."""
    grid = np_grid(steps, shift)
    k = int(torch.randint(steps, (1,), generator=gen))
    x = torch.randn((n, *shape), generator=gen).double().numpy()
    if real is None:
        for j in range(k):
            t = np.full(n, grid[j])
            x0 = x - t[:, None, None, None] * np_lin(abc, x, t, p)
            fresh = torch.randn((n, *shape), generator=gen).double().numpy()
            x = (1 - grid[j + 1]) * x0 + grid[j + 1] * fresh
    else:
        x = (1 - grid[k]) * real + grid[k] * x
    t = np.full(n, grid[k])
    return x - t[:, None, None, None] * np_lin(abc, x, t, p), grid[k], k


def np_uniform_t_eps(gen: torch.Generator, n: int, shape) -> tuple[np.ndarray, np.ndarray]:
    t = (0.02 + 0.96 * torch.rand(n, generator=gen)).double().numpy()
    eps = torch.randn((n, *shape), generator=gen).double().numpy()
    return t, eps


def close(a: Tensor | float, b: np.ndarray | float, tol: float = 1e-5) -> None:
    a = a.detach().double().numpy() if isinstance(a, Tensor) else a
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------------------------
# (a) losses on hand-worked cases


def test_dmd_gradient_and_surrogate() -> None:
    rng = np.random.default_rng(0)
    x, real, fake = (rng.normal(size=(2, 3, 2, 2)) for _ in range(3))
    w = np.abs(x - real).reshape(2, -1).mean(1)[:, None, None, None]
    grad = (fake - real) / w
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    rt, ft = (torch.tensor(v, dtype=torch.float32) for v in (real, fake))
    close(dmd_gradient(xt, rt, ft), grad)
    loss = dmd_loss(xt, rt, ft)
    close(loss, 0.5 * (grad**2).reshape(2, -1).sum(1).mean())
    loss.backward()
    close(xt.grad * 2, grad)  # d L / d x_b = grad_b / B


def test_fake_and_regression_losses() -> None:
    v = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    x = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    eps = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    # eps - x = [[.5, .5], [0, 1]]; errors [[.5, 1.5], [0, -2]] -> (0.25 + 2.25 + 0 + 4) / 4
    close(fake_score_loss(v, x, eps), 6.5 / 4)
    # per image sums 1 + 4 = 5 and 1 + 1 = 2 (errors [[1, 2], [-1, 1]]) -> mean 3.5
    close(regression_loss(v, torch.tensor([[0.0, 0.0], [1.0, -2.0]])), 3.5)


@pytest.mark.parametrize("real", [False, True])
def test_student_sample_closed_form(real: bool) -> None:
    ctx = make_ctx("dmd", {}, steps=3, shift=2.0)
    captions = ["bb", "dddd"]
    text, p = encode(captions), np.array([pooled_of(c) for c in captions])
    x_real = make_batch(captions, ctx.sample_shape).x0
    seen = set()
    for seed in range(12):
        gen = torch.Generator().manual_seed(seed)
        ref = torch.Generator().set_state(gen.get_state())
        x0, t_k = _student_x0(ctx, text, 2, gen, real=x_real if real else None)
        want, t_want, k = np_student_x0(
            ref,
            (0.3, 0.2, 0.1),
            p,
            2,
            ctx.sample_shape,
            3,
            2.0,
            real=x_real.double().numpy() if real else None,
        )
        close(x0, want)
        close(t_k, np.full(2, t_want))
        assert torch.equal(gen.get_state(), ref.get_state())  # the same draws, no more
        assert x0.requires_grad
        seen.add(k)
    assert seen == {0, 1, 2}
    # the schedule matches the trainer's grid
    close(ctx.grid(), np.array(np_grid(3, 2.0)))
    close(sampling_schedule(3, 2.0), np.array(np_grid(3, 2.0)))


def test_dmd_student_loss_closed_form() -> None:
    """The whole DMD loss at one step; the fake network barely moves (lr 1e-12), so its
    estimate is the teacher's conditional (unguided) one."""
    ctx = make_ctx("dmd", {"fake_updates": 2, "fake_lr": 1e-12, "regression_weight": 0.0})
    method = Dmd(ctx)
    captions = ["a", "ccc"]
    batch = make_batch(captions, ctx.sample_shape)
    p, n, shape, w = np.array([pooled_of(c) for c in captions]), 2, ctx.sample_shape, 2.0
    gen = torch.Generator().manual_seed(3)
    ref = torch.Generator().set_state(gen.get_state())
    loss, metrics = method.student_loss(batch, gen, 0)

    s, te = (0.3, 0.2, 0.1), (0.5, -0.4, 0.6)
    fake_losses = []
    for _ in range(2):
        xs, _, _ = np_student_x0(ref, s, p, n, shape, 3, 2.0)
        t, eps = np_uniform_t_eps(ref, n, shape)
        tb = t[:, None, None, None]
        x_t = (1 - tb) * xs + tb * eps
        fake_losses.append(np.mean((np_lin(te, x_t, t, p) - (eps - xs)) ** 2))
    xs, _, _ = np_student_x0(ref, s, p, n, shape, 3, 2.0)
    t, eps = np_uniform_t_eps(ref, n, shape)
    tb = t[:, None, None, None]
    x_t = (1 - tb) * xs + tb * eps
    v_c, v_u = np_lin(te, x_t, t, p), np_lin(te, x_t, t, 0 * p)
    x0_real = x_t - tb * (v_u + w * (v_c - v_u))
    x0_fake = x_t - tb * v_c
    np.testing.assert_allclose(
        x0_fake - x0_real, tb * 0.6 * p[:, None, None, None] * (w - 1) * np.ones_like(xs), atol=1e-6
    )
    grad = (x0_fake - x0_real) / np.abs(xs - x0_real).reshape(n, -1).mean(1)[:, None, None, None]
    want = 0.5 * (grad**2).reshape(n, -1).sum(1).mean()
    close(loss, want, 1e-4)
    close(metrics["train/dmd_loss"], want, 1e-4)
    close(metrics["train/fake_loss"], np.mean(fake_losses), 1e-4)
    assert torch.equal(gen.get_state(), ref.get_state())
    # the surrogate's gradient w.r.t. the student's a: sum over x of grad / B * dx/da
    loss.backward()
    assert ctx.student.a.grad is not None and ctx.student.a.grad.abs() > 0


def test_hinge_r1_adv_distill_values() -> None:
    real = torch.tensor([[2.0, 0.5], [-1.0, 1.0]])
    fake = torch.tensor([[-2.0, 0.0], [0.5, -0.5]])
    # relu(1 - real) = [0, .5, 2, 0] -> .625; relu(1 + fake) = [0, 1, 1.5, .5] -> .75
    close(hinge_d_loss(real, fake), 1.375)
    close(generator_adv_loss(fake), 0.5)

    rng = np.random.default_rng(1)
    f, u = rng.normal(size=(2, 3, 4)), rng.normal(size=4)
    ft = torch.tensor(f, requires_grad=True)
    logits = (ft * torch.tensor(u)).sum(-1) + (ft**2).sum(-1)  # [B, M]; dD_m/df_m = u + 2 f_m
    close(r1_penalty(logits, ft), ((u + 2 * f) ** 2).reshape(2, -1).sum(1).mean())

    xs, xt = rng.normal(size=(2, 3, 2, 2)), rng.normal(size=(2, 3, 2, 2))
    t = np.array([0.25, 0.75])
    xs_t = torch.tensor(xs, requires_grad=True)
    d = distill_loss(xs_t, torch.tensor(xt), torch.tensor(t))
    close(d, np.mean((1 - t) * ((xs - xt) ** 2).reshape(2, -1).mean(1)))
    d.backward()
    close(xs_t.grad, 2 * (1 - t)[:, None, None, None] * (xs - xt) / (12 * 2))


def test_projection_head_formula() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(5, 4, width=6)
    f, c = torch.randn(2, 3, 5), torch.randn(2, 4)
    sd = {k: v.double().numpy() for k, v in head.state_dict().items()}

    def lrelu(z: np.ndarray) -> np.ndarray:
        return np.where(z > 0, z, 0.2 * z)

    h = lrelu(f.double().numpy() @ sd["mlp.0.weight"].T + sd["mlp.0.bias"])
    h = lrelu(h @ sd["mlp.2.weight"].T + sd["mlp.2.bias"])
    proj = c.double().numpy() @ sd["text.weight"].T + sd["text.bias"]
    want = (
        (h @ sd["out.weight"].T)[..., 0]
        + sd["out.bias"][0]
        + np.einsum("bmh,bh->bm", h, proj) / np.sqrt(6)
    )
    close(head(f, c), want)


# ----------------------------------------------------------------------------------------------
# ADD's stand-in encoder


class TinyEncoder(nn.Module):
    """``[B, 3, 8, 8]`` -> ``[B, 16, 8]`` patch features (a 4x4 grid), like the real ones."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 2, 2)

    def forward(self, images: Tensor) -> Tensor:
        return torch.tanh(self.conv(images)).flatten(2).transpose(1, 2)


def tiny_load_encoder(name: str) -> Encoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        net = TinyEncoder()
    net.eval().requires_grad_(False)
    return Encoder(net, 8, net)


@pytest.fixture
def tiny_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(add_mod, "load_encoder", tiny_load_encoder)


ADD_SHAPE = (3, 8, 8)


def test_add_distill_term_closed_form(tiny_encoder: None) -> None:
    """ADD's student input (real image noised to t_k) and distillation target, end to end."""
    ctx = make_ctx("add", {"distill_weight": 1.0}, shape=ADD_SHAPE)
    method = Add(ctx)
    captions = ["bb", "dddd"]
    batch = make_batch(captions, ADD_SHAPE)
    p, n, w = np.array([pooled_of(c) for c in captions]), 2, 2.0
    gen = torch.Generator().manual_seed(4)
    ref = torch.Generator().set_state(gen.get_state())
    loss, metrics = method.student_loss(batch, gen, 0)

    te = (0.5, -0.4, 0.6)
    xs, _, _ = np_student_x0(
        ref, (0.3, 0.2, 0.1), p, n, ADD_SHAPE, 3, 2.0, real=batch.x0.double().numpy()
    )
    t, eps = np_uniform_t_eps(ref, n, ADD_SHAPE)
    tb = t[:, None, None, None]
    x_t = (1 - tb) * xs + tb * eps
    v_c, v_u = np_lin(te, x_t, t, p), np_lin(te, x_t, t, 0 * p)
    x0_teacher = x_t - tb * (v_u + w * (v_c - v_u))
    want = np.mean((1 - t) * ((xs - x0_teacher) ** 2).reshape(n, -1).mean(1))
    close(metrics["train/distill_loss"], want, 1e-4)
    close(loss, metrics["train/adv_loss"] + want, 1e-4)
    assert torch.equal(gen.get_state(), ref.get_state())


def test_add_rejects_latents(tiny_encoder: None) -> None:
    from trainers.config import ConfigError

    with pytest.raises(ConfigError, match="pixel data"):
        Add(make_ctx("add", {}, shape=(4, 8, 8)))


# ----------------------------------------------------------------------------------------------
# (b) one step: what changes and what does not


def params(m: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def changed(before: list[Tensor], m: nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))


def test_dmd_step_updates_student_and_fake(tmp_path: Path) -> None:
    ctx = make_ctx("dmd", {"fake_updates": 2, "pairs": 6, "pair_steps": 2})
    method = Dmd(ctx)
    method.prepare(tmp_path)
    assert (tmp_path / "dmd_pairs.pt").is_file()
    opt = torch.optim.SGD(ctx.student.parameters(), lr=0.1)
    s0, t0, f0 = params(ctx.student), params(ctx.teacher), params(method.fake)
    batch = make_batch(["a", "ccc"], ctx.sample_shape)
    loss, metrics = method.student_loss(batch, torch.Generator().manual_seed(0), 0)
    assert set(metrics) == {"train/dmd_loss", "train/fake_loss", "train/reg_loss"}
    assert all(np.isfinite(v) for v in metrics.values())
    close(loss, metrics["train/dmd_loss"] + 0.25 * metrics["train/reg_loss"], 1e-4)
    opt.zero_grad()
    loss.backward()
    assert all(
        p.grad is None for p in method.fake.parameters()
    )  # the student loss leaves the fake alone
    opt.step()
    assert changed(s0, ctx.student) and changed(f0, method.fake)
    assert not changed(t0, ctx.teacher)
    assert set(method.state_dict()) == {"fake.a", "fake.b", "fake.c"}


def test_add_step_updates_student_and_head_not_encoder(tiny_encoder: None) -> None:
    ctx = make_ctx("add", {"distill_weight": 0.0, "r1_weight": 0.1}, shape=ADD_SHAPE)
    method = Add(ctx)
    enc = method.encoder.module
    opt = torch.optim.SGD(ctx.student.parameters(), lr=0.1)
    s0, t0, h0, e0 = params(ctx.student), params(ctx.teacher), params(method.head), params(enc)
    batch = make_batch(["bb", "dddd"], ADD_SHAPE)
    loss, metrics = method.student_loss(batch, torch.Generator().manual_seed(0), 0)
    assert metrics["train/r1"] > 0
    opt.zero_grad()
    loss.backward()  # adversarial term only (distill_weight 0): it must reach the student
    assert ctx.student.a.grad is not None and ctx.student.a.grad.abs() > 0
    assert all(p.grad is None for p in method.head.parameters())  # nor the head
    assert all(p.grad is None for p in enc.parameters())
    opt.step()
    assert changed(s0, ctx.student) and changed(h0, method.head)
    assert not changed(t0, ctx.teacher) and not changed(e0, enc)
    assert all(k.startswith("head.") for k in method.state_dict())


# ----------------------------------------------------------------------------------------------
# (c) resume


def run_steps(method, ctx: Context, opt: torch.optim.Optimizer, steps: range, batch: Batch):
    out = []
    for step in steps:
        loss, metrics = method.student_loss(batch, torch.Generator().manual_seed(100 + step), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append((float(loss.detach()), metrics))
    return out


@pytest.mark.parametrize("name", ["dmd", "add"])
def test_resume_equals_uninterrupted(name: str, tiny_encoder: None, tmp_path: Path) -> None:
    cls, shape = (Dmd, (3, 4, 4)) if name == "dmd" else (Add, ADD_SHAPE)
    settings = {"pairs": 4, "pair_steps": 2} if name == "dmd" else {}
    batch = make_batch(["a", "dddd"], shape)

    def build() -> tuple[Context, Any, torch.optim.Optimizer]:
        ctx = make_ctx(name, settings, shape=shape)
        method = cls(ctx)
        method.prepare(tmp_path)
        return ctx, method, torch.optim.Adam(ctx.student.parameters(), lr=1e-2)

    ctx, method, opt = build()
    run_steps(method, ctx, opt, range(2), batch)
    buf = io.BytesIO()
    torch.save(
        {
            "student": ctx.student.state_dict(),
            "opt": opt.state_dict(),
            "method": method.extra_state(),
        },
        buf,
    )
    want = run_steps(method, ctx, opt, range(2, 4), batch)

    ctx2, method2, opt2 = build()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    ctx2.student.load_state_dict(ckpt["student"])
    opt2.load_state_dict(ckpt["opt"])
    method2.load_extra_state(copy.deepcopy(ckpt["method"]))
    got = run_steps(method2, ctx2, opt2, range(2, 4), batch)
    assert got == want
    for a, b in zip(method.state_dict().values(), method2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
