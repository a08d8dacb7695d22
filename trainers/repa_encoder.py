"""The embedded data's REPA alignment encoder: a small conv net with a spatial patch grid.

REPA (Yu et al. 2024) aligns a diffusion backbone's hidden states with a frozen, pretrained
encoder's patch features (DINOv2 for ImageNet). The shapes data has no pretrained encoder, so this
module trains one once on generated images and caches it, exactly as ``trainers/domain.py``
does for the attribute network, and through the same helpers (cache directory, fcntl lock,
atomic writes, recipe hash in the file name).

Why it cannot simply game the domain FID: the evaluator's :class:`~trainers.domain.AttributeNet`
is trained *supervised* on the five attribute labels and its FID features are a flattened 4x4 map
after max-pooling. This encoder never sees a label: it is a masked autoencoder (MAE-style,
He et al. 2022, on a conv net): 4x4-pixel patches of the input are blanked with probability
``mask_ratio`` and noise is added, and a small decoder must reconstruct the clean image from the
encoder's 8x8 grid. Different objective, architecture (GroupNorm + SiLU, stride-2 convolutions,
no pooling, no heads), training images (seed ``ENCODER_SEED``, not the evaluator's 7919) and
initialisation seed. Its features describe local appearance (colour, edges, where the shape is),
which is what a denoiser's intermediate tokens can usefully predict.

Output: ``[B, 64, dim]`` patch features (an 8x8 grid, row-major, over the 32x32 resized input),
the same layout as a ViT's patch tokens, so the trainer treats it like DINOv2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from trainers.data.shapes import DATASET_VERSION, ShapesDataset, to_model_range
from trainers.files import atomic_write_bytes, default_cache_dir, file_lock

__all__ = ["ENCODER_SEED", "PatchEncoder", "PatchEncoderRecipe", "load_patch_encoder"]

logger = logging.getLogger(__name__)

ENCODER_SEED = 271_828
"""Seed of the encoder's training images and initialisation (not the evaluator's 7919)."""

RESOLUTION = 32
"""Every input is resized to this side; the grid is RESOLUTION / 4 = 8 patches a side."""

# Bump when the forward pass or the training loop changes in a way the recipe does not capture.
_RECIPE_VERSION = 2
_TRAIN_COUNT = 0  # tests use it to prove a cache hit


def _block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU()]


class PatchEncoder(nn.Module):
    """Conv encoder ``[B, 3, H, W]`` in [-1, 1] -> patch features ``[B, 64, dim]``.

    32x32 -> 16x16 -> 8x8 (two stride-2 convolutions); each of the 8x8 cells is a 4x4-pixel
    patch. ``decoder`` is used only for training (reconstruction) and is not part of the
    features.
    """

    def __init__(self, width: int = 16, dim: int = 64):
        super().__init__()
        w = width
        # Stride 2 from the first layer: full-resolution convolutions cost ~8x more CPU time
        # and the features are wanted on the 8x8 grid anyway.
        self.trunk = nn.Sequential(*_block(3, w, 2), *_block(w, 2 * w, 2), *_block(2 * w, dim, 1))
        self.out = nn.Conv2d(dim, dim, 1)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(dim, 2 * w, 4, 2, 1),
            nn.SiLU(),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1),
            nn.SiLU(),
            nn.Conv2d(w, 3, 3, 1, 1),
        )
        self.dim = dim
        self.grid = RESOLUTION // 4

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        x = images.float().clamp(-1.0, 1.0)
        if x.shape[-2:] != (RESOLUTION, RESOLUTION):
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True)
        return x

    def feature_map(self, images: Tensor) -> Tensor:
        """``[B, dim, 8, 8]``."""
        return self.out(self.trunk(self.preprocess(images)))

    def forward(self, images: Tensor) -> Tensor:
        """Patch features ``[B, 64, dim]`` (row-major over the 8x8 grid)."""
        return self.feature_map(images).flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class PatchEncoderRecipe:
    """Everything that determines the trained encoder; its hash names the cache file."""

    seed: int = ENCODER_SEED
    images: int = 8192
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    mask_ratio: float = 0.4
    noise_std: float = 0.1
    width: int = 16
    dim: int = 64
    max_mse_ratio: float = 0.5
    """Refuse a net whose held-out masked-reconstruction MSE is above this fraction of the
    images' pixel variance (it learned nothing)."""

    def hash(self) -> str:
        spec = {"recipe": asdict(self), "version": _RECIPE_VERSION}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def encoder_path(cache_dir: Path | str | None, recipe: PatchEncoderRecipe) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    return root / f"repa_encoder-{DATASET_VERSION}-{recipe.hash()}.safetensors"


def _masked(x: Tensor, recipe: PatchEncoderRecipe, gen: torch.Generator) -> Tensor:
    """Blank random 4x4 patches (to 0, mid grey) and add noise: the MAE corruption."""
    b = x.shape[0]
    keep = (torch.rand(b, 1, 8, 8, generator=gen) >= recipe.mask_ratio).float()
    keep = F.interpolate(keep, scale_factor=4, mode="nearest")  # [b, 1, 32, 32]
    return x * keep + recipe.noise_std * torch.randn(x.shape, generator=gen)


def _train(recipe: PatchEncoderRecipe) -> tuple[PatchEncoder, dict[str, float]]:
    global _TRAIN_COUNT
    _TRAIN_COUNT += 1
    start = time.perf_counter()
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # weights independent of the core count (see trainers/domain.py)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            net = PatchEncoder(recipe.width, recipe.dim)
            ds = ShapesDataset(seed=recipe.seed, split="all", size=recipe.images, resolution=32)
            x = to_model_range(ds.images)
            gen = torch.Generator().manual_seed(recipe.seed)
            opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr)
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1
            )
            net.train()
            for _ in range(recipe.steps):
                batch = x[torch.randint(len(x), (recipe.batch_size,), generator=gen)]
                recon = net.decoder(net.feature_map(_masked(batch, recipe, gen)))
                loss = F.mse_loss(recon, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            net.eval()
            report = _evaluate(net, recipe)
    finally:
        torch.set_num_threads(prev)
    report["train_seconds"] = round(time.perf_counter() - start, 3)
    return net, report


@torch.no_grad()
def _evaluate(net: PatchEncoder, recipe: PatchEncoderRecipe) -> dict[str, float]:
    """Masked-reconstruction MSE on held-out images against their pixel variance."""
    ds = ShapesDataset(seed=recipe.seed + 1, split="val", size=512, resolution=32)
    x = to_model_range(ds.images)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    mse = float(F.mse_loss(net.decoder(net.feature_map(_masked(x, recipe, gen))), x))
    return {"val_mse": mse, "pixel_variance": float(x.var())}


def _load(weights: Path, sidecar: Path, recipe: PatchEncoderRecipe) -> PatchEncoder | None:
    """The cached encoder, or None if absent or unusable (then it is retrained)."""
    try:
        meta = json.loads(sidecar.read_text())
        data = weights.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("weights_sha256"):
            raise ValueError("sha256 does not match the sidecar (truncated or corrupt)")
        with torch.random.fork_rng(devices=[]):
            net = PatchEncoder(recipe.width, recipe.dim)
        net.load_state_dict(st_load(data), strict=True)
        return net
    except FileNotFoundError:
        return None
    except Exception as err:  # any unreadable cache file: retrain (it is only a cache)
        logger.warning("REPA encoder cache %s is unusable (%s); retraining", weights, err)
        return None


def load_patch_encoder(
    cache_dir: Path | str | None = None, *, recipe: PatchEncoderRecipe | None = None
) -> PatchEncoder:
    """The trained encoder (frozen, eval mode, CPU); trained once (~30 s) and cached.

    Concurrent callers on a cold cache serialise on a lock file: one trains, the others load.
    Raises ``RuntimeError`` if a fresh net fails its reconstruction check (nothing is cached).
    """
    recipe = recipe or PatchEncoderRecipe()
    weights = encoder_path(cache_dir, recipe)
    sidecar = weights.with_suffix(".json")
    net = _load(weights, sidecar, recipe)
    if net is None:
        with file_lock(weights.with_suffix(".lock")):
            net = _load(weights, sidecar, recipe)
            if net is None:
                net = _train_and_write(recipe, weights, sidecar)
    return net.eval().requires_grad_(False)


def _train_and_write(recipe: PatchEncoderRecipe, weights: Path, sidecar: Path) -> PatchEncoder:
    logger.info("training the REPA patch encoder (one-off) -> %s", weights)
    net, report = _train(recipe)
    if report["val_mse"] > recipe.max_mse_ratio * report["pixel_variance"]:
        raise RuntimeError(
            f"REPA encoder recipe {recipe.hash()} reconstructs masked images with MSE "
            f"{report['val_mse']:.4f}, above {recipe.max_mse_ratio} x pixel variance "
            f"{report['pixel_variance']:.4f}: it learned nothing; change the recipe"
        )
    data = st_save({k: v.contiguous() for k, v in net.state_dict().items()})
    meta = {
        "dataset_version": DATASET_VERSION,
        "recipe_hash": recipe.hash(),
        "recipe": asdict(recipe),
        "report": report,
        "torch_version": torch.__version__,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
    }
    # Weights first, sidecar last: the sidecar (with the weights' sha256) marks a finished pair.
    atomic_write_bytes(weights, data)
    atomic_write_bytes(sidecar, (json.dumps(meta, indent=2) + "\n").encode())
    loaded = _load(weights, sidecar, recipe)
    assert loaded is not None
    return loaded
