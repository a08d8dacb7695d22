"""Curriculum learning for the flow trainer: stages by step (``curriculum:`` in the config).

A stage sets, from its ``start`` step until the next stage starts (the last one until
``train.steps``):

- ``resolution``: the training images are downsampled to it (area filter: the mean over each
  output cell, the box filter the embedded data is itself rendered with) before noising. The
  denoiser is built at ``data.resolution`` and takes the smaller inputs: the UNet is
  convolutional (any side divisible by 4), SD3 crops its positional embedding
  (``pos_embed_max_size``, diffusers ``PatchEmbed.cropped_pos_embed``), PixArt recomputes its
  sin-cos embedding for the new grid. ``timesteps.shift: auto`` / ``flux`` follow the stage's
  resolution. Pixel data only: a VAE's latents are encoded once at ``data.resolution``, and
  encoding every stage's resolution too is not implemented, so the config is refused.
- ``caption_attributes`` (embedded shapes data only): each caption names only that many of
  the image's five attributes. The shape is the caption's noun and always named; the others
  named are a random subset of the remaining four, kept in the full caption's order and
  wording (``trainers.data.shapes.partial_caption``), so every word stays in the caption
  vocabulary and a partial caption reads like the full one with some attributes left out.

Evaluation, samples and the export stay at ``data.resolution`` whatever the stage. A last stage
below ``data.resolution`` is allowed (the model then samples at a resolution it last trained
on early); the trainer logs a warning when it starts.

Everything here is a pure function of the config and the step (and rank), so a run resumed in
the middle of a stage continues exactly as an uninterrupted one; the caption subsets have their
own random stream (``purpose_generator(seed, step, rank, "captions")``), so the streams of the
batch, dropout, timesteps and noise are the same with and without a curriculum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainers.config import ConfigError, FlowConfig


@dataclass(frozen=True)
class Stage:
    """One resolved stage: steps ``[start, end)`` at ``resolution`` (pixels per side), with
    captions naming ``caption_attributes`` attributes (None: the full caption)."""

    index: int
    start: int
    end: int
    resolution: int
    caption_attributes: int | None


def stages(cfg: FlowConfig) -> list[Stage]:
    """The config's stages with their defaults filled in; one stage at ``data.resolution``
    with full captions when there is no curriculum."""
    stage_cfgs = getattr(cfg, "curriculum", None) or []
    if not stage_cfgs:
        return [Stage(0, 0, cfg.train.steps, cfg.data.resolution, None)]
    out = []
    for i, s in enumerate(stage_cfgs):
        end = stage_cfgs[i + 1].start if i + 1 < len(stage_cfgs) else cfg.train.steps
        out.append(
            Stage(i, s.start, end, s.resolution or cfg.data.resolution, s.caption_attributes)
        )
    return out


def stage_at(all_stages: list[Stage], step: int) -> Stage:
    """The stage that step ``step`` (0-based: the step being taken) trains in."""
    for s in reversed(all_stages):
        if step >= s.start:
            return s
    return all_stages[0]


def pixels_seen(
    all_stages: list[Stage],
    step: int,
    batch_size: int,
    per_image: Callable[[int], int] = lambda resolution: resolution**2,
) -> int:
    """Pixels (per channel) of the training images of steps ``0 .. step - 1``: images x
    resolution^2 summed over the stages: the compute proxy of a curriculum run. ``per_image``
    (of a stage's resolution) counts something else per image, e.g. the denoiser's tokens."""
    return sum(
        max(0, min(step, s.end) - s.start) * batch_size * per_image(s.resolution)
        for s in all_stages
    )


def downsample(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Images [B, C, H, W] to [B, C, resolution, resolution] by area averaging (identity at
    the same size)."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="area")


def validate_curriculum(cfg: FlowConfig, patch_size: int | None) -> None:
    """Refuse a curriculum the model or the data cannot follow (raises :class:`ConfigError`
    naming ``curriculum.<i>.<key>`` and the fix). The checks that need only the config run in
    ``FlowConfig``'s validator; this one needs the built denoiser's patch size (None: the UNet,
    whose two 2x downsamplings need sides divisible by 4)."""
    divisor = patch_size or 4
    for i, s in enumerate(getattr(cfg, "curriculum", None) or []):
        if s.resolution is not None and s.resolution % divisor:
            what = f"patch size {patch_size}" if patch_size else "the UNet's two 2x downsamplings"
            raise ConfigError(
                f"curriculum.{i}.resolution {s.resolution} is not divisible by {divisor} "
                f"({what}); use a multiple of {divisor}"
            )


def partial_captions(captions: list[str], k: int, generator: torch.Generator) -> list[str]:
    """Each shapes caption rewritten to name ``k`` of its five attributes: the shape, and
    ``k - 1`` of the other four drawn uniformly (one ``randperm`` per caption from
    ``generator``); an empty caption (dropped for guidance) stays empty."""
    from trainers.data.shapes import ATTRIBUTE_NAMES, parse_caption, partial_caption

    others = [n for n in ATTRIBUTE_NAMES if n != "shape"]
    out = []
    for caption in captions:
        # Draw for every caption, empty or not, so caption i's subset does not depend on which
        # other captions were dropped.
        perm = torch.randperm(len(others), generator=generator)[: k - 1].tolist()
        if not caption:
            out.append(caption)
            continue
        attrs = parse_caption(caption)
        if attrs is None:
            raise ConfigError(
                f"curriculum caption_attributes needs the embedded shapes captions, got "
                f"{caption!r}; remove caption_attributes or use data.kind shapes"
            )
        out.append(partial_caption(attrs, ["shape", *(others[j] for j in perm)]))
    return out
