"""REPA: representation alignment as a training choice (Yu et al. 2024, "Representation
Alignment for Generation: Training Diffusion Transformers Is Easier Than You Think").

The flow loss is unchanged; REPA adds ``lambda * L_align`` where

    L_align = -1/(B N) sum_b sum_n cos(h_phi(z_bn), y_bn)                      (paper eq. 8)

``z`` are the backbone's hidden states after block ``layer`` (one token per image patch),
``h_phi`` a three-layer SiLU MLP (the projector, trained with the model) and ``y`` the patch
features of the *clean* image from a frozen encoder (DINOv2, or any ViT, or the embedded data's
encoder in ``trainers/repa_encoder.py``).

Pieces:

- :class:`BlockHook` captures ``transformer_blocks[layer - 1]``'s output with a forward hook, so
  the backbone and ``trainers/models.py`` stay unaware of REPA. An SD3 joint block returns
  ``(encoder_hidden_states, hidden_states)`` (the last one ``(None, hidden_states)``); PixArt
  blocks return the image tokens ``[B, N, D]``.
- Grid matching: the model has ``(H/p) x (W/p)`` tokens and the encoder its own grid (16x16 for
  DINOv2 at 224 px, 8x8 for the shapes encoder). The encoder's grid is resized to the model's
  with adaptive average pooling (``F.adaptive_avg_pool2d``): each model token is aligned with the
  mean of the encoder features that cover the same image area (when the encoder's grid is
  coarser, the same op repeats the covering cell).
- The encoder is frozen, in eval mode and outside ``parameters()`` / ``state_dict()`` (so it is
  neither optimised nor checkpointed); its features are computed under ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.config import REPA_BACKBONES, ConfigError, RepaConfig
from trainers.errors import WeightsError

# ImageNet statistics: DINOv2's (and most ViTs') preprocessing.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class Projector(nn.Sequential):
    """``[B, N, hidden] -> [B, N, out]``: Linear-SiLU-Linear-SiLU-Linear (the paper's MLP)."""

    def __init__(self, hidden: int, width: int, out: int):
        super().__init__(
            nn.Linear(hidden, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, out),
        )


class BlockHook:
    """Keeps the image tokens ``[B, N, D]`` of one transformer block's last forward call."""

    def __init__(self, block: nn.Module):
        self.hidden: Tensor | None = None
        self._handle = block.register_forward_hook(self._capture)

    def _capture(self, _module: nn.Module, _args: Any, output: Any) -> None:
        self.hidden = output[1] if isinstance(output, tuple) else output

    def pop(self) -> Tensor:
        if self.hidden is None:
            raise RuntimeError("the REPA block hook has not fired: run the model forward first")
        hidden, self.hidden = self.hidden, None
        return hidden

    def remove(self) -> None:
        self._handle.remove()


def match_grid(features: Tensor, grid: tuple[int, int]) -> Tensor:
    """Encoder patch features ``[B, M, E]`` on a square grid -> ``[B, gh * gw, E]``.

    Adaptive average pooling over the encoder's ``sqrt(M) x sqrt(M)`` grid, row-major as ViT
    patch tokens and the diffusers patch embedding both are.
    """
    b, m, e = features.shape
    side = round(m**0.5)
    if side * side != m:
        raise ValueError(f"encoder features have {m} patches, not a square grid")
    if (side, side) == grid:
        return features
    fmap = features.transpose(1, 2).reshape(b, e, side, side)
    return F.adaptive_avg_pool2d(fmap, grid).flatten(2).transpose(1, 2)


def alignment_loss(projected: Tensor, target: Tensor) -> Tensor:
    """``-mean cos(projected, target)`` over batch and patches; both ``[B, N, E]``."""
    if projected.shape != target.shape:
        raise ValueError(
            f"projected tokens {tuple(projected.shape)} and encoder features "
            f"{tuple(target.shape)} differ in shape"
        )
    return -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()


# ----------------------------------------------------------------------------------------------
# encoders: images [B, 3, H, W] in [-1, 1] -> patch features [B, M, E]


@dataclass
class Encoder:
    module: nn.Module
    dim: int
    features: Callable[[Tensor], Tensor]


def _shapes_encoder() -> Encoder:
    from trainers.repa_encoder import load_patch_encoder

    net = load_patch_encoder()
    return Encoder(net, net.dim, net)


def _vit_encoder(path: str) -> Encoder:
    """A transformers ViT (DINOv2, ViT, ...) from a local directory or the hub cache."""
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise WeightsError(
            f"repa.encoder {path!r} is neither a name in trainers.repa.ENCODERS "
            f"({', '.join(ENCODERS)}) nor a loadable transformers vision model: {err}. Pass a "
            "local directory written by save_pretrained (e.g. facebook/dinov2-base downloaded "
            "with `huggingface-cli download`), or a hub id already in the hub cache"
        ) from None
    cfg = model.config
    # DINOv2's config says 518 px (its pretraining size); REPA feeds it 224 px (16x16 patches
    # of 14 px), which its interpolated position embeddings allow. Other ViTs: their own size.
    size = 224 if cfg.model_type == "dinov2" else int(cfg.image_size)
    # Tokens before the patches: [CLS] and, for DINOv2 with registers, the register tokens.
    skip = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
    mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)

    def features(images: Tensor) -> Tensor:
        x = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
        x = ((x.clamp(-1, 1) + 1) / 2 - mean.to(x.device)) / std.to(x.device)
        tokens = model(pixel_values=x).last_hidden_state  # [B, skip + (size/patch)^2, E]
        return tokens[:, skip:]

    return Encoder(model, int(cfg.hidden_size), features)


# Name -> constructor; names are public values of ``repa.encoder``. Anything else is a path.
ENCODERS: dict[str, Callable[[], Encoder]] = {"shapes-ssl": _shapes_encoder}


def load_encoder(name: str) -> Encoder:
    """A registered encoder, or a transformers ViT from ``name`` (a local path or hub id)."""
    if name in ENCODERS:
        enc = ENCODERS[name]()
    elif Path(name).exists() or "/" in name:
        enc = _vit_encoder(name)
    else:
        raise ConfigError(
            f"repa.encoder {name!r} is not a registered encoder ({', '.join(ENCODERS)}) and not "
            "an existing directory; give a registered name or a path to a saved ViT (DINOv2)"
        )
    enc.module.eval().requires_grad_(False)
    return enc


# ----------------------------------------------------------------------------------------------
# the REPA term


class Repa(nn.Module):
    """The REPA term for one backbone: hook, projector (trainable) and frozen encoder.

    ``state_dict()`` holds the projector only. Usage per step: run the model forward (the hook
    captures block ``layer``), then ``loss(x0_pixels, grid)``.
    """

    def __init__(self, cfg: RepaConfig, transformer: nn.Module, backbone: str, encoder: Encoder):
        super().__init__()
        if backbone not in REPA_BACKBONES:
            raise ConfigError(
                f"repa needs a transformer backbone ({', '.join(REPA_BACKBONES)}), got "
                f"model.backbone {backbone!r}"
            )
        blocks = transformer.transformer_blocks
        if not 1 <= cfg.layer <= len(blocks):
            raise ConfigError(
                f"repa.layer {cfg.layer} is outside the backbone's 1..{len(blocks)} blocks; "
                "choose a block in that range (the paper aligns about a third of the way in)"
            )
        self.cfg = cfg
        self.patch_size = int(transformer.config.patch_size)
        hidden = int(transformer.config.num_attention_heads * transformer.config.attention_head_dim)
        self.projector = Projector(hidden, cfg.projector_dim, encoder.dim)
        self.hook = BlockHook(blocks[cfg.layer - 1])
        self._encoder = [encoder]  # a list keeps it out of parameters() and state_dict()

    @property
    def encoder(self) -> Encoder:
        return self._encoder[0]

    @torch.no_grad()
    def target(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """Frozen encoder features of clean images ``[B, 3, H, W]`` on the model's grid."""
        self.encoder.module.eval()
        with torch.autocast(images.device.type, enabled=False):
            return match_grid(self.encoder.features(images).float(), grid)

    def loss(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        """``L_align`` for the hidden states the hook captured in the last forward."""
        hidden = self.hook.pop()  # [B, N, D]
        if hidden.shape[1] != grid[0] * grid[1]:
            raise RuntimeError(
                f"block output has {hidden.shape[1]} tokens, expected {grid[0]}x{grid[1]}"
            )
        return alignment_loss(self.projector(hidden), self.target(images, grid))

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The model's token grid for an input of ``height x width`` (pixels or latents)."""
        return height // self.patch_size, width // self.patch_size


def build_repa(cfg: RepaConfig, denoiser: nn.Module, encoder: Encoder | None = None) -> Repa:
    """The REPA term for a ``trainers.models.Denoiser``; ``encoder`` defaults to
    ``load_encoder(cfg.encoder)``."""
    encoder = encoder or load_encoder(cfg.encoder)
    return Repa(cfg, denoiser.transformer, denoiser.backbone, encoder)
