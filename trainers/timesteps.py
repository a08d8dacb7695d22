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
mass towards noise, which higher resolutions need. ``auto`` picks SD3's ``s = sqrt(m / n)``;
``flux`` is Flux's dynamic shift (diffusers ``FluxPipeline``: ``calculate_shift`` and
``FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")``):
``mu`` linear in the token count the denoiser sees, and ``t' = e^mu / (e^mu + (1 / t - 1))``,
which is the SD3 shift above with ``s = e^mu`` (multiply numerator and denominator by ``t``).
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


def image_seq_len(latent_height: int, latent_width: int, patch_size: int | None) -> int:
    """The number of tokens the denoiser sees for one image of ``latent_height x latent_width``
    cells (pixels, or VAE latent cells): ``(h / p) * (w / p)`` for a patch transformer (SD3,
    PixArt; ``patch_size`` p), the latent cells ``h * w`` for a backbone without patches
    (``patch_size`` None: the UNet, whose first level sees every cell)."""
    p = patch_size or 1
    if latent_height % p or latent_width % p:
        raise ValueError(
            f"a {latent_height}x{latent_width} input is not divisible by the patch size {p}; "
            "pick a resolution that is a multiple of it"
        )
    return (latent_height // p) * (latent_width // p)


def flux_mu(cfg: TimestepConfig, seq_len: int) -> float:
    """Flux's ``mu`` for ``seq_len`` tokens: linear through (``flux_base_seq_len``,
    ``flux_base_shift``) and (``flux_max_seq_len``, ``flux_max_shift``), extrapolated beyond
    (diffusers' ``calculate_shift``; our tiny images sit far below its 256-token base)."""
    slope = (cfg.flux_max_shift - cfg.flux_base_shift) / (
        cfg.flux_max_seq_len - cfg.flux_base_seq_len
    )
    return cfg.flux_base_shift + slope * (seq_len - cfg.flux_base_seq_len)


def resolve_shift(cfg: TimestepConfig, resolution: int, seq_len: int | None = None) -> float:
    """The numeric shift used at ``resolution`` (pixels per side) with ``seq_len`` tokens per
    image (:func:`image_seq_len`; needed for ``flux`` only).

    ``auto``: SD3 section 5.3.2, ``s = sqrt(m / n)`` where m and n count the pixels (or latent
    cells: the ratio is the same) of the training and the base resolution. The base resolution
    (``timesteps.base_resolution``, default 32 = the embedded data) is where ``s = 1``; SD3 used
    256x256 as its base and found ``s = 3`` best at 1024x1024 (= sqrt(16) rounded down).
    ``flux``: ``s = exp(flux_mu(cfg, seq_len))``.
    """
    if cfg.shift == "auto":
        return math.sqrt((resolution * resolution) / (cfg.base_resolution * cfg.base_resolution))
    if cfg.shift == "flux":
        if seq_len is None:
            raise ValueError("timesteps.shift 'flux' needs the image's token count (seq_len)")
        return math.exp(flux_mu(cfg, seq_len))
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


def resolve_shift_value(
    cfg: TimestepConfig, shift: float | str, resolution: int, seq_len: int | None = None
) -> float:
    """:func:`resolve_shift` for a shift given apart from ``cfg`` (``sample.shift``, an
    export's ``generate(shift=...)``): a number is used as is; ``auto`` / ``flux`` follow that
    rule with ``cfg``'s other fields (base resolution, the ``flux_*`` line)."""
    if isinstance(shift, str) and shift not in ("auto", "flux"):
        raise ValueError(f"shift must be a number, 'auto' or 'flux', got {shift!r}")
    if not isinstance(shift, str):
        if float(shift) <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        return float(shift)
    return resolve_shift(cfg.model_copy(update={"shift": shift}), resolution, seq_len)
