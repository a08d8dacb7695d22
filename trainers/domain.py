"""Domain evaluator for the embedded shapes data: attribute accuracy and a domain FID.

It lives with the trainers, not in :mod:`evaluators`, because a flow run scores itself with it
in-process at every eval step; the evaluators and the arena's domain judge import it from here.

A small CNN (:class:`AttributeNet`) is trained once on procedurally generated images
(:mod:`trainers.data.shapes`) and cached on disk. Generated images are then scored by

* **prompt following**: the net classifies every attribute (shape, colour, size, position,
  background) of each generated image and compares it with the caption's labels;
* **domain FID**: the Fréchet distance between Gaussians fitted to the net's penultimate features
  of generated images and of real images (Inception FID is meaningless on 32 px shapes).

Cache layout (``$HARNESS_CACHE/domain`` or ``~/.cache/diffusion-harness/domain``)::

    attribute_net-<DATASET_VERSION>-<recipe hash>.safetensors   weights
    attribute_net-<DATASET_VERSION>-<recipe hash>.json          sidecar (report, weights sha256)
    attribute_net-<DATASET_VERSION>-<recipe hash>.lock          fcntl lock for train-and-write
    refstats-<...key...>.safetensors                            reference feature statistics

Corrupt or truncated cache files are **not** fatal: they are detected (the sidecar records the
weights' sha256), a warning naming the file is emitted, and the net (or the reference statistics)
is recomputed and the file overwritten. Training is deterministic (fixed seeds, one thread), so
on the same machine and torch version the result is the same net.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from trainers.data.shapes import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    DATASET_VERSION,
    SPLITS,
    ShapesDataset,
    to_model_range,
)
from trainers.files import atomic_write_bytes, default_cache_dir, file_lock

__all__ = [
    "EVALUATOR_SEED",
    "AttributeNet",
    "AttributeNetRecipe",
    "DomainMetrics",
    "PerImage",
    "attribute_net_path",
    "attribute_net_report",
    "default_cache_dir",
    "frechet_distance",
    "gaussian_stats",
    "load_attribute_net",
    "reference_stats",
]

logger = logging.getLogger(__name__)

EVALUATOR_SEED = 7919
"""Seed of the evaluator's own training images (distinct from any trainer's data seed)."""

NET_RESOLUTION = 32
"""Every input is resized to this side length before the net sees it."""

# Bump when AttributeNet's forward pass or the training procedure (_fit/_train) changes in a way
# that the recipe fields and parameter shapes (both in the recipe hash) do not capture, so that
# stale cached weights are not reused.
_RECIPE_VERSION = 1

# Images per forward pass in DomainMetrics / reference_stats. Fixed (independent of the caller's
# batch size) because float32 conv/matmul results of one image differ in the last bits with the
# batch they are computed in; fixed chunks make the metrics bit-identical for any batch size.
_CHUNK = 128

# Number of times this process trained a net (tests use it to prove cache hits / single training).
_TRAIN_COUNT = 0
_TRAIN_THREADS = 1


# --------------------------------------------------------------------------------------------
# The network


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class AttributeNet(nn.Module):
    """Small CNN with one classification head per attribute of the shapes data set.

    Input: float images in ``[-1, 1]``, ``[B, 3, H, W]``, any ``H, W`` (resized to 32x32 with
    antialiased bilinear interpolation; values are clamped to ``[-1, 1]`` first, as a sampler's
    output would be before it is saved). About 190K parameters at the default width.
    """

    def __init__(self, width: int = 16, feature_dim: int = 128):
        super().__init__()
        w = width
        # 32x32 -> 16x16 -> 8x8 -> 4x4; position is an attribute, so the 4x4 map is flattened
        # rather than globally pooled (pooling would throw away where the shape is).
        self.trunk = nn.Sequential(
            *_conv_block(3, w),
            nn.MaxPool2d(2),
            *_conv_block(w, 2 * w),
            nn.MaxPool2d(2),
            *_conv_block(2 * w, 4 * w),
            *_conv_block(4 * w, 4 * w),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(4 * w * 4 * 4, feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict(
            {name: nn.Linear(feature_dim, len(values)) for name, values in ATTRIBUTES.items()}
        )
        self.width = width
        self.feature_dim = feature_dim
        # Set by load_attribute_net; part of the reference-statistics cache key.
        self.recipe_hash: str | None = None

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        """Validate, clamp to ``[-1, 1]`` and resize to ``[B, 3, 32, 32]`` float32."""
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(
                f"images must be float in [-1, 1], got dtype {images.dtype} "
                "(convert uint8 images with trainers.data.shapes.to_model_range)"
            )
        x = images.float().clamp(-1.0, 1.0)
        if x.shape[-2:] != (NET_RESOLUTION, NET_RESOLUTION):
            x = F.interpolate(
                x,
                size=(NET_RESOLUTION, NET_RESOLUTION),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        return x

    def features_and_logits(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Penultimate features ``[B, feature_dim]`` and per-attribute logits ``[B, n_values]``."""
        feats = self.embed(self.trunk(self.preprocess(images)))
        return feats, {name: head(feats) for name, head in self.heads.items()}

    def features(self, images: Tensor) -> Tensor:
        """Penultimate-layer features ``[B, feature_dim]`` (non-negative: post-ReLU)."""
        return self.embed(self.trunk(self.preprocess(images)))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Per-attribute logits: ``{name: [B, len(ATTRIBUTES[name])]}``."""
        return self.features_and_logits(images)[1]


# --------------------------------------------------------------------------------------------
# Training recipe, training, cache


@functools.cache
def _param_shapes(width: int, feature_dim: int) -> dict[str, list[int]]:
    # On the meta device: no memory, and no draws from the caller's global RNG.
    with torch.device("meta"):
        net = AttributeNet(width, feature_dim)
    return {k: list(v.shape) for k, v in net.state_dict().items()}


def _new_net(recipe: AttributeNetRecipe) -> AttributeNet:
    """An untrained net for ``recipe`` (to load weights into) without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        return AttributeNet(recipe.width, recipe.feature_dim)


@dataclass(frozen=True)
class AttributeNetRecipe:
    """Everything that determines the trained net. Its hash names the cache file.

    The default is the evaluator used everywhere; tests pass tiny recipes to exercise the cache.
    """

    seed: int = EVALUATOR_SEED
    # (render resolution, number of images) parts of the "all" split. Mostly native 32 px; some
    # rendered at 64/16 px and resized like generated images at those resolutions would be.
    # Part k uses seed ``seed + k``, so the parts are different images.
    train_mix: tuple[tuple[int, int], ...] = ((32, 7680), (64, 3072), (16, 1536))
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    # Per image gaussian noise with std ~ U(0, noise_std_max) in [-1, 1] units: generated
    # images are noisy and the net must still read their attributes.
    noise_std_max: float = 0.3
    width: int = 16
    feature_dim: int = 128
    # Real-image accuracy check after training (recorded in the sidecar); seed differs from
    # every training part's seed.
    eval_seed: int = 104_729
    eval_size: int = 2000
    min_accuracy: float = 0.98

    def hash(self) -> str:
        """12 hex digits over the recipe fields, the architecture version and parameter shapes."""
        spec = {
            "recipe": asdict(self),
            "recipe_version": _RECIPE_VERSION,
            "params": _param_shapes(self.width, self.feature_dim),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def _cache_dir(cache_dir: Path | str | None) -> Path:
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def attribute_net_path(
    cache_dir: Path | str | None = None, recipe: AttributeNetRecipe | None = None
) -> Path:
    """Path of the cached weights (``.safetensors``); the sidecar is the same stem + ``.json``."""
    recipe = recipe or AttributeNetRecipe()
    return _cache_dir(cache_dir) / f"attribute_net-{DATASET_VERSION}-{recipe.hash()}.safetensors"


class _CacheInvalid(Exception):
    """A cache file exists but cannot be used (truncated, corrupt, mismatched)."""


def _train_data(recipe: AttributeNetRecipe) -> tuple[Tensor, Tensor]:
    """Training images ``[N, 3, 32, 32]`` float32 in [-1, 1] and labels ``[N, 5]``."""
    xs, ys = [], []
    for k, (resolution, size) in enumerate(recipe.train_mix):
        ds = ShapesDataset(seed=recipe.seed + k, split="all", size=size, resolution=resolution)
        xs.append(AttributeNet.preprocess(to_model_range(ds.images)))
        ys.append(ds.labels)
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def _accuracy(net: AttributeNet, images: Tensor, labels: Tensor) -> dict[str, float]:
    """Per-attribute accuracy of ``net`` (eval mode) on float images ``[N, 3, H, W]``."""
    correct = torch.zeros(len(ATTRIBUTE_NAMES), dtype=torch.long)
    for i in range(0, len(images), _CHUNK):
        logits = net(images[i : i + _CHUNK])
        for j, name in enumerate(ATTRIBUTE_NAMES):
            correct[j] += (logits[name].argmax(1).cpu() == labels[i : i + _CHUNK, j]).sum()
    return {name: correct[j].item() / len(images) for j, name in enumerate(ATTRIBUTE_NAMES)}


def _fit(net: AttributeNet, images: Tensor, labels: Tensor, recipe: AttributeNetRecipe) -> None:
    """Optimisation loop; ``images`` ``[N, 3, 32, 32]`` (channels_last), ``labels`` ``[N, 5]``."""
    gen = torch.Generator().manual_seed(recipe.seed)
    n, bs = len(images), recipe.batch_size
    steps_per_epoch = max(1, n // bs)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch, pct_start=0.15
    )
    net.train()
    for _ in range(recipe.epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * bs : (s + 1) * bs]
            x, y = images[idx], labels[idx]  # [b, 3, 32, 32], [b, 5]
            std = torch.rand(len(x), 1, 1, 1, generator=gen) * recipe.noise_std_max  # [b,1,1,1]
            noise = torch.randn(x.shape, generator=gen).to(memory_format=torch.channels_last)
            logits = net(x + noise * std)
            loss = sum(
                F.cross_entropy(logits[name], y[:, j]) for j, name in enumerate(ATTRIBUTE_NAMES)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()


def _train(recipe: AttributeNetRecipe) -> tuple[AttributeNet, float, float]:
    """Train on CPU (deterministic regardless of the caller's device).

    Returns (net, wall seconds, CPU seconds); data rendering is included in both.
    """
    global _TRAIN_COUNT
    _TRAIN_COUNT += 1
    start, start_cpu = time.perf_counter(), time.process_time()
    prev_threads = torch.get_num_threads()
    # One thread, always: the weights then do not depend on the machine's core count, and on a
    # shared/oversubscribed CPU OpenMP threads spin-wait badly. Measured on 2 cores, per step:
    # idle machine 48 ms (1 thread) vs 31 ms (2 threads); under load ~4: 41 ms vs 210-330 ms.
    # channels_last: ~1.4x faster CPU convs than contiguous.
    torch.set_num_threads(_TRAIN_THREADS)
    try:
        # fork_rng: seed deterministically without disturbing the caller's global RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            net = AttributeNet(recipe.width, recipe.feature_dim)
            net = net.to(memory_format=torch.channels_last)
            images, labels = _train_data(recipe)
            _fit(net, images.contiguous(memory_format=torch.channels_last), labels, recipe)
    finally:
        torch.set_num_threads(prev_threads)
    return net, time.perf_counter() - start, time.process_time() - start_cpu


def _weights_fingerprint(net: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _load_cached(weights: Path, sidecar: Path, recipe: AttributeNetRecipe) -> AttributeNet | None:
    """The cached net, ``None`` if nothing is cached, or :class:`_CacheInvalid` if unusable."""
    if not weights.exists() and not sidecar.exists():
        return None
    try:
        meta = json.loads(sidecar.read_text())
        data = weights.read_bytes()
    except (OSError, ValueError) as e:
        raise _CacheInvalid(f"{type(e).__name__}: {e}") from e
    if not isinstance(meta, dict):
        raise _CacheInvalid(f"{sidecar} is not a JSON object")
    expected = {"dataset_version": DATASET_VERSION, "recipe_hash": recipe.hash()}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise _CacheInvalid(f"{sidecar}: {key} is {meta.get(key)!r}, expected {value!r}")
    if hashlib.sha256(data).hexdigest() != meta.get("weights_sha256"):
        raise _CacheInvalid(f"{weights}: sha256 does not match the sidecar (truncated/corrupt)")
    net = _new_net(recipe)
    try:
        net.load_state_dict(st_load(data), strict=True)
    except Exception as e:  # safetensors raises its own error types
        raise _CacheInvalid(f"{weights}: {type(e).__name__}: {e}") from e
    return net


def load_attribute_net(
    cache_dir: Path | str | None = None,
    device: str | torch.device = "cpu",
    *,
    recipe: AttributeNetRecipe | None = None,
) -> AttributeNet:
    """The trained attribute net in eval mode on ``device`` (gradients disabled).

    Trained once (on CPU, one thread, deterministically; ~23 s) and cached under ``cache_dir``
    (default :func:`default_cache_dir`). Concurrent callers on a cold cache serialise on an fcntl
    lock: one trains and writes, the others wait and then load. A corrupt/truncated/mismatched
    cache file triggers a ``UserWarning`` naming it, retraining, and an atomic overwrite.

    Raises ``RuntimeError`` if a freshly trained net misses ``recipe.min_accuracy`` on real
    images (a broken evaluator must not produce numbers); nothing is cached in that case.
    """
    recipe = recipe or AttributeNetRecipe()
    weights = attribute_net_path(cache_dir, recipe)
    sidecar = weights.with_suffix(".json")
    lock = weights.with_suffix(".lock")

    try:  # fast path without the lock: writes are atomic, so a valid pair is a finished pair
        net = _load_cached(weights, sidecar, recipe)
    except _CacheInvalid:
        net = None  # maybe mid-rewrite by another process: re-check under the lock
    if net is None:
        with file_lock(lock):
            try:
                net = _load_cached(weights, sidecar, recipe)
            except _CacheInvalid as e:
                warnings.warn(
                    f"attribute-net cache {weights} (or its sidecar {sidecar.name}) is unusable "
                    f"({e}); retraining and overwriting it",
                    UserWarning,
                    stacklevel=2,
                )
                net = None
            if net is None:
                net = _train_and_write(recipe, weights, sidecar)
    net.recipe_hash = recipe.hash()
    net.eval().requires_grad_(False)
    return net.to(device)


def _train_and_write(recipe: AttributeNetRecipe, weights: Path, sidecar: Path) -> AttributeNet:
    logger.info("training the domain attribute net (one-off) -> %s", weights)
    net, seconds, cpu_seconds = _train(recipe)
    accuracy = {}
    for split in ("val", "heldout"):
        ds = ShapesDataset(seed=recipe.eval_seed, split=split, size=recipe.eval_size)
        accuracy[split] = _accuracy(net, to_model_range(ds.images), ds.labels)
    worst = min(min(acc.values()) for acc in accuracy.values())
    if worst < recipe.min_accuracy:
        raise RuntimeError(
            f"attribute net trained with recipe {recipe.hash()} reaches only {worst:.4f} accuracy "
            f"on real images (need >= {recipe.min_accuracy}): {accuracy}"
        )
    data = st_save({k: v.contiguous() for k, v in net.state_dict().items()})
    meta = {
        "dataset_version": DATASET_VERSION,
        "recipe_hash": recipe.hash(),
        "recipe": asdict(recipe),
        "train_seconds": round(seconds, 3),
        "train_cpu_seconds": round(cpu_seconds, 3),
        "train_threads": _TRAIN_THREADS,
        "torch_version": torch.__version__,
        "eval": {"seed": recipe.eval_seed, "size": recipe.eval_size},
        "accuracy": accuracy,
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        "created_unix": time.time(),
    }
    # Weights first, sidecar last: the sidecar (with the weights' sha256) marks a finished pair.
    atomic_write_bytes(weights, data)
    atomic_write_bytes(sidecar, (json.dumps(meta, indent=2) + "\n").encode())
    logger.info("attribute net trained in %.1f s; accuracy %s", seconds, accuracy)
    # Return the net as every other process will see it (re-read, contiguous weights), so the
    # training process's features are bit-identical to the loaders'; also checks the write.
    loaded = _load_cached(weights, sidecar, recipe)
    assert loaded is not None
    return loaded


def attribute_net_report(
    cache_dir: Path | str | None = None, *, recipe: AttributeNetRecipe | None = None
) -> dict[str, Any]:
    """The cached net's sidecar: dataset version, recipe hash, train seconds, real accuracies.

    ``accuracy`` maps ``"val"``/``"heldout"`` to ``{attribute: accuracy}``. Raises
    ``FileNotFoundError`` if the net was never trained, ``ValueError`` if the sidecar is corrupt.
    """
    sidecar = attribute_net_path(cache_dir, recipe).with_suffix(".json")
    if not sidecar.exists():
        raise FileNotFoundError(f"{sidecar} does not exist; call load_attribute_net() first")
    try:
        meta = json.loads(sidecar.read_text())
    except ValueError as e:
        raise ValueError(
            f"{sidecar} is corrupt ({e}); delete it or call load_attribute_net() to retrain"
        ) from e
    if not isinstance(meta, dict):
        raise ValueError(f"{sidecar} is not a JSON object; delete it")
    return meta


# --------------------------------------------------------------------------------------------
# Fréchet distance


def _as_f64(x: Any, name: str) -> np.ndarray:
    arr = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _psd_sqrt(sym: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sym)
    # Rounding can make eigenvalues of a PSD matrix slightly negative: clamp before the sqrt.
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` in float64.

    ``d = |mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^{1/2})``. Inputs: ``mu`` ``[F]``,
    ``sigma`` ``[F, F]`` (symmetric PSD), as tensors or array-likes.

    The trace term uses that ``s1 s2`` is similar to ``A = s1^{1/2} s2 s1^{1/2}`` (same
    eigenvalues), and ``A`` is symmetric PSD: its eigenvalues come from a symmetric eigensolver
    (real, backward stable) and are clamped at 0. ``scipy.linalg.sqrtm(s1 @ s2)`` (pytorch-fid)
    works on a non-symmetric product and can return complex/inaccurate results for (near-)singular
    covariances (hence its ``eps * I`` retry); torchmetrics' ``eigvals(s1 @ s2)`` uses a
    non-symmetric eigensolver and discards imaginary rounding noise. Rank-deficient covariances
    (fewer images than features, dead ReLU features) are common here, so the symmetric form wins.
    """
    m1, m2 = _as_f64(mu1, "mu1"), _as_f64(mu2, "mu2")
    s1, s2 = _as_f64(sigma1, "sigma1"), _as_f64(sigma2, "sigma2")
    if m1.ndim != 1 or m1.shape != m2.shape:
        raise ValueError(f"mu1 and mu2 must be [F] of equal shape, got {m1.shape} and {m2.shape}")
    f = m1.shape[0]
    if s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(f"sigma1/sigma2 must be [{f}, {f}], got {s1.shape} and {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2  # exact symmetry for eigh
    root1 = _psd_sqrt(s1)
    inner = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = m1 - m2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    # Mathematically >= 0 (tr sqrt(s1 s2) <= (tr s1 + tr s2) / 2); clamp rounding noise only.
    return max(value, 0.0)


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[F]`` and unbiased covariance ``[F, F]`` (float64, CPU) of ``features [N, F]``."""
    if features.ndim != 2:
        raise ValueError(f"features must be [N, F], got shape {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise ValueError(
            f"need at least 2 feature vectors for a covariance, got {features.shape[0]}"
        )
    x = features.detach().cpu().double()
    mu = x.mean(0)
    centred = x - mu
    sigma = centred.T @ centred / (x.shape[0] - 1)
    return mu, sigma


# --------------------------------------------------------------------------------------------
# Metrics


def _net_device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def _run_chunk(net: AttributeNet, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Run exactly ``_CHUNK`` images (zero-padded) so results never depend on the batch size.

    ``x``: preprocessed ``[n <= _CHUNK, 3, 32, 32]``. Returns features ``[n, F]`` float64 CPU
    and logits ``{name: [n, n_values]}`` on the net's device.
    """
    n = len(x)
    if n < _CHUNK:
        x = torch.cat([x, x.new_zeros(_CHUNK - n, *x.shape[1:])])
    # Autocast off: a caller's autocast context would silently run the evaluator in bf16.
    with torch.autocast(device_type=x.device.type, enabled=False):
        feats, logits = net.features_and_logits(x)
    return feats[:n].double().cpu(), {k: v[:n] for k, v in logits.items()}


@dataclass(frozen=True)
class PerImage:
    """Per-image results of :class:`DomainMetrics`, rows in the order images were added."""

    features: np.ndarray  # [N, F] float64: the net's penultimate features (not shifted)
    labels: np.ndarray  # [N, A] int64: the caption labels, columns in ATTRIBUTE_NAMES order
    correct: np.ndarray  # [N, A] bool: the net's prediction equals the caption label


class DomainMetrics:
    """Domain FID and per-attribute accuracy of generated images (torchmetrics-style).

    ``update(images [B, 3, H, W] in [-1, 1], labels [B, 5])`` any number of times, then
    ``compute()``. State is float64 sufficient statistics of the features (sum, sum of outer
    products, count) plus correct counts, so results do not depend on how images are batched:
    images are buffered and run through the net in fixed chunks of 128, making them
    bit-identical for any batch sizes. ``compute()`` does not consume the buffer.

    ``reference``: ``(mu [F], sigma [F, F])`` of real images, e.g. from :func:`reference_stats`.
    The net is put into eval mode.

    ``keep_per_image=True`` also keeps every image's features and correctness for
    :meth:`per_image` (for paired, per-image comparisons of two models); the metrics are the
    same with or without it.
    """

    higher_is_better: ClassVar[dict[str, bool]] = {
        "domain_fid": False,
        **{f"attr_acc/{name}": True for name in ATTRIBUTE_NAMES},
        "attr_acc_mean": True,
        "attr_all_correct": True,
    }

    def __init__(
        self, net: AttributeNet, reference: tuple[Any, Any], *, keep_per_image: bool = False
    ):
        self.net = net.eval()
        self.keep_per_image = keep_per_image
        mu, sigma = reference
        self._ref_mu = torch.as_tensor(_as_f64(mu, "reference mu"))
        self._ref_sigma = torch.as_tensor(_as_f64(sigma, "reference sigma"))
        f = net.feature_dim
        if self._ref_mu.shape != (f,) or self._ref_sigma.shape != (f, f):
            raise ValueError(
                f"reference stats must be ([{f}], [{f}, {f}]) for this net, got "
                f"({list(self._ref_mu.shape)}, {list(self._ref_sigma.shape)})"
            )
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        f = self.net.feature_dim
        # Features are accumulated shifted by the reference mean (a constant shift leaves the
        # covariance unchanged) to limit cancellation in sum_outer - n * mean mean^T.
        self._sum = torch.zeros(f, dtype=torch.float64)  # [F]
        self._outer = torch.zeros(f, f, dtype=torch.float64)  # [F, F]
        self._count = 0
        self._correct = torch.zeros(len(ATTRIBUTE_NAMES), dtype=torch.long)  # [5]
        self._all_correct = 0
        self._pending_x: Tensor | None = None  # [<_CHUNK, 3, 32, 32] preprocessed, net device
        self._pending_y: Tensor | None = None  # [<_CHUNK, 5] CPU long
        # keep_per_image: (features [n, F] float64, labels [n, 5], hit [n, 5] bool) per chunk
        self._rows: list[tuple[Tensor, Tensor, Tensor]] = []
        self._pending_cache: tuple[Tensor, Tensor] | None = None  # _chunk_rows of the buffer

    @torch.no_grad()
    def update(self, images: Tensor, labels: Tensor) -> None:
        """Add generated ``images [B, 3, H, W]`` (float, [-1, 1]) with caption ``labels [B, 5]``."""
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        x = AttributeNet.preprocess(images.to(_net_device(self.net)))  # [B, 3, 32, 32]
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or inf (diverged sampler?)")
        y = torch.as_tensor(labels).cpu()
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got dtype {y.dtype}")
        if y.shape != (len(x), len(ATTRIBUTE_NAMES)):
            raise ValueError(
                f"labels must be [B={len(x)}, {len(ATTRIBUTE_NAMES)}] "
                f"({', '.join(ATTRIBUTE_NAMES)}), got shape {tuple(y.shape)}"
            )
        y = y.long()
        for j, name in enumerate(ATTRIBUTE_NAMES):
            if len(y) and (y[:, j].min() < 0 or y[:, j].max() >= len(ATTRIBUTES[name])):
                hi = len(ATTRIBUTES[name]) - 1
                raise ValueError(f"labels[:, {j}] ({name}) out of range 0..{hi}")
        if self._pending_x is not None:
            x, y = torch.cat([self._pending_x, x]), torch.cat([self._pending_y, y])
        full = len(x) // _CHUNK * _CHUNK
        for i in range(0, full, _CHUNK):
            feats, hit = self._chunk_rows(x[i : i + _CHUNK], y[i : i + _CHUNK])
            self._accumulate(*self._chunk_stats(feats, hit))
            if self.keep_per_image:
                self._rows.append((feats, y[i : i + _CHUNK].clone(), hit))
        self._pending_x = x[full:].clone() if full < len(x) else None
        self._pending_y = y[full:].clone() if full < len(y) else None
        self._pending_cache = None

    def _pending_rows(self) -> tuple[Tensor, Tensor]:
        """``_chunk_rows`` of the buffered partial chunk, computed once per buffer content."""
        assert self._pending_x is not None and self._pending_y is not None
        if self._pending_cache is None:
            self._pending_cache = self._chunk_rows(self._pending_x, self._pending_y)
        return self._pending_cache

    def _chunk_rows(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Features ``[n, F]`` float64 CPU and correctness ``[n, 5]`` bool of one chunk."""
        feats, logits = _run_chunk(self.net, x)
        hit = torch.stack(
            [logits[name].argmax(1).cpu() == y[:, j] for j, name in enumerate(ATTRIBUTE_NAMES)], 1
        )  # [n, 5] bool
        return feats, hit

    def _chunk_stats(self, feats: Tensor, hit: Tensor) -> tuple[Tensor, Tensor, int, Tensor, int]:
        feats = feats - self._ref_mu  # [n, F] float64
        return feats.sum(0), feats.T @ feats, len(feats), hit.sum(0), int(hit.all(1).sum())

    def _accumulate(self, s: Tensor, outer: Tensor, n: int, correct: Tensor, all_ok: int) -> None:
        self._sum += s
        self._outer += outer
        self._count += n
        self._correct += correct
        self._all_correct += all_ok

    @property
    def num_images(self) -> int:
        """Images added so far (buffered ones included)."""
        return self._count + (0 if self._pending_x is None else len(self._pending_x))

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        """``domain_fid``, ``attr_acc/<name>``, ``attr_acc_mean``, ``attr_all_correct``.

        Raises ``ValueError`` with fewer than 2 images (no covariance, so no FID).
        """
        s, outer, n = self._sum.clone(), self._outer.clone(), self._count
        correct, all_ok = self._correct.clone(), self._all_correct
        if self._pending_x is not None:  # the partial chunk, without consuming it
            ps, pouter, pn, pcorrect, pall = self._chunk_stats(*self._pending_rows())
            s, outer, n = s + ps, outer + pouter, n + pn
            correct, all_ok = correct + pcorrect, all_ok + pall
        if n < 2:
            raise ValueError(
                f"DomainMetrics needs at least 2 images to compute domain_fid, got {n}; "
                "call update() with more generated images"
            )
        mean_shifted = s / n  # [F]
        sigma = (outer - n * torch.outer(mean_shifted, mean_shifted)) / (n - 1)
        mu = mean_shifted + self._ref_mu
        out = {"domain_fid": frechet_distance(mu, sigma, self._ref_mu, self._ref_sigma)}
        acc = {f"attr_acc/{name}": correct[j].item() / n for j, name in enumerate(ATTRIBUTE_NAMES)}
        out.update(acc)
        out["attr_acc_mean"] = sum(acc.values()) / len(acc)
        out["attr_all_correct"] = all_ok / n
        return out

    @torch.no_grad()
    def per_image(self) -> PerImage:
        """Every image added so far (buffered ones included, not consumed), in order; needs
        ``keep_per_image=True``. Recomputing the metrics from it gives :meth:`compute`'s
        values to float rounding (e.g. ``attr_acc/<name>`` = ``correct[:, j].mean()``)."""
        if not self.keep_per_image:
            raise RuntimeError(
                "DomainMetrics.per_image() needs DomainMetrics(..., keep_per_image=True)"
            )
        rows = list(self._rows)
        if self._pending_x is not None:
            feats, hit = self._pending_rows()
            rows.append((feats, self._pending_y, hit))
        f, a = self.net.feature_dim, len(ATTRIBUTE_NAMES)
        if not rows:
            return PerImage(
                np.zeros((0, f)), np.zeros((0, a), np.int64), np.zeros((0, a), dtype=bool)
            )
        return PerImage(
            features=torch.cat([r[0] for r in rows]).numpy().astype(np.float64),
            labels=torch.cat([r[1] for r in rows]).numpy().astype(np.int64),
            correct=torch.cat([r[2] for r in rows]).numpy().astype(bool),
        )


# --------------------------------------------------------------------------------------------
# Reference statistics


@torch.no_grad()
def _real_features(net: AttributeNet, images_uint8: Tensor) -> Tensor:
    """Features ``[N, F]`` float64 of uint8 images ``[N, 3, H, W]``, in the metric's chunks."""
    device = _net_device(net)
    out = []
    for i in range(0, len(images_uint8), _CHUNK):
        x = AttributeNet.preprocess(to_model_range(images_uint8[i : i + _CHUNK]).to(device))
        out.append(_run_chunk(net, x)[0])
    return torch.cat(out)


def reference_stats(
    net: AttributeNet,
    *,
    seed: int,
    split: str,
    size: int,
    resolution: int,
    cache_dir: Path | str | None = None,
) -> tuple[Tensor, Tensor]:
    """``(mu [F], sigma [F, F])`` float64 of the net's features of ``size`` real images.

    Cached in ``cache_dir`` (default :func:`default_cache_dir`) keyed by dataset version, the
    net's recipe hash and weights fingerprint, seed, split, size and resolution. No lock:
    computing is cheap and deterministic and writes are atomic, so concurrent callers at worst
    duplicate work. An unreadable cache file is recomputed with a warning.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if size < 2:
        raise ValueError(f"reference_stats needs size >= 2 for a covariance, got {size}")
    net.eval()
    key = (
        f"refstats-{DATASET_VERSION}-{net.recipe_hash or 'custom'}-{_weights_fingerprint(net)}"
        f"-seed{seed}-{split}-n{size}-r{resolution}"
    )
    path = _cache_dir(cache_dir) / f"{key}.safetensors"
    f = net.feature_dim
    if path.exists():
        try:
            stats = st_load(path.read_bytes())
            mu, sigma = stats["mu"], stats["sigma"]
            if mu.shape != (f,) or sigma.shape != (f, f) or mu.dtype != torch.float64:
                raise ValueError(f"unexpected shapes {tuple(mu.shape)}, {tuple(sigma.shape)}")
            if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
                raise ValueError("non-finite values")
            return mu, sigma
        except Exception as e:  # any unreadable file: recompute (it is only a cache)
            warnings.warn(
                f"reference-stats cache {path} is unusable ({type(e).__name__}: {e}); "
                "recomputing and overwriting it",
                UserWarning,
                stacklevel=2,
            )
    ds = ShapesDataset(seed=seed, split=split, size=size, resolution=resolution)  # type: ignore[arg-type]
    mu, sigma = gaussian_stats(_real_features(net, ds.images))
    atomic_write_bytes(path, st_save({"mu": mu.contiguous(), "sigma": sigma.contiguous()}))
    return mu, sigma


@torch.no_grad()
def predict_labels(net: AttributeNet, images: Tensor) -> Tensor:
    """The attribute network's predicted label per attribute, ``[N, A]`` int64 on the CPU, for
    images ``[N, 3, H, W]`` in [-1, 1]; run in fixed chunks, so independent of ``N``."""
    device = _net_device(net)
    out = []
    for i in range(0, len(images), _CHUNK):
        x = net.preprocess(images[i : i + _CHUNK].to(device))
        _, logits = _run_chunk(net, x)
        out.append(torch.stack([logits[a].argmax(1) for a in ATTRIBUTE_NAMES], 1).cpu())
    if not out:
        return torch.zeros(0, len(ATTRIBUTE_NAMES), dtype=torch.long)
    return torch.cat(out)
