"""The arena's storage side: import pairwise votes from JSONL and compute the leaderboard.

Votes come from anywhere (a rating session, an MLLM judge, the domain judge, another team's
export) as JSONL, one vote per line::

    {"prompt": "a red circle", "seed": 7, "left": "tsl@euler-8", "right": "unif@euler-8",
     "winner": "left", "rater": "ana", "rater_kind": "human", "time": "2026-11-22T10:15:00Z",
     "left_image": "runs/tsl/0/samples/a.png", "right_image": "sha256:9f2c...", "session": "s1"}

:func:`import_comparisons` validates the whole file first and stores it in one transaction
(:meth:`Store.add_comparisons`): a bad line names ``file:line`` and nothing of the file is
stored; a vote already stored is not stored twice. :func:`leaderboard` fits Bradley-Terry
ratings with bootstrap intervals over the stored votes (:mod:`evaluators.ratings`), for one
rater kind or all of them, with online Elo beside it as the order-dependent secondary view.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from harness.store import (
    OUTCOMES,
    RATER_KINDS,
    ComparisonsAdded,
    RaterKind,
    Store,
    StoreError,
    check_rater_kind,
)
from trainers.names import did_you_mean

# JSONL key -> (comparisons column, types, required). Documented in README.md ("Arena").
_LINE_FIELDS: dict[str, tuple[str, tuple[type, ...], bool]] = {
    "prompt": ("prompt", (str,), True),
    "seed": ("seed", (int,), True),
    "left": ("left_id", (str,), True),
    "right": ("right_id", (str,), True),
    "winner": ("outcome", (str,), True),
    "rater": ("rater_id", (str,), True),
    "rater_kind": ("rater_kind", (str,), False),
    "time": ("time", (int, float, str), True),
    "left_image": ("left_image", (str,), False),
    "right_image": ("right_image", (str,), False),
    "session": ("session", (str,), False),
    "extra": ("extra", (dict,), False),
}
# Longest accepted text per JSONL key (characters): a pasted document or a runaway generator in
# an id would otherwise land in every leaderboard row and app page. Documented in
# `harness arena import --help`.
MAX_ID_CHARS = 200
MAX_PROMPT_CHARS = 2000
MAX_PATH_CHARS = 1000
MAX_CHARS: dict[str, int] = {
    "prompt": MAX_PROMPT_CHARS,
    "left": MAX_ID_CHARS,
    "right": MAX_ID_CHARS,
    "rater": MAX_ID_CHARS,
    "session": MAX_ID_CHARS,
    "left_image": MAX_PATH_CHARS,
    "right_image": MAX_PATH_CHARS,
}
DEFAULT_RATER_KIND: RaterKind = "human"
# Gold votes (the rating app's attention checks: a pair with a known answer, flagged
# {"gold": true} in comparisons.extra) measure a rater's reliability and never count for ratings.
NOT_GOLD = "coalesce(extra->>'$.gold', 'false') <> 'true'"
# Epoch seconds past this (the year 5138) are almost surely milliseconds.
_MAX_EPOCH_S = 1e11
_MAX_ERRORS_SHOWN = 10


class ComparisonFileError(StoreError, ValueError):
    """A comparisons JSONL file has malformed lines; nothing of it was stored."""


def import_comparisons(
    store: Store, path: str | Path, *, add_contestants: bool = False
) -> ComparisonsAdded:
    """Store the votes of a JSONL file (format: module docstring and README), all or nothing.

    Every line is checked before the store is touched; malformed lines raise
    :class:`ComparisonFileError` listing each as ``file:line: problem``. Then the votes go to
    :meth:`Store.add_comparisons` in one transaction, which refuses unknown contestants
    (unless ``add_contestants``: then they are registered with only their id), a rater seen
    before with another kind, and a vote stored before with another outcome, again naming
    ``file:line``. Blank lines are skipped. Returns how many votes were new and how many were
    already stored.
    """
    rows, labels = read_comparisons(path)
    return store.add_comparisons(rows, add_contestants=add_contestants, labels=labels)


def read_comparisons(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The file's votes as :meth:`Store.add_comparisons` rows, and a ``file:line`` label for
    each. Raises :class:`ComparisonFileError` listing every malformed line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ComparisonFileError(f"cannot read comparisons file {path}: {err}") from None
    rows, labels, errors = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            rows.append(_parse_line(line))
            labels.append(where)
        except ValueError as err:
            errors.append(f"{where}: {err}")
    if errors:
        shown = errors[:_MAX_ERRORS_SHOWN]
        more = len(errors) - len(shown)
        raise ComparisonFileError(
            f"{path}: {len(errors)} malformed line(s); nothing was imported:\n  "
            + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else "")
        )
    return rows, labels


def _parse_line(line: str) -> dict[str, Any]:
    """One JSONL line -> a comparisons row; ValueError says what is wrong."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    unknown = [k for k in rec if k not in _LINE_FIELDS]
    if unknown:
        k = unknown[0]
        raise ValueError(
            f"unknown key {k!r}{did_you_mean(k, _LINE_FIELDS)}; allowed: {', '.join(_LINE_FIELDS)}"
        )
    row: dict[str, Any] = {}
    for key, (column, kinds, required) in _LINE_FIELDS.items():
        value = rec.get(key)
        if value is None:
            if required:
                raise ValueError(f"missing {key!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, kinds):
            names = " or ".join("a string" if k is str else k.__name__ for k in kinds)
            raise ValueError(f"{key!r} must be {names}, got {value!r}")
        if isinstance(value, str) and len(value) > MAX_CHARS.get(key, len(value)):
            raise ValueError(
                f"{key!r} is {len(value)} characters long, more than the {MAX_CHARS[key]} "
                f"allowed ({value[:40]!r}...)"
            )
        row[column] = value
    if row["outcome"] not in OUTCOMES:
        raise ValueError(
            f"'winner' {row['outcome']!r} is not one of {', '.join(OUTCOMES)}"
            f"{did_you_mean(row['outcome'], OUTCOMES)}"
        )
    kind = row.setdefault("rater_kind", DEFAULT_RATER_KIND)
    if kind not in RATER_KINDS:
        raise ValueError(
            f"'rater_kind' {kind!r} is not one of {', '.join(RATER_KINDS)}"
            f"{did_you_mean(kind, RATER_KINDS)}"
        )
    for key, column in (("left", "left_id"), ("right", "right_id"), ("rater", "rater_id")):
        if row[column] == "":
            raise ValueError(f"{key!r} is empty")
    if row["left_id"] == row["right_id"]:
        raise ValueError(f"'left' and 'right' are the same contestant {row['left_id']!r}")
    row["time"] = parse_time(row["time"])
    return row


def parse_time(value: int | float | str) -> float:
    """Epoch seconds from epoch seconds or an ISO 8601 time with a UTC offset.

    A time without an offset is refused rather than guessed (local time or UTC?), and so is an
    epoch value too large for seconds (milliseconds are the usual mistake)."""
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"'time' {value!r} is not ISO 8601 (e.g. 2026-11-22T10:15:00Z) nor epoch seconds"
            ) from None
        if when.tzinfo is None:
            raise ValueError(
                f"'time' {value!r} has no UTC offset; add one (e.g. {value}Z or {value}+01:00)"
            )
        return when.timestamp()
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"'time' must be finite, got {value!r}")
    if abs(seconds) > _MAX_EPOCH_S:
        raise ValueError(
            f"'time' {value!r} is not epoch seconds (that is past the year 5000; milliseconds?)"
        )
    return seconds


def leaderboard(
    store: Store,
    rater_kind: RaterKind | None = None,
    rounds: int = 1000,
    seed: int = 0,
    *,
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """The arena leaderboard over the stored votes, best first.

    ``rater_kind``: only votes by raters of that kind ("human", "judge", "domain"); None
    combines all. Ratings are the Bradley-Terry fit (ties and both_bad count half to each side;
    Arena scale, mean 1000) with ``confidence`` bootstrap percentile intervals over ``rounds``
    resamples seeded by ``seed``; ``rank`` is Chatbot Arena's rank with intervals (1 + the number
    of contestants ahead beyond doubt, so overlapping ones share a rank). ``elo`` is online Elo
    (k=32) over the votes in time order. Only contestants with at least one vote appear. Gold
    votes (``extra.gold``: the rating app's attention checks) are left out.

    Robustness, beside each row: ``provisional`` is true for contestants with fewer than
    :data:`evaluators.ratings.PROVISIONAL_BATTLES` (20) battles; their interval is widened to
    at least the ridge fit's Laplace interval (:func:`evaluators.ratings.laplace_intervals`),
    because the bootstrap of a handful of votes only repeats them (one vote: a zero-width
    interval), and ``rank`` uses the widened intervals. ``top_flip_votes`` (the same in every
    row: it is the board's) is how many votes must be removed before the leader is no longer
    alone on top, found greedily (:func:`evaluators.ratings.top_flip`: an upper bound, the true
    minimum is at most this), None when not reached within ``top_flip_cap`` removals.

    Returns rows of ``contestant, label, rating, lower, upper, rank, battles, elo,
    provisional, top_flip_votes, top_flip_cap``; an empty list when there are no votes.
    """
    sql, params = f"SELECT left_id, right_id, outcome FROM comparisons WHERE {NOT_GOLD}", []
    if rater_kind is not None:
        sql += " AND rater_kind = ?"
        params.append(check_rater_kind(rater_kind))
    with store.read() as con:
        battles = con.execute(sql + " ORDER BY time, comparison_id", params).fetchall()
        labels = dict(con.execute("SELECT contestant_id, label FROM contestants").fetchall())
    return rate_battles(battles, labels, rounds, seed, confidence=confidence)


def rating_intervals(
    counts: Any, *, rounds: int = 1000, seed: int = 0, confidence: float = 0.95
) -> tuple[Any, Any, Any, Any]:
    """(bootstrap ratings, lower, upper, provisional) of aggregated battles: the bootstrap
    interval, widened for provisional contestants (fewer than
    :data:`evaluators.ratings.PROVISIONAL_BATTLES`) to at least the ridge fit's Laplace
    interval, since the bootstrap of a handful of votes only repeats them (one vote: a point).
    The leaderboard and the judge's ``--until-width`` both read intervals from here."""
    import numpy as np

    from evaluators.ratings import PROVISIONAL_BATTLES, bootstrap_ratings, laplace_intervals

    ratings = bootstrap_ratings(counts, rounds=rounds, confidence=confidence, seed=seed)
    provisional = counts.battles.sum(axis=1) < PROVISIONAL_BATTLES
    lap_lower, lap_upper = laplace_intervals(counts, confidence=confidence)
    lower = np.where(provisional, np.minimum(ratings.lower, lap_lower), ratings.lower)
    upper = np.where(provisional, np.maximum(ratings.upper, lap_upper), ratings.upper)
    return ratings, lower, upper, provisional


def rate_battles(
    battles: list[tuple[str, str, str]],
    labels: dict[str, str | None],
    rounds: int = 1000,
    seed: int = 0,
    *,
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """Leaderboard rows (see :func:`leaderboard`) from ``(left, right, outcome)`` battles in
    time order; the arena app calls it with battles filtered by judge, category or study."""
    import numpy as np

    from evaluators.ratings import aggregate, online_elo, rank_with_intervals, top_flip

    if not battles:
        return []
    counts = aggregate(battles)
    ratings, lower, upper, provisional = rating_intervals(
        counts, rounds=rounds, seed=seed, confidence=confidence
    )
    elo = online_elo(battles)
    played = counts.battles.sum(axis=1)
    rank = rank_with_intervals(lower, upper)
    flip = top_flip(counts)
    order = [int(k) for k in np.argsort(-ratings.rating, kind="stable")]
    return [
        {
            "contestant": counts.names[k],
            "label": labels.get(counts.names[k]),
            "rating": float(ratings.rating[k]),
            "lower": float(lower[k]),
            "upper": float(upper[k]),
            "rank": int(rank[k]),
            "battles": int(played[k]),
            "elo": elo[counts.names[k]],
            "provisional": bool(provisional[k]),
            "top_flip_votes": flip.votes,
            "top_flip_cap": flip.cap,
        }
        for k in order
    ]
