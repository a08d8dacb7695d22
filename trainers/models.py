"""Backbones: diffusers transformer classes behind one ``(x, t, text) -> velocity`` call.

The backbone knows nothing about noise or timestep densities (those live in ``trainers/flow``
and ``trainers/timesteps.py``); it maps a noisy image, a time in [0, 1] and text embeddings to a
prediction of the same shape as x.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from torch import nn

from trainers.names import lookup
from trainers.text import TextEmbeddings


@dataclass(frozen=True)
class Preset:
    """Width = heads x head_dim. DiT presets follow DiT's table 1 (width, depth, heads)."""

    layers: int
    heads: int
    head_dim: int
    patch_size: int

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


# Name -> size; names are the public values of ``model.preset``. With SD3's joint blocks the
# parameter count is about twice DiT's at the same width and depth (a second, text stream).
PRESETS: dict[str, Preset] = {
    "micro": Preset(layers=2, heads=2, head_dim=32, patch_size=4),  # tests: ~0.3M params
    "tiny": Preset(layers=4, heads=4, head_dim=32, patch_size=4),  # CPU default: ~2M params
    "small": Preset(layers=6, heads=6, head_dim=32, patch_size=2),
    "dit-s": Preset(layers=12, heads=6, head_dim=64, patch_size=2),
    "dit-b": Preset(layers=12, heads=12, head_dim=64, patch_size=2),
    "dit-l": Preset(layers=24, heads=16, head_dim=64, patch_size=2),
    "dit-xl": Preset(layers=28, heads=16, head_dim=72, patch_size=2),
}


def _sd3(
    p: Preset, sample_size: int, channels: int, text_dim: int, pooled_dim: int, **kw: Any
) -> nn.Module:
    args: dict[str, Any] = dict(
        sample_size=sample_size,
        patch_size=p.patch_size,
        in_channels=channels,
        out_channels=channels,
        num_layers=p.layers,
        attention_head_dim=p.head_dim,
        num_attention_heads=p.heads,
        joint_attention_dim=text_dim,
        caption_projection_dim=p.width,
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=max(sample_size // p.patch_size, 1),
    )
    args.update(kw)
    return SD3Transformer2DModel(**args)


def _pixart(
    p: Preset, sample_size: int, channels: int, text_dim: int, pooled_dim: int, **kw: Any
) -> nn.Module:
    args: dict[str, Any] = dict(
        sample_size=sample_size,
        patch_size=p.patch_size,
        in_channels=channels,
        out_channels=channels,
        num_layers=p.layers,
        attention_head_dim=p.head_dim,
        num_attention_heads=p.heads,
        cross_attention_dim=p.width,
        caption_channels=text_dim,
        norm_num_groups=1,
    )
    args.update(kw)
    return PixArtTransformer2DModel(**args)


def _unet(
    p: Preset, sample_size: int, channels: int, text_dim: int, pooled_dim: int, **kw: Any
) -> nn.Module:
    """A convolutional UNet with cross-attention to the text (SD 1.x layout) at the preset's
    width: three resolution levels of (width/2, width, width) channels, attention heads of the
    preset's head_dim, ``layers // 4`` (at least 1) ResNet blocks per level. Patch size does not
    apply. Convolutions learn small local structure (a shape's corners) with far less data than
    patch transformers, which matters for CPU-sized studies."""
    w = p.width
    args: dict[str, Any] = dict(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(w // 2, w, w),
        layers_per_block=max(1, p.layers // 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_dim,
        attention_head_dim=p.head_dim,
        norm_num_groups=8,
    )
    args.update(kw)
    return UNet2DConditionModel(**args)


def _unet_forward(
    m: nn.Module, x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings
) -> torch.Tensor:
    return m(
        sample=x,
        timestep=t * 1000.0,
        encoder_hidden_states=text.tokens,
        encoder_attention_mask=text.mask.to(x.dtype),
        return_dict=False,
    )[0]


def _sd3_forward(
    m: nn.Module, x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings
) -> torch.Tensor:
    # diffusers' SD3 pipelines feed timestep = sigma * 1000; keep that scale for weight reuse.
    return m(
        hidden_states=x,
        encoder_hidden_states=text.tokens,
        pooled_projections=text.pooled,
        timestep=t * 1000.0,
        return_dict=False,
    )[0]


def _pixart_forward(
    m: nn.Module, x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings
) -> torch.Tensor:
    return m(
        hidden_states=x,
        encoder_hidden_states=text.tokens,
        encoder_attention_mask=text.mask.to(x.dtype),
        timestep=t * 1000.0,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )[0]


@dataclass(frozen=True)
class Backbone:
    cls: type
    build: Callable[..., nn.Module]
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor, TextEmbeddings], torch.Tensor]


# Name -> backbone; names are the public values of ``model.backbone``.
BACKBONES: dict[str, Backbone] = {
    "sd3": Backbone(SD3Transformer2DModel, _sd3, _sd3_forward),
    "pixart": Backbone(PixArtTransformer2DModel, _pixart, _pixart_forward),
    "unet": Backbone(UNet2DConditionModel, _unet, _unet_forward),
}


class Denoiser(nn.Module):
    """A diffusers transformer predicting the flow-matching velocity ``v = eps - x0``."""

    def __init__(self, backbone: str, transformer: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.transformer = transformer
        self._forward = lookup(BACKBONES, backbone, "model.backbone").forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings) -> torch.Tensor:
        """x: [B, C, H, W]; t: [B] in [0, 1]; returns [B, C, H, W]."""
        return self._forward(self.transformer, x, t, text)

    def save_pretrained(self, directory: str | Path) -> None:
        self.transformer.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, backbone: str, directory: str | Path) -> Denoiser:
        spec = lookup(BACKBONES, backbone, "model.backbone")
        return cls(backbone, spec.cls.from_pretrained(directory))


def build_denoiser(
    backbone: str,
    preset: str,
    *,
    sample_size: int,
    channels: int,
    text_dim: int,
    pooled_dim: int,
    overrides: dict[str, Any] | None = None,
) -> Denoiser:
    """Build a randomly initialised backbone of a named size."""
    spec = lookup(BACKBONES, backbone, "model.backbone")
    p = lookup(PRESETS, preset, "model.preset")
    overrides = dict(overrides or {})
    # Size fields given as overrides replace the preset's, so derived arguments (the positional
    # embedding grid, the caption projection width) follow them.
    fields = {
        "patch_size": "patch_size",
        "num_layers": "layers",
        "num_attention_heads": "heads",
        "attention_head_dim": "head_dim",
    }
    p = replace(p, **{fields[k]: int(overrides.pop(k)) for k in list(overrides) if k in fields})
    if backbone == "unet":
        p = replace(p, patch_size=4)  # two 2x downsamplings: the image side must divide by 4
    if sample_size % p.patch_size:
        raise ValueError(
            f"image size {sample_size} is not divisible by the preset's patch size {p.patch_size}; "
            "change data.resolution or set model.overrides.patch_size"
        )
    try:
        transformer = spec.build(p, sample_size, channels, text_dim, pooled_dim, **overrides)
    except TypeError as err:
        raise ValueError(f"model.overrides not accepted by {spec.cls.__name__}: {err}") from None
    return Denoiser(backbone, transformer)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
