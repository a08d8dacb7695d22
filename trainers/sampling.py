"""Sampling, for every trainer: initial noise, classifier-free guidance, the ODE solvers, the
distilled students' samplers and batched generation of images from (prompt, seed) pairs.

Conventions are the flow trainer's (``trainers/flow``): t = 1 is noise, t = 0 is data, the
network predicts the velocity ``v = dx_t/dt = eps - x0``, and sampling integrates dx/dt = v from
t = 1 to t = 0 over ``sampling_schedule(steps, shift)``.

Two registries name the samplers; their names are public values:

- :data:`SOLVERS` (``sample.solver``, ``eval.solver``: the ``Solver`` literal of
  ``trainers/config.py``): the teacher's ODE solvers, used with classifier-free guidance;
- :data:`STUDENT_SAMPLERS` (:data:`StudentSampler`, ``DistillMethod.sampler``): how a distilled
  student samples, without guidance (it was distilled into it).

Every image's randomness is a function of its seed alone (:func:`initial_noise`,
:func:`renoise_noise`), so a (prompt, seed) pair gives the same image in any batch, run or
device, and two models sampled with the same seeds are paired.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from trainers.flow import x0_from_velocity
from trainers.text import TextEmbeddings
from trainers.timesteps import sampling_schedule

Net = Callable[[Tensor, Tensor, TextEmbeddings], Tensor]
"""``net(x [B, C, H, W], t [B], text) -> v``: a denoiser predicting the velocity."""

StudentSampler = Literal["ode", "consistency"]
"""The names of :data:`STUDENT_SAMPLERS` (a test checks they agree)."""


# ----------------------------------------------------------------------------------------------
# noise and guidance


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> Tensor:
    """[N, *shape] standard normal noise; item i depends only on ``seeds[i]`` and ``shape``.

    Each item has its own CPU generator, so the noise for a (prompt, seed) pair is the same
    whatever the batch, the run or the device.
    """
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


def renoise_noise(seeds: Sequence[int], k: int, shape: tuple[int, ...]) -> Tensor:
    """The fresh noise of re-noising step ``k``: per item, a function of (seed, k) alone."""
    return initial_noise([int(s) * 1_000_003 + 7919 * (k + 1) for s in seeds], shape)


def guided_velocity(
    net: Net,
    x: Tensor,
    t: Tensor,
    text: TextEmbeddings,
    uncond: TextEmbeddings | None,
    guidance: float,
) -> Tensor:
    """Classifier-free guidance ``v_u + w (v_c - v_u)`` in one batched call (float32).

    ``uncond`` has the rows of ``text`` or one row (broadcast); with ``uncond`` None or w = 1 it
    is the conditional velocity alone (one network evaluation at batch size B).
    """
    if uncond is None or guidance == 1.0:
        return net(x, t, text).float()
    v = net(torch.cat([x, x]), torch.cat([t, t]), _concat_text(text, uncond)).float()
    v_c, v_u = v.chunk(2)
    return v_u + guidance * (v_c - v_u)


def _concat_text(a: TextEmbeddings, b: TextEmbeddings) -> TextEmbeddings:
    """The rows of ``a`` then those of ``b`` (a one-row ``b`` repeated to ``a``'s rows)."""

    def cat(x: Tensor, y: Tensor) -> Tensor:
        return torch.cat([x, y.expand(x.shape[0], *y.shape[1:]) if y.shape[0] == 1 else y])

    return TextEmbeddings(
        tokens=cat(a.tokens, b.tokens), pooled=cat(a.pooled, b.pooled), mask=cat(a.mask, b.mask)
    )


# ----------------------------------------------------------------------------------------------
# the ODE solvers (the teacher's sampler)

Velocity = Callable[[Tensor, float], Tensor]
"""``velocity(x, t) -> v`` at the scalar time ``t`` (guidance already applied)."""


@dataclass(frozen=True)
class OdeSolver:
    """One step ``x(t) -> x(t_next)`` of dx/dt = v, and the network evaluations per image of a
    ``steps``-step integration (guidance doubles the batch, not the count)."""

    step: Callable[[Velocity, Tensor, float, float], Tensor]
    nfe: Callable[[int], int]


def _euler_step(velocity: Velocity, x: Tensor, t: float, t_next: float) -> Tensor:
    dt = t_next - t
    return x + dt * velocity(x, t)


def _heun_step(velocity: Velocity, x: Tensor, t: float, t_next: float) -> Tensor:
    # Heun (2nd order) falls back to an Euler step on the last interval, where t_next = 0
    # (Karras et al. 2022, alg. 1).
    dt = t_next - t
    v = velocity(x, t)
    x_euler = x + dt * v
    if t_next > 0:
        return x + 0.5 * dt * (v + velocity(x_euler, t_next))
    return x_euler


# Name -> solver; the names are the values of ``trainers.config.Solver`` (a test checks it).
SOLVERS: dict[str, OdeSolver] = {
    "euler": OdeSolver(_euler_step, lambda steps: steps),
    "heun": OdeSolver(_heun_step, lambda steps: 2 * steps - 1),
}


def _solver(name: str) -> OdeSolver:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; allowed: {', '.join(SOLVERS)}")
    return SOLVERS[name]


def solver_nfe(solver: str, steps: int) -> int:
    """Network evaluations per image (each counts once, guidance doubles the batch not NFE)."""
    return _solver(solver).nfe(steps)


@torch.no_grad()
def sample(
    denoiser: Net,
    noise: Tensor,
    cond: TextEmbeddings,
    uncond: TextEmbeddings | None,
    *,
    steps: int,
    shift: float,
    solver: str = "euler",
    guidance: float = 1.0,
) -> Tensor:
    """Integrate from t = 1 (``noise``) to t = 0 with classifier-free guidance.

    Guidance: ``v = v_u + w (v_c - v_u)`` (w = 1: conditional only; :func:`guided_velocity`).
    The time grid is ``linspace(1, 0, steps + 1)`` shifted with the training shift; ``solver``
    names a :data:`SOLVERS` entry.

    Written here rather than with diffusers' FlowMatch schedulers because those floor sigma at
    1/num_train_timesteps, take the shift only at construction and have no guidance; the Euler
    update is tested to equal ``FlowMatchEulerDiscreteScheduler.step`` on the same sigmas.
    """
    step = _solver(solver).step
    b = noise.shape[0]

    def velocity(x: Tensor, t: float) -> Tensor:
        tt = torch.full((b,), t, device=x.device, dtype=torch.float32)
        return guided_velocity(denoiser, x, tt, cond, uncond, guidance)

    x = noise.float()
    for t, t_next in itertools.pairwise(sampling_schedule(steps, shift).tolist()):
        x = step(velocity, x, t, t_next)
    return x


# ----------------------------------------------------------------------------------------------
# the distilled students' samplers (no guidance: it was distilled into the student)


def consistency_walk(
    student: Net,
    x: Tensor,
    text: TextEmbeddings,
    ts: Sequence[float],
    fresh: Callable[[int], Tensor],
) -> Tensor:
    """Multistep consistency sampling over the descending grid ``ts`` from ``x`` at ``ts[0]``:
    at each ``t_k`` take ``x0_hat = x - t_k v``, then re-noise it to ``t_{k+1}`` with the noise
    ``fresh(k)``, or return it when ``t_{k+1}`` is 0. The student's sampler and DMD/ADD's
    backward simulation (which draws its noise from the step's generator) share it."""
    b = x.shape[0]
    for k, (t, t_next) in enumerate(itertools.pairwise(ts)):
        tt = torch.full((b,), t, device=x.device)
        x0 = x0_from_velocity(x, tt, student(x, tt, text).float())
        x = x0 if t_next <= 0 else (1.0 - t_next) * x0 + t_next * fresh(k)
    return x


def _ode_student(
    student: Net,
    noise: Tensor,
    text: TextEmbeddings,
    steps: int,
    shift: float,
    _seeds: Sequence[int],
) -> Tensor:
    """Euler over the shifted grid, as the teacher samples (progressive, reflow)."""
    return sample(student, noise, text, None, steps=steps, shift=shift, solver="euler")


def _consistency_student(
    student: Net,
    noise: Tensor,
    text: TextEmbeddings,
    steps: int,
    shift: float,
    seeds: Sequence[int],
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, alg. 1): predict ``x0_hat`` at each grid
    time, re-noise it to the next with noise drawn per item from ``(seed, k)`` (consistency,
    dmd, add)."""
    x = noise.float()
    shape = tuple(x.shape[1:])
    ts = sampling_schedule(steps, shift).tolist()
    return consistency_walk(
        student, x, text, ts, lambda k: renoise_noise(seeds, k, shape).to(x.device)
    )


# Name -> sampler; the names are the values of ``StudentSampler`` (a test checks it).
STUDENT_SAMPLERS: dict[
    str, Callable[[Net, Tensor, TextEmbeddings, int, float, Sequence[int]], Tensor]
] = {
    "ode": _ode_student,
    "consistency": _consistency_student,
}


@torch.no_grad()
def sample_student(
    student: Net,
    noise: Tensor,
    text: TextEmbeddings,
    *,
    sampler: StudentSampler,
    steps: int,
    shift: float,
    seeds: Sequence[int],
) -> Tensor:
    """Images from a student at its step count, without guidance (distilled into it).

    ``ode``: Euler over ``sampling_schedule(steps, shift)``. ``consistency``: at each grid time
    ``t_k`` take ``x0_hat = x - t_k v``; unless last, re-noise to ``t_{k+1}`` with noise drawn
    per item from ``(seed, k)`` so that a (prompt, seed) pair gives the same image in any batch.
    """
    if sampler not in STUDENT_SAMPLERS:
        raise ValueError(
            f"unknown student sampler {sampler!r}; allowed: {', '.join(STUDENT_SAMPLERS)}"
        )
    return STUDENT_SAMPLERS[sampler](student, noise, text, steps, shift, seeds)


# ----------------------------------------------------------------------------------------------
# images for (prompt, seed) pairs


def generate_batched(
    denoiser: torch.nn.Module,
    text_encoder: torch.nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    latent_shape: tuple[int, ...],
    sample_batch: Callable[[Tensor, Any, list[int]], Tensor],
    vae: Any = None,
    batch_size: int = 64,
) -> Tensor:
    """Images in [-1, 1] for (prompt, seed) pairs, ``batch_size`` at a time, in eval mode:
    ``sample_batch(noise, text embeddings, seeds)`` maps each item's own initial noise (a
    function of its seed alone) to a sample, which the VAE decodes when there is one."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    device = next(denoiser.parameters()).device
    was_training = denoiser.training
    denoiser.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        p, s = list(prompts[i : i + batch_size]), list(seeds[i : i + batch_size])
        noise = initial_noise(s, latent_shape).to(device)
        x = sample_batch(noise, text_encoder(p), s)
        out.append((vae.decode(x) if vae is not None else x).clamp(-1, 1).cpu())
    denoiser.train(was_training)
    return torch.cat(out)


def generate_images(
    denoiser: torch.nn.Module,
    text_encoder: torch.nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    latent_shape: tuple[int, ...],
    *,
    steps: int,
    solver: str,
    guidance: float,
    shift: float,
    vae: Any = None,
    batch_size: int = 64,
) -> Tensor:
    """A flow model's images (:func:`sample` with guidance against the empty prompt), in
    batches; the result does not depend on ``batch_size`` (per-item noise)."""
    uncond = text_encoder([""])

    def sample_batch(noise: Tensor, cond: Any, _seeds: list[int]) -> Tensor:
        return sample(
            denoiser,
            noise,
            cond,
            uncond,
            steps=steps,
            shift=shift,
            solver=solver,
            guidance=guidance,
        )

    return generate_batched(
        denoiser, text_encoder, prompts, seeds, latent_shape, sample_batch, vae, batch_size
    )


def generate_student(
    denoiser: torch.nn.Module,
    text_encoder: torch.nn.Module,
    prompts: Sequence[str],
    seeds: Sequence[int],
    latent_shape: tuple[int, ...],
    *,
    sampler: StudentSampler,
    steps: int,
    shift: float,
    vae: Any = None,
    batch_size: int = 64,
) -> Tensor:
    """A student's images in [-1, 1] for (prompt, seed) pairs; independent of ``batch_size``."""

    def sample_batch(noise: Tensor, text: TextEmbeddings, s: list[int]) -> Tensor:
        return sample_student(
            denoiser, noise, text, sampler=sampler, steps=steps, shift=shift, seeds=s
        )

    return generate_batched(
        denoiser, text_encoder, prompts, seeds, latent_shape, sample_batch, vae, batch_size
    )
