"""The preference rewards (trainers/preference/rewards.py): the registry, each reward's value
against an independent computation, gradients, errors and provenance.

Fast tests use a randomly initialised attribute net, a tiny random CLIP written to disk and a
scripted judge server on loopback. The tests that need the trained attribute net load the
default one, which the session trains once into the shared HARNESS_CACHE (test_domain.py's
trained-net tests use the same file), and are marked slow like those.
"""

from __future__ import annotations

import dataclasses
import json
from typing import get_args

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from trainers.config import ConfigError
from trainers.data.shapes import ATTRIBUTE_NAMES, ShapesDataset, to_model_range, to_uint8
from trainers.domain import AttributeNet, load_attribute_net, reference_stats
from trainers.preference.rewards import (
    REALISM_REFERENCE,
    REALISM_RIDGE,
    REWARDS,
    AttributeReward,
    RealismReward,
    RewardError,
    RewardName,
    RewardSettings,
    build_reward,
)

KEY = "sk-reward-test-7d41c9e0"  # distinctive: searched for in provenance and errors


def shapes(size: int = 6, seed: int = 3) -> tuple[torch.Tensor, ShapesDataset]:
    """Real rendered images of the embedded data (float, [-1, 1], 32 px) and their data set."""
    ds = ShapesDataset(seed=seed, split="val", size=size)
    return to_model_range(ds.images), ds


def recoloured(ds: ShapesDataset) -> list[str]:
    """Each item's caption with another colour."""
    return [
        dataclasses.replace(a, colour="red" if a.colour != "red" else "blue").caption
        for a in ds.attrs
    ]


@pytest.fixture(scope="module")
def random_net() -> AttributeNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AttributeNet().eval()


@pytest.fixture(scope="module")
def trained_attribute_net() -> AttributeNet:
    """The default attribute net (trained once per session into the shared HARNESS_CACHE)."""
    return load_attribute_net()


def test_registry_names_are_the_literal() -> None:
    # The built-in rewards; the others are entry points (tests/evaluators/test_rewards.py).
    assert set(REWARDS) == {"attribute", "realism"} and set(REWARDS) <= set(get_args(RewardName))
    assert RewardSettings().name == "attribute" and RewardSettings().scale == 1.0


def test_settings_are_strict() -> None:
    with pytest.raises(ValidationError):
        RewardSettings(name="pickscore")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        RewardSettings(scale=float("inf"))
    with pytest.raises(ValidationError):
        RewardSettings(weight=2.0)  # type: ignore[call-arg]
    assert issubclass(RewardError, ConfigError)


# -- attribute -----------------------------------------------------------------------------------
def test_attribute_equals_softmax_by_hand_and_has_gradients(random_net: AttributeNet) -> None:
    x, ds = shapes()
    reward = AttributeReward(RewardSettings(scale=2.0), "cpu", net=random_net)
    images = x.clone().requires_grad_(True)
    value = reward(images, ds.captions)
    assert value.shape == (6,) and value.dtype == torch.float32

    with torch.no_grad():
        logits = random_net(x[2:3])
    by_hand = []
    for j, name in enumerate(ATTRIBUTE_NAMES):
        z = logits[name][0].double().numpy()
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        by_hand.append(p[ds.attrs[2].labels[j]])
    assert value[2].item() == pytest.approx(2.0 * float(np.mean(by_hand)), rel=1e-5)

    value.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    # The net is frozen: no gradient reaches its parameters.
    assert all(not p.requires_grad and p.grad is None for p in reward.net.parameters())
    assert not reward.net.training


def test_attribute_refuses_prompts_it_cannot_parse(random_net: AttributeNet) -> None:
    x, ds = shapes(2)
    reward = AttributeReward(RewardSettings(), "cpu", net=random_net)
    with pytest.raises(RewardError, match=r"'a photo of a cat'.*embedded shapes data"):
        reward(x, [ds.captions[0], "a photo of a cat"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(x, ds.captions[:1])
    with pytest.raises(TypeError, match="float"):
        reward(to_uint8(x), ds.captions)
    with pytest.raises(RewardError, match="takes no path"):
        AttributeReward(RewardSettings(path="/models/x"), "cpu", net=random_net)


def test_attribute_provenance(random_net: AttributeNet) -> None:
    prov = AttributeReward(RewardSettings(scale=0.5), "cpu", net=random_net).provenance()
    json.dumps(prov)
    assert prov["name"] == "attribute" and prov["scale"] == 0.5 and prov["differentiable"]
    assert len(prov["weights_sha256"]) == 64 and prov["version"]


@pytest.mark.slow
def test_attribute_rewards_the_asked_caption(trained_attribute_net: AttributeNet) -> None:
    x, ds = shapes(16, seed=11)
    reward = build_reward(RewardSettings(), "cpu")
    own, other = reward(x, ds.captions), reward(x, recoloured(ds))
    assert (own > 0.9).all(), own
    assert (other < own - 0.1).all(), (own, other)


# -- realism -------------------------------------------------------------------------------------
def test_realism_equals_mahalanobis_by_hand(random_net: AttributeNet) -> None:
    x, ds = shapes(4)
    reward = RealismReward(RewardSettings(name="realism"), "cpu", net=random_net)
    images = x.clone().requires_grad_(True)
    value = reward(images, ds.captions)
    assert torch.equal(value.detach(), reward(x, ["ignored"] * 4))  # prompts are ignored

    mu, sigma = reference_stats(random_net, resolution=32, **REALISM_REFERENCE)
    ridge = REALISM_RIDGE * sigma.diagonal().mean()
    precision = torch.linalg.inv(sigma + ridge * torch.eye(len(mu), dtype=torch.float64))
    with torch.no_grad():
        d = random_net.features(x).double() - mu
    by_hand = -torch.einsum("bi,ij,bj->b", d, precision, d) / len(mu)
    torch.testing.assert_close(value.detach().double(), by_hand, rtol=1e-3, atol=1e-4)

    value.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0


@pytest.mark.slow
def test_realism_prefers_real_images_to_noise(trained_attribute_net: AttributeNet) -> None:
    x, ds = shapes(32, seed=12)
    reward = build_reward(RewardSettings(name="realism"), "cpu")
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    real, fake = reward(x, ds.captions), reward(noise, ds.captions)
    assert real.mean() > fake.mean() + 0.5, (real, fake)
    assert torch.median(real) > fake.max()


# -- clip and model ------------------------------------------------------------------------------
