"""The registry of trainers: what the harness knows about each ``trainer:`` a study may name.

Torch-free on purpose (only the pydantic config models are imported): the study-file validator
reads it without loading torch. A trainer's config model names itself in a ``trainer`` field
whose only value is its key here (a test ties the two).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from trainers.config import FlowConfig
from trainers.distill.config import DistillConfig
from trainers.finetune.config import FinetuneConfig
from trainers.preference.config import REWARD_NAMES, PreferenceConfig

__all__ = [
    "DISTILL_METRICS",
    "FINETUNE_METRICS",
    "FLOW_METRICS",
    "KNOWN_METRICS",
    "PREFERENCE_METRICS",
    "SHAPES_ONLY_METRICS",
    "TRAINERS",
    "Trainer",
]

# Mirrors trainers.data.shapes.ATTRIBUTE_NAMES (tests check they agree). Importing that module
# here would pull in torch, several seconds on every `harness study check`.
_SHAPES_ATTRIBUTE_NAMES: tuple[str, ...] = ("shape", "colour", "size", "position", "background")


def _eval_metric_names(prefix: str, with_fid: bool) -> list[str]:
    """Names ``trainers.evaluate.ShapesEvaluator`` logs for one prompt set."""
    names = [f"{prefix}attr_acc/{a}" for a in _SHAPES_ATTRIBUTE_NAMES]
    names += [f"{prefix}attr_acc_mean", f"{prefix}attr_all_correct"]
    return (["domain_fid"] if with_fid else []) + names


SHAPES_ONLY_METRICS: frozenset[str] = frozenset(
    [
        *_eval_metric_names("", with_fid=True),
        *_eval_metric_names("heldout_", with_fid=False),
        *("terse_attr_acc", "terse_all_named"),  # with eval.terse_prompts
    ]
)
"""Written only when the trainer trains on the embedded shapes (the domain evaluator)."""
FLOW_METRICS: frozenset[str] = frozenset(
    [
        *("train/loss", "train/images_per_s", "train/lr", "train/grad_norm", "eval/flow_loss"),
        *SHAPES_ONLY_METRICS,
    ]
)
"""Every metric name the flow trainer writes to ``metrics.jsonl`` (trainers/train.py and
trainers/evaluate.py); the last value of one of these is a study's objective."""


@dataclass(frozen=True)
class Trainer:
    """What the harness knows about one trainer: its config model, entry module, metrics."""

    config: type[BaseModel]
    """The trainer's config model (frozen, ``extra="forbid"``): search paths are its fields and
    every resolved trial config must validate against it."""
    module: str
    """Launched as ``python -m <module> --config CONFIG --run-dir DIR``."""
    metrics: frozenset[str]
    """Metric names the trainer writes; a study's objective must be one of them."""


DISTILL_METRICS: frozenset[str] = frozenset(
    [
        *("train/loss", "train/images_per_s", "train/lr", "train/grad_norm", "eval/nfe"),
        *SHAPES_ONLY_METRICS,
    ]
)
"""The distillation trainer's metrics (trainers/distill/train.py; each method also logs its own
``train/<term>`` values, not objectives)."""

_DRIFT = tuple(f"prior_drift/{m}" for m in ("domain_fid", "attr_acc_mean", "attr_all_correct"))
"""The post-training trainers' drift of the domain metrics from step 0 (trainers/post.py)."""
_SUBJECT_ATTRIBUTES = tuple(a for a in _SHAPES_ATTRIBUTE_NAMES if a != "shape")
FINETUNE_METRICS: frozenset[str] = frozenset(
    [
        *FLOW_METRICS,
        *("train/instance_loss", "train/prior_loss"),
        *("subject/fidelity", "subject/fidelity_floor", "subject/fidelity_ceiling"),
        *("subject/prompt_fidelity", "subject/prompt_fidelity_ceiling"),
        *(f"subject/prompt_fidelity/{a}" for a in _SUBJECT_ATTRIBUTES),
        *_DRIFT,
    ]
)
"""The fine-tuning trainer's metrics (trainers/finetune/train.py): the flow trainer's, the
DreamBooth losses and subject metrics (trainers/subject_eval.py) and the prior's drift from
step 0."""

PREFERENCE_METRICS: frozenset[str] = frozenset(
    [
        *FLOW_METRICS,
        *_DRIFT,
        *(f"reward/{name}/{split}" for name in REWARD_NAMES for split in ("train", "heldout")),
        *("train/reward", "train/reward_std", "train/flow_loss", "train/refl_stop_t"),
        *("train/kl_mean", "train/clip_frac", "train/ratio_mean"),
        *("train/dpo_implicit_acc", "train/dpo_margin", "train/dpo_pairs", "train/pair_margin"),
        *(f"pairs/{k}" for k in ("read", "used", "rater_kind", "gold", "contestant", "tie")),
        *(f"pairs/{k}" for k in ("both_bad", "missing_image", "resolution")),
    ]
)
"""The preference trainer's metrics (trainers/preference/): the flow trainer's, each reward on
training and held-out prompts (``reward/<name>/<split>``), the domain metrics' drift from the
starting model, the methods' training values and DPO's arena pair counts."""

TRAINERS: dict[str, Trainer] = {
    "flow": Trainer(config=FlowConfig, module="trainers.flow", metrics=FLOW_METRICS),
    "distill": Trainer(config=DistillConfig, module="trainers.distill", metrics=DISTILL_METRICS),
    "finetune": Trainer(
        config=FinetuneConfig, module="trainers.finetune", metrics=FINETUNE_METRICS
    ),
    "preference": Trainer(
        config=PreferenceConfig, module="trainers.preference", metrics=PREFERENCE_METRICS
    ),
}
KNOWN_METRICS: frozenset[str] = frozenset().union(*(t.metrics for t in TRAINERS.values()))
