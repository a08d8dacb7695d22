"""REPA: hook, grid matching, gradient flow, frozen encoder, the trainer's step and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainers.trainer_utils import config
from trainers.config import ConfigError, RepaConfig, parse_config
from trainers.models import build_denoiser
from trainers.repa import (
    Encoder,
    Repa,
    alignment_loss,
    build_repa,
    load_encoder,
    match_grid,
)
from trainers.text import TextEmbeddings


def tiny_denoiser(backbone: str = "sd3", layers: int = 3):
    torch.manual_seed(0)
    return build_denoiser(
        backbone,
        "micro",
        sample_size=16,
        channels=3,
        text_dim=16,
        pooled_dim=16,
        overrides={"num_layers": layers},
    )


def text(b: int) -> TextEmbeddings:
    g = torch.Generator().manual_seed(1)
    return TextEmbeddings(
        tokens=torch.randn(b, 5, 16, generator=g),
        pooled=torch.randn(b, 16, generator=g),
        mask=torch.ones(b, 5, dtype=torch.long),
    )


def tiny_encoder() -> Encoder:
    from trainers.repa_encoder import PatchEncoder

    torch.manual_seed(3)
    net = PatchEncoder(width=8, dim=24).eval().requires_grad_(False)
    return Encoder(net, net.dim, net)


def images(b: int = 4, seed: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny, randomly initialised DINOv2 saved to disk: loaded through the real code path."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        patch_size=14, image_size=518,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(cfg).save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------
# the pieces against independent references


def test_match_grid_is_block_mean_and_identity_on_equal_grids() -> None:
    f = torch.randn(2, 64, 5)  # an 8x8 grid
    pooled = match_grid(f, (4, 4))
    # Closed form: each 4x4 cell is the mean of the 2x2 encoder cells covering it.
    ref = f.reshape(2, 4, 2, 4, 2, 5).mean(dim=(2, 4)).reshape(2, 16, 5)
    torch.testing.assert_close(pooled, ref)
    assert match_grid(f, (8, 8)) is f
    with pytest.raises(ValueError, match="square grid"):
        match_grid(torch.randn(1, 10, 3), (2, 2))


def test_alignment_loss_is_negative_mean_cosine() -> None:
    a, b = torch.randn(3, 7, 6), torch.randn(3, 7, 6)
    an, bn = a.numpy().astype(np.float64), b.numpy().astype(np.float64)
    cos = (an * bn).sum(-1) / np.linalg.norm(an, axis=-1) / np.linalg.norm(bn, axis=-1)
    assert float(alignment_loss(a, b)) == pytest.approx(-cos.mean(), rel=1e-5)
    assert float(alignment_loss(a, 2.5 * a)) == pytest.approx(-1.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        alignment_loss(a, b[:, :3])


@pytest.mark.parametrize("backbone", ["sd3", "pixart"])
@pytest.mark.parametrize("layer", [1, 3])
def test_hook_captures_the_block_output(backbone: str, layer: int) -> None:
    den = tiny_denoiser(backbone)
    repa = build_repa(RepaConfig(weight=1.0, layer=layer), den, tiny_encoder())
    blocks = den.transformer.transformer_blocks
    seen: dict[str, torch.Tensor] = {}
    if layer < len(blocks):  # what the next block receives is what block `layer` returned

        def pre_hook(_m: torch.nn.Module, _args: tuple, kwargs: dict) -> None:
            # SD3 blocks get hidden_states by keyword, PixArt blocks positionally.
            seen["next_in"] = kwargs.get("hidden_states", _args[0] if _args else None)

        blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    den(images(), torch.full((4,), 0.5), text(4))
    hidden = repa.hook.pop()
    assert hidden.shape == (4, 16, 64)  # 16 px / patch 4 = 4x4 tokens, micro width 64
    assert repa.grid(16, 16) == (4, 4)
    if "next_in" in seen:
        assert hidden is seen["next_in"]
    with pytest.raises(RuntimeError, match="has not fired"):
        repa.hook.pop()


def test_alignment_gradient_reaches_blocks_up_to_layer_and_projector_only() -> None:
    den = tiny_denoiser("sd3", layers=3)
    enc = tiny_encoder()
    before = {k: v.clone() for k, v in enc.module.state_dict().items()}
    repa = build_repa(RepaConfig(weight=1.0, layer=2), den, enc)
    x = images()
    den(x, torch.full((4,), 0.3), text(4))
    repa.loss(x, repa.grid(16, 16)).backward()
    blocks = den.transformer.transformer_blocks

    def grad_norm(module: torch.nn.Module) -> float:
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    assert grad_norm(blocks[0]) > 0 and grad_norm(blocks[1]) > 0
    assert grad_norm(blocks[2]) == 0 and grad_norm(den.transformer.proj_out) == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in repa.projector.parameters())
    # The encoder is frozen: no gradient, unchanged, eval mode, not in the REPA state.
    assert all(p.grad is None and not p.requires_grad for p in enc.module.parameters())
    assert not enc.module.training
    for k, v in enc.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(k.startswith("projector.") for k in repa.state_dict())


def test_dinov2_from_a_local_directory(dinov2_dir: Path, tmp_path: Path) -> None:
    enc = load_encoder(str(dinov2_dir))
    assert enc.dim == 32 and not enc.module.training
    feats = enc.features(images(2))
    assert feats.shape == (2, 256, 32)  # 224 px / 14 = 16x16 patches, [CLS] dropped
    missing = tmp_path / "no-dinov2-here"
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no-dinov2-here.*save_pretrained"):
        load_encoder(str(missing))
    with pytest.raises(ConfigError, match="not a registered encoder"):
        load_encoder("dino-v2")


def test_config_errors_name_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"transformer backbone.*unet"):
        parse_config(config(model={"backbone": "unet", "preset": "micro"}, repa={"weight": 0.5}))
    parse_config(config(model={"backbone": "unet", "preset": "micro"}))  # REPA off: fine
    with pytest.raises(ConfigError, match=r"repa.layer 4 is outside the backbone's 1..3"):
        Repa(RepaConfig(weight=1, layer=4), tiny_denoiser().transformer, "sd3", tiny_encoder())
    # REPA off at its defaults leaves the config (and so its hash) as it was before REPA.
    base = parse_config(config())
    assert "repa" not in base.to_dict()
    assert parse_config(config(repa={"weight": 0.5})).hash() != base.hash()


def test_patch_encoder_cache_trains_once(tmp_path: Path) -> None:
    import trainers.repa_encoder as re

    recipe = re.PatchEncoderRecipe(images=64, steps=3, batch_size=8, max_mse_ratio=10.0)
    count = re._TRAIN_COUNT
    a = re.load_patch_encoder(tmp_path, recipe=recipe)
    b = re.load_patch_encoder(tmp_path, recipe=recipe)
    assert count + 1 == re._TRAIN_COUNT  # the second call is a cache hit
    assert re.encoder_path(tmp_path, recipe).with_suffix(".json").is_file()
    x = images(2)
    torch.testing.assert_close(a(x), b(x))
    assert a(x).shape == (2, 64, 64) and not a.training


# ----------------------------------------------------------------------------------------------
# in the trainer


def repa_config(encoder: Path | str, steps: int) -> dict:
    return config(
        data={"kind": "shapes", "resolution": 16, "size": 64, "seed": 0},
        train={"steps": steps, "batch_size": 8, "checkpoint_every": 1000, "warmup_steps": 2},
        repa={"weight": 0.5, "layer": 1, "encoder": str(encoder), "projector_dim": 32},
    )


def trainer(cfg: dict, run_dir: Path):
    from trainers.rundir import RunDir
    from trainers.train import Dist, FlowTrainer

    run = RunDir(run_dir)
    run.create()
    return FlowTrainer(parse_config(cfg), run, Dist())


def test_repa_loss_goes_down_in_the_training_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainers.repa import ENCODERS

    monkeypatch.setitem(ENCODERS, "tiny-test", tiny_encoder)  # a registered name, resolved
    t = trainer(repa_config("tiny-test", 15), tmp_path / "run")
    projector_before = [p.clone() for p in t.repa.projector.parameters()]
    values = []
    for _ in range(15):
        t.train_step()
        values.append(t._repa_metrics()["train/repa_loss"])
    assert np.mean(values[-3:]) < np.mean(values[:3]) - 0.1, values
    assert all(
        not torch.equal(a, b)
        for a, b in zip(projector_before, t.repa.projector.parameters(), strict=True)
    )
    assert all(p.grad is None for p in t.repa.encoder.module.parameters())


@pytest.mark.slow
def test_resume_with_repa_equals_uninterrupted(dinov2_dir: Path, tmp_path: Path) -> None:
    cfg = repa_config(dinov2_dir, 8)
    ref = trainer(cfg, tmp_path / "ref")
    for _ in range(8):
        ref.train_step()
    first = trainer(cfg, tmp_path / "run")
    for _ in range(4):
        first.train_step()
    first.save_checkpoint()
    second = trainer(cfg, tmp_path / "run")
    assert second.try_resume() and second.step == 4
    while second.step < 8:
        second.train_step()
    for a, b in [(ref.net, second.net), (ref.repa, second.repa)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)
    assert "repa" in torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=False)
