"""Training timestep densities and the resolution shift (SD3, Esser et al. 2024, section 3.1).

Convention: t in [0, 1], t = 0 is data, t = 1 is noise.

``uniform``, ``logit_normal`` and ``mode`` come from ``diffusers.training_utils.
compute_density_for_timestep_sampling``. ``cosmap`` is written here because diffusers only has it
as a loss weight (``compute_loss_weighting_for_sd3``), not as a sampler: SD3 eq. 20 maps
``u ~ U(0, 1)`` through ``t = 1 - 1 / (tan(pi u / 2) + 1)``.

The shift ``t' = s t / (1 + (s - 1) t)`` (SD3 eq. 23) is applied after sampling; ``s > 1`` moves
mass towards noise, which higher resolutions need. ``auto`` picks SD3's ``s = sqrt(m / n)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from trainers.config import TimestepConfig


def _uniform(cfg: TimestepConfig, n: int, gen: torch.Generator | None) -> torch.Tensor:
    return compute_density_for_timestep_sampling("none", n, generator=gen)


def _logit_normal(cfg: TimestepConfig, n: int, gen: torch.Generator | None) -> torch.Tensor:
    return compute_density_for_timestep_sampling(
        "logit_normal", n, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, generator=gen
    )


def _mode(cfg: TimestepConfig, n: int, gen: torch.Generator | None) -> torch.Tensor:
    return compute_density_for_timestep_sampling(
        "mode", n, mode_scale=cfg.mode_scale, generator=gen
    )


def _cosmap(cfg: TimestepConfig, n: int, gen: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(n, generator=gen)
    return 1.0 - 1.0 / (torch.tan(math.pi * u / 2) + 1.0)


# Name -> sampler; the names are the public values of ``timesteps.sampler``.
SAMPLERS: dict[str, Callable[[TimestepConfig, int, torch.Generator | None], torch.Tensor]] = {
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


def sample_timesteps(
    cfg: TimestepConfig, n: int, shift: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``n`` training timesteps in [0, 1] (float32, CPU), shift applied."""
    t = SAMPLERS[cfg.sampler](cfg, n, generator)
    # Keep t strictly inside (0, 1): float32 sigmoid can round to exactly 0 or 1.
    return shift_timesteps(t, shift).clamp(1e-5, 1.0 - 1e-5)


def sampling_schedule(steps: int, shift: float) -> torch.Tensor:
    """The ``steps + 1`` times an ODE solver visits, from 1 (noise) to 0 (data), shifted."""
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
