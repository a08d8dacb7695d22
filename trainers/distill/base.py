"""What every distillation method gets from the trainer, and what it gives back.

Conventions are the flow trainer's (``trainers/flow.py``): ``x_t = (1 - t) x0 + t eps``, t = 0 is
data, the network predicts the velocity ``v = eps - x0``, so its clean-image estimate is
``x0_hat = x_t - t v`` (exact at t = 0: the consistency boundary condition for free).

The student starts as a copy of the teacher. The teacher's classifier-free guidance (scale
``distill.guidance``) is distilled into the student: every target comes from the *guided* teacher
``v_w = v_u + w (v_c - v_u)``, and the student samples with its conditional branch alone (one
network evaluation per step). Two student samplers exist (:func:`sample_student`):

- ``ode``: Euler over the shifted grid of ``distill.steps`` intervals, as the teacher samples
  (progressive, reflow: the student is still a velocity field, now good at few steps);
- ``consistency``: multistep consistency sampling (Song et al. 2023, alg. 1): at each grid time
  predict ``x0_hat``, then re-noise it to the next grid time with fresh noise (consistency,
  dmd, add: the student is a few-step generator of ``x0``).

A method is an ``nn.Module`` so that its own networks (a fake-score network, discriminator
heads, an EMA target) and buffers are saved in the checkpoint with ``state_dict``; the student
and teacher live in :class:`Context`, which is not a module, so they are not saved twice.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from trainers.distill.config import DistillConfig
from trainers.flow import initial_noise
from trainers.text import TextEmbeddings
from trainers.timesteps import sampling_schedule

StudentSampler = Literal["ode", "consistency"]


@dataclass
class Batch:
    """One training batch. ``text`` / ``uncond`` are already encoded (frozen text encoder)."""

    x0: Tensor  # [B, C, H, W] real training data (pixels in [-1, 1], or latents)
    captions: list[str]
    text: TextEmbeddings  # [B] conditional embeddings of ``captions``
    uncond: TextEmbeddings  # [B] the empty prompt's embeddings (classifier-free guidance)


@dataclass
class Context:
    """The networks and facts a method works with.

    ``student(x, t, text) -> v`` is trainable; ``teacher`` is frozen and in eval mode. ``encode``
    maps captions to embeddings with the frozen text encoder. ``sample_shape`` is (C, H, W) of
    one training example. ``shift`` is the teacher's training (and sampling) shift.
    """

    cfg: DistillConfig
    student: nn.Module
    teacher: nn.Module
    encode: Callable[[Sequence[str]], TextEmbeddings]
    shift: float
    sample_shape: tuple[int, int, int]
    device: torch.device
    captions: list[str] = field(default_factory=list)  # training captions (pairs draw from them)

    @property
    def guidance(self) -> float:
        return self.cfg.distill.guidance

    @property
    def steps(self) -> int:
        return self.cfg.distill.steps

    def grid(self, steps: int | None = None) -> Tensor:
        """The shifted time grid ``1 = t_0 > ... > t_steps = 0`` ([steps + 1], CPU)."""
        return sampling_schedule(self.steps if steps is None else steps, self.shift)

    @torch.no_grad()
    def teacher_velocity(
        self, x: Tensor, t: Tensor, text: TextEmbeddings, uncond: TextEmbeddings
    ) -> Tensor:
        """The guided teacher velocity ``v_u + w (v_c - v_u)`` at ``(x [B..], t [B])``."""
        return guided_velocity(self.teacher, x, t, text, uncond, self.guidance)


def guided_velocity(
    net: Callable[[Tensor, Tensor, TextEmbeddings], Tensor],
    x: Tensor,
    t: Tensor,
    text: TextEmbeddings,
    uncond: TextEmbeddings,
    guidance: float,
) -> Tensor:
    """``v_u + w (v_c - v_u)`` in one batched call (w = 1: the conditional velocity alone)."""
    if guidance == 1.0:
        return net(x, t, text).float()
    both = TextEmbeddings(
        torch.cat([text.tokens, uncond.tokens]),
        torch.cat([text.pooled, uncond.pooled]),
        torch.cat([text.mask, uncond.mask]),
    )
    v = net(torch.cat([x, x]), torch.cat([t, t]), both).float()
    v_c, v_u = v.chunk(2)
    return v_u + guidance * (v_c - v_u)


def bcast(t: Tensor, like: Tensor) -> Tensor:
    """``t`` [B] viewed as [B, 1, 1, 1] (as many trailing dims as ``like``)."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def x0_from_velocity(x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """The clean-image estimate ``x_t - t v`` (t [B])."""
    return x_t - bcast(t, x_t) * v


def noise_to(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """``(1 - t) x0 + t eps`` (t [B])."""
    tb = bcast(t, x0)
    return (1.0 - tb) * x0 + tb * eps


def expand(text: TextEmbeddings, n: int) -> TextEmbeddings:
    """A one-row embedding (the empty prompt) repeated to ``n`` rows."""
    return TextEmbeddings(
        text.tokens.expand(n, *text.tokens.shape[1:]),
        text.pooled.expand(n, *text.pooled.shape[1:]),
        text.mask.expand(n, *text.mask.shape[1:]),
    )


class DistillMethod(nn.Module):
    """Base class: a method's loss, its own trained modules and state.

    The trainer owns the student's optimizer, learning-rate schedule, gradient clipping and EMA.
    Each step it calls :meth:`student_loss` (which first updates the method's own networks, if
    any, with their own optimizers) and back-propagates the returned loss into the student, then
    calls :meth:`after_student_step`.
    """

    name: ClassVar[str]
    sampler: ClassVar[StudentSampler]

    def __init__(self, ctx: Context):
        super().__init__()
        self._ctx = [ctx]  # a list, so nn.Module does not register the student and teacher

    @property
    def ctx(self) -> Context:
        return self._ctx[0]

    def prepare(self, workdir: Path) -> None:
        """One-off work before training (e.g. teacher pairs), cached under ``workdir``."""

    def student_loss(
        self, batch: Batch, gen: torch.Generator, step: int
    ) -> tuple[Tensor, dict[str, float]]:
        """The student's loss at ``step`` (0-based), with its graph, and metrics to log under
        their full names (e.g. ``train/round``; averaged between log lines). Every random draw
        must come from ``gen`` (resume = uninterrupted)."""
        raise NotImplementedError

    def after_student_step(self, step: int) -> None:
        """Called after the student's optimizer step ``step`` (1-based count of steps done)."""

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The method's own optimizers (checkpointed with it)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        return {"module": self.state_dict()} | {
            f"opt/{k}": o.state_dict() for k, o in self.optimizers().items()
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["module"])
        for k, o in self.optimizers().items():
            o.load_state_dict(state[f"opt/{k}"])


# ----------------------------------------------------------------------------------------------
# student sampling


@torch.no_grad()
def sample_student(
    student: Callable[[Tensor, Tensor, TextEmbeddings], Tensor],
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
    ts = sampling_schedule(steps, shift).tolist()
    x = noise.float()
    if sampler == "consistency":
        shape = tuple(x.shape[1:])
        return consistency_walk(
            student, x, text, ts, lambda k: renoise_noise(seeds, k, shape).to(x.device)
        )
    b = noise.shape[0]
    for t, t_next in itertools.pairwise(ts):
        tt = torch.full((b,), t, device=x.device)
        x = x + (t_next - t) * student(x, tt, text).float()
    return x


def consistency_walk(
    student: Callable[[Tensor, Tensor, TextEmbeddings], Tensor],
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


def renoise_noise(seeds: Sequence[int], k: int, shape: tuple[int, ...]) -> Tensor:
    """The fresh noise of re-noising step ``k``: per item, a function of (seed, k) alone."""
    return initial_noise([int(s) * 1_000_003 + 7919 * (k + 1) for s in seeds], shape)


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
) -> torch.Tensor:
    """A student's images in [-1, 1] for (prompt, seed) pairs; independent of ``batch_size``."""
    from trainers.export import generate_batched

    def sample_batch(noise: Tensor, text: TextEmbeddings, s: list[int]) -> Tensor:
        return sample_student(
            denoiser, noise, text, sampler=sampler, steps=steps, shift=shift, seeds=s
        )

    return generate_batched(
        denoiser, text_encoder, prompts, seeds, latent_shape, sample_batch, vae, batch_size
    )


# ----------------------------------------------------------------------------------------------
# teacher pairs (reflow's training data, DMD's regression targets)


@torch.no_grad()
def teacher_pairs(
    ctx: Context, n: int, steps: int, seed: int, cache: Path, batch_size: int = 64
) -> dict[str, Any]:
    """``n`` (noise, teacher image, caption) triples from the guided teacher ODE (Euler,
    ``steps``), cached in ``cache`` (a ``.pt`` file keyed by what made them). Captions are drawn
    from the training captions with a generator seeded by ``seed``."""
    from trainers.flow import sample

    key = {"n": n, "steps": steps, "seed": seed, "guidance": ctx.guidance, "shift": ctx.shift}
    if cache.is_file():
        data = torch.load(cache, map_location="cpu", weights_only=False)
        if data.get("key") == key:
            return data
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(ctx.captions), (n,), generator=g).tolist()
    captions = [ctx.captions[i] for i in idx]
    noise = torch.randn((n, *ctx.sample_shape), generator=g)
    uncond = ctx.encode([""])
    images = []
    for a in range(0, n, batch_size):
        rows = slice(a, min(a + batch_size, n))
        images.append(
            sample(
                ctx.teacher,
                noise[rows].to(ctx.device),
                ctx.encode(captions[rows]),
                uncond,
                steps=steps,
                shift=ctx.shift,
                guidance=ctx.guidance,
            ).cpu()
        )
    data = {"key": key, "noise": noise, "images": torch.cat(images), "captions": captions}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(cache)
    return data
