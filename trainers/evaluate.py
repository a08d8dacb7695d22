"""Periodic evaluation for the embedded data: domain FID and prompt following of EMA samples.

Seen compositions (val split prompts) give ``domain_fid`` (against real val images) and the
per-attribute accuracies; held-out compositions (never in training) give ``heldout_*``.

Each evaluation can also store its per-image results (``<run_dir>/evals/step_{step:07d}.npz``,
see :class:`EvalImages`), so that two configurations evaluated on the same prompts and sampling
seeds can be compared image by image (paired bootstrap over seeds, then images). The logged
metrics are functions of that file:

- ``attr_acc/<a>`` = ``seen_correct[:, j].mean()``, ``attr_acc_mean`` = their mean,
  ``attr_all_correct`` = ``seen_correct.all(1).mean()``; ``heldout_*`` likewise on
  ``heldout_correct``;
- ``domain_fid`` = ``frechet_distance(seen_features.mean(0), np.cov(seen_features,
  rowvar=False), reference_mean, reference_cov)`` (``trainers.domain``).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from trainers.config import FlowConfig
from trainers.data.shapes import ATTRIBUTE_NAMES, sample_attrs
from trainers.rundir import RunDir, atomic_write_bytes

GenerateFn = Callable[[Sequence[str], Sequence[int]], torch.Tensor]

# Offset so that the evaluation prompts are not the sample-grid prompts (those start at 0).
_EVAL_INDEX_OFFSET = 100_000


@dataclass(frozen=True)
class EvalImages:
    """Per-image results of one evaluation. Row i of the ``seen_*`` arrays is evaluation prompt
    i of the seen compositions, generated with sampling seed ``seen_seeds[i]``; likewise
    ``heldout_*``. Columns of ``*_labels``/``*_correct`` follow ``attributes``."""

    attributes: np.ndarray  # [A] unicode: trainers.domain.ATTRIBUTE_NAMES
    seen_labels: np.ndarray  # [N, A] int64: the caption's label per attribute
    seen_correct: np.ndarray  # [N, A] bool: the attribute net's prediction == the label
    seen_features: np.ndarray  # [N, F] float64: the attribute net's features (not shifted)
    seen_seeds: np.ndarray  # [N] int64: the sampling seed of each image
    heldout_labels: np.ndarray  # [M, A] int64
    heldout_correct: np.ndarray  # [M, A] bool
    heldout_seeds: np.ndarray  # [M] int64
    reference_mean: np.ndarray  # [F] float64: real-image feature mean (the FID's reference)
    reference_cov: np.ndarray  # [F, F] float64: real-image feature covariance
    step: int  # the training step evaluated


# key -> (dtype kind check, numpy dtype to store/read as, shape in symbols)
_LAYOUT: dict[str, tuple[str, type | str, tuple[str, ...]]] = {
    "attributes": ("U", "U", ("A",)),
    "seen_labels": ("iu", np.int64, ("N", "A")),
    "seen_correct": ("b", np.bool_, ("N", "A")),
    "seen_features": ("fiu", np.float64, ("N", "F")),
    "seen_seeds": ("iu", np.int64, ("N",)),
    "heldout_labels": ("iu", np.int64, ("M", "A")),
    "heldout_correct": ("b", np.bool_, ("M", "A")),
    "heldout_seeds": ("iu", np.int64, ("M",)),
    "reference_mean": ("fiu", np.float64, ("F",)),
    "reference_cov": ("fiu", np.float64, ("F", "F")),
    "step": ("iu", np.int64, ()),
}


def _check(images: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Arrays of ``_LAYOUT`` with consistent shapes, cast to their dtypes; ValueError naming
    ``where`` and the key otherwise."""
    missing = [k for k in _LAYOUT if k not in images]
    if missing:
        raise ValueError(
            f"{where}: missing key(s) {', '.join(missing)}; a per-image evaluation file holds "
            f"{', '.join(_LAYOUT)}"
        )
    sizes: dict[str, int] = {}
    out = {}
    for key, (kinds, dtype, symbols) in _LAYOUT.items():
        arr = np.asarray(images[key])
        if arr.dtype.kind not in kinds:
            raise ValueError(f"{where}: {key} has dtype {arr.dtype}, expected kind {kinds!r}")
        expected = tuple(sizes.setdefault(s, n) for s, n in zip(symbols, arr.shape, strict=False))
        if arr.ndim != len(symbols) or arr.shape != expected:
            want = "[" + ", ".join(f"{s}={sizes[s]}" if s in sizes else s for s in symbols) + "]"
            raise ValueError(f"{where}: {key} has shape {list(arr.shape)}, expected {want}")
        out[key] = arr.astype(dtype) if dtype != "U" else arr
    return out


def write_eval_images(path: Path, images: EvalImages) -> None:
    """``np.savez_compressed`` of ``images`` at ``path``, atomically (temporary file, rename)."""
    arrays = _check({f.name: getattr(images, f.name) for f in fields(EvalImages)}, str(path))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def read_eval_images(path: str | Path) -> EvalImages:
    """The per-image results stored at ``path`` (``<run_dir>/evals/step_*.npz``). Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for an
    unreadable one, a missing key or an array of the wrong shape or dtype."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path}: not a readable per-image evaluation file ({err})") from None
    a = _check(arrays, str(path))
    return EvalImages(**{k: v for k, v in a.items() if k != "step"}, step=int(a["step"]))


def eval_image_files(run_dir: str | Path) -> dict[int, Path]:
    """``{step: path}`` of a run directory's per-image evaluation files, by step."""
    return RunDir(run_dir).eval_image_files()


class ShapesEvaluator:
    def __init__(self, cfg: FlowConfig, device: torch.device):
        from trainers.domain import DomainMetrics, load_attribute_net, reference_stats

        self.net = load_attribute_net(device=device)
        ref = reference_stats(
            self.net,
            seed=cfg.data.seed,
            split="val",
            size=cfg.eval.reference_images,
            resolution=cfg.data.resolution,
        )
        n = cfg.eval.num_images
        self.seen = [sample_attrs(cfg.data.seed, "val", _EVAL_INDEX_OFFSET + i) for i in range(n)]
        self.heldout = [
            sample_attrs(cfg.data.seed, "heldout", _EVAL_INDEX_OFFSET + i)
            for i in range(max(2, n // 2))
        ]
        self.terse = None
        if cfg.eval.terse_prompts:
            from trainers.data.terse import terse_prompts

            self.terse = terse_prompts()
        self.reference = ref  # (mean, covariance) of the real images' features
        self._metrics = lambda: DomainMetrics(self.net, ref, keep_per_image=True)
        self.last_images: EvalImages | None = None

    def run(
        self, generate: GenerateFn, *, images_path: Path | None = None, step: int = 0
    ) -> dict[str, float]:
        """The metrics of ``generate``'s images of the evaluation prompts. The per-image results
        are kept in ``last_images`` (``step`` recorded in them) and, with ``images_path``,
        written there (:func:`write_eval_images`)."""
        out: dict[str, float] = {}
        per: dict[str, np.ndarray] = {}
        for prefix, items in (("seen_", self.seen), ("heldout_", self.heldout)):
            seeds = list(range(len(items)))
            images = generate([a.caption for a in items], seeds)
            metrics = self._metrics()
            metrics.update(images, torch.tensor([a.labels for a in items]))
            values = metrics.compute()
            rows = metrics.per_image()
            per |= {
                f"{prefix}labels": rows.labels,
                f"{prefix}correct": rows.correct,
                f"{prefix}seeds": np.asarray(seeds, dtype=np.int64),
            }
            if prefix == "seen_":
                per["seen_features"] = rows.features
                out.update({k: float(v) for k, v in values.items()})
            else:  # FID needs the seen distribution; held-out prompts report accuracy only
                acc = {k: v for k, v in values.items() if k.startswith("attr_")}
                out.update({prefix + k: float(v) for k, v in acc.items()})
        if self.terse is not None:
            out |= self._terse(generate)
        mean, cov = self.reference
        self.last_images = EvalImages(
            attributes=np.array(ATTRIBUTE_NAMES, dtype=str),
            reference_mean=torch.as_tensor(mean).double().cpu().numpy(),
            reference_cov=torch.as_tensor(cov).double().cpu().numpy(),
            step=step,
            **per,
        )
        if images_path is not None:
            write_eval_images(Path(images_path), self.last_images)
        return out

    def _terse(self, generate: GenerateFn) -> dict[str, float]:
        """``terse_attr_acc`` / ``terse_all_named`` of ``generate``'s images of the terse set
        (one sampling seed per prompt, 0, 1, ...), scored on the attributes each names."""
        from trainers.data.terse import named_accuracy, named_labels
        from trainers.domain import predict_labels

        assert self.terse is not None
        images = generate([p.prompt for p in self.terse], list(range(len(self.terse))))
        frac, all_named = named_accuracy(
            predict_labels(self.net, images).numpy(), named_labels(self.terse)
        )
        return {"terse_attr_acc": float(frac.mean()), "terse_all_named": float(all_named.mean())}
