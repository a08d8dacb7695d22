"""Training timestep densities and the resolution shift (SD3, Esser et al. 2024, section 3.1).

Convention: t in [0, 1], t = 0 is data, t = 1 is noise.

Every sampler is a deterministic, increasing transform (its inverse CDF) of one uniform draw
``u ~ U(0, 1)`` per image:

- ``uniform``: ``t = u``;
- ``logit_normal``: ``t = sigmoid(m + s * ndtri(u))``, i.e. ``logit(t) ~ N(m, s)``;
- ``mode`` (SD3 eq. 21): ``t = 1 - v - c (cos^2(pi v / 2) - 1 + v)`` with ``v = 1 - u``;
- ``cosmap`` (SD3 eq. 20): ``t = 1 - 1 / (tan(pi u / 2) + 1)``.

``uniform``, ``logit_normal`` and ``mode`` have the densities of ``diffusers.training_utils.
compute_density_for_timestep_sampling`` (the tests check it), but are deliberately *not* drawn by
calling it: diffusers draws ``logit_normal`` from ``torch.normal`` and the others from
``torch.rand``, so two configurations differing only in the sampler would consume different
random numbers. Written as quantile transforms of the same ``u`` (quantile coupling), two
configurations trained with the same seed see the same ``u`` at every step (common random
numbers), so the difference of their results is paired rather than confounded with sampling
noise. ``cosmap`` exists in diffusers only as a loss weight (``compute_loss_weighting_for_sd3``).

The shift ``t' = s t / (1 + (s - 1) t)`` (SD3 eq. 23) is applied after sampling; ``s > 1`` moves
mass towards noise, which higher resolutions need. ``auto`` picks SD3's ``s = sqrt(m / n)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from trainers.config import TimestepConfig

# Each transform maps u [n] float64 in [0, 1) to t [n] float64 in [0, 1].


def _uniform(cfg: TimestepConfig, u: torch.Tensor) -> torch.Tensor:
    return u


def _logit_normal(cfg: TimestepConfig, u: torch.Tensor) -> torch.Tensor:
    # ndtri(0) = -inf -> t = 0, which sample_timesteps clamps like any other endpoint.
    return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.special.ndtri(u))


def _mode(cfg: TimestepConfig, u: torch.Tensor) -> torch.Tensor:
    # diffusers' formula f(v) = 1 - v - c (cos^2(pi v / 2) - 1 + v) is decreasing in v for the
    # allowed mode_scale; applied to v = 1 - u (the same law as u) it increases with u, so image
    # i sits at the same quantile of every sampler's density, not at the opposite one.
    v = 1.0 - u
    return 1.0 - v - cfg.mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1.0 + v)


def _cosmap(cfg: TimestepConfig, u: torch.Tensor) -> torch.Tensor:
    return 1.0 - 1.0 / (torch.tan(math.pi * u / 2) + 1.0)


# Name -> transform of u; the names are the public values of ``timesteps.sampler``.
SAMPLERS: dict[str, Callable[[TimestepConfig, torch.Tensor], torch.Tensor]] = {
    "uniform": _uniform,
    "logit_normal": _logit_normal,
    "mode": _mode,
    "cosmap": _cosmap,
}


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 eq. 23: ``t' = s t / (1 + (s - 1) t)``; identity at ``s = 1``, fixes 0 and 1."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolve_shift(cfg: TimestepConfig, resolution: int) -> float:
    """The numeric shift used in training.

    ``auto``: SD3 section 5.3.2, ``s = sqrt(m / n)`` where m and n count the pixels (or latent
    cells: the ratio is the same) of the training and the base resolution. The base resolution
    (``timesteps.base_resolution``, default 32 = the embedded data) is where ``s = 1``; SD3 used
    256x256 as its base and found ``s = 3`` best at 1024x1024 (= sqrt(16) rounded down).
    """
    if cfg.shift == "auto":
        return math.sqrt((resolution * resolution) / (cfg.base_resolution * cfg.base_resolution))
    return float(cfg.shift)


def timesteps_from_uniform(cfg: TimestepConfig, u: torch.Tensor, shift: float) -> torch.Tensor:
    """Training timesteps [n] (float32, on ``u``'s device) from uniforms ``u`` [n] in [0, 1):
    the configured sampler's quantile transform, then the shift. Element i depends only on
    ``u[i]``, so equal ``u`` couple the draws of any two timestep configurations."""
    t = SAMPLERS[cfg.sampler](cfg, u.double())
    # Keep t strictly inside (0, 1): u = 0 and rounding can give exactly 0 or 1.
    return shift_timesteps(t, shift).clamp(1e-5, 1.0 - 1e-5).float()


def sample_timesteps(
    cfg: TimestepConfig, n: int, shift: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``n`` training timesteps in [0, 1] (float32, CPU), shift applied: ``n`` uniforms
    from ``generator`` (``torch.rand``), transformed by :func:`timesteps_from_uniform`."""
    return timesteps_from_uniform(cfg, torch.rand(n, generator=generator), shift)


def sampling_schedule(steps: int, shift: float) -> torch.Tensor:
    """The ``steps + 1`` times an ODE solver visits, from 1 (noise) to 0 (data), shifted."""
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
