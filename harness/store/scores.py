"""The ``scores`` table: image-metric values with their provenance. The rows are built by
:mod:`evaluators.scores`; this is where they are written and read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evaluators.sinks import ScoreRow, decode_json
from harness.store.core import StoreCore, _json

_SCORE_COLUMNS = (
    "score_id", "target", "target_kind", "metric", "value", "num_images", "provenance",
    "provenance_hash", "time",
)  # fmt: skip
_SCORES_UPSERT = f"""
INSERT INTO scores ({", ".join(_SCORE_COLUMNS)})
VALUES ({", ".join(["?"] * len(_SCORE_COLUMNS))})
ON CONFLICT (score_id) DO UPDATE SET value = excluded.value, num_images = excluded.num_images,
    time = excluded.time
"""


class ScoreTable(StoreCore):
    """The store's image-metric scores (:class:`evaluators.sinks.ScoreSink`)."""

    def upsert_scores(self, rows: Sequence[ScoreRow]) -> int:
        """Store score rows in one transaction: a known ``score_id`` (the same target, metric
        and provenance) gets the new value, image count and time. Returns how many rows were
        written."""
        values = [
            [
                r["score_id"],
                r["target"],
                r["target_kind"],
                r["metric"],
                float(r["value"]),
                int(r["num_images"]),
                _json(r["provenance"], f"provenance of {r['metric']}"),
                r["provenance_hash"],
                float(r["time"]),
            ]
            for r in rows
        ]
        if values:
            with self.transaction() as con:
                con.executemany(_SCORES_UPSERT, values)
        return len(values)

    def scores(
        self, targets: Sequence[str] | None = None, metric: str | None = None
    ) -> list[dict[str, Any]]:
        """Stored score rows (``provenance`` decoded), optionally of some targets and one
        metric, newest first."""
        sql, params = "SELECT * FROM scores WHERE true", []
        if targets is not None:
            sql += " AND target IN (SELECT unnest(?))"
            params.append(list(targets))
        if metric is not None:
            sql += " AND metric = ?"
            params.append(metric)
        return decode_json(self.query(sql + " ORDER BY time DESC, score_id", params), "provenance")
