"""What every distillation method gets from the trainer, and what it gives back.

Conventions are the flow trainer's (``trainers/flow``: ``noise_to``, ``x0_from_velocity``):
``x_t = (1 - t) x0 + t eps``, t = 0 is data, the network predicts the velocity ``v = eps - x0``,
so its clean-image estimate is ``x0_hat = x_t - t v`` (exact at t = 0: the consistency boundary
condition for free).

The student starts as a copy of the teacher. The teacher's classifier-free guidance (scale
``distill.guidance``) is distilled into the student: every target comes from the *guided* teacher
``v_w = v_u + w (v_c - v_u)``, and the student samples with its conditional branch alone (one
network evaluation per step). Two student samplers exist (``trainers.sampling.sample_student``):

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from trainers.distill.config import DistillConfig
from trainers.sampling import StudentSampler, guided_velocity, sample
from trainers.text import TextEmbeddings
from trainers.timesteps import sampling_schedule


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


def expand(text: TextEmbeddings, n: int) -> TextEmbeddings:
    """A one-row embedding (the empty prompt) repeated to ``n`` rows."""
    return TextEmbeddings(
        text.tokens.expand(n, *text.tokens.shape[1:]),
        text.pooled.expand(n, *text.pooled.shape[1:]),
        text.mask.expand(n, *text.mask.shape[1:]),
    )


class DistillMethod(nn.Module):
    """Base class: a method's loss, its own trained modules and state.

    The contract between a method and ``DistillTrainer`` (``trainers/distill/train.py``):

    - Class attributes: ``name`` (its ``distill.method`` value, registered in
      ``trainers.distill.methods``) and ``sampler`` (a ``trainers.sampling.STUDENT_SAMPLERS``
      name): how the student samples in evaluation, samples and the export (``harness.json``
      records it, and ``ExportedModel.generate`` uses it).
    - ``__init__(ctx)``: built once per process start, after the trainer (and before a resume
      loads weights), then moved to ``ctx.device``. Its own networks are submodules and any
      state that changes during training a submodule or buffer, so ``state_dict`` holds them;
      the student and teacher stay in ``ctx`` (not registered, not saved twice). The student's
      weights may still be replaced by a resume after ``__init__``: copy the student lazily, at
      its first step (see the consistency target).
    - :meth:`prepare`: on the main rank, after ``__init__``, at every start (also on resume), so
      it caches its one-off work under ``workdir`` (``<run_dir>/distill/``, the only place a
      method writes); e.g. :func:`teacher_pairs`.
    - Each step the trainer calls :meth:`student_loss` with the step's batch (order from the
      seed alone) and ``gen = step_generator(seed, step, rank)``; the method may first update
      its own networks with its own optimizers; it returns the student's loss with its graph and
      its metrics (finite, or the run fails). The trainer then zeroes the student's gradients,
      back-propagates, clips and steps the student's optimizer, schedule and EMA (the method
      must not), and calls :meth:`after_student_step`.
    - Randomness: every draw of a step comes from ``gen`` (not the global RNG, not a generator
      of its own), so a resumed run continues exactly as an uninterrupted one; evaluation
      noise is per seed (``trainers.sampling``), so students are compared on paired samples.
    - Targets come from the frozen teacher, guided: ``ctx.teacher_velocity``.
    - Resumable state: :meth:`extra_state` / :meth:`load_extra_state` (default: ``state_dict``
      plus :meth:`optimizers`' states) go into the trainer's checkpoint under ``method``.
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
# teacher pairs (reflow's training data, DMD's regression targets)


@torch.no_grad()
def teacher_pairs(
    ctx: Context, n: int, steps: int, seed: int, cache: Path, batch_size: int = 64
) -> dict[str, Any]:
    """``n`` (noise, teacher image, caption) triples from the guided teacher ODE (Euler,
    ``steps``), cached in ``cache`` (a ``.pt`` file keyed by what made them). Captions are drawn
    from the training captions with a generator seeded by ``seed``."""
    key = {"n": n, "steps": steps, "seed": seed, "guidance": ctx.guidance, "shift": ctx.shift}
    if cache.is_file():
        try:  # tensors, strings and numbers only: a crafted cache file cannot run code
            data = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, garbage or unsafe: it is only a cache, so remake it
            print(f"note: ignoring teacher-pair cache {cache} ({type(err).__name__})", flush=True)
            data = {}
        if isinstance(data, dict) and data.get("key") == key:
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
