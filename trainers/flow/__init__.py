"""Rectified flow (flow matching) for text-to-image: the conventions and the loss.

Conventions (SD3, Esser et al. 2024, eq. 1-3 with their rectified-flow choice): t = 0 is data,
t = 1 is noise, ``x_t = (1 - t) x0 + t eps``, and the network predicts the velocity
``v = dx_t/dt = eps - x0`` under an unweighted MSE, so its clean-image estimate is
``x0_hat = x_t - t v``. Sampling integrates dx/dt = v from t = 1 to t = 0
(``trainers/sampling.py``).

Run the trainer with ``python -m trainers.flow --config CONFIG.json --run-dir DIR``
(``trainers/flow/__main__.py``; the trainer itself is ``trainers/train.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainers.config import TimestepConfig
from trainers.timesteps import timesteps_from_uniform


@dataclass(frozen=True)
class FlowGenerators:
    """The random streams of one flow-matching step, one per purpose, so that how many numbers
    one purpose draws never shifts another's (common random numbers across configurations)."""

    timesteps: torch.Generator | None = None  # the uniforms u behind t
    noise: torch.Generator | None = None  # eps


@dataclass(frozen=True)
class FlowLoss:
    loss: torch.Tensor  # scalar
    t: torch.Tensor  # [B] timesteps used (x0's device)
    u: torch.Tensor  # [B] the uniforms t was transformed from (CPU)
    eps: torch.Tensor  # [B, C, H, W] the noise (x0's device and dtype)


def flow_matching_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    timesteps: TimestepConfig,
    shift: float,
    generators: FlowGenerators | None = None,
) -> FlowLoss:
    """MSE between the predicted and the true velocity at sampled t.

    predict: ``(x_t [B, C, H, W], t [B]) -> v``, the network with its conditioning bound.
    x0: [B, C, H, W] clean data. ``u ~ U(0, 1)`` [B] is drawn from ``generators.timesteps`` and
    mapped to t by the configured sampler (:func:`timesteps_from_uniform`); eps from
    ``generators.noise``. Both are drawn on the CPU and moved to x0's device, so the same
    generator states give the same draws on any device, and for any timestep configuration.
    """
    gens = generators or FlowGenerators()
    b = x0.shape[0]
    u = torch.rand(b, generator=gens.timesteps)
    eps = torch.randn(x0.shape, generator=gens.noise, dtype=torch.float32)
    t = timesteps_from_uniform(timesteps, u, shift).to(x0.device)
    eps = eps.to(x0.device, x0.dtype)
    tb = t.view(b, *([1] * (x0.dim() - 1)))
    x_t = (1.0 - tb) * x0 + tb * eps
    pred = predict(x_t, t)
    loss = torch.mean((pred.float() - (eps - x0).float()) ** 2)
    return FlowLoss(loss, t, u, eps)


@torch.no_grad()
def grid_flow_loss(
    predict: Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor],
    x0: torch.Tensor,
    levels: int,
    seed: int = 0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Velocity MSE at the fixed grid t_k = (k + 0.5) / levels, [levels] (mean over images).

    Unlike the training loss it does not depend on the timestep sampler or the shift a model was
    trained with (t is the same grid for every model and the noise depends only on ``seed``),
    so its mean compares timestep choices on any data; SD3 (Esser et al. 2024, sec. 5.1) uses a
    validation loss of this kind. ``predict(x_t, t, rows)`` gets the rows of ``x0`` it sees (for
    their captions). Chunking over images does not change the result beyond float rounding.
    """
    n = x0.shape[0]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    out = torch.zeros(levels, dtype=torch.float64)
    for k in range(levels):
        t_k = (k + 0.5) / levels
        for a in range(0, n, batch_size):
            rows = slice(a, min(a + batch_size, n))
            x, e = x0[rows], eps[rows]
            t = torch.full((x.shape[0],), t_k, device=x.device)
            pred = predict((1.0 - t_k) * x + t_k * e, t, rows).float()
            out[k] += ((pred - (e - x).float()) ** 2).flatten(1).mean(1).sum().double().cpu()
    return out / n


def bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` [B] viewed as [B, 1, 1, 1] (as many trailing dims as ``like``)."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def noise_to(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps`` (t [B])."""
    tb = bcast(t, x0)
    return (1.0 - tb) * x0 + tb * eps


def x0_from_velocity(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The clean-image estimate ``x_t - t v`` (t [B]); exact at t = 0."""
    return x_t - bcast(t, x_t) * v
