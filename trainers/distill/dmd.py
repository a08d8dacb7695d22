"""Distribution matching distillation: DMD (Yin et al. 2024, "One-step Diffusion with
Distribution Matching Distillation") with DMD2's multi-step student (Yin et al. 2024, "Improved
Distribution Matching Distillation for Fast Image Synthesis").

The student G is a few-step ``x0`` generator. Its samples are pulled towards the guided teacher's
distribution by the gradient of ``KL(p_fake || p_real)`` (DMD eq. 7):

    grad_theta KL = E_{z, t, x_t}[ -(s_real(x_t, t) - s_fake(x_t, t)) dG/dtheta ]

where ``s_real`` is the (guided) teacher's score and ``s_fake`` the score of a *fake* network
trained online, with the ordinary denoising loss, on the student's own samples. In ``x0``
terms, with the per-image normalisation of DMD eq. 8 (``w_t = sigma_t^2 / alpha_t * C S /
||mu_real(x_t, t) - x||_1``, which cancels the score's ``alpha_t / sigma_t^2``):

    grad = (x0_fake - x0_real) / w,     w = mean_{C,H,W} |x - x0_real|          (DMD eq. 8)

and the loss whose gradient w.r.t. the student's image ``x`` is ``grad`` is DMD2's surrogate

    L_dm = 1/B sum_b 0.5 || x_b - stopgrad(x_b - grad_b) ||^2

(summed over each image's values, averaged over the batch: ``d L_dm / d x_b = grad_b / B``, i.e.
exactly ``grad`` per image with the usual batch mean).

DMD's regression loss (eq. 9) keeps the student close to the teacher's own ODE on a fixed set
of (noise, teacher image) pairs: ``L_reg = E d(G(z), y)``. DMD uses LPIPS for ``d``; here it is
the squared L2 distance, summed per image like ``L_dm`` (so ``regression_weight`` balances two
terms of the same scale), averaged over the batch. The student's total loss is
``L_dm + lambda_reg L_reg`` (eq. 10).

Adaptations (stated where they happen):

- The student is DMD2's multi-step generator: a sample is the student's consistency sampler run
  without gradient from noise down to a random grid time ``t_k`` ("backward simulation", DMD2
  sec. 4.5), then one step with gradient (:func:`student_x0`, shared with ADD).
- Timesteps of the distribution-matching gradient and of the fake network's training are both
  uniform in ``[0.02, 0.98]`` (DMD sec. 4: ``t ~ U(T_min, T_max)`` with 0.02T, 0.98T).
- The fake network is a copy of the teacher, trained with the flow-matching (velocity) loss, on
  the conditional caption only (unguided, as DMD2's fake score); ``fake_updates`` updates per
  student update, each on a fresh student sample (DMD2's two time-scale rule).
- The regression pairs come from the guided teacher's Euler ODE (``teacher_pairs``); the student
  maps a pair's noise to an image in one step at t = 1.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from trainers.distill.base import Batch, Context, DistillMethod, teacher_pairs
from trainers.distill.config import DmdSettings
from trainers.flow import noise_to, x0_from_velocity
from trainers.sampling import StudentSampler, consistency_walk
from trainers.text import TextEmbeddings

T_MIN, T_MAX = 0.02, 0.98
"""The range of the noise levels at which DMD compares the real and fake scores (DMD sec. 4)."""


# ----------------------------------------------------------------------------------------------
# the student's samples (shared with ADD)


def _student_x0(
    ctx: Context,
    text: TextEmbeddings,
    n: int,
    gen: torch.Generator,
    real: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A student sample ``x0 [n, C, H, W]`` with its graph, and the student time ``t_k [n]``.

    ``k`` is drawn uniformly from ``[0, ctx.steps)`` (one per batch) from ``gen``; ``t_k`` is the
    grid time ``ctx.grid()[k]``. The student's input at ``t_k``:

    - ``real is None`` (DMD2's backward simulation): from noise ``x = eps`` at ``t_0 = 1``, the
      student's own multistep consistency sampler (as ``trainers.sampling.sample_student``,
      fresh noise from ``gen`` at each re-noising) without gradient down to ``t_k``; for
      ``k = 0`` the noise itself;
    - ``real`` given (ADD): the real images noised to ``t_k``, ``noise_to(real, eps, t_k)``.

    Then, with gradient, ``x0 = x - t_k v_student(x, t_k, text)``.
    """
    k = int(torch.randint(ctx.steps, (1,), generator=gen))
    grid = ctx.grid().tolist()
    shape = (n, *ctx.sample_shape)
    eps = torch.randn(shape, generator=gen).to(ctx.device)
    if real is None:
        with torch.no_grad():
            x = consistency_walk(
                ctx.student,
                eps,
                text,
                grid[: k + 1],
                lambda _k: torch.randn(shape, generator=gen).to(ctx.device),
            )
    else:
        x = noise_to(real.float(), eps, torch.full((n,), grid[k], device=ctx.device))
    t_k = torch.full((n,), grid[k], device=ctx.device)
    return x0_from_velocity(x, t_k, ctx.student(x, t_k, text).float()), t_k


def _uniform_t(n: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """``n`` times uniform in ``[T_MIN, T_MAX]`` from ``gen``."""
    return (T_MIN + (T_MAX - T_MIN) * torch.rand(n, generator=gen)).to(device)


# ----------------------------------------------------------------------------------------------
# the losses


def dmd_gradient(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD eq. 7-8: ``(x0_fake - x0_real) / w`` with ``w = mean_{C,H,W} |x - x0_real|`` per image.

    ``x`` is the student's sample, ``x0_real`` / ``x0_fake`` the real (guided teacher) and fake
    networks' clean-image estimates from ``x`` noised to some ``t``. All without gradient.
    """
    x, x0_real, x0_fake = x.detach().float(), x0_real.detach().float(), x0_fake.detach().float()
    w = (x - x0_real).abs().flatten(1).mean(1).clamp_min(1e-8)
    return (x0_fake - x0_real) / w.view(-1, *([1] * (x.dim() - 1)))


def dmd_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD2's surrogate ``1/B sum_b 0.5 ||x_b - stopgrad(x_b - grad_b)||^2``, ``grad`` from
    :func:`dmd_gradient`; its gradient w.r.t. ``x_b`` is ``grad_b / B`` (batch mean)."""
    target = (x - dmd_gradient(x, x0_real, x0_fake)).detach()
    return 0.5 * ((x.float() - target) ** 2).flatten(1).sum(1).mean()


def fake_score_loss(v_fake: Tensor, x: Tensor, eps: Tensor) -> Tensor:
    """The fake network's flow-matching loss ``mean (v_fake(x_t, t) - (eps - x))^2`` on the
    student's (detached) samples ``x``, ``x_t = (1 - t) x + t eps`` (DMD eq. 6 in velocity form)."""
    return torch.mean((v_fake.float() - (eps - x.detach()).float()) ** 2)


def regression_loss(x0_student: Tensor, images: Tensor) -> Tensor:
    """DMD eq. 9 with L2 for LPIPS: ``1/B sum_b ||G(z_b) - y_b||^2`` (summed per image)."""
    return ((x0_student.float() - images.float()) ** 2).flatten(1).sum(1).mean()


# ----------------------------------------------------------------------------------------------
# the method


class Dmd(DistillMethod):
    """DMD / DMD2: distribution matching against an online fake score, plus regression."""

    name: ClassVar[str] = "dmd"
    sampler: ClassVar[StudentSampler] = "consistency"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.settings: DmdSettings = ctx.cfg.distill.dmd
        train = ctx.cfg.train
        # mu_fake: initialised from the teacher (DMD sec. 4), trainable, checkpointed with us.
        self.fake = copy.deepcopy(ctx.teacher).requires_grad_(True).train()
        self.fake_opt = torch.optim.AdamW(
            self.fake.parameters(),
            lr=self.settings.fake_lr or train.lr,
            betas=train.betas,
            weight_decay=train.weight_decay,
        )
        self._pairs: dict[str, Any] | None = None

    def prepare(self, workdir: Path) -> None:
        if self.settings.regression_weight > 0:
            s = self.settings
            self._pairs = teacher_pairs(
                self.ctx,
                s.pairs,
                s.pair_steps,
                seed=self.ctx.cfg.seed,
                cache=workdir / "dmd_pairs.pt",
            )

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"fake": self.fake_opt}

    # -- pieces ---------------------------------------------------------------------------------

    def fake_step(self, batch: Batch, gen: torch.Generator) -> float:
        """One update of the fake network on a fresh (detached) student sample; its loss."""
        ctx, n = self.ctx, batch.x0.shape[0]
        with torch.no_grad():
            x, _ = _student_x0(ctx, batch.text, n, gen)
        t = _uniform_t(n, gen, ctx.device)
        eps = torch.randn(x.shape, generator=gen).to(ctx.device)
        loss = fake_score_loss(self.fake(noise_to(x, eps, t), t, batch.text), x, eps)
        self.fake_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.fake_opt.step()
        self.fake_opt.zero_grad(set_to_none=True)  # free the gradients until the next update
        return float(loss.detach())

    @torch.no_grad()
    def estimates(self, x: Tensor, batch: Batch, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(x0_real, x0_fake)`` at ``x_t = noise_to(x, eps, t)``, ``t ~ U[0.02, 0.98]``: the
        guided teacher's and the fake network's (conditional) clean-image estimates."""
        ctx, n = self.ctx, x.shape[0]
        t = _uniform_t(n, gen, ctx.device)
        eps = torch.randn(x.shape, generator=gen).to(ctx.device)
        x_t = noise_to(x.detach().float(), eps, t)
        x0_real = x0_from_velocity(x_t, t, ctx.teacher_velocity(x_t, t, batch.text, batch.uncond))
        x0_fake = x0_from_velocity(x_t, t, self.fake(x_t, t, batch.text).float())
        return x0_real, x0_fake

    def regression(self, n: int, gen: torch.Generator) -> Tensor:
        """``L_reg`` on ``n`` teacher pairs drawn from ``gen``: the student's one step from the
        pair's noise at t = 1 against the teacher's image."""
        if self._pairs is None:
            raise RuntimeError(
                "dmd: the regression pairs are missing; call prepare(workdir) before training "
                "(or set distill.dmd.regression_weight to 0)"
            )
        ctx, pairs = self.ctx, self._pairs
        idx = torch.randint(len(pairs["captions"]), (n,), generator=gen)
        noise = pairs["noise"][idx].to(ctx.device).float()
        images = pairs["images"][idx].to(ctx.device)
        text = ctx.encode([pairs["captions"][i] for i in idx.tolist()]).to(ctx.device)
        t = torch.ones(n, device=ctx.device)
        x0 = x0_from_velocity(noise, t, ctx.student(noise, t, text).float())
        return regression_loss(x0, images)

    # -- the step -------------------------------------------------------------------------------

    def student_loss(
        self, batch: Batch, gen: torch.Generator, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        fake_losses = [self.fake_step(batch, gen) for _ in range(self.settings.fake_updates)]
        x, _ = _student_x0(self.ctx, batch.text, batch.x0.shape[0], gen)
        x0_real, x0_fake = self.estimates(x, batch, gen)
        dm = dmd_loss(x, x0_real, x0_fake)
        metrics = {
            "train/dmd_loss": float(dm.detach()),
            "train/fake_loss": sum(fake_losses) / len(fake_losses),
        }
        loss = dm
        if self.settings.regression_weight > 0:
            reg = self.regression(batch.x0.shape[0], gen)
            loss = loss + self.settings.regression_weight * reg
            metrics["train/reg_loss"] = float(reg.detach())
        return loss, metrics
