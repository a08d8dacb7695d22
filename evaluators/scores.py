"""Image-metric scores in the store's ``scores`` table (schema v3), with their provenance.

A score is one number (``fid``, ``kid``, ``cmmd``, ``clip_score``, ...) of one image set (a run's
samples, a contestant's renders, a folder) together with *how* it was measured: the extractor
and its weights hash, resolution and resize mode, the reference set and its features hash, the
number of images, and the sampler, steps, guidance and seeds of the images. Two scores are
comparable only if that provenance is identical, so:

* ``provenance_hash`` = sha256 of the canonical JSON of the provenance (sorted keys);
* ``score_id`` = sha256 of (target, metric, provenance_hash): measuring the same thing the same
  way again replaces the stored value (and its time) instead of adding a row; measuring it
  differently adds a row;
* :func:`compare_scores` **refuses** (:class:`ProvenanceMismatchError`, naming the provenance
  fields that differ) to return scores of different provenance for one comparison, and
  :func:`scores_by_provenance` returns them **grouped** by provenance for a caller that wants to
  show every group side by side, never mixed.

The functions take a :class:`~evaluators.sinks.ScoreSink` (:class:`harness.store.Store` is one):
the rows are built here, the SQL is the store's.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

from evaluators.sinks import RecordError, ScoreRow, ScoreSink, TargetKind, to_json

__all__ = [
    "TARGET_KINDS",
    "ProvenanceMismatchError",
    "RecordError",
    "Score",
    "compare_scores",
    "provenance_hash",
    "put_scores",
    "read_scores",
    "score_id",
    "scores_by_provenance",
]

TARGET_KINDS: tuple[str, ...] = get_args(TargetKind)


class ProvenanceMismatchError(RecordError):
    """Scores measured differently were asked to be compared."""


def provenance_hash(provenance: dict[str, Any]) -> str:
    """16 hex digits of sha256 over the canonical JSON of ``provenance``."""
    return hashlib.sha256(to_json(provenance, "provenance").encode()).hexdigest()[:16]


def score_id(target: str, metric: str, prov_hash: str) -> str:
    """16 hex digits of sha256 over (target, metric, provenance hash)."""
    return hashlib.sha256(json.dumps([target, metric, prov_hash]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Score:
    """One metric value of one image set, with how it was measured."""

    target: str
    target_kind: TargetKind
    metric: str
    value: float
    num_images: int
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target_kind not in TARGET_KINDS:
            raise RecordError(
                f"target_kind must be one of {', '.join(TARGET_KINDS)}, got {self.target_kind!r}"
            )
        if not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise RecordError(f"score {self.metric} of {self.target} is not a finite number")

    @property
    def provenance_hash(self) -> str:
        return provenance_hash(self.provenance)

    @property
    def score_id(self) -> str:
        return score_id(self.target, self.metric, self.provenance_hash)

    def row(self, now: float) -> ScoreRow:
        """The ``scores`` row of this score, measured at ``now``."""
        return ScoreRow(
            score_id=self.score_id,
            target=self.target,
            target_kind=self.target_kind,
            metric=self.metric,
            value=float(self.value),
            num_images=int(self.num_images),
            provenance=self.provenance,
            provenance_hash=self.provenance_hash,
            time=now,
        )


def put_scores(sink: ScoreSink, scores: Iterable[Score], *, now: float | None = None) -> int:
    """Store ``scores`` in one transaction (re-measured ones replace their value); returns how
    many rows were written."""
    stamp = time.time() if now is None else now
    return sink.upsert_scores([s.row(stamp) for s in scores])


def read_scores(
    sink: ScoreSink, targets: Sequence[str] | None = None, metric: str | None = None
) -> list[dict[str, Any]]:
    """Stored score rows (``provenance`` decoded), optionally of some targets and one metric,
    newest first."""
    return sink.scores(targets, metric)


def scores_by_provenance(
    sink: ScoreSink, targets: Sequence[str], metric: str
) -> list[dict[str, Any]]:
    """The scores of ``targets`` for ``metric``, **grouped** by provenance (never mixed).

    Returns one group per provenance hash, largest group first:
    ``{"provenance_hash", "provenance", "scores": {target: value}}``. A target measured more than
    once with the same provenance has one row (``score_id`` makes it so).
    """
    groups: dict[str, dict[str, Any]] = {}
    for row in read_scores(sink, targets, metric):
        g = groups.setdefault(
            row["provenance_hash"],
            {
                "provenance_hash": row["provenance_hash"],
                "provenance": row["provenance"],
                "scores": {},
            },
        )
        g["scores"].setdefault(row["target"], row["value"])
    return sorted(groups.values(), key=lambda g: (-len(g["scores"]), g["provenance_hash"]))


def compare_scores(sink: ScoreSink, targets: Sequence[str], metric: str) -> dict[str, float]:
    """``{target: value}`` of ``metric`` for every target, all with one provenance.

    **Refuses** with :class:`ProvenanceMismatchError` when the targets' scores were measured
    differently (the message names the provenance fields that differ), and with
    :class:`~evaluators.sinks.RecordError` when a target has no score for ``metric``. A target
    measured in several ways is fine as long as exactly one provenance is shared by all targets
    (that one is used).
    """
    if not targets:
        raise RecordError("compare_scores needs at least one target")
    groups = scores_by_provenance(sink, targets, metric)
    missing = [t for t in targets if not any(t in g["scores"] for g in groups)]
    if missing:
        raise RecordError(
            f"no {metric} score stored for {', '.join(missing)}; run `harness eval TARGET "
            f"--metrics {metric}` first"
        )
    common = [g for g in groups if all(t in g["scores"] for t in targets)]
    if len(common) == 1:
        return {t: common[0]["scores"][t] for t in targets}
    if len(common) > 1:
        raise ProvenanceMismatchError(
            f"{metric}: the targets share {len(common)} provenances "
            f"({', '.join(g['provenance_hash'] for g in common)}); use scores_by_provenance "
            "and pick one"
        )
    by_target = {t: next(g for g in groups if t in g["scores"]) for t in targets}
    first_t = targets[0]
    lines = []
    for t in targets[1:]:
        a, b = by_target[first_t]["provenance"], by_target[t]["provenance"]
        diff = _diff(a, b)
        if diff:
            shown = "; ".join(f"{p}: {_get(a, p)!r} vs {_get(b, p)!r}" for p in diff[:5])
            lines.append(f"  {first_t} vs {t}: {shown}")
    raise ProvenanceMismatchError(
        f"refusing to compare {metric} scores measured differently:\n"
        + "\n".join(lines)
        + "\nre-evaluate the targets with the same extractor, reference, image count and "
        "sampler settings (harness eval), or compare within one provenance group "
        "(scores_by_provenance)"
    )


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            here = f"{prefix}.{key}" if prefix else str(key)
            out.extend(_diff(a.get(key), b.get(key), here) if key in a and key in b else [here])
        return out
    return [] if a == b else [prefix or "<root>"]


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return "<absent>"
        obj = obj[part]
    if isinstance(obj, (list, dict)) and len(json.dumps(obj)) > 60:
        return json.dumps(obj)[:57] + "..."
    return obj
