"""Latent space: loading a VAE offline, the codec's normalisation, and the on-disk latent cache.

A tiny randomly initialised AutoencoderKL is written with ``save_pretrained`` and loaded back
through ``load_vae``, the same path real weights take.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from trainers.data.latents import VaeCodec, encode_images, latent_cache_dir, load_vae
from trainers.data.shapes import to_model_range
from trainers.errors import WeightsError


def _tiny_vae(**config) -> AutoencoderKL:
    torch.manual_seed(0)
    args = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 16,
    }
    return AutoencoderKL(**(args | config))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("vae") / "vae"
    _tiny_vae().save_pretrained(directory)
    return directory


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "latents"


def _images(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


# ---------------------------------------------------------------------------------------------
# codec


def test_load_and_shapes(vae_dir: Path) -> None:
    vae = load_vae(str(vae_dir))
    assert isinstance(vae, AutoencoderKL) and not vae.training
    assert not any(p.requires_grad for p in vae.parameters())
    codec = VaeCodec(vae)
    assert (codec.latent_channels, codec.downsample) == (4, 2)
    x = to_model_range(_images(3))
    z = codec.encode(x)
    assert z.shape == (3, 4, 8, 8) and z.dtype == torch.float32
    assert codec.decode(z).shape == (3, 3, 16, 16)
    assert codec.decode(z).abs().max() <= 1.0
    assert torch.equal(codec.encode(x), z)  # the mean, not a sample: deterministic


def test_downsample_follows_the_block_count(tmp_path: Path) -> None:
    three = _tiny_vae(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 16),
    )
    codec = VaeCodec(three)
    assert codec.downsample == 4
    assert codec.encode(torch.zeros(1, 3, 16, 16)).shape == (1, 4, 4, 4)


def test_normalisation_uses_shift_and_scale(tmp_path: Path) -> None:
    _tiny_vae(scaling_factor=1.5, shift_factor=0.25).save_pretrained(tmp_path / "vae")
    vae = load_vae(str(tmp_path / "vae"))
    codec = VaeCodec(vae)
    x = to_model_range(_images(2))
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        z = codec.encode(x)
        torch.testing.assert_close(z, (mean - 0.25) * 1.5)
        torch.testing.assert_close(codec.decode(z), vae.decode(mean).sample.clamp(-1, 1))


def test_missing_shift_factor_means_no_shift(vae_dir: Path) -> None:
    vae = load_vae(str(vae_dir))
    assert vae.config.shift_factor is None
    codec = VaeCodec(vae)
    x = to_model_range(_images(2))
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(codec.encode(x), expected)


# ---------------------------------------------------------------------------------------------
# encode_images and its cache


def test_encode_images_matches_the_codec_and_batching(vae_dir: Path, cache: Path) -> None:
    codec = VaeCodec(load_vae(str(vae_dir)))
    images = _images(7)
    z = encode_images(codec, images, batch_size=3)  # 3 + 3 + 1
    assert z.shape == (7, 4, 8, 8) and z.device.type == "cpu"
    torch.testing.assert_close(z, codec.encode(to_model_range(images)), rtol=1e-5, atol=1e-5)


def test_second_run_reads_the_cache(
    vae_dir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    codec = VaeCodec(load_vae(str(vae_dir)))
    images = _images()
    first = encode_images(codec, images, batch_size=4)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))

    # A fresh codec (a new run) must not encode anything.
    again = VaeCodec(load_vae(str(vae_dir)))

    def fail(_images: torch.Tensor) -> torch.Tensor:
        raise AssertionError("encode called on a cache hit")

    monkeypatch.setattr(again, "encode", fail)
    assert torch.equal(encode_images(again, images.clone()), first)
    with pytest.raises(AssertionError, match="cache hit"):
        encode_images(again, images, cache=False)


def test_cache_key_covers_images_and_weights(vae_dir: Path, cache: Path) -> None:
    codec = VaeCodec(load_vae(str(vae_dir)))
    images = _images()
    encode_images(codec, images)
    encode_images(codec, _images(seed=1))  # other images
    assert len(list(cache.glob("*.safetensors"))) == 2
    with torch.no_grad():  # other weights
        codec.vae.encoder.conv_in.weight.add_(0.1)
    changed = encode_images(codec, images)
    assert len(list(cache.glob("*.safetensors"))) == 3
    torch.testing.assert_close(changed, codec.encode(to_model_range(images)))


def test_corrupt_cache_file_is_re_encoded(vae_dir: Path, cache: Path) -> None:
    codec = VaeCodec(load_vae(str(vae_dir)))
    images = _images()
    first = encode_images(codec, images)
    (file,) = cache.glob("*.safetensors")
    file.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="corrupt latent cache"):
        again = encode_images(codec, images)
    assert torch.equal(again, first)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HARNESS_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert latent_cache_dir() == tmp_path / ".cache" / "diffusion-harness" / "latents"
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "c"))
    assert latent_cache_dir() == tmp_path / "c" / "latents"


def test_encode_images_wants_uint8(vae_dir: Path, cache: Path) -> None:
    codec = VaeCodec(load_vae(str(vae_dir)))
    with pytest.raises(ValueError, match="uint8"):
        encode_images(codec, to_model_range(_images(2)))


# ---------------------------------------------------------------------------------------------
# load_vae errors


def test_subfolder_of_a_pipeline(vae_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(vae_dir, tmp_path / "pipe" / "vae")
    assert isinstance(load_vae(str(tmp_path / "pipe"), "vae"), AutoencoderKL)
    with pytest.raises(WeightsError, match=re.escape("data.vae_subfolder: vae")):
        load_vae(str(tmp_path / "pipe"))  # forgot the subfolder: say so
    with pytest.raises(WeightsError, match="no subfolder 'unet'"):
        load_vae(str(tmp_path / "pipe"), "unet")


def test_missing_path_names_the_path_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "no-vae"
    with pytest.raises(WeightsError) as err:
        load_vae(str(missing))
    msg = str(err.value)
    assert str(missing) in msg and "hf download" in msg and "data.vae" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_hub_id_not_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match="hf download someorg/some-vae"):
        load_vae("someorg/some-vae")


def test_no_weights(vae_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(vae_dir, tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no weights") as err:
        load_vae(str(tmp_path / "vae"))
    assert str(tmp_path / "vae") in str(err.value)


def test_corrupt_weights(vae_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(vae_dir, tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WeightsError, match=re.escape(str(tmp_path / "vae"))) as err:
        load_vae(str(tmp_path / "vae"))
    assert "corrupt" in str(err.value) and isinstance(err.value, ValueError)


def test_weights_of_another_shape(vae_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(vae_dir, tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    config["latent_channels"] = 8  # config and weights disagree
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=re.escape(str(tmp_path / "vae"))):
        load_vae(str(tmp_path / "vae"))


def test_not_a_vae(vae_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(vae_dir, tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    (tmp_path / "unet" / "config.json").write_text(
        json.dumps(config | {"_class_name": "UNet2DModel"})
    )
    with pytest.raises(WeightsError, match="UNet2DModel, not an AutoencoderKL"):
        load_vae(str(tmp_path / "unet"))


def test_decode_differentiable_equals_decode_and_has_gradients(vae_dir: Path) -> None:
    """The preference trainer's reward is back-propagated through the decoder (ReFL in latent
    space): same images as decode(), and gradients reach the latents."""
    codec = VaeCodec(load_vae(str(vae_dir)))
    z = codec.encode(_images(2)).requires_grad_(True)
    images = codec.decode_differentiable(z)
    torch.testing.assert_close(images.detach(), codec.decode(z.detach()))
    images.sum().backward()
    assert z.grad is not None and bool(z.grad.abs().sum() > 0)
