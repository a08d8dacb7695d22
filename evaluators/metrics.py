"""The registry of image metrics ``harness eval`` computes: one entry per ``--metrics`` name.

Torch-free on purpose, so ``harness eval --help`` and the option check stay fast. An entry says
which network's outputs the metric needs (its *family*: the network is loaded once and its
features computed once for every metric of the family), whether it compares with real images
or needs captions, how many images make it defined, which direction is better, and the function
that computes it (``"module:function"``, imported only when the metric is asked for).

A compute function takes a :class:`MetricInputs` and returns ``(name, value, metric_params)``
triples: a metric may store more than one value (``kid`` stores ``kid`` and ``kid_std``,
``attr_acc`` one accuracy per attribute).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from trainers.names import lookup

__all__ = [
    "FAMILIES",
    "METRICS",
    "Family",
    "MetricInfo",
    "MetricInputs",
    "compute_function",
    "higher_is_better",
]

Family = Literal["inception", "clip", "clip_text", "attribute_net"]
FAMILIES: tuple[Family, ...] = ("inception", "clip", "clip_text", "attribute_net")
"""In the order ``harness eval`` computes them (and prints their scores)."""

_PAIRS = "its unbiased MMD estimator averages over pairs of distinct images"
_COVARIANCE = "the covariance of the features divides by n - 1"


@dataclass(frozen=True)
class MetricInfo:
    """What the evaluate command needs to know about one metric."""

    family: Family
    compute: str
    """``"module:function"``; the function maps :class:`MetricInputs` to value triples."""
    higher_is_better: bool
    min_images: int
    why_min: str
    """Why fewer than ``min_images`` images leave it undefined (shown in the error)."""
    reference: bool = False
    """Compares generated images with real ones (needs ``--reference`` or a default)."""
    prompts: bool = False
    """Needs a caption per image."""
    outputs: tuple[str, ...] = ()
    """Extra stored names besides the metric's own, with the same direction (``kid_std``)."""


METRICS: dict[str, MetricInfo] = {
    "fid": MetricInfo(
        "inception", "evaluators.image_metrics:score_fid", False, 2, _COVARIANCE, reference=True
    ),
    "kid": MetricInfo(
        "inception",
        "evaluators.image_metrics:score_kid",
        False,
        2,
        _PAIRS,
        reference=True,
        outputs=("kid_std",),
    ),
    "cmmd": MetricInfo(
        "clip", "evaluators.image_metrics:score_cmmd", False, 2, _PAIRS, reference=True
    ),
    "clip_score": MetricInfo(
        "clip_text",
        "evaluators.image_metrics:score_clip",
        True,
        1,
        "it averages over images",
        prompts=True,
    ),
    "domain_fid": MetricInfo(
        "attribute_net",
        "evaluators.image_metrics:score_domain_fid",
        False,
        2,
        _COVARIANCE,
        reference=True,
        prompts=True,
    ),
    "attr_acc": MetricInfo(
        "attribute_net",
        "evaluators.image_metrics:score_attr_acc",
        True,
        1,
        "it averages over images",
        prompts=True,
        outputs=("attr_acc_mean", "attr_all_correct"),
    ),
}


@dataclass
class MetricInputs:
    """What a compute function reads: the family's outputs for generated and real images."""

    fake: Any = None
    """Generated-image features ``[N, D]`` (or the family's own result object)."""
    real: Any = None
    """Reference features ``[M, D]`` (or statistics), None for reference-free metrics."""
    images: Any = None
    """The generated images, uint8 ``[N, 3, R, R]``."""
    prompts: list[str] | None = None
    network: Any = None
    """The family's loaded network (extractor or scorer)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Metric parameters from the command line (``kid_subsets``, ``seed``, ``batch_size``)."""
    progress: Callable[[int], None] | None = None


def compute_function(name: str) -> Callable[[MetricInputs], list[tuple[str, float, dict]]]:
    """The compute function of metric ``name`` (imported now)."""
    module, function = lookup(METRICS, name, "metric").compute.split(":")
    return getattr(importlib.import_module(module), function)


def higher_is_better(stored_name: str) -> bool:
    """Direction of a stored score name: a metric, one of its ``outputs``, or ``attr_acc/*``."""
    for name, info in METRICS.items():
        if stored_name in (name, *info.outputs) or stored_name.startswith(f"{name}/"):
            return info.higher_is_better
    raise KeyError(f"no metric stores scores named {stored_name!r}")
