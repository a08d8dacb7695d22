"""The domain evaluator: Fréchet distance, DomainMetrics, the cached attribute net.

Fast tests use randomly initialised nets, stub nets or a tiny training recipe (< 1 s). Tests that
need the real trained net share one session-scoped training run (~15-30 s) and are marked slow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from trainers import domain as D
from trainers.data.shapes import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    DATASET_VERSION,
    ShapesDataset,
    to_model_range,
)
from trainers.domain import (
    AttributeNet,
    AttributeNetRecipe,
    DomainMetrics,
    attribute_net_path,
    attribute_net_report,
    frechet_distance,
    gaussian_stats,
    load_attribute_net,
    reference_stats,
)

REPO = Path(__file__).resolve().parents[2]

# Trains in well under a second; accuracy is meaningless (min_accuracy=0), only the cache matters.
TINY = AttributeNetRecipe(
    train_mix=((32, 256),), epochs=1, batch_size=64, eval_size=64, min_accuracy=0.0
)


# --------------------------------------------------------------------------------------------
# helpers


def random_cov(rng: np.random.Generator, f: int, rank: int | None = None, jitter: float = 0.0):
    """A random PSD [f, f] covariance of the given rank, plus ``jitter * I``."""
    a = rng.standard_normal((f, rank or f))
    return a @ a.T / (rank or f) + jitter * np.eye(f)


def scipy_fd(mu1, s1, mu2, s2) -> float:
    """Independent reference: the pytorch-fid formula with scipy.linalg.sqrtm(s1 @ s2)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def trainings() -> int:
    """How many times this process trained an attribute net."""
    return D._TRAIN_COUNT


def state_sha(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def real(
    seed: int, split: str, size: int, resolution: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    ds = ShapesDataset(seed=seed, split=split, size=size, resolution=resolution)
    return to_model_range(ds.images), ds.labels


@pytest.fixture
def random_net() -> AttributeNet:
    torch.manual_seed(0)
    return AttributeNet().eval()


# --------------------------------------------------------------------------------------------
# Fréchet distance and Gaussian statistics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_matches_scipy_sqrtm(seed: int) -> None:
    rng = np.random.default_rng(seed)
    f = 24
    mu1, mu2 = rng.standard_normal(f), rng.standard_normal(f)
    s1, s2 = random_cov(rng, f), random_cov(rng, f)
    expected = scipy_fd(mu1, s1, mu2, s2)
    assert expected > 1.0  # a non-trivial case
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("rank1", "rank2"), [(3, 20), (5, 5), (12, 7)])
def test_frechet_distance_near_singular(rank1: int, rank2: int) -> None:
    rng = np.random.default_rng(rank1 * 100 + rank2)
    f = 20
    mu1, mu2 = rng.standard_normal(f) * 0.1, rng.standard_normal(f) * 0.1
    s1 = random_cov(rng, f, rank1, jitter=1e-9)
    s2 = random_cov(rng, f, rank2, jitter=1e-9)
    assert np.linalg.cond(s1) > 1e6 or np.linalg.cond(s2) > 1e6
    expected = scipy_fd(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2)
    # sqrtm of a near-singular product is itself only accurate to ~sqrt(eps * |s|) per eigenvalue.
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_frechet_distance_diagonal_closed_form() -> None:
    """Diagonal covariances (some exactly singular): FD = |dmu|^2 + sum (sqrt a - sqrt b)^2."""
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 2, 16)
    b = rng.uniform(0, 2, 16)
    a[:4] = 0.0  # exactly singular
    b[2:6] = 0.0
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_identical_gaussians_is_zero() -> None:
    rng = np.random.default_rng(4)
    for s in (random_cov(rng, 32), random_cov(rng, 32, rank=4)):
        mu = rng.standard_normal(32)
        assert abs(frechet_distance(mu, s, mu, s)) < 1e-6 * np.trace(s)
    # ... and it does see a small difference
    s = random_cov(rng, 32)
    assert frechet_distance(mu, s, mu + 0.01, s) == pytest.approx(32 * 1e-4, rel=1e-4)


def test_frechet_distance_symmetric_and_accepts_tensors() -> None:
    rng = np.random.default_rng(5)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = random_cov(rng, 16), random_cov(rng, 16, rank=6, jitter=1e-10)
    ab = frechet_distance(mu1, s1, mu2, s2)
    ba = frechet_distance(mu2, s2, mu1, s1)
    assert ab == pytest.approx(ba, rel=1e-8)
    t = frechet_distance(*(torch.from_numpy(x).float() for x in (mu1, s1, mu2, s2)))
    assert t == pytest.approx(ab, rel=1e-4)  # float32 inputs, float64 maths


def test_frechet_distance_validates_inputs() -> None:
    mu, s = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(mu, s, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match="sigma"):
        frechet_distance(mu, np.eye(3), mu, s)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(mu, s * np.nan, mu, s)


def test_gaussian_stats_matches_numpy() -> None:
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)) * 3 + 5
    mu, sigma = gaussian_stats(x)
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), x.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x.double().numpy(), rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(x[:1])
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        gaussian_stats(x[0])


# --------------------------------------------------------------------------------------------
# AttributeNet


def test_attribute_net_shapes_and_size(random_net: AttributeNet) -> None:
    n_params = sum(p.numel() for p in random_net.parameters())
    assert 100_000 <= n_params <= 1_000_000
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    logits = random_net(x)
    assert set(logits) == set(ATTRIBUTE_NAMES)
    for name, values in ATTRIBUTES.items():
        assert logits[name].shape == (3, len(values))
    feats = random_net.features(x)
    assert feats.shape == (3, random_net.feature_dim)
    assert 64 <= random_net.feature_dim <= 128


def test_attribute_net_resizes_any_resolution(random_net: AttributeNet) -> None:
    x64 = torch.rand(2, 3, 64, 48) * 2 - 1
    resized = F.interpolate(
        x64, size=(32, 32), mode="bilinear", antialias=True, align_corners=False
    )
    with torch.no_grad():
        torch.testing.assert_close(random_net.features(x64), random_net.features(resized))
        # out-of-range values are clamped, as a sampler's output would be before saving
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        torch.testing.assert_close(
            random_net.features(x * 3), random_net.features((x * 3).clamp(-1, 1))
        )


def test_attribute_net_rejects_bad_input(random_net: AttributeNet) -> None:
    with pytest.raises(TypeError, match="to_model_range"):
        random_net(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        random_net(torch.zeros(3, 32, 32))


# --------------------------------------------------------------------------------------------
# DomainMetrics


class LabelStub(AttributeNet):
    """Predicts attribute j from pixel (channel 0, row 0, column j): v -> class round((v+1)*10)."""

    def features_and_logits(self, images: torch.Tensor):
        x = self.preprocess(images)
        pred = ((x[:, 0, 0, :5] + 1) * 10).round().long()  # [B, 5]
        logits = {  # clamp: the zero padding of DomainMetrics' chunks decodes to class 10
            name: F.one_hot(pred[:, j].clamp(max=len(values) - 1), len(values)).float()
            for j, (name, values) in enumerate(ATTRIBUTES.items())
        }
        return x.flatten(1)[:, 1 : 1 + self.feature_dim], logits


def encode(pred: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, 32, 32] that LabelStub classifies as ``pred`` [B, 5]; random elsewhere."""
    x = torch.rand(len(pred), 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x[:, 0, 0, :5] = pred.float() / 10 - 1
    return x


def test_domain_metrics_counts_accuracy_exactly() -> None:
    net = LabelStub()
    labels = torch.tensor([[i % 4, i % 6, i % 2, i % 5, i % 3] for i in range(10)])
    pred = labels.clone()
    pred[0:3, 0] = (labels[0:3, 0] + 1) % 4  # shape wrong on images 0-2
    pred[5, 1] = (labels[5, 1] + 1) % 6  # colour wrong on image 5
    pred[2, 4] = (labels[2, 4] + 2) % 3  # background wrong on image 2 (already wrong shape)
    pred[9, 3] = (labels[9, 3] + 1) % 5  # position wrong on image 9
    ref = gaussian_stats(
        torch.randn(20, net.feature_dim, generator=torch.Generator().manual_seed(2))
    )
    m = DomainMetrics(net, ref)
    m.update(encode(pred)[:4], labels[:4])
    m.update(encode(pred)[4:], labels[4:])
    out = m.compute()
    assert out["attr_acc/shape"] == pytest.approx(0.7)
    assert out["attr_acc/colour"] == pytest.approx(0.9)
    assert out["attr_acc/size"] == pytest.approx(1.0)
    assert out["attr_acc/position"] == pytest.approx(0.9)
    assert out["attr_acc/background"] == pytest.approx(0.9)
    assert out["attr_acc_mean"] == pytest.approx((0.7 + 0.9 + 1.0 + 0.9 + 0.9) / 5)
    assert out["attr_all_correct"] == pytest.approx(0.5)  # images 0, 1, 2, 5, 9 have an error
    assert set(out) == set(DomainMetrics.higher_is_better)
    assert DomainMetrics.higher_is_better["domain_fid"] is False
    assert all(DomainMetrics.higher_is_better[k] for k in out if k.startswith("attr_"))


def test_domain_metrics_independent_of_batch_size(random_net: AttributeNet) -> None:
    x, y = real(seed=3, split="val", size=300)  # 2 full chunks of 128 + a partial one
    ref = gaussian_stats(random_net.features(real(seed=4, split="val", size=200)[0]).detach())
    results = []
    for bs in (1, 7, 300):
        m = DomainMetrics(random_net, ref)
        for i in range(0, len(x), bs):
            m.update(x[i : i + bs], y[i : i + bs])
        assert m.num_images == 300
        results.append(m.compute())
    assert results[0]["domain_fid"] > 0.0
    for other in results[1:]:
        assert set(other) == set(results[0])
        for k, v in results[0].items():
            # Relative: a random net's FID is ~2e-4, so an absolute 1e-9 would not notice the
            # ~1e-7 relative float32 drift of a naive (un-chunked) implementation.
            assert other[k] == pytest.approx(v, rel=1e-9, abs=1e-15), k


def test_domain_metrics_fid_equals_direct_computation(random_net: AttributeNet) -> None:
    """Sufficient statistics give the same FID as fitting the Gaussian to all features at once."""
    x, y = real(seed=5, split="all", size=150)
    ref = gaussian_stats(random_net.features(real(seed=6, split="all", size=100)[0]).detach())
    m = DomainMetrics(random_net, ref)
    m.update(x, y)
    with torch.no_grad():
        expected = frechet_distance(*gaussian_stats(random_net.features(x)), *ref)
    assert m.compute()["domain_fid"] == pytest.approx(expected, rel=1e-5)


def test_domain_metrics_compute_is_repeatable_and_reset(random_net: AttributeNet) -> None:
    x, y = real(seed=7, split="val", size=40)
    ref = gaussian_stats(random_net.features(x).detach())
    m = DomainMetrics(random_net, ref)
    m.update(x[:20], y[:20])
    first = m.compute()
    assert m.compute() == first  # compute() does not consume buffered images
    m.update(x[20:], y[20:])
    assert m.compute() != first
    m.reset()
    assert m.num_images == 0
    m.update(x[:20], y[:20])
    assert m.compute() == first


def test_per_image_results_recompute_the_metrics(random_net: AttributeNet) -> None:
    """keep_per_image keeps every image's features and correctness, in order, buffered chunk
    included; the metrics recomputed from them are compute()'s, which the flag leaves alone."""
    x, y = real(seed=11, split="val", size=300)  # 2 full chunks of 128 + a partial one
    ref = gaussian_stats(random_net.features(real(seed=12, split="val", size=100)[0]).detach())
    plain = DomainMetrics(random_net, ref)
    kept = DomainMetrics(random_net, ref, keep_per_image=True)
    for i in range(0, 300, 70):
        plain.update(x[i : i + 70], y[i : i + 70])
        kept.update(x[i : i + 70], y[i : i + 70])
    values = kept.compute()
    assert values == plain.compute()  # bit-identical with or without per-image rows
    rows = kept.per_image()
    assert rows.features.shape == (300, random_net.feature_dim)
    assert rows.features.dtype == np.float64 and rows.correct.dtype == bool
    assert rows.labels.dtype == np.int64 and np.array_equal(rows.labels, y.numpy())
    assert kept.num_images == 300 and kept.compute() == values  # per_image consumed nothing
    with torch.no_grad():
        direct = random_net.features(x).double().numpy()
        logits = random_net(x)
    np.testing.assert_allclose(rows.features, direct, rtol=1e-5, atol=1e-6)
    pred = torch.stack([logits[a].argmax(1) for a in ATTRIBUTE_NAMES], 1).numpy()
    # Float rounding across batch shapes can flip a near-tie argmax; allow a handful.
    assert (rows.correct != (pred == y.numpy())).sum() <= 3
    for j, name in enumerate(ATTRIBUTE_NAMES):
        assert values[f"attr_acc/{name}"] == pytest.approx(rows.correct[:, j].mean(), abs=1e-12)
    assert values["attr_acc_mean"] == pytest.approx(rows.correct.mean(0).mean(), abs=1e-12)
    assert values["attr_all_correct"] == pytest.approx(rows.correct.all(1).mean(), abs=1e-12)
    fid = frechet_distance(
        rows.features.mean(0), np.cov(rows.features, rowvar=False), ref[0], ref[1]
    )
    assert values["domain_fid"] == pytest.approx(fid, rel=1e-6, abs=1e-12)


def test_per_image_results_independent_of_batch_size(random_net: AttributeNet) -> None:
    x, y = real(seed=13, split="val", size=150)
    ref = gaussian_stats(random_net.features(x).detach())
    out = []
    for bs in (1, 150):
        m = DomainMetrics(random_net, ref, keep_per_image=True)
        for i in range(0, len(x), bs):
            m.update(x[i : i + bs], y[i : i + bs])
        out.append(m.per_image())
    assert np.array_equal(out[0].features, out[1].features)
    assert np.array_equal(out[0].correct, out[1].correct)
    assert np.array_equal(out[0].labels, out[1].labels)


def test_per_image_needs_the_flag_and_reset_clears_it(random_net: AttributeNet) -> None:
    x, y = real(seed=14, split="val", size=6)
    ref = gaussian_stats(random_net.features(x).detach())
    with pytest.raises(RuntimeError, match="keep_per_image=True"):
        DomainMetrics(random_net, ref).per_image()
    m = DomainMetrics(random_net, ref, keep_per_image=True)
    assert m.per_image().features.shape == (0, random_net.feature_dim)
    m.update(x, y)
    assert len(m.per_image().labels) == 6
    m.reset()
    assert len(m.per_image().labels) == 0


def test_domain_metrics_reference_of_same_images_gives_zero_fid(
    random_net: AttributeNet, tmp_path: Path
) -> None:
    ref = reference_stats(
        random_net, seed=8, split="val", size=200, resolution=32, cache_dir=tmp_path
    )
    x, y = real(seed=8, split="val", size=200)
    m = DomainMetrics(random_net, ref)
    for i in range(0, 200, 33):
        m.update(x[i : i + 33], y[i : i + 33])
    assert m.compute()["domain_fid"] < 1e-6 * float(ref[1].trace())


def test_domain_metrics_needs_two_images(random_net: AttributeNet) -> None:
    x, y = real(seed=9, split="val", size=4)
    ref = gaussian_stats(random_net.features(x).detach())
    m = DomainMetrics(random_net, ref)
    with pytest.raises(ValueError, match="at least 2 images"):
        m.compute()
    m.update(x[:1], y[:1])
    with pytest.raises(ValueError, match="at least 2 images"):
        m.compute()
    m.update(x[1:2], y[1:2])
    assert np.isfinite(m.compute()["domain_fid"])


def test_domain_metrics_validates_inputs(random_net: AttributeNet) -> None:
    x, y = real(seed=10, split="val", size=4)
    ref = gaussian_stats(random_net.features(x).detach())
    m = DomainMetrics(random_net, ref)
    with pytest.raises(ValueError, match="labels must be"):
        m.update(x, y[:, :4])
    with pytest.raises(ValueError, match="labels must be"):
        m.update(x, y[:3])
    bad = y.clone()
    bad[0, 0] = 4  # only 4 shapes: 0..3
    with pytest.raises(ValueError, match="shape"):
        m.update(x, bad)
    with pytest.raises(TypeError, match="integer"):
        m.update(x, y.float())
    with pytest.raises(TypeError, match="to_model_range"):
        m.update(ShapesDataset(seed=10, split="val", size=4).images, y)
    with pytest.raises(ValueError, match="NaN"):
        m.update(x * torch.nan, y)
    with pytest.raises(ValueError, match="reference"):
        DomainMetrics(random_net, (ref[0][:5], ref[1]))
    assert m.num_images == 0  # nothing was added by the failed updates


# --------------------------------------------------------------------------------------------
# Cache of the attribute net (tiny recipe: fast)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "hc"))
    assert D.default_cache_dir() == tmp_path / "hc" / "domain"
    monkeypatch.delenv("HARNESS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert D.default_cache_dir() == tmp_path / "home" / ".cache" / "diffusion-harness" / "domain"


def test_recipe_hash_names_the_cache_file(tmp_path: Path) -> None:
    path = attribute_net_path(tmp_path, TINY)
    assert DATASET_VERSION in path.name and TINY.hash() in path.name
    other = dataclasses.replace(TINY, epochs=2)
    assert other.hash() != TINY.hash()
    assert attribute_net_path(tmp_path, other) != path
    assert dataclasses.replace(TINY).hash() == TINY.hash()


def test_tiny_train_writes_sidecar_then_hits_cache(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="load_attribute_net"):
        attribute_net_report(tmp_path, recipe=TINY)
    before = trainings()
    net = load_attribute_net(tmp_path, recipe=TINY)
    assert trainings() == before + 1
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    weights = attribute_net_path(tmp_path, TINY)
    report = attribute_net_report(tmp_path, recipe=TINY)
    assert report["dataset_version"] == DATASET_VERSION
    assert report["recipe_hash"] == TINY.hash() == net.recipe_hash
    assert report["train_seconds"] > 0
    assert set(report["accuracy"]) == {"val", "heldout"}
    for acc in report["accuracy"].values():
        assert set(acc) == set(ATTRIBUTE_NAMES)
    assert report["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert not list(tmp_path.glob("**/*.tmp"))  # atomic writes leave no temp files

    mtime = weights.stat().st_mtime_ns
    again = load_attribute_net(tmp_path, recipe=TINY)
    assert trainings() == before + 1  # no retraining
    assert weights.stat().st_mtime_ns == mtime
    assert state_sha(again) == state_sha(net)


def test_training_is_deterministic(tmp_path: Path) -> None:
    a = load_attribute_net(tmp_path / "a", recipe=TINY)
    b = load_attribute_net(tmp_path / "b", recipe=TINY)
    assert state_sha(a) == state_sha(b)


def test_training_leaves_global_rng_and_threads_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    expected = torch.rand(3)
    for _ in range(2):  # training, then a cache hit
        torch.manual_seed(123)
        load_attribute_net(tmp_path, recipe=TINY)
        torch.testing.assert_close(torch.rand(3), expected)
        assert torch.get_num_threads() == threads


@pytest.mark.parametrize("damage", ["truncate_weights", "garbage_sidecar", "missing_sidecar"])
def test_corrupt_cache_warns_and_retrains(tmp_path: Path, damage: str) -> None:
    good = load_attribute_net(tmp_path, recipe=TINY)
    weights = attribute_net_path(tmp_path, TINY)
    sidecar = weights.with_suffix(".json")
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "garbage_sidecar":
        sidecar.write_text("{not json")
        with pytest.raises(ValueError, match=str(sidecar)):
            attribute_net_report(tmp_path, recipe=TINY)
    else:
        sidecar.unlink()
    before = trainings()
    with pytest.warns(UserWarning, match=r"unusable.*retraining") as record:
        healed = load_attribute_net(tmp_path, recipe=TINY)
    assert str(weights) in str(record[0].message)
    assert trainings() == before + 1
    assert state_sha(healed) == state_sha(good)
    report = attribute_net_report(tmp_path, recipe=TINY)
    assert report["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_weights_swapped_for_other_valid_weights_are_detected(tmp_path: Path) -> None:
    """A well-formed but different weights file fails the sidecar checksum."""
    load_attribute_net(tmp_path, recipe=TINY)
    weights = attribute_net_path(tmp_path, TINY)
    from safetensors.torch import save_file

    torch.manual_seed(99)
    save_file(AttributeNet().state_dict(), str(weights))
    with pytest.warns(UserWarning, match="sha256"):
        load_attribute_net(tmp_path, recipe=TINY)


def test_concurrent_threads_train_once(tmp_path: Path) -> None:
    """flock is per open file, so threads contend like processes: exactly one trains."""
    before = trainings()
    nets: list[AttributeNet] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            nets.append(load_attribute_net(tmp_path, recipe=TINY))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert trainings() == before + 1
    assert len({state_sha(n) for n in nets}) == 1


@pytest.mark.slow
def test_concurrent_processes_train_once(tmp_path: Path) -> None:
    code = (
        "import json, hashlib, sys\n"
        "from trainers import domain as D\n"
        "from trainers.domain import AttributeNetRecipe\n"
        f"net = D.load_attribute_net(sys.argv[1], recipe={TINY!r})\n"
        "h = hashlib.sha256()\n"
        "for k, v in sorted(net.state_dict().items()):\n"
        "    h.update(k.encode()); h.update(v.contiguous().numpy().tobytes())\n"
        "print(json.dumps({'trained': D._TRAIN_COUNT, 'sha': h.hexdigest()}))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["trained"] for r in results) == 1
    assert len({r["sha"] for r in results}) == 1
    assert results[0]["sha"] == state_sha(load_attribute_net(tmp_path, recipe=TINY))


# --------------------------------------------------------------------------------------------
# Reference statistics cache


def test_reference_stats_cached_and_keyed(random_net: AttributeNet, tmp_path: Path) -> None:
    kw = {"seed": 11, "split": "val", "size": 64, "resolution": 32, "cache_dir": tmp_path}
    mu, sigma = reference_stats(random_net, **kw)
    assert mu.dtype == sigma.dtype == torch.float64
    assert mu.shape == (random_net.feature_dim,)
    assert sigma.shape == (random_net.feature_dim, random_net.feature_dim)
    files = list(tmp_path.glob("refstats-*.safetensors"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    mu2, sigma2 = reference_stats(random_net, **kw)
    assert files[0].stat().st_mtime_ns == mtime
    assert torch.equal(mu, mu2) and torch.equal(sigma, sigma2)
    # direct computation agrees
    x, _ = real(seed=11, split="val", size=64)
    with torch.no_grad():
        exp_mu, exp_sigma = gaussian_stats(random_net.features(x))
    torch.testing.assert_close(mu, exp_mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sigma, exp_sigma, rtol=1e-4, atol=1e-6)
    # every key component makes a new entry
    for change in ({"seed": 12}, {"split": "heldout"}, {"size": 65}, {"resolution": 16}):
        other = reference_stats(random_net, **{**kw, **change})
        assert not torch.equal(other[0], mu), change
    assert len(list(tmp_path.glob("refstats-*.safetensors"))) == 5
    # different weights -> different entry, not a stale hit
    torch.manual_seed(1)
    other_net = AttributeNet().eval()
    assert not torch.equal(reference_stats(other_net, **kw)[0], mu)


def test_reference_stats_corrupt_file_recomputed(random_net: AttributeNet, tmp_path: Path) -> None:
    kw = {"seed": 13, "split": "val", "size": 32, "resolution": 32, "cache_dir": tmp_path}
    mu, sigma = reference_stats(random_net, **kw)
    (path,) = tmp_path.glob("refstats-*.safetensors")
    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="recomputing"):
        mu2, sigma2 = reference_stats(random_net, **kw)
    assert torch.equal(mu, mu2) and torch.equal(sigma, sigma2)
    with pytest.raises(ValueError, match="size >= 2"):
        reference_stats(random_net, **{**kw, "size": 1})
    with pytest.raises(ValueError, match="split"):
        reference_stats(random_net, **{**kw, "split": "test"})


# --------------------------------------------------------------------------------------------
# The real trained net (one training per session)


@pytest.fixture(scope="session")
def trained_net(harness_cache: Path) -> AttributeNet:
    """The default attribute net, trained once into the session's tmp HARNESS_CACHE."""
    assert os.environ["HARNESS_CACHE"] == str(harness_cache)  # never ~/.cache
    net = load_attribute_net()
    assert attribute_net_path().is_relative_to(harness_cache)
    return net


@pytest.mark.slow
def test_trained_net_report(trained_net: AttributeNet) -> None:
    report = attribute_net_report()
    assert report["dataset_version"] == DATASET_VERSION
    assert report["recipe_hash"] == AttributeNetRecipe().hash() == trained_net.recipe_hash
    for split in ("val", "heldout"):
        for name in ATTRIBUTE_NAMES:
            assert report["accuracy"][split][name] >= 0.98, (split, name)


@pytest.mark.slow
@pytest.mark.parametrize(("split", "resolution"), [("val", 32), ("heldout", 32), ("val", 64)])
def test_trained_net_accuracy_on_fresh_real_images(
    trained_net: AttributeNet, split: str, resolution: int
) -> None:
    x, y = real(seed=2024, split=split, size=1000, resolution=resolution)  # unseen seed
    with torch.no_grad():
        logits = trained_net(x)
    for j, name in enumerate(ATTRIBUTE_NAMES):
        acc = (logits[name].argmax(1) == y[:, j]).float().mean().item()
        assert acc >= 0.98, f"{name}: {acc:.4f} on {split} @ {resolution}px"


@pytest.mark.slow
def test_trained_net_cache_hit(trained_net: AttributeNet) -> None:
    weights = attribute_net_path()
    mtime = weights.stat().st_mtime_ns
    before = trainings()
    start = time.perf_counter()
    again = load_attribute_net()
    assert time.perf_counter() - start < 5.0
    assert trainings() == before
    assert weights.stat().st_mtime_ns == mtime
    assert state_sha(again) == state_sha(trained_net)


@pytest.mark.slow
def test_trained_net_accuracy_true_vs_shuffled_labels(trained_net: AttributeNet) -> None:
    x, y = real(seed=2025, split="all", size=1200)
    ref = reference_stats(trained_net, seed=0, split="all", size=500, resolution=32)
    m = DomainMetrics(trained_net, ref)
    m.update(x, y)
    right = m.compute()
    assert right["attr_acc_mean"] >= 0.99
    assert right["attr_all_correct"] >= 0.97

    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    m.reset()
    m.update(x, shuffled)
    wrong = m.compute()
    for j, (name, values) in enumerate(ATTRIBUTES.items()):
        # chance = P(two random labels agree) = sum_k p_k^2 ~ 1 / K
        p = torch.bincount(y[:, j], minlength=len(values)).double() / len(y)
        chance = float((p * p).sum())
        assert abs(wrong[f"attr_acc/{name}"] - chance) < 0.06, name
    assert wrong["attr_all_correct"] < 0.02
    assert wrong["domain_fid"] == pytest.approx(right["domain_fid"])  # FID ignores labels


@pytest.mark.slow
def test_domain_fid_orders_real_degraded_noise(trained_net: AttributeNet) -> None:
    ref = reference_stats(trained_net, seed=0, split="val", size=1000, resolution=32)
    x, y = real(seed=1, split="val", size=1000)  # same distribution, different images

    def fid(images: torch.Tensor) -> float:
        m = DomainMetrics(trained_net, ref)
        m.update(images, y)
        return m.compute()["domain_fid"]

    g = torch.Generator().manual_seed(0)
    fid_real = fid(x)
    fid_noisy = fid(x + 0.2 * torch.randn(x.shape, generator=g))
    fid_noise = fid(torch.rand(x.shape, generator=g) * 2 - 1)
    trace = float(ref[1].trace())
    assert fid_real < 0.02 * trace  # only finite-sample bias
    assert fid_real < fid_noisy < fid_noise
    assert fid_noise > 50 * fid_real
    assert fid_noise > 0.5 * trace
