"""Progressive distillation (Salimans & Ho 2022, alg. 2) for rectified flow.

Rounds halve the sampler's step count, from ``distill.progressive.teacher_steps`` down to
``distill.steps``: R = log2(teacher_steps / steps) rounds, and the ``train.steps`` student updates
are split evenly over them (round r covers steps ``[r S / R, (r + 1) S / R)``). In round r the
*round teacher* samples with ``N_r = teacher_steps / 2^r`` Euler steps on the shifted grid
``ctx.grid(N_r)``; the student learns to cover two of its steps with one, so that after the round
it samples as well with ``N_r / 2`` steps. Round 0's round teacher is the real teacher with
classifier-free guidance; later rounds' is a frozen copy of the student taken at the round's start
(called with the conditional text alone: the guidance is already distilled into it). Salimans &
Ho start each round's student from the previous student, which is what continuing to train the
same student does.

The paper's alg. 2 in the rectified-flow / velocity parameterisation
--------------------------------------------------------------------
The paper (variance-preserving ``z_t = alpha_t x + sigma_t eps``, x-prediction) takes two DDIM
steps of the teacher ``t -> t' = t - 0.5/N -> t'' = t - 1/N`` and regresses the student's
x-prediction on the ``x~`` whose single DDIM step ``t -> t''`` lands on the teacher's ``z_t''``::

    x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)
    L  = w(lambda_t) || x~ - x^_eta(z_t) ||^2

For rectified flow (``x_t = (1 - t) x0 + t eps``, net predicts ``v = eps - x0``) a DDIM step is
exactly an Euler step of the flow ODE, so the same construction reads, with ``t > t_mid > t'``
consecutive points of ``ctx.grid(N_r)`` and ``t, t'`` consecutive points of the student's grid
``ctx.grid(N_r / 2)``::

    x_mid = x_t   + (t_mid - t) v_teacher(x_t, t)
    x_t'  = x_mid + (t' - t_mid) v_teacher(x_mid, t_mid)
    v*    = (x_t' - x_t) / (t' - t)            # the one Euler step t -> t' that lands on x_t'
    L     = mean || v_student(x_t, t) - v* ||^2

which is the paper's loss with ``x~ = x_t - t v*`` and weight ``1 / t^2`` in x-space (the
unweighted velocity MSE of the flow trainer, instead of the paper's truncated-SNR or
``1 + SNR`` weights). Like the paper, t is drawn from the student's discrete grid (uniformly
among its ``N_r / 2`` intervals) rather than continuously, and ``x_t`` is noised real data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from trainers.distill._copies import copy_into, frozen_copy
from trainers.distill.base import Batch, Context, DistillMethod
from trainers.flow import bcast, noise_to

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x [B, ...], t [B]) -> v, conditioning bound


def num_rounds(teacher_steps: int, steps: int) -> int:
    """R = log2(teacher_steps / steps); teacher_steps must be steps times a power of two >= 2."""
    q, rem = divmod(teacher_steps, steps)
    if rem or q < 2 or q & (q - 1):
        raise ValueError(
            f"progressive: teacher_steps ({teacher_steps}) must be steps ({steps}) times a power "
            "of two >= 2"
        )
    return q.bit_length() - 1


def round_of(step: int, rounds: int, total_steps: int) -> int:
    """The round of 0-based ``step``: r with ``r S / R <= step < (r + 1) S / R`` (clamped)."""
    return min(max(step, 0) * rounds // total_steps, rounds - 1)


def two_step_target(
    teacher: Velocity, x_t: Tensor, t: Tensor, t_mid: Tensor, t_next: Tensor
) -> Tensor:
    """``v* = (x_t' - x_t) / (t' - t)`` after two teacher Euler steps ``t -> t_mid -> t'``."""
    with torch.no_grad():
        x_mid = x_t + bcast(t_mid - t, x_t) * teacher(x_t, t).float()
        x_next = x_mid + bcast(t_next - t_mid, x_t) * teacher(x_mid, t_mid).float()
        return (x_next - x_t) / bcast(t_next - t, x_t)


def progressive_loss(
    student: Velocity, teacher: Velocity, x_t: Tensor, t: Tensor, t_mid: Tensor, t_next: Tensor
) -> tuple[Tensor, Tensor]:
    """``mean || v_student(x_t, t) - v* ||^2`` (see the module docstring); returns (loss, v*)."""
    target = two_step_target(teacher, x_t, t, t_mid, t_next)
    pred = student(x_t, t).float()
    return torch.mean((pred - target) ** 2), target


class Progressive(DistillMethod):
    name = "progressive"
    sampler = "ode"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        settings = ctx.cfg.distill.progressive
        self.teacher_steps = settings.teacher_steps
        self.rounds = num_rounds(settings.teacher_steps, ctx.steps)
        self.total_steps = ctx.cfg.train.steps
        # The frozen student copy that teaches rounds >= 1 (a submodule: it is checkpointed, so
        # a run resumed mid-round has the same round teacher), and the round it was copied for
        # (0: not yet copied; round 0's teacher is the real one).
        self.round_teacher: nn.Module | None = frozen_copy(ctx.student) if self.rounds > 1 else None
        self.register_buffer("teacher_round", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> Progressive:
        super().train(mode)
        if self.round_teacher is not None:
            self.round_teacher.eval()
        return self

    def round_of(self, step: int) -> int:
        return round_of(step, self.rounds, self.total_steps)

    def round_steps(self, r: int) -> int:
        """N_r: the round teacher's Euler steps in round r (the student's are N_r / 2)."""
        return self.teacher_steps >> r

    def _enter_round(self, r: int) -> None:
        """Copy the student into the round teacher the first time a step of round r runs; the
        copy is the student as it is after all the steps of earlier rounds, resumed or not."""
        if r > 0 and int(self.teacher_round) != r:
            assert self.round_teacher is not None
            copy_into(self.round_teacher, self.ctx.student)
            self.teacher_round.fill_(r)

    def student_loss(
        self, batch: Batch, gen: torch.Generator, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        ctx = self.ctx
        r = self.round_of(step)
        self._enter_round(r)
        n = self.round_steps(r)
        fine, coarse = ctx.grid(n), ctx.grid(n // 2)
        x0 = batch.x0.float()
        b, dev = x0.shape[0], x0.device
        i = torch.randint(n // 2, (b,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(dev)
        t, t_mid, t_next = (g.float().to(dev) for g in (coarse[i], fine[2 * i + 1], coarse[i + 1]))
        x_t = noise_to(x0, eps, t)

        if r == 0:

            def teacher(x: Tensor, tt: Tensor) -> Tensor:
                return ctx.teacher_velocity(x, tt, batch.text, batch.uncond)

        else:
            round_teacher = self.round_teacher
            assert round_teacher is not None

            def teacher(x: Tensor, tt: Tensor) -> Tensor:
                return round_teacher(x, tt, batch.text)

        def student(x: Tensor, tt: Tensor) -> Tensor:
            return ctx.student(x, tt, batch.text)

        loss, _ = progressive_loss(student, teacher, x_t, t, t_mid, t_next)
        return loss, {"train/round": float(r), "train/round_teacher_steps": float(n)}
