"""Latent consistency distillation (Luo et al. 2023, LCM, alg. 1 / eq. 9; Song et al. 2023).

LCM's latent consistency distillation loss with classifier-free guidance and skipping step k::

    z^_{t_n} = z_{t_{n+k}} + (1 + omega) Psi(z_{t_{n+k}}, t_{n+k}, t_n, c)
                           - omega Psi(z_{t_{n+k}}, t_{n+k}, t_n, 0)
    L(theta, theta^-) = E_{z, c, n} [ d( f_theta(z_{t_{n+k}}, c, t_{n+k}),
                                         f_theta^-(z^_{t_n}, c, t_n) ) ]

Here, on the rectified-flow grid ``t_0 = 0 < ... < t_N = 1`` (the shifted sampling schedule with
N = ``distill.consistency.grid``, reversed), n uniform in ``[0, N - k]``:

- ``x_{t_{n+k}} = (1 - t_{n+k}) x0 + t_{n+k} eps`` from real data;
- the solver Psi is one Euler step of the flow ODE. Psi is linear in the velocity, so LCM's
  ``(1 + omega) Psi_c - omega Psi_u`` is one Euler step with the guided velocity
  ``v_w = v_u + w (v_c - v_u)``, ``w = 1 + omega = distill.guidance``::

      x^_{t_n} = x_{t_{n+k}} + (t_n - t_{n+k}) v_w(x_{t_{n+k}}, t_{n+k})

  (LCM also feeds omega to the student, which then serves a range of guidance scales; this
  student learns the one scale ``distill.guidance`` and takes no omega input);
- the consistency function is ``f(x, t) = x - t v(x, t)``, i.e. ``c_skip(t) = 1``,
  ``c_out(t) = -t`` on the velocity. ``f(x, 0) = x`` holds exactly, which is the boundary
  condition. LCM's ``c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2)``,
  ``c_out = s t / sqrt((s t)^2 + sigma_data^2)`` (s = 10) wrap an x0 / eps predictor of a
  variance-preserving DDPM whose grid starts at a small ``t = epsilon > 0``, where the boundary
  can only be met approximately; for rectified flow ``x_t - t v`` *is* the network's own
  clean-image estimate and already equals x at t = 0, so no extra skip connection (and no
  sigma_data) is needed, and it is what the consistency sampler uses (``x0_hat = x - t v``);
- theta^- is an EMA of the student (``theta^- <- mu theta^- + (1 - mu) theta``, mu =
  ``target_ema``), no gradient; LCM uses it as the target network;
- d is the pseudo-Huber distance of Song & Dhariwal 2023 (improved consistency training),
  ``d(a, b) = sqrt(||a - b||^2 + c^2) - c`` per image, ``c = huber_c`` or ``0.00054 sqrt(dim)``,
  averaged over the batch with uniform weights lambda(t_n) = 1 (as LCM).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from trainers.distill._copies import copy_into, ema_update, frozen_copy
from trainers.distill.base import Batch, Context, DistillMethod
from trainers.flow import bcast, noise_to, x0_from_velocity

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x [B, ...], t [B]) -> v, conditioning bound


def default_huber_c(values_per_image: int) -> float:
    """Song & Dhariwal 2023: ``c = 0.00054 sqrt(d)``."""
    return 0.00054 * math.sqrt(values_per_image)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """``sqrt(||a - b||^2 + c^2) - c`` per image ([B])."""
    sq = ((a.float() - b.float()) ** 2).flatten(1).sum(1)
    return torch.sqrt(sq + c * c) - c


def consistency_loss(
    student: Velocity,
    target: Velocity,
    x_hi: Tensor,
    v_teacher: Tensor,
    t_hi: Tensor,
    t_lo: Tensor,
    c: float,
) -> tuple[Tensor, Tensor]:
    """LCD's loss for one batch (see the module docstring); returns (loss, distance [B]).

    ``x_hi`` is ``x_{t_{n+k}}``, ``v_teacher`` the guided teacher velocity there, ``t_hi`` /
    ``t_lo`` are ``t_{n+k}`` / ``t_n`` ([B]).
    """
    with torch.no_grad():
        x_hat_lo = x_hi + bcast(t_lo - t_hi, x_hi) * v_teacher.float()
        f_target = x0_from_velocity(x_hat_lo, t_lo, target(x_hat_lo, t_lo).float())
    f_online = x0_from_velocity(x_hi, t_hi, student(x_hi, t_hi).float())
    dist = pseudo_huber(f_online, f_target, c)
    return dist.mean(), dist


def consistency_grid(ctx: Context, n: int) -> Tensor:
    """``t_0 = 0 < ... < t_N = 1``: the shifted sampling schedule, ascending ([N + 1], CPU)."""
    return ctx.grid(n).flip(0)


class Consistency(DistillMethod):
    name = "consistency"
    sampler = "consistency"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        settings = ctx.cfg.distill.consistency
        if settings.skip > settings.grid:
            raise ValueError(
                f"consistency: skip ({settings.skip}) must be at most grid ({settings.grid})"
            )
        self.grid_steps = settings.grid
        self.skip = settings.skip
        self.decay = settings.target_ema
        self.huber_c = (
            settings.huber_c
            if settings.huber_c is not None
            else default_huber_c(math.prod(ctx.sample_shape))
        )
        # theta^-: a submodule, so it is checkpointed. It starts as the student (LCM); the copy
        # is refreshed at the first step that runs before any update (``target_ready`` False),
        # so it is the student the trainer trains even if its weights were loaded after this.
        self.target: nn.Module = frozen_copy(ctx.student)
        self.register_buffer("target_ready", torch.zeros((), dtype=torch.bool))

    def train(self, mode: bool = True) -> Consistency:
        super().train(mode)
        self.target.eval()
        return self

    def student_loss(
        self, batch: Batch, gen: torch.Generator, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        ctx = self.ctx
        if not bool(self.target_ready):
            copy_into(self.target, ctx.student)
            self.target_ready.fill_(True)
        grid = consistency_grid(ctx, self.grid_steps)
        x0 = batch.x0.float()
        b, dev = x0.shape[0], x0.device
        n = torch.randint(self.grid_steps - self.skip + 1, (b,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(dev)
        t_hi, t_lo = grid[n + self.skip].float().to(dev), grid[n].float().to(dev)
        x_hi = noise_to(x0, eps, t_hi)
        v_teacher = ctx.teacher_velocity(x_hi, t_hi, batch.text, batch.uncond)
        target = self.target

        def student(x: Tensor, tt: Tensor) -> Tensor:
            return ctx.student(x, tt, batch.text)

        def ema_target(x: Tensor, tt: Tensor) -> Tensor:
            return target(x, tt, batch.text)

        loss, _ = consistency_loss(student, ema_target, x_hi, v_teacher, t_hi, t_lo, self.huber_c)
        return loss, {"train/distance": float(loss.detach())}

    def after_student_step(self, step: int) -> None:
        ema_update(self.target, self.ctx.student, self.decay)
