"""The ``judgments`` table: every answer of an MLLM or the domain judge, keyed so that nothing
is asked twice. The rows are built by the judges (:mod:`evaluators.mllm_judge`,
:mod:`evaluators.domain_judge`); this is where they are written and read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evaluators.sinks import JudgmentMode, JudgmentRow, decode_json
from harness.store.core import StoreCore, _json

_JUDGMENT_COLUMNS = (
    "judgment_key", "judge", "model", "mode", "rubric_version", "prompt", "images", "parsed",
    "result", "raw", "error", "latency_s", "time",
)  # fmt: skip
_JUDGMENTS_INSERT = f"""
INSERT INTO judgments ({", ".join(_JUDGMENT_COLUMNS)})
SELECT {", ".join(["unnest(?)"] * len(_JUDGMENT_COLUMNS))}
"""
_REPLACE = "ON CONFLICT DO UPDATE SET " + ", ".join(
    f"{c} = excluded.{c}" for c in _JUDGMENT_COLUMNS[1:]
)
_KEEP = "ON CONFLICT DO NOTHING"


class JudgmentTable(StoreCore):
    """The judges' answers (:class:`evaluators.sinks.JudgmentCache`)."""

    def upsert_judgments(self, rows: Sequence[JudgmentRow], *, replace: bool = True) -> int:
        """Store judgment rows in one transaction, one statement over list parameters. A key
        already stored gets the new row if ``replace``, else keeps its row. ``raw``, ``error``
        and ``latency_s`` may be left out (NULL). Returns how many rows were given."""
        if not rows:
            return 0
        columns: list[list[Any]] = [[] for _ in _JUDGMENT_COLUMNS]
        for row in rows:
            for values, name in zip(columns, _JUDGMENT_COLUMNS, strict=True):
                value = row.get(name)
                if name == "result" and value is not None:
                    value = _json(value, "judgment result")
                values.append(value)
        with self.transaction() as con:
            con.execute(_JUDGMENTS_INSERT + (_REPLACE if replace else _KEEP), columns)
        return len(rows)

    def cached_judgments(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Stored judgments by key (``result`` decoded); keys not stored are absent."""
        if not keys:
            return {}
        rows = self.query(
            "SELECT * FROM judgments WHERE judgment_key IN (SELECT unnest(?))", [list(keys)]
        )
        return {r["judgment_key"]: r for r in decode_json(rows, "result")}

    def judgments(
        self,
        *,
        judge: str | None = None,
        model: str | None = None,
        mode: JudgmentMode | None = None,
    ) -> list[dict[str, Any]]:
        """Stored judgments in time order, optionally of one judge / model / mode."""
        where, params = [], []
        for column, value in (("judge", judge), ("model", model), ("mode", mode)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = "SELECT * FROM judgments" + (f" WHERE {' AND '.join(where)}" if where else "")
        return decode_json(self.query(sql + " ORDER BY time, judgment_key", params), "result")
