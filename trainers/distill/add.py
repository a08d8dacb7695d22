"""Adversarial diffusion distillation (Sauer et al. 2023, "Adversarial Diffusion Distillation").

The student ``x0_theta`` gets a real image noised to one of its own timesteps,
``x_s = alpha_s x0 + sigma_s eps`` (here ``noise_to(x0, eps, t_k)`` with ``t_k`` a grid time of
the student's sampler), and predicts ``x0_theta = x_s - t_k v_student``. Its loss (ADD eq. 1):

    L = L_adv^G(x0_theta, phi) + lambda L_distill(x0_theta, psi)

- Adversarial, generator side (eq. 2): ``L_adv^G = -E[ sum_k D_phi,k(F_k(x0_theta)) ]``; here one
  feature network output (the frozen encoder's patch features) and one head giving per-patch
  logits, so ``-mean_{b, patches} D(x0_theta)``.
- Distillation (eq. 3): ``L_distill = E_{t, eps'}[ c(t) d(x0_theta, x0_psi(sg(x0_theta_t); t)) ]``
  with ``x0_theta_t = noise_to(x0_theta, eps', t)`` and ``x0_psi`` the guided teacher's clean-image
  estimate; ``d`` is the squared L2 distance (mean over the image's values here, so
  ``lambda = 2.5`` weighs it against an O(1) adversarial term), ``c(t) = alpha_t`` (ADD's
  exponential weighting; ``alpha_t = 1 - t`` in the flow convention), ``t ~ U[0.02, 0.98]``.
- Discriminator (eq. 4-5), hinge loss with R1:
  ``L_adv^D = E_x0[ max(0, 1 - D(x0)) + gamma R1 ] + E_x0_theta[ max(0, 1 + D(x0_theta)) ]``
  (means over batch and patches). As in ADD, the R1 penalty is taken w.r.t. the input of the
  discriminator head (the frozen features of the real images), not the pixels:
  ``R1 = 1/B sum_b || d(sum_m D_m(f_b)) / d f_b ||^2``, without a 1/2 factor.

The discriminator is a frozen feature network (``trainers.repa.load_encoder``, the same code as
REPA's encoder: ``shapes-ssl`` for the embedded data, or DINOv2 as in ADD) and a small trainable
head on its patch features, conditioned on the caption in the projection-discriminator style
(Miyato & Koyama 2018; ADD / StyleGAN-T): ``D_m = w^T h_m + <h_m, P c> / sqrt(H)`` with ``h_m``
an MLP of patch ``m``'s features and ``c`` the pooled text embedding. The encoder is outside the
module's ``state_dict`` (never trained or saved); gradients flow through it to the student's
images for the generator loss.

Adaptations: one feature level and head (ADD: several DINOv2 layers, a head each); no image
conditioning of the discriminator (ADD optionally adds the real image's embedding) and no
spectral normalisation in the head; the discriminator is updated once per student step, first,
on the detached student images of the same step. Pixel data only: the encoder takes images in
[-1, 1]; latent runs would need to decode the student's latents through the VAE first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import Tensor, nn

from trainers.config import ConfigError
from trainers.distill.base import Batch, Context, DistillMethod
from trainers.distill.config import AddSettings
from trainers.distill.dmd import _student_x0, _uniform_t
from trainers.flow import noise_to, x0_from_velocity
from trainers.repa import Encoder, load_encoder
from trainers.sampling import StudentSampler

HEAD_WIDTH = 256
"""H: width of the discriminator head's hidden layers and of the text projection."""


# ----------------------------------------------------------------------------------------------
# the discriminator head


class ProjectionHead(nn.Module):
    """Per-patch logits ``[B, M]`` from patch features ``[B, M, E]`` and pooled text ``[B, P]``.

    ``h = MLP(f)`` (two 1x1 layers, LeakyReLU 0.2), ``D = w^T h + <h, P c> / sqrt(H)``.
    """

    def __init__(self, feature_dim: int, text_dim: int, width: int = HEAD_WIDTH):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(feature_dim, width),
            nn.LeakyReLU(0.2),
            nn.Linear(width, width),
            nn.LeakyReLU(0.2),
        )
        self.out = nn.Linear(width, 1)
        self.text = nn.Linear(text_dim, width)
        self.width = width

    def forward(self, features: Tensor, pooled: Tensor) -> Tensor:
        h = self.mlp(features.float())  # [B, M, H]
        proj = self.text(pooled.float())  # [B, H]
        return self.out(h).squeeze(-1) + torch.einsum("bmh,bh->bm", h, proj) / self.width**0.5


# ----------------------------------------------------------------------------------------------
# the losses


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """ADD eq. 4-5 without R1: ``mean max(0, 1 - D(real)) + mean max(0, 1 + D(fake))``."""
    return (
        torch.relu(1.0 - logits_real.float()).mean() + torch.relu(1.0 + logits_fake.float()).mean()
    )


def r1_penalty(logits_real: Tensor, features_real: Tensor) -> Tensor:
    """``1/B sum_b ||d (sum_m D_m) / d f_b||^2``; ``features_real`` must require grad and
    ``logits_real`` be computed from it. Keeps the graph (it is part of the D loss)."""
    (grad,) = torch.autograd.grad(logits_real.float().sum(), features_real, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


def generator_adv_loss(logits_fake: Tensor) -> Tensor:
    """ADD eq. 2: ``-mean D(x0_theta)`` over batch and patches."""
    return -logits_fake.float().mean()


def distill_loss(x0_student: Tensor, x0_teacher: Tensor, t: Tensor) -> Tensor:
    """ADD eq. 3: ``1/B sum_b c(t_b) mean_{C,H,W} (x0_student - sg(x0_teacher))^2``,
    ``c(t) = alpha_t = 1 - t``."""
    err = (x0_student.float() - x0_teacher.detach().float()) ** 2
    return ((1.0 - t.float()) * err.flatten(1).mean(1)).mean()


@contextmanager
def _no_param_grad(module: nn.Module) -> Iterator[None]:
    """Keep ``module``'s parameters out of graphs built inside (inputs still get gradients)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(f)


# ----------------------------------------------------------------------------------------------
# the method


class Add(DistillMethod):
    """ADD: adversarial loss with a frozen-feature discriminator plus score distillation."""

    name: ClassVar[str] = "add"
    sampler: ClassVar[StudentSampler] = "consistency"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        if getattr(ctx, "vae", None) is not None or ctx.sample_shape[0] != 3:
            raise ConfigError(
                f"distill.method 'add' needs pixel data (3-channel images in [-1, 1]) for its "
                f"discriminator's image encoder, got samples of shape {ctx.sample_shape}; latent "
                "runs are not supported (the student's latents would have to be decoded first)"
            )
        self.settings: AddSettings = ctx.cfg.distill.add
        encoder = load_encoder(self.settings.encoder)
        encoder.module.to(ctx.device).eval().requires_grad_(False)
        self._encoder = [encoder]  # a list keeps it out of parameters() and state_dict()
        pooled_dim = int(ctx.encode([""]).pooled.shape[-1])
        self.head = ProjectionHead(encoder.dim, pooled_dim)
        train = ctx.cfg.train
        self.disc_opt = torch.optim.AdamW(
            self.head.parameters(),
            lr=self.settings.disc_lr or train.lr,
            betas=train.betas,
            weight_decay=train.weight_decay,
        )

    @property
    def encoder(self) -> Encoder:
        return self._encoder[0]

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"disc": self.disc_opt}

    def features(self, images: Tensor) -> Tensor:
        """Frozen patch features ``[B, M, E]`` of images in [-1, 1] (differentiable in them)."""
        self.encoder.module.eval()
        with torch.autocast(images.device.type, enabled=False):
            return self.encoder.features(images.float()).float()

    def discriminator_step(self, real: Tensor, fake: Tensor, pooled: Tensor) -> dict[str, float]:
        """One hinge + R1 update of the head on real images and (detached) student images."""
        with torch.no_grad():
            f_real = self.features(real)
            f_fake = self.features(fake.detach())
        f_real.requires_grad_(True)
        logits_real = self.head(f_real, pooled)
        logits_fake = self.head(f_fake, pooled)
        hinge = hinge_d_loss(logits_real, logits_fake)
        loss = hinge
        r1 = torch.zeros(())
        if self.settings.r1_weight > 0:
            r1 = r1_penalty(logits_real, f_real)
            loss = loss + self.settings.r1_weight * r1
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_opt.step()
        self.disc_opt.zero_grad(set_to_none=True)
        return {
            "train/disc_loss": float(hinge.detach()),
            "train/r1": float(r1.detach()),
            "train/d_real": float(logits_real.detach().mean()),
            "train/d_fake": float(logits_fake.detach().mean()),
        }

    def student_loss(
        self, batch: Batch, gen: torch.Generator, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        ctx, n = self.ctx, batch.x0.shape[0]
        x0, _ = _student_x0(ctx, batch.text, n, gen, real=batch.x0)
        pooled = batch.text.pooled.to(ctx.device)
        metrics = self.discriminator_step(batch.x0, x0, pooled)
        # Generator: gradients reach the student's images through the frozen encoder and the
        # just-updated head, whose parameters stay out of this graph.
        with _no_param_grad(self.head):
            adv = generator_adv_loss(self.head(self.features(x0), pooled))
        t = _uniform_t(n, gen, ctx.device)
        eps = torch.randn(x0.shape, generator=gen).to(ctx.device)
        x_t = noise_to(x0.detach(), eps, t)
        x0_teacher = x0_from_velocity(
            x_t, t, ctx.teacher_velocity(x_t, t, batch.text, batch.uncond)
        )
        dist = distill_loss(x0, x0_teacher, t)
        metrics |= {
            "train/adv_loss": float(adv.detach()),
            "train/distill_loss": float(dist.detach()),
        }
        return adv + self.settings.distill_weight * dist, metrics
