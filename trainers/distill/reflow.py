"""Reflow, then one-step distillation (Liu et al. 2023, InstaFlow; Liu et al. 2022, Rectified Flow).

``prepare`` draws ``distill.reflow.pairs`` (noise, teacher image, caption) triples from the guided
teacher ODE (``teacher_pairs``, cached in the run directory, so a resumed run reads them back).

Stage 1, reflow (InstaFlow eq. 3 / Rectified Flow eq. 1, on the teacher's coupling). InstaFlow
writes it with noise at time 0 and the image at time 1; in this repository's convention (t = 0
data, t = 1 noise, ``v = eps - x0``) it reads::

    X_t = (1 - t) X_img + t X_noise,   t ~ U(0, 1)
    L   = E || v_student(X_t, t | T) - (X_noise - X_img) ||^2

t is uniform as in Rectified Flow / InstaFlow (not the teacher's logit-normal, nor shifted): the
straightened student must be right over the whole path, and uniform t is what the paper uses.
The batch's real images are not used: the pairs replace the data.

Stage 2, only when ``distill.steps == 1`` and ``distill_fraction > 0``: the last
``distill_fraction`` of ``train.steps`` distils the straightened student into one step
(InstaFlow eq. 4, ``v~ = argmin E[ D(ODE[v_k](X_0 | T), X_0 + v(X_0 | T)) ]``), here::

    x0_student = X_noise - v_student(X_noise, t = 1 | T)       # one Euler step from t = 1 to 0
    L          = E || x0_student - X_img ||^2

Adaptations: D is the squared L2 distance (mean over values) instead of InstaFlow's LPIPS (no
LPIPS network for arbitrary latents here), and the one-step target is the *teacher's* image of the
pair rather than the image the 2-rectified flow's own ODE gives from the same noise (InstaFlow
re-generates its distillation targets with the reflowed model; using the teacher pairs saves a
second pair generation, and the reflowed model was trained to transport that noise to those
images).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainers.distill.base import Batch, Context, DistillMethod, teacher_pairs
from trainers.flow import noise_to

Velocity = Callable[[Tensor, Tensor], Tensor]  # (x [B, ...], t [B]) -> v, conditioning bound


def reflow_loss(student: Velocity, noise: Tensor, images: Tensor, t: Tensor) -> Tensor:
    """``mean || v_student((1 - t) x_img + t noise, t) - (noise - x_img) ||^2``."""
    x_t = noise_to(images, noise, t)
    return torch.mean((student(x_t, t).float() - (noise - images)) ** 2)


def one_step_loss(student: Velocity, noise: Tensor, images: Tensor) -> Tensor:
    """``mean || (noise - v_student(noise, 1)) - x_img ||^2`` (InstaFlow stage 2 with L2)."""
    t = torch.ones(noise.shape[0], device=noise.device)
    x0 = noise - student(noise, t).float()
    return torch.mean((x0 - images) ** 2)


def stage_two_start(total_steps: int, steps: int, distill_fraction: float) -> int:
    """The first 0-based step of stage 2 (``total_steps``: no stage 2)."""
    if steps != 1 or distill_fraction <= 0:
        return total_steps
    return total_steps - int(distill_fraction * total_steps + 0.5)


class Reflow(DistillMethod):
    name = "reflow"
    sampler = "ode"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.settings = ctx.cfg.distill.reflow
        self.stage2_start = stage_two_start(
            ctx.cfg.train.steps, ctx.steps, self.settings.distill_fraction
        )
        self.pairs: dict[str, Any] | None = None  # not in the state dict: cached on disk

    def prepare(self, workdir: Path) -> None:
        ctx = self.ctx
        data = teacher_pairs(
            ctx,
            self.settings.pairs,
            self.settings.pair_steps,
            seed=ctx.cfg.seed,
            cache=Path(workdir) / "reflow_pairs.pt",
        )
        self.pairs = {
            "noise": data["noise"].float().to(ctx.device),
            "images": data["images"].float().to(ctx.device),
            "captions": list(data["captions"]),
        }

    def stage(self, step: int) -> int:
        return 2 if step >= self.stage2_start else 1

    def student_loss(
        self, batch: Batch, gen: torch.Generator, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        if self.pairs is None:
            raise RuntimeError("reflow: prepare(workdir) must run before training (teacher pairs)")
        ctx, pairs = self.ctx, self.pairs
        b = batch.x0.shape[0]
        idx = torch.randint(len(pairs["captions"]), (b,), generator=gen)
        stage = self.stage(step)
        t = torch.rand(b, generator=gen) if stage == 1 else None
        dev = pairs["noise"].device
        noise, images = pairs["noise"][idx.to(dev)], pairs["images"][idx.to(dev)]
        text = ctx.encode([pairs["captions"][j] for j in idx.tolist()]).to(noise.device)

        def student(x: Tensor, tt: Tensor) -> Tensor:
            return ctx.student(x, tt, text)

        if t is None:
            loss = one_step_loss(student, noise, images)
        else:
            loss = reflow_loss(student, noise, images, t.to(noise.device))
        return loss, {"train/stage": float(stage)}
