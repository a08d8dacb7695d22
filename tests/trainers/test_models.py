"""Backbones: every registered class builds, predicts the right shape, and round-trips."""

from pathlib import Path

import pytest
import torch

from trainers.models import BACKBONES, PRESETS, Denoiser, build_denoiser, count_parameters, lookup
from trainers.text import TextEmbeddings


def _text(b: int, length: int = 5, dim: int = 16) -> TextEmbeddings:
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[:, -2:] = False
    return TextEmbeddings(tokens=torch.randn(b, length, dim), pooled=torch.randn(b, dim), mask=mask)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_build_forward_save_load(backbone: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_denoiser(
        backbone, "micro", sample_size=16, channels=3, text_dim=16, pooled_dim=16
    )
    x, t, text = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.9]), _text(2)
    out = model(x, t, text)
    assert out.shape == x.shape
    # The prediction depends on t and on the text (the conditioning is wired in).
    assert not torch.allclose(out, model(x, torch.tensor([0.7, 0.1]), text))
    assert not torch.allclose(out, model(x, t, _text(2)))
    model.save_pretrained(tmp_path / "m")
    loaded = Denoiser.from_pretrained(backbone, tmp_path / "m")
    torch.testing.assert_close(loaded(x, t, text), out)


def test_preset_sizes_follow_dit_widths() -> None:
    # Counted on the meta device: no memory for the 1B-parameter presets.
    counts = {}
    with torch.device("meta"):
        for name in ("tiny", "dit-b", "dit-xl"):
            m = build_denoiser(
                "sd3", name, sample_size=32, channels=4, text_dim=768, pooled_dim=768
            )
            counts[name] = count_parameters(m)
    assert 1e6 < counts["tiny"] < 5e6
    # DiT-B is 130M and DiT-XL 675M; SD3 joint blocks add a text stream of about the same size.
    assert 150e6 < counts["dit-b"] < 350e6
    assert 700e6 < counts["dit-xl"] < 1.6e9
    assert PRESETS["dit-xl"].width == 1152 and PRESETS["dit-b"].width == 768


def test_unknown_names_suggest_the_closest() -> None:
    with pytest.raises(KeyError, match="did you mean 'dit-b'"):
        lookup(PRESETS, "dit_b", "model.preset")
    with pytest.raises(ValueError, match="patch size"):
        build_denoiser("sd3", "tiny", sample_size=30, channels=3, text_dim=8, pooled_dim=8)
    with pytest.raises(ValueError, match="overrides"):
        build_denoiser(
            "sd3",
            "micro",
            sample_size=16,
            channels=3,
            text_dim=8,
            pooled_dim=8,
            overrides={"nope": 1},
        )


def test_size_overrides_replace_the_preset_fields() -> None:
    m = build_denoiser(
        "sd3",
        "micro",
        sample_size=16,
        channels=3,
        text_dim=8,
        pooled_dim=8,
        overrides={"patch_size": 2, "num_layers": 3},
    )
    assert m.transformer.config.patch_size == 2 and m.transformer.config.num_layers == 3
    assert m.transformer.config.pos_embed_max_size == 8  # 16 / 2, not 16 / 4
    out = m(torch.randn(1, 3, 16, 16), torch.tensor([0.5]), _text(1, dim=8))
    assert out.shape == (1, 3, 16, 16)
