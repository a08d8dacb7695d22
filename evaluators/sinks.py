"""Where evaluators put what they measure: the interfaces, the row records, canonical JSON.

Evaluators (image-metric scores, judges) build plain rows and hand them to a sink; they hold
no SQL and do not import the harness. :class:`harness.store.Store` satisfies every protocol
here structurally (a test checks it), so callers pass a store; a test may pass anything that
has the methods.

A row's JSON-like fields (a score's ``provenance``, a judgment's ``result``) are Python
objects; the sink stores them as canonical JSON (:func:`to_json`) and hands them back decoded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal, NotRequired, Protocol, TypedDict, runtime_checkable

__all__ = [
    "JudgmentCache",
    "JudgmentMode",
    "JudgmentRow",
    "RecordError",
    "ScoreRow",
    "ScoreSink",
    "TargetKind",
    "decode_json",
    "to_json",
]

TargetKind = Literal["run", "contestant", "folder"]
"""What a score measures: a run's samples, a contestant's renders, an image folder."""
JudgmentMode = Literal["absolute", "pairwise"]
"""A judgment rates one image (``absolute``) or compares two (``pairwise``)."""


class RecordError(ValueError):
    """A record an evaluator built cannot be stored or compared (a value that is not JSON or
    not finite, scores measured differently, a score that is missing)."""


def to_json(obj: Any, what: str, error: type[Exception] = RecordError) -> str:
    """Canonical JSON text (sorted keys, no NaN: DuckDB's JSON type rejects it). ``error``
    (naming ``what``) when ``obj`` is not storable as JSON."""
    try:
        return json.dumps(obj, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise error(f"{what} is not storable as JSON: {err}") from None


def decode_json(rows: list[dict[str, Any]], column: str = "extra") -> list[dict[str, Any]]:
    """Decode a JSON column of query rows in place (JSON columns come back as text)."""
    for r in rows:
        r[column] = None if r[column] is None else json.loads(r[column])
    return rows


class ScoreRow(TypedDict):
    """One row of the ``scores`` table; ``provenance`` is a JSON-like dict."""

    score_id: str
    target: str
    target_kind: TargetKind
    metric: str
    value: float
    num_images: int
    provenance: dict[str, Any]
    provenance_hash: str
    time: float


class JudgmentRow(TypedDict):
    """One row of the ``judgments`` table; ``result`` is a JSON-like dict or None."""

    judgment_key: str
    judge: str
    model: str
    mode: JudgmentMode
    rubric_version: str
    prompt: str
    images: list[str]
    parsed: bool
    result: dict[str, Any] | None
    time: float
    raw: NotRequired[str | None]
    error: NotRequired[str | None]
    latency_s: NotRequired[float | None]


@runtime_checkable
class ScoreSink(Protocol):
    """Stores image-metric scores and reads them back."""

    def upsert_scores(self, rows: Sequence[ScoreRow]) -> int:
        """Store ``rows`` in one transaction (a known ``score_id`` gets the new value and
        time); returns how many rows were written."""
        ...

    def scores(
        self, targets: Sequence[str] | None = None, metric: str | None = None
    ) -> list[dict[str, Any]]:
        """Stored score rows (``provenance`` decoded), optionally of some targets and one
        metric, newest first."""
        ...


@runtime_checkable
class JudgmentCache(Protocol):
    """Stores judges' answers by key, so that nothing is asked twice."""

    def upsert_judgments(self, rows: Sequence[JudgmentRow], *, replace: bool = True) -> int:
        """Store ``rows`` in one transaction; a stored key is replaced if ``replace``, else
        kept. Returns how many rows were given."""
        ...

    def cached_judgments(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Stored judgments by key (``result`` decoded); keys not stored are absent."""
        ...

    def judgments(
        self,
        *,
        judge: str | None = None,
        model: str | None = None,
        mode: JudgmentMode | None = None,
    ) -> list[dict[str, Any]]:
        """Stored judgments in time order, optionally of one judge / model / mode."""
        ...
