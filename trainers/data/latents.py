"""Optional latent space: encode training images once through a frozen VAE, cache on disk.

``load_vae`` finds an ``AutoencoderKL`` in a local directory or the Hugging Face cache (never
downloading); ``VaeCodec`` maps images in [-1, 1] to normalised latents and back;
``encode_images`` encodes a whole uint8 data set in batches and caches the result as a
``.safetensors`` file under ``$HARNESS_CACHE/latents`` (default
``~/.cache/diffusion-harness/latents``), keyed by the images and the VAE, so a second run with
the same data and VAE does not encode anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from trainers.data.shapes import to_model_range
from trainers.errors import WeightsError, download_hint, resolve_pretrained_dir

__all__ = [
    "VaeCodec",
    "WeightsError",
    "encode_images",
    "latent_cache_dir",
    "load_vae",
]

# Bump when what encode_images stores changes (e.g. sampling instead of the mean): old cache
# files then simply stop matching.
_CACHE_VERSION = "vae-latents-v1"
_EXAMPLE_VAE = "stabilityai/sd-vae-ft-mse"  # a standalone VAE, for fix hints
_EXAMPLE_PIPELINE = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # one with a vae/ subfolder
_VAE_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.safetensors.index.json",
)


def load_vae(path_or_id: str, subfolder: str | None = None) -> AutoencoderKL:
    """An ``AutoencoderKL`` from a local directory or a hub id already in the HF cache.

    Args:
        path_or_id: directory written by ``save_pretrained`` (or a pipeline directory with
            ``subfolder="vae"``), or a cached hub id. Never downloaded.
        subfolder: folder inside it holding the VAE (``vae`` for a diffusers pipeline).

    Returns:
        The VAE on the CPU, in eval mode, with ``requires_grad`` off.

    Raises:
        WeightsError: naming the path, when it is missing, lacks config.json or weights, holds
            another model class, or its files are corrupt.
    """
    # In fix hints, name the hub id the user gave, or a well-known VAE for a local path.
    is_local = Path(path_or_id).expanduser().exists() or path_or_id.startswith(("/", ".", "~"))
    example = path_or_id if not is_local else _EXAMPLE_PIPELINE if subfolder else _EXAMPLE_VAE
    directory = resolve_pretrained_dir(
        path_or_id,
        what="VAE",
        setting="data.vae",
        example_id=example,
        subfolder=subfolder,
        subfolder_setting="data.vae_subfolder",
    )
    hint = download_hint(example, "data.vae", subfolder)
    where = f"VAE {path_or_id!r}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    config_file = directory / "config.json"
    if not config_file.is_file():
        pipeline = (directory / "vae" / "config.json").is_file()
        fix = "set data.vae_subfolder: vae" if pipeline else hint
        raise WeightsError(f"{where}: {directory} has no config.json; {fix}")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise WeightsError(f"{where}: {config_file} is corrupt ({err}); {hint}") from None
    if class_name not in (None, "AutoencoderKL"):
        raise WeightsError(
            f"{where}: {config_file} describes a {class_name}, not an AutoencoderKL; point "
            "data.vae (and data.vae_subfolder) at the VAE"
        )
    if not any((directory / name).is_file() for name in _VAE_WEIGHTS):
        raise WeightsError(
            f"{where}: {directory} has config.json but no weights "
            f"({' or '.join(_VAE_WEIGHTS[:2])}); {hint}"
        )
    try:
        # low_cpu_mem_usage=False: the default needs accelerate (not a dependency) and warns.
        vae, info = AutoencoderKL.from_pretrained(
            directory, local_files_only=True, low_cpu_mem_usage=False, output_loading_info=True
        )
    except Exception as err:  # SafetensorError, OSError, size-mismatch RuntimeError, ...
        raise WeightsError(
            f"{where}: cannot load the weights in {directory} ({type(err).__name__}: {err}); "
            f"the files are corrupt or incomplete, {hint}"
        ) from err
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise WeightsError(
            f"{where}: the weights in {directory} do not fit its config.json "
            f"({len(missing)} missing, e.g. {missing[:3]}); {hint}"
        )
    return vae.eval().requires_grad_(False)


class VaeCodec(nn.Module):
    """Images in [-1, 1] <-> normalised latents through a frozen ``AutoencoderKL``.

    ``encode`` takes the mean of the latent distribution rather than a sample: latents are then
    a function of the images alone, which is what makes caching them on disk valid (a sample
    would be frozen into the cache anyway), and the posterior's standard deviation is tiny for
    trained VAEs, so sampling would add little beyond noise. Latents are normalised as diffusers
    pipelines do, ``(z - shift_factor) * scaling_factor`` (no shift when ``shift_factor`` is
    None), so a diffusion model sees roughly unit-variance inputs.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        shift = getattr(self.vae.config, "shift_factor", None)
        return 0.0 if shift is None else float(shift)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        """Spatial reduction factor: one 2x downsampling per encoder block but the last."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def train(self, mode: bool = True) -> VaeCodec:
        """Keep the VAE in eval mode whatever the parent module does."""
        super().train(mode)
        self.vae.eval()
        return self

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """float [B, 3, H, W] in [-1, 1] -> float32 latents [B, C, H / d, W / d] (d = downsample),
        on the VAE's device."""
        x = images.to(device=self.device, dtype=self.dtype)
        # No autocast: cached latents must not depend on the caller's context, and SD-style
        # VAEs overflow in half precision.
        with torch.autocast(self.device.type, enabled=False):
            z = self.vae.encode(x).latent_dist.mean  # deterministic; see the class docstring
        return ((z - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents [B, C, h, w] -> float32 images [B, 3, h * d, w * d] in [-1, 1]
        (clamped), on the VAE's device."""
        return self.decode_differentiable(latents)

    def decode_differentiable(self, latents: Tensor) -> Tensor:
        """:meth:`decode` with gradients to ``latents`` (the VAE's own weights stay as they are:
        frozen unless the caller trains them), for a reward back-propagated to the latents."""
        z = latents.to(device=self.device, dtype=self.dtype)
        z = z / self.scaling_factor + self.shift_factor
        with torch.autocast(self.device.type, enabled=False):
            images = self.vae.decode(z).sample
        return images.float().clamp(-1.0, 1.0)

    def fingerprint(self) -> str:
        """sha256 of the VAE's config and weights (dtype included) and the normalisation."""
        h = hashlib.sha256(_CACHE_VERSION.encode())
        h.update(json.dumps(dict(self.vae.config), sort_keys=True, default=str).encode())
        h.update(f"{self.scaling_factor}/{self.shift_factor}".encode())
        for name, tensor in sorted(self.vae.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            # Byte view: works for every dtype (numpy has no bfloat16).
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        return h.hexdigest()


def latent_cache_dir() -> Path:
    """``$HARNESS_CACHE/latents``, else ``~/.cache/diffusion-harness/latents`` (not created)."""
    root = os.environ.get("HARNESS_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "diffusion-harness"
    return base / "latents"


def _images_sha256(images: Tensor) -> str:
    h = hashlib.sha256(f"{images.dtype}:{tuple(images.shape)}".encode())
    h.update(images.detach().to("cpu").contiguous().numpy().data)
    return h.hexdigest()


def encode_images(
    codec: VaeCodec, images_uint8: Tensor, batch_size: int = 64, *, cache: bool = True
) -> Tensor:
    """Latents of a whole data set, through the on-disk cache.

    Args:
        codec: the VAE to encode with.
        images_uint8: uint8 [N, 3, H, W] (e.g. ``ShapesDataset.images``).
        batch_size: images per VAE call.
        cache: read and write ``latent_cache_dir()``; the key is a hash of the images tensor
            and of the VAE (config, weights, dtype), so any change to either re-encodes.

    Returns:
        float32 latents [N, C, H / d, W / d] on the CPU.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4 or images_uint8.shape[1] != 3:
        raise ValueError(
            f"encode_images expects uint8 [N, 3, H, W] images, got {images_uint8.dtype} "
            f"{tuple(images_uint8.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, _, height, width = images_uint8.shape
    d = codec.downsample
    expected = (n, codec.latent_channels, height // d, width // d)

    file = None
    if cache:
        key = hashlib.sha256(f"{_images_sha256(images_uint8)}/{codec.fingerprint()}".encode())
        file = latent_cache_dir() / f"{key.hexdigest()[:32]}.safetensors"
        if file.is_file():
            try:
                latents = load_file(file)["latents"]
                if tuple(latents.shape) == expected:
                    return latents
                warnings.warn(
                    f"ignoring latent cache {file}: shape {tuple(latents.shape)} != {expected}",
                    stacklevel=2,
                )
            except (SafetensorError, KeyError, OSError) as err:
                warnings.warn(f"ignoring corrupt latent cache {file}: {err}", stacklevel=2)

    chunks = []
    for start in range(0, n, batch_size):
        batch = to_model_range(images_uint8[start : start + batch_size])  # [b, 3, H, W]
        chunks.append(codec.encode(batch).cpu())  # [b, C, h, w]
    latents = torch.cat(chunks).contiguous()

    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a crash (or a concurrent DDP rank) never leaves a half file.
        fd, tmp = tempfile.mkstemp(dir=file.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"latents": latents}, tmp, metadata={"version": _CACHE_VERSION})
            os.replace(tmp, file)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return latents
