"""FID / KID / CMMD / CLIP score: the math against independent references (scipy, numpy,
torchmetrics, a plain transformers forward pass), the extractors' offline weight lookup on tiny
random networks saved to disk, batch-size invariance, the reference cache and the scores table.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import cdist

from evaluators import extractors as ex
from evaluators.image_metrics import (
    NotEnoughImagesError,
    ReferenceSource,
    clip_score,
    cmmd,
    fid,
    kid,
    mmd_rbf,
    reference_features,
)
from evaluators.scores import (
    ProvenanceMismatchError,
    RecordError,
    Score,
    compare_scores,
    put_scores,
    read_scores,
    scores_by_provenance,
)
from harness.store import Store
from tests.evaluators.metric_nets import write_random_inception, write_tiny_clip
from trainers.data.shapes import ShapesDataset
from trainers.errors import WeightsError


def _feats(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * 0.7 + shift


# ---------------------------------------------------------------------------------------------
# FID


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's formula: sqrtm of the product of the covariances."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_matches_scipy_sqrtm_and_torchmetrics_formula() -> None:
    from torchmetrics.image.fid import _compute_fid

    fake, real = _feats(300, 16, 0, shift=0.3), _feats(400, 16, 1)
    ours = fid(fake, real)
    ref = _scipy_fid(fake.numpy(), real.numpy())
    tm = _compute_fid(fake.mean(0), torch.cov(fake.T), real.mean(0), torch.cov(real.T))
    assert ours == pytest.approx(ref, rel=1e-9)
    assert ours == pytest.approx(float(tm), rel=1e-7)
    assert ours > 16 * 0.3**2 * 0.9  # the mean shift alone contributes 16 * 0.09


def test_fid_of_a_set_with_itself_is_zero_and_symmetric() -> None:
    a, b = _feats(50, 8, 0), _feats(60, 8, 1, shift=1.0)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-9)
    assert fid(a, b) == pytest.approx(fid(b, a), rel=1e-10)


def test_too_few_images_is_an_error_not_a_number() -> None:
    with pytest.raises(NotEnoughImagesError, match=r"fid needs at least 2 generated.*n - 1"):
        fid(_feats(1, 8, 0), _feats(10, 8, 1))
    with pytest.raises(NotEnoughImagesError, match="at least 2 reference"):
        kid(_feats(10, 8, 0), _feats(1, 8, 1))
    with pytest.raises(NotEnoughImagesError, match="cmmd needs at least 2"):
        cmmd(_feats(1, 8, 0), _feats(10, 8, 1))
    with pytest.raises(ValueError, match="same D"):
        fid(_feats(10, 8, 0), _feats(10, 9, 1))


def test_fid_warns_when_the_covariance_is_rank_deficient() -> None:
    with pytest.warns(UserWarning, match="rank-deficient"):
        value = fid(_feats(5, 8, 0), _feats(20, 8, 1))
    assert np.isfinite(value)


# ---------------------------------------------------------------------------------------------
# KID


def _numpy_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written out with loops over pairs."""
    d = x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> float:
        return (a @ b / d + 1.0) ** 3

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_kid_matches_a_direct_computation_and_torchmetrics() -> None:
    from torchmetrics.image.kid import KernelInceptionDistance

    fake, real = _feats(12, 6, 0, shift=0.5), _feats(12, 6, 1)
    mean, std, size = kid(fake, real, subsets=5, subset_size=1000)
    # Subsets as large as the sets are the whole sets: every subset gives the same value.
    assert size == 12 and std == pytest.approx(0.0, abs=1e-12)
    assert mean == pytest.approx(_numpy_kid(fake.numpy(), real.numpy()), rel=1e-9)
    tm = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=3, subset_size=12)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    assert mean == pytest.approx(float(tm.compute()[0]), rel=1e-6)


def test_kid_subsets_are_seeded() -> None:
    fake, real = _feats(40, 6, 0, shift=0.5), _feats(50, 6, 1)
    a = kid(fake, real, subsets=10, subset_size=20, seed=3)
    assert a == kid(fake, real, subsets=10, subset_size=20, seed=3)
    assert a != kid(fake, real, subsets=10, subset_size=20, seed=4)
    assert a[1] > 0 and a[2] == 20


# ---------------------------------------------------------------------------------------------
# CMMD


def _scipy_mmd(x: np.ndarray, y: np.ndarray, sigma: float, unbiased: bool) -> float:
    kxx = np.exp(-cdist(x, x, "sqeuclidean") / (2 * sigma**2))
    kyy = np.exp(-cdist(y, y, "sqeuclidean") / (2 * sigma**2))
    kxy = np.exp(-cdist(x, y, "sqeuclidean") / (2 * sigma**2))
    n, m = len(x), len(y)
    if unbiased:
        return (
            (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean()
        )
    return kxx.mean() + kyy.mean() - 2 * kxy.mean()


@pytest.mark.parametrize("unbiased", [True, False])
def test_cmmd_matches_scipy_cdist(unbiased: bool) -> None:
    # Unit vectors, like CLIP embeddings, and a sigma at which the kernel is not flat.
    x = torch.nn.functional.normalize(_feats(30, 12, 0, shift=0.4), dim=-1)
    y = torch.nn.functional.normalize(_feats(25, 12, 1), dim=-1)
    for sigma in (10.0, 0.5):
        ours = mmd_rbf(x, y, sigma=sigma, unbiased=unbiased)
        assert ours == pytest.approx(
            _scipy_mmd(x.numpy(), y.numpy(), sigma, unbiased), rel=1e-8, abs=1e-15
        )
    assert cmmd(x, y, unbiased=unbiased) == pytest.approx(
        1000 * _scipy_mmd(x.numpy(), y.numpy(), 10.0, unbiased), rel=1e-8
    )


def test_unbiased_cmmd_is_near_zero_for_two_samples_of_one_distribution() -> None:
    # The biased V-statistic is positive by about (1 - mean k) (1/n + 1/m); the unbiased one is
    # centred on 0. Across 20 pairs of samples of one distribution the unbiased mean is near 0.
    biased, unbiased = [], []
    for s in range(20):
        x = torch.nn.functional.normalize(_feats(20, 8, 2 * s), dim=-1) * 20
        y = torch.nn.functional.normalize(_feats(20, 8, 2 * s + 1), dim=-1) * 20
        biased.append(mmd_rbf(x, y, unbiased=False))
        unbiased.append(mmd_rbf(x, y))
    assert min(biased) > 0
    assert abs(np.mean(unbiased)) < 0.2 * np.mean(biased)


# ---------------------------------------------------------------------------------------------
# CLIP: weights from disk, features, CMMD and CLIP score


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def shapes() -> ShapesDataset:
    return ShapesDataset(seed=3, split="val", size=10, resolution=24)


def test_clip_extractor_loads_from_the_env_var(
    clip_dir: Path, shapes: ShapesDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ex.CLIP_ENV, str(clip_dir))
    clip = ex.ClipExtractor()
    assert clip.directory == clip_dir.resolve()
    feats = ex.extract_features(clip, shapes.images, batch_size=4)
    assert feats.shape == (10, 16) and feats.dtype == torch.float32
    assert torch.allclose(feats.norm(dim=-1), torch.ones(10), atol=1e-5)
    # Different images, different embeddings (the random net is not degenerate).
    assert torch.cdist(feats, feats).max() > 1e-2
    prov = clip.provenance()
    assert prov["weights_sha256"] == ex._clip_weights_sha256(clip_dir)
    assert prov["input_size"] == 32 and prov["resize"] == "bicubic"


def test_clip_features_and_cmmd_do_not_depend_on_the_batch_size(
    clip_dir: Path, shapes: ShapesDataset
) -> None:
    clip = ex.ClipExtractor(str(clip_dir))
    one = ex.extract_features(clip, shapes.images, batch_size=1)
    all_ = ex.extract_features(clip, shapes.images, batch_size=10)
    assert torch.allclose(one, all_, atol=1e-5)
    real = ex.extract_features(clip, ShapesDataset(seed=4, split="val", size=8).images)
    assert cmmd(one, real) == pytest.approx(cmmd(all_, real), rel=1e-4, abs=1e-6)


def test_clip_weights_hash_changes_with_the_weights(tmp_path: Path, clip_dir: Path) -> None:
    other = write_tiny_clip(tmp_path / "other", seed=1)
    assert (
        ex.ClipExtractor(str(other)).weights_sha256
        != ex.ClipExtractor(str(clip_dir)).weights_sha256
    )


def test_clip_score_matches_a_plain_transformers_forward(
    clip_dir: Path, shapes: ShapesDataset
) -> None:
    model, processor = ex.load_clip(clip_dir)
    captions = shapes.captions
    # Independent path: CLIPModel.forward's logits are logit_scale * cosine similarity.
    inputs = processor(text=captions, images=list(shapes.images), return_tensors="pt", padding=True)

    def reference() -> torch.Tensor:
        with torch.no_grad():
            out = model(**inputs)
        return 100 * out.logits_per_image.diagonal() / model.logit_scale.exp()  # [N]

    if reference().mean() < 0:
        # CLIP score clamps the mean at 0; flip the random text projection so that the mean
        # cosine is positive and the comparison below is not 0 == 0.
        with torch.no_grad():
            model.text_projection.weight.neg_()
    expected = float(reference().mean())
    assert expected > 1.0
    ours = clip_score(model, processor, shapes.images, captions, batch_size=3)
    assert ours == pytest.approx(expected, rel=1e-4)
    assert clip_score(model, processor, shapes.images, captions, batch_size=10) == pytest.approx(
        ours, rel=1e-5
    )
    with pytest.raises(ValueError, match="10 images but 9 captions"):
        clip_score(model, processor, shapes.images, captions[:9])


def test_missing_clip_names_the_path_and_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ex.CLIP_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(WeightsError, match=r"nowhere.*does not exist.*hf download"):
        ex.ClipExtractor()
    monkeypatch.delenv(ex.CLIP_ENV)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError) as info:
        ex.ClipExtractor()
    message = str(info.value)
    assert ex.CMMD_CLIP_DEFAULT_ID in message and "never downloads" in message
    assert ex.CLIP_ENV in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"no config\.json"):
        ex.ClipExtractor(str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------
# Inception: lookup and errors (fast), the real network (slow)


def test_inception_url_is_torch_fidelitys() -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert ex.INCEPTION_URL == URL_INCEPTION_V3 and URL_INCEPTION_V3.endswith(ex.INCEPTION_FILE)


def test_missing_inception_weights_say_where_they_were_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ex.INCEPTION_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as info:
        ex.resolve_inception_weights()
    message = str(info.value)
    assert ex.INCEPTION_URL in message and ex.INCEPTION_ENV in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / ex.INCEPTION_FILE) in message
    monkeypatch.setenv(ex.INCEPTION_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsError, match=r"missing.pth \(\$HARNESS_INCEPTION_WEIGHTS\) does"):
        ex.resolve_inception_weights()
    # The torch hub cache is used when nothing is named.
    monkeypatch.delenv(ex.INCEPTION_ENV)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / ex.INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert ex.resolve_inception_weights() == cached


def test_corrupt_or_foreign_inception_weights_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"bad.pth are not a readable PyTorch state dict"):
        ex.InceptionExtractor(bad)
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(WeightsError, match="not torch-fidelity's FeatureExtractorInceptionV3"):
        ex.InceptionExtractor(other)


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_inception(tmp_path_factory.mktemp("inception") / "random-inception.pth")


@pytest.mark.slow
def test_fid_on_a_random_inception_matches_torchmetrics(
    inception_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our FID (torchmetrics' extractor + our Frechet distance) against torchmetrics'
    FrechetInceptionDistance end to end on the same weights file and images; batch size and
    the way the weights are found (argument or env var) do not change it."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fake = ShapesDataset(seed=1, split="val", size=6, resolution=32).images
    real = ShapesDataset(seed=2, split="train", size=6, resolution=32).images
    monkeypatch.setenv(ex.INCEPTION_ENV, str(inception_path))
    net = ex.InceptionExtractor()
    assert net.path == inception_path
    assert net.weights_sha256 == ex.file_sha256(inception_path)
    f1 = ex.extract_features(net, fake, batch_size=6)
    f2 = ex.extract_features(net, fake, batch_size=2)
    # FID is a function of the features: equal features (up to float32 noise) across batch
    # sizes are its batch-size invariance.
    assert torch.allclose(f1, f2, rtol=1e-4, atol=1e-5)
    assert f1.shape == (6, 2048) and net.provenance()["layer"] == "pool3"

    # End to end against torchmetrics on its 192-d layer: the same network, weights file, uint8
    # input and resize, but a 192x192 Frechet distance (at 2048-d each one costs two
    # eigendecompositions that take 10-80 s on this machine).
    small = ex.InceptionExtractor(inception_path, dim=192)
    fake192, real192 = small.features(fake), small.features(real)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 6 images, 192 features
        ours = fid(fake192, real192)
    assert ours > 1e-3  # features vary with the image: the test can fail
    tm = FrechetInceptionDistance(feature=192, feature_extractor_weights_path=str(inception_path))
    tm.update(real, real=True)
    tm.update(fake, real=False)
    assert ours == pytest.approx(float(tm.compute()), rel=1e-3)


# ---------------------------------------------------------------------------------------------
# Reference cache


def test_reference_features_are_cached_by_key(tmp_path: Path, clip_dir: Path) -> None:
    clip = ex.ClipExtractor(str(clip_dir))
    loads: list[int] = []

    def load(n: int) -> torch.Tensor:
        loads.append(n)
        return ShapesDataset(seed=0, split="val", size=n, resolution=16).images

    source = ReferenceSource("shapes/val/seed0", {"dataset": "shapes"}, load, 16)
    a, prov = reference_features(clip, source, 6, cache_dir=tmp_path)
    b, prov_b = reference_features(clip, source, 6, cache_dir=tmp_path)
    assert loads == [6] and torch.equal(a, b) and prov == prov_b
    assert (
        prov["num_images"] == 6 and prov["resolution"] == 16 and len(prov["features_sha256"]) == 16
    )
    reference_features(clip, source, 7, cache_dir=tmp_path)  # another count: another entry
    assert loads == [6, 7]
    cache_file = tmp_path / prov["cache_file"]
    cache_file.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unusable"):
        c, _ = reference_features(clip, source, 6, cache_dir=tmp_path)
    assert loads == [6, 7, 6] and torch.allclose(a, c)


# ---------------------------------------------------------------------------------------------
# The scores table


def _prov(guidance: float = 3.0, weights: str = "abc") -> dict:
    return {
        "extractor": {"name": "inception-v3-compat", "weights_sha256": weights},
        "images": {"sampler": {"solver": "euler", "steps": 25, "guidance": guidance}},
        "num_images": 8,
    }


def test_scores_round_trip_and_remeasuring_replaces() -> None:
    store = Store(":memory:")
    s = Score("run-a", "run", "fid", 12.5, 8, _prov())
    put_scores(store, [s], now=1.0)
    put_scores(store, [Score("run-a", "run", "fid", 12.0, 8, _prov())], now=2.0)
    rows = read_scores(store, ["run-a"], "fid")
    assert len(rows) == 1 and rows[0]["value"] == 12.0 and rows[0]["time"] == 2.0
    assert rows[0]["score_id"] == s.score_id and rows[0]["provenance"] == _prov()
    assert rows[0]["provenance_hash"] == s.provenance_hash
    put_scores(store, [Score("run-a", "run", "fid", 30.0, 8, _prov(weights="zzz"))])
    assert len(read_scores(store, ["run-a"], "fid")) == 2
    with pytest.raises(RecordError, match="not a finite number"):
        Score("run-a", "run", "fid", float("nan"), 8, {})


def test_compare_refuses_scores_measured_differently() -> None:
    store = Store(":memory:")
    put_scores(
        store,
        [
            Score("a", "run", "fid", 10.0, 8, _prov()),
            Score("b", "run", "fid", 11.0, 8, _prov()),
            Score("c", "run", "fid", 9.0, 8, _prov(guidance=5.0)),
        ],
    )
    assert compare_scores(store, ["a", "b"], "fid") == {"a": 10.0, "b": 11.0}
    with pytest.raises(ProvenanceMismatchError, match=r"images\.sampler\.guidance: 3\.0 vs 5\.0"):
        compare_scores(store, ["a", "c"], "fid")
    groups = scores_by_provenance(store, ["a", "b", "c"], "fid")
    assert [sorted(g["scores"]) for g in groups] == [["a", "b"], ["c"]]
    with pytest.raises(RecordError, match="no fid score stored for d"):
        compare_scores(store, ["a", "d"], "fid")
    # A target measured both ways is comparable through the provenance it shares with the rest.
    put_scores(store, [Score("c", "run", "fid", 9.5, 8, _prov())])
    assert compare_scores(store, ["a", "c"], "fid") == {"a": 10.0, "c": 9.5}
