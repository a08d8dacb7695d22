"""Rectified flow (flow matching) for text-to-image: the loss and the ODE samplers.

Conventions (SD3, Esser et al. 2024, eq. 1-3 with their rectified-flow choice): t = 0 is data,
t = 1 is noise, ``x_t = (1 - t) x0 + t eps``, and the network predicts the velocity
``v = dx_t/dt = eps - x0`` under an unweighted MSE. Sampling integrates dx/dt = v from t = 1 to
t = 0.

Run the trainer with ``python -m trainers.flow --config CONFIG.json --run-dir DIR``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from trainers.config import TimestepConfig
from trainers.text import TextEmbeddings
from trainers.timesteps import sampling_schedule, timesteps_from_uniform


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


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """[N, *shape] standard normal noise; item i depends only on ``seeds[i]`` and ``shape``.

    Each item has its own CPU generator, so the noise for a (prompt, seed) pair is the same
    whatever the batch, the run or the device.
    """
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


def solver_nfe(solver: str, steps: int) -> int:
    """Network evaluations per image (each counts once, guidance doubles the batch not NFE)."""
    return steps if solver == "euler" else 2 * steps - 1


@torch.no_grad()
def sample(
    denoiser: Callable[[torch.Tensor, torch.Tensor, TextEmbeddings], torch.Tensor],
    noise: torch.Tensor,
    cond: TextEmbeddings,
    uncond: TextEmbeddings | None,
    *,
    steps: int,
    shift: float,
    solver: str = "euler",
    guidance: float = 1.0,
) -> torch.Tensor:
    """Integrate from t = 1 (``noise``) to t = 0 with classifier-free guidance.

    Guidance: ``v = v_u + w (v_c - v_u)`` (w = 1: conditional only). The time grid is
    ``linspace(1, 0, steps + 1)`` shifted with the training shift. Heun (2nd order) falls back to
    an Euler step on the last interval, where t_next = 0 (Karras et al. 2022, alg. 1).

    Written here rather than with diffusers' FlowMatch schedulers because those floor sigma at
    1/num_train_timesteps, take the shift only at construction and have no guidance; the Euler
    update is tested to equal ``FlowMatchEulerDiscreteScheduler.step`` on the same sigmas.
    """
    if solver not in ("euler", "heun"):
        raise ValueError(f"unknown solver {solver!r}; allowed: euler, heun")
    b = noise.shape[0]
    use_cfg = uncond is not None and guidance != 1.0
    both = _concat_text(cond, uncond) if use_cfg else cond

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        tt = torch.full((b,), t, device=x.device, dtype=torch.float32)
        if not use_cfg:
            return denoiser(x, tt, cond).float()
        v = denoiser(torch.cat([x, x]), torch.cat([tt, tt]), both).float()
        v_c, v_u = v[:b], v[b:]
        return v_u + guidance * (v_c - v_u)

    ts = sampling_schedule(steps, shift).tolist()
    x = noise.float()
    for t, t_next in itertools.pairwise(ts):
        dt = t_next - t
        v = velocity(x, t)
        x_euler = x + dt * v
        if solver == "heun" and t_next > 0:
            x = x + 0.5 * dt * (v + velocity(x_euler, t_next))
        else:
            x = x_euler
    return x


def _concat_text(a: TextEmbeddings, b: TextEmbeddings) -> TextEmbeddings:
    def cat(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, y.expand(x.shape[0], *y.shape[1:]) if y.shape[0] == 1 else y])

    return TextEmbeddings(
        tokens=cat(a.tokens, b.tokens), pooled=cat(a.pooled, b.pooled), mask=cat(a.mask, b.mask)
    )


if __name__ == "__main__":  # pragma: no cover - thin entry point, tested through subprocesses
    from trainers.train import main

    raise SystemExit(main())
