"""Progressive, reflow and consistency distillation: each loss against hand-worked values, one
training step, resume state and (progressive) the rounds.

Stand-in networks: ``Lin`` computes ``v = a x + b t + c p`` where p is the caption's pooled
embedding (``len(caption)``, so the empty prompt has p = 0 and the guided velocity is
``a x + b t + w c p``); ``Tiny`` is a small non-linear MLP for the checks that compare a method
with an independent computation or across a resume. Images are 1x1x2.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from trainers.distill._copies import bare, ema_update, frozen_copy
from trainers.distill.base import Batch, Context, DistillMethod, expand, teacher_pairs
from trainers.distill.config import DistillConfig
from trainers.distill.consistency import Consistency, consistency_loss, pseudo_huber
from trainers.distill.progressive import (
    Progressive,
    num_rounds,
    progressive_loss,
    round_of,
    two_step_target,
)
from trainers.distill.reflow import Reflow, one_step_loss, reflow_loss, stage_two_start
from trainers.sampling import sample
from trainers.text import TextEmbeddings

SHAPE = (1, 1, 2)
CAPTIONS = ["a", "bb", "ccc"]


def encode(captions: Sequence[str]) -> TextEmbeddings:
    n = len(captions)
    pooled = torch.tensor([[float(len(c))] for c in captions])
    return TextEmbeddings(torch.zeros(n, 1, 1), pooled, torch.ones(n, 1, dtype=torch.bool))


def _t(t: Tensor, x: Tensor) -> Tensor:
    return t.view(-1, *([1] * (x.dim() - 1)))


class Lin(nn.Module):
    """``v = a x + b t + c p`` (p: the pooled text embedding)."""

    def __init__(self, a: float, b: float, c: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x: Tensor, t: Tensor, text: TextEmbeddings) -> Tensor:
        return self.a * x + self.b * _t(t, x) + self.c * _t(text.pooled[:, 0], x)


class Tiny(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x: Tensor, t: Tensor, text: TextEmbeddings) -> Tensor:
        h = torch.cat([x.flatten(1), t[:, None], text.pooled[:, :1]], dim=1)
        return self.net(h).view_as(x)


def frozen(net: nn.Module) -> nn.Module:
    return net.requires_grad_(False).eval()


def make_ctx(
    method: str,
    teacher: nn.Module,
    student: nn.Module | None = None,
    *,
    steps: int,
    guidance: float = 2.0,
    shift: float = 1.0,
    train_steps: int = 10,
    **settings: Any,
) -> Context:
    cfg = DistillConfig(
        teacher="unused",
        distill={"method": method, "steps": steps, "guidance": guidance, method: settings},
        train={"steps": train_steps},
    )
    student = copy.deepcopy(teacher).requires_grad_(True).train() if student is None else student
    return Context(
        cfg, student, frozen(teacher), encode, shift, SHAPE, torch.device("cpu"), list(CAPTIONS)
    )


def make_batch(x0: Tensor, captions: list[str] | None = None) -> Batch:
    b = x0.shape[0]
    captions = captions or [CAPTIONS[i % len(CAPTIONS)] for i in range(b)]
    return Batch(x0, captions, encode(captions), expand(encode([""]), b))


def data_batch(step: int, b: int = 3) -> Batch:
    x0 = torch.randn((b, *SHAPE), generator=torch.Generator().manual_seed(1000 + step))
    return make_batch(x0)


def shifted_grid(steps: int, shift: float) -> np.ndarray:
    """``1 = t_0 > ... > t_steps = 0`` written out again: SD3's shift of linspace(1, 0)."""
    u = np.linspace(1.0, 0.0, steps + 1)
    return shift * u / (1.0 + (shift - 1.0) * u)


def params(net: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def train_run(
    build: Callable[[], tuple[Context, DistillMethod]],
    start: int,
    stop: int,
    state: dict[str, Any] | None = None,
    load_method: bool = True,
) -> tuple[list[float], dict[str, Any]]:
    """Train from ``start`` to ``stop`` (Adam), optionally from a saved state; return the losses
    and the state a checkpoint would hold afterwards."""
    ctx, method = build()
    opt = torch.optim.Adam(ctx.student.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(7)
    if state is not None:
        ctx.student.load_state_dict(state["student"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        if load_method:
            method.load_extra_state(state["method"])
    losses = []
    for step in range(start, stop):
        loss, _ = method.student_loss(data_batch(step), gen, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_student_step(step + 1)
        losses.append(loss.item())
    saved = {
        "student": copy.deepcopy(ctx.student.state_dict()),
        "opt": copy.deepcopy(opt.state_dict()),
        "gen": gen.get_state(),
        "method": copy.deepcopy(method.extra_state()),
    }
    return losses, saved


def check_one_step_trains_student_only(ctx: Context, method: DistillMethod, batch: Batch) -> None:
    before_s, before_t = params(ctx.student), params(ctx.teacher)
    opt = torch.optim.SGD(ctx.student.parameters(), lr=0.1)
    loss, metrics = method.student_loss(batch, torch.Generator().manual_seed(0), 0)
    assert loss.requires_grad and loss.item() > 0
    assert all(isinstance(v, float) for v in metrics.values())
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in ctx.teacher.parameters())
    opt.step()
    method.after_student_step(1)
    assert any(not torch.equal(a, b) for a, b in zip(before_s, params(ctx.student), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before_t, params(ctx.teacher), strict=True))


def check_resume(build: Callable[[], tuple[Context, DistillMethod]], total: int, at: int) -> None:
    full, _ = train_run(build, 0, total)
    head, state = train_run(build, 0, at)
    tail, _ = train_run(build, at, total, state)
    assert head + tail == full  # bit-identical
    # The method's own state matters: without it the resumed run differs.
    wrong, _ = train_run(build, at, total, state, load_method=False)
    assert wrong != full[at:]


# ----------------------------------------------------------------------------------------------
# progressive


def test_progressive_loss_hand_worked() -> None:
    # Teacher v = 0.5 x + t + w p with w = 2, p = 1 (guided: v_u + w (v_c - v_u)); one interval
    # t = 1 -> t_mid = 0.5 -> t' = 0, x_t = eps = (1, -1):
    #   v(x_t, 1)   = (0.5 + 3, -0.5 + 3)                      = (3.5, 2.5)
    #   x_mid       = x_t - 0.5 (3.5, 2.5)                     = (-0.75, -2.25)
    #   v(x_mid, .5)= (-0.375 + 2.5, -1.125 + 2.5)             = (2.125, 1.375)
    #   x_t'        = x_mid - 0.5 (2.125, 1.375)               = (-1.8125, -2.9375)
    #   v*          = (x_t' - x_t) / (0 - 1)                   = (2.8125, 1.9375)
    # Student v = 0.5 x + t + p (conditional only) at (x_t, 1) = (2.5, 1.5):
    #   loss = ((2.5 - 2.8125)^2 + (1.5 - 1.9375)^2) / 2 = 0.14453125
    def teacher(x: Tensor, t: Tensor) -> Tensor:
        return 0.5 * x + _t(t, x) + 2.0

    def student(x: Tensor, t: Tensor) -> Tensor:
        return 0.5 * x + _t(t, x) + 1.0

    x_t = torch.tensor([1.0, -1.0]).view(1, 1, 1, 2)
    one, half, zero = torch.ones(1), torch.full((1,), 0.5), torch.zeros(1)
    loss, target = progressive_loss(student, teacher, x_t, one, half, zero)
    assert target.flatten().tolist() == [2.8125, 1.9375]
    assert loss.item() == 0.14453125


def test_progressive_rounds_and_boundaries() -> None:
    assert num_rounds(8, 1) == 3 and num_rounds(16, 4) == 2 and num_rounds(2, 1) == 1
    for bad in [(4, 4), (6, 1), (12, 4), (3, 2)]:
        with pytest.raises(ValueError):
            num_rounds(*bad)
    # S = 10, R = 3: round r covers [r * 10 / 3, (r + 1) * 10 / 3) = [0, 3.3), [3.3, 6.7), [6.7, 10)
    assert [round_of(s, 3, 10) for s in range(10)] == [0] * 4 + [1] * 3 + [2] * 3
    assert [round_of(s, 2, 8) for s in range(8)] == [0] * 4 + [1] * 4
    assert round_of(12, 3, 10) == 2  # past the end: the last round

    ctx = make_ctx("progressive", Tiny(), steps=1, teacher_steps=8, train_steps=10)
    method = Progressive(ctx)
    assert method.rounds == 3
    assert [method.round_steps(r) for r in range(3)] == [8, 4, 2]  # last round: student = 1 step
    assert method.round_teacher is not None and not method.round_teacher.training
    assert not any(p.requires_grad for p in method.round_teacher.parameters())
    opt = torch.optim.SGD(ctx.student.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    copies: dict[int, list[Tensor]] = {}
    for step in range(10):
        student_now = params(ctx.student)
        loss, metrics = method.student_loss(data_batch(step), gen, step)
        assert metrics["train/round"] == round_of(step, 3, 10)
        if step in (4, 7):  # entering a round: the round teacher is the student of that moment
            copies[step] = params(method.round_teacher)
            assert all(torch.equal(a, b) for a, b in zip(copies[step], student_now, strict=True))
        if step in (5, 6):  # inside round 1 it stays frozen
            same = zip(copies[4], params(method.round_teacher), strict=True)
            assert all(torch.equal(a, b) for a, b in same)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(copies[4], copies[7], strict=True))


def test_progressive_first_round_target_is_two_guided_teacher_euler_steps() -> None:
    # teacher_steps 2 -> steps 1: the one student interval is [1, 0], x_t = eps, and the two
    # teacher Euler steps are exactly the guided sampler with 2 steps.
    teacher = frozen(Tiny(1))
    ctx = make_ctx("progressive", teacher, steps=1, teacher_steps=2, shift=3.0, guidance=2.5)
    method = Progressive(ctx)
    assert method.rounds == 1 and method.round_teacher is None
    batch = data_batch(0)
    loss, metrics = method.student_loss(batch, torch.Generator().manual_seed(3), 0)
    assert metrics["train/round"] == 0.0
    g = torch.Generator().manual_seed(3)
    torch.randint(1, (3,), generator=g)
    eps = torch.randn(batch.x0.shape, generator=g)
    x_end = sample(teacher, eps, batch.text, batch.uncond, steps=2, shift=3.0, guidance=2.5)
    v_star = (x_end - eps) / (0.0 - 1.0)
    with torch.no_grad():
        v = ctx.student(eps, torch.ones(3), batch.text)
    assert loss.item() == pytest.approx(torch.mean((v - v_star) ** 2).item(), rel=1e-6)


def test_progressive_first_round_target_by_hand_on_the_shifted_grid() -> None:
    # teacher_steps 8 -> steps 2 (R = 2), round 0: the round teacher takes 8 steps, the student
    # 4; the target for interval i is two guided Euler steps over fine-grid points 2i, 2i+1,
    # 2i+2, written out in numpy for the linear teacher.
    a, b, c, w, shift = 0.5, -0.7, 0.3, 1.5, 2.0
    ctx = make_ctx("progressive", Lin(a, b, c), steps=2, teacher_steps=8, shift=shift, guidance=w)
    method = Progressive(ctx)
    batch = data_batch(1, b=4)
    loss, _ = method.student_loss(batch, torch.Generator().manual_seed(11), 0)

    g = torch.Generator().manual_seed(11)
    i = torch.randint(4, (4,), generator=g).numpy()
    eps = torch.randn(batch.x0.shape, generator=g).double().numpy()
    x0 = batch.x0.double().numpy()
    p = batch.text.pooled[:, 0].double().numpy()[:, None, None, None]
    fine = shifted_grid(8, shift)
    t, tm, tn = (fine[2 * i + j][:, None, None, None] for j in range(3))

    def v_guided(x: np.ndarray, tt: np.ndarray) -> np.ndarray:
        v_c, v_u = a * x + b * tt + c * p, a * x + b * tt
        return v_u + w * (v_c - v_u)

    x_t = (1 - t) * x0 + t * eps
    x_mid = x_t + (tm - t) * v_guided(x_t, t)
    x_next = x_mid + (tn - tm) * v_guided(x_mid, tm)
    v_star = (x_next - x_t) / (tn - t)
    v_student = a * x_t + b * t + c * p
    expected = np.mean((v_student - v_star) ** 2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_progressive_later_rounds_use_the_unguided_round_teacher() -> None:
    ctx = make_ctx("progressive", Tiny(2), steps=1, teacher_steps=4, train_steps=2)
    method = Progressive(ctx)
    with torch.no_grad():  # make the student differ from the teacher
        for p in ctx.student.parameters():
            p.add_(0.1)
    batch = data_batch(5)
    loss, metrics = method.student_loss(batch, torch.Generator().manual_seed(4), 1)
    assert metrics["train/round"] == 1.0
    g = torch.Generator().manual_seed(4)
    i = torch.randint(1, (3,), generator=g)
    eps = torch.randn(batch.x0.shape, generator=g)
    t, tm, tn = torch.ones(3), torch.full((3,), 0.5), torch.zeros(3)
    assert torch.equal(i, torch.zeros(3, dtype=torch.long))

    def student(x: Tensor, tt: Tensor) -> Tensor:
        return ctx.student(x, tt, batch.text)

    target = two_step_target(student, eps, t, tm, tn)  # the copy is the student: cond only
    with torch.no_grad():
        expected = torch.mean((student(eps, t) - target) ** 2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_progressive_step_trains_student_only() -> None:
    ctx = make_ctx("progressive", Tiny(), steps=1, teacher_steps=4)
    check_one_step_trains_student_only(ctx, Progressive(ctx), data_batch(0))


@pytest.mark.parametrize("at", [4, 5, 8])  # a round's first step, mid-round 1, mid-round 2
def test_progressive_resume_equals_uninterrupted(at: int) -> None:
    def build() -> tuple[Context, DistillMethod]:
        ctx = make_ctx("progressive", Tiny(3), steps=1, teacher_steps=8, train_steps=10)
        return ctx, Progressive(ctx)

    _, state = train_run(build, 0, at)
    assert "round_teacher.net.0.weight" in state["method"]["module"]
    assert "teacher_round" in state["method"]["module"]
    if at == 4:  # saved before round 1's first step: the copy is made after the resume
        full, _ = train_run(build, 0, 10)
        tail, _ = train_run(build, at, 10, state)
        assert full[at:] == tail
    else:
        check_resume(build, 10, at)


# ----------------------------------------------------------------------------------------------
# reflow


def test_reflow_losses_hand_worked() -> None:
    # Student v = 0.5 x + t + 1 (p = 1); noise (1, -1), image (0.5, 0.25).
    # Reflow at t = 0.5: x_t = (0.75, -0.375), v = (1.875, 1.3125), target noise - image
    #   = (0.5, -1.25): loss = (1.375^2 + 2.5625^2) / 2 = 4.228515625.
    # One step: v(noise, 1) = (2.5, 1.5), x0 = noise - v = (-1.5, -2.5):
    #   loss = (2^2 + 2.75^2) / 2 = 5.78125.
    def student(x: Tensor, t: Tensor) -> Tensor:
        return 0.5 * x + _t(t, x) + 1.0

    noise = torch.tensor([1.0, -1.0]).view(1, 1, 1, 2)
    image = torch.tensor([0.5, 0.25]).view(1, 1, 1, 2)
    assert reflow_loss(student, noise, image, torch.full((1,), 0.5)).item() == 4.228515625
    assert one_step_loss(student, noise, image).item() == 5.78125


def test_reflow_stages() -> None:
    assert stage_two_start(10, 1, 0.3) == 7
    assert stage_two_start(400, 1, 0.5) == 200
    assert stage_two_start(10, 2, 0.5) == 10  # stage 2 only for a one-step student
    assert stage_two_start(10, 1, 0.0) == 10


def test_reflow_method_pairs_stages_and_losses(tmp_path) -> None:
    a, b, c = 0.5, -0.3, 0.2
    ctx = make_ctx("reflow", Lin(a, b, c), steps=1, pairs=5, pair_steps=2, distill_fraction=0.3)
    method = Reflow(ctx)
    with pytest.raises(RuntimeError):
        method.student_loss(data_batch(0), torch.Generator(), 0)
    method.prepare(tmp_path)
    cache = tmp_path / "reflow_pairs.pt"
    pairs = teacher_pairs(ctx, 5, 2, seed=ctx.cfg.seed, cache=cache)
    assert torch.equal(method.pairs["images"], pairs["images"])
    assert torch.equal(method.pairs["noise"], pairs["noise"])

    # A resumed run calls prepare again: the pairs come back from the cache, not the teacher.
    resumed = Reflow(make_ctx("reflow", Lin(9.0, 9.0, 9.0), steps=1, pairs=5, pair_steps=2))
    resumed.prepare(tmp_path)
    assert torch.equal(resumed.pairs["images"], pairs["images"])

    batch = data_batch(0, b=4)
    for step, stage in [(6, 1), (7, 2)]:
        loss, metrics = method.student_loss(batch, torch.Generator().manual_seed(step), step)
        assert metrics["train/stage"] == stage
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(5, (4,), generator=g)
        noise = pairs["noise"][idx].double().numpy()
        img = pairs["images"][idx].double().numpy()
        p = np.array([len(pairs["captions"][j]) for j in idx.tolist()])[:, None, None, None]
        if stage == 1:
            t = torch.rand(4, generator=g).double().numpy()[:, None, None, None]
            x_t = (1 - t) * img + t * noise
            expected = np.mean((a * x_t + b * t + c * p - (noise - img)) ** 2)
        else:
            x0 = noise - (a * noise + b * 1.0 + c * p)
            expected = np.mean((x0 - img) ** 2)
        assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_reflow_step_trains_student_only(tmp_path) -> None:
    ctx = make_ctx("reflow", Tiny(), steps=1, pairs=4, pair_steps=2, distill_fraction=0.5)
    method = Reflow(ctx)
    method.prepare(tmp_path)
    check_one_step_trains_student_only(ctx, method, data_batch(0))


# ----------------------------------------------------------------------------------------------
# consistency


def test_consistency_loss_hand_worked() -> None:
    # Guided teacher v = 0.5 x + t + 2 (w = 2, p = 1); x_{t_{n+k}} = (1, -1), t_{n+k} = 0.75,
    # t_n = 0.25:
    #   v_w          = (0.5 + 2.75, -0.5 + 2.75)               = (3.25, 2.25)
    #   x^_{t_n}     = x - 0.5 v_w                             = (-0.625, -2.125)
    # EMA target v = 0.25 x + p at (x^, 0.25)                  = (0.84375, 0.46875)
    #   f_target     = x^ - 0.25 v                             = (-0.8359375, -2.2421875)
    # Student v = 0.5 x + t + p at (x, 0.75)                   = (2.25, 1.25)
    #   f_online     = x - 0.75 v                              = (-0.6875, -1.9375)
    #   ||f_online - f_target||^2 = 0.1484375^2 + 0.3046875^2  = 0.1148681640625
    x = torch.tensor([1.0, -1.0]).view(1, 1, 1, 2)
    t_hi, t_lo = torch.full((1,), 0.75), torch.full((1,), 0.25)
    v_teacher = 0.5 * x + 0.75 + 2.0

    def student(x: Tensor, t: Tensor) -> Tensor:
        return 0.5 * x + _t(t, x) + 1.0

    def target(x: Tensor, t: Tensor) -> Tensor:
        return 0.25 * x + 1.0

    for c in [0.00054 * math.sqrt(2), 0.1]:
        loss, dist = consistency_loss(student, target, x, v_teacher, t_hi, t_lo, c)
        expected = math.sqrt(0.1148681640625 + c * c) - c
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        assert dist.shape == (1,)

    # Boundary condition: at t_n = 0 the target is x^_{t_n} itself, whatever theta^- says.
    zero = torch.zeros(1)
    loss, _ = consistency_loss(student, lambda x, t: x * 1e6, x, v_teacher, t_hi, zero, 0.1)
    x_hat = x - 0.75 * v_teacher
    online = x - 0.75 * (0.5 * x + 0.75 + 1.0)
    expected = pseudo_huber(online, x_hat, 0.1).item()
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_pseudo_huber_is_per_image() -> None:
    a = torch.tensor([[3.0, 4.0], [0.0, 0.0]]).view(2, 1, 1, 2)
    d = pseudo_huber(a, torch.zeros_like(a), 1.0)
    assert d.tolist() == pytest.approx([math.sqrt(26.0) - 1.0, 0.0])


def test_consistency_method_matches_the_closed_form() -> None:
    a, b, c, w, shift, n_grid, k = 0.5, -0.7, 0.3, 1.5, 2.0, 6, 2
    ctx = make_ctx(
        "consistency", Lin(a, b, c), steps=2, guidance=w, shift=shift, grid=n_grid, skip=k
    )
    method = Consistency(ctx)
    assert method.huber_c == pytest.approx(0.00054 * math.sqrt(2))
    with torch.no_grad():  # the EMA target theta^- = (a', b', c') differs from the student
        ctx.student.a.fill_(0.4)
    method.target_ready.fill_(True)
    ta, tb, tc = 0.5, -0.7, 0.3

    batch = data_batch(2, b=5)
    loss, metrics = method.student_loss(batch, torch.Generator().manual_seed(5), 0)
    assert metrics["train/distance"] == pytest.approx(loss.item())

    g = torch.Generator().manual_seed(5)
    n = torch.randint(n_grid - k + 1, (5,), generator=g).numpy()
    eps = torch.randn(batch.x0.shape, generator=g).double().numpy()
    x0 = batch.x0.double().numpy()
    p = batch.text.pooled[:, 0].double().numpy()[:, None, None, None]
    asc = shifted_grid(n_grid, shift)[::-1]  # t_0 = 0 < ... < t_N = 1
    t_hi, t_lo = asc[n + k][:, None, None, None], asc[n][:, None, None, None]
    x_hi = (1 - t_hi) * x0 + t_hi * eps
    v_w = a * x_hi + b * t_hi + w * c * p  # v_u + w (v_c - v_u)
    x_hat = x_hi + (t_lo - t_hi) * v_w
    f_target = x_hat - t_lo * (ta * x_hat + tb * t_lo + tc * p)
    f_online = x_hi - t_hi * (0.4 * x_hi + b * t_hi + c * p)
    hc = 0.00054 * math.sqrt(2)
    d = np.sqrt(((f_online - f_target) ** 2).reshape(5, -1).sum(1) + hc * hc) - hc
    assert loss.item() == pytest.approx(d.mean(), rel=1e-5)


def test_consistency_ema_target() -> None:
    ctx = make_ctx("consistency", Lin(1.0, 2.0, 3.0), steps=2, target_ema=0.9)
    method = Consistency(ctx)
    assert not method.target.training
    assert not any(p.requires_grad for p in method.target.parameters())
    method.train()
    assert not method.target.training
    with torch.no_grad():
        ctx.student.a.fill_(2.0)
    method.after_student_step(1)
    assert method.target.a.item() == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)
    assert method.target.b.item() == pytest.approx(2.0)


def test_consistency_target_starts_as_the_student() -> None:
    # Weights loaded into the student after the method is built are the target's at step 0.
    ctx = make_ctx("consistency", Lin(1.0, 2.0, 3.0), steps=2)
    method = Consistency(ctx)
    with torch.no_grad():
        ctx.student.a.fill_(5.0)
    method.student_loss(data_batch(0), torch.Generator().manual_seed(0), 0)
    assert method.target.a.item() == 5.0 and bool(method.target_ready)


def test_consistency_step_trains_student_only() -> None:
    ctx = make_ctx("consistency", Tiny(), steps=2, grid=8, skip=2)
    check_one_step_trains_student_only(ctx, Consistency(ctx), data_batch(0))


def test_consistency_resume_equals_uninterrupted() -> None:
    def build() -> tuple[Context, DistillMethod]:
        ctx = make_ctx("consistency", Tiny(4), steps=2, grid=8, skip=2, target_ema=0.5)
        return ctx, Consistency(ctx)

    _, state = train_run(build, 0, 3)
    assert "target.net.0.weight" in state["method"]["module"]
    check_resume(build, 6, 3)


# ----------------------------------------------------------------------------------------------
# frozen copies


def test_frozen_copies_unwrap_compiled_modules() -> None:
    net = Tiny()
    compiled = torch.compile(net)  # lazy: nothing is compiled until it is called
    assert bare(compiled) is net
    twin = frozen_copy(compiled)
    assert set(twin.state_dict()) == set(net.state_dict())
    with torch.no_grad():
        net.net[0].weight.add_(1.0)
    ema_update(twin, compiled, 0.0)
    assert torch.equal(twin.net[0].weight, net.net[0].weight)
