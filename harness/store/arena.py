"""The arena's tables: contestants, raters (with human raters' token hashes), pairwise
comparisons and the paired renders they compare."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

from evaluators.sinks import decode_json
from harness.store.core import (
    _INT,
    _NUM,
    _STR,
    StoreCore,
    StoreError,
    _check_type,
    _fetch_in,
    _float,
    _json,
    _nonempty,
    _require,
    _scalar,
)
from harness.store.schema import OUTCOMES, RATER_KINDS, RaterKind
from trainers.names import did_you_mean


@dataclass(frozen=True)
class ComparisonsAdded:
    """What :meth:`Store.add_comparisons` did: rows given, votes newly stored, votes that were
    already stored (or repeated within the rows), and contestants and raters it registered."""

    rows: int
    inserted: int
    already_present: int
    contestants_added: int = 0
    raters_added: int = 0


class RaterError(StoreError, ValueError):
    """A rater could not be added: bad name, taken by a non-human rater, already has a token."""


class ArenaTables(StoreCore):
    """The store's contestants, raters, comparisons and renders."""

    # -- the arena: contestants, raters, comparisons -------------------------------------------
    def add_contestant(
        self,
        contestant_id: str,
        *,
        run_id: str | None = None,
        label: str | None = None,
        solver: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        shift: float | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Register a contestant: a trained model (``run_id``, a registered run) at a sampler
        setting (``solver``, ``steps``, ``guidance``, ``shift``), or an external image set
        (``run_id`` None). Returns True if created, False if it existed.

        Registering again fills in fields that are still NULL (a contestant added by an import
        with only its id can get its details later); a field that is set to a different value
        is an error naming it: a contestant's definition never changes, use a new id.
        """
        where = f"contestant {contestant_id!r}"
        _require(
            _nonempty(contestant_id),
            f"contestant id must be a non-empty string, got {contestant_id!r}",
        )
        fields = {
            "run_id": run_id,
            "label": label,
            "solver": solver,
            "steps": steps,
            "guidance": guidance,
            "shift": shift,
        }
        for key, kinds in _CONTESTANT_FIELDS.items():
            _check_type(fields[key], kinds, f"{where}: {key!r}")
        _require(steps is None or steps >= 1, f"{where}: 'steps' must be >= 1, got {steps}")
        for key in ("guidance", "shift"):
            fields[key] = _float(fields[key])
            _require(
                fields[key] is None or math.isfinite(fields[key]),
                f"{where}: {key!r} must be finite, got {fields[key]}",
            )
        fields["extra"] = None if extra is None else _json(dict(extra), f"{where} extra")
        with self.transaction() as con:
            if run_id is not None:
                known = con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone()
                _require(
                    known is not None,
                    f"{where}: run {run_id!r} is not registered in "
                    f"{self.path}: register_run first (or leave run_id None for an "
                    "external image set)",
                )
            return self._upsert_entity(
                con, "contestants", "contestant_id", contestant_id, fields, where
            )

    def add_rater(
        self,
        rater_id: str,
        kind: RaterKind,
        *,
        name: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> bool:
        """Register who judges: a person (``"human"``), an MLLM judge (``"judge"``) or the
        domain judge (``"domain"``). Returns True if created, False if it existed; like
        :meth:`add_contestant`, NULL fields are filled in and a different value is an error
        (a rater's kind never changes). :meth:`add_comparisons` registers unknown raters."""
        where = f"rater {rater_id!r}"
        _require(_nonempty(rater_id), f"rater id must be a non-empty string, got {rater_id!r}")
        kind = check_rater_kind(kind, f"{where}: kind")
        _check_type(name, _STR, f"{where}: 'name'")
        fields = {
            "kind": kind,
            "name": name,
            "extra": None if extra is None else _json(dict(extra), f"{where} extra"),
        }
        with self.transaction() as con:
            return self._upsert_entity(con, "raters", "rater_id", rater_id, fields, where)

    def add_rater_token(
        self, rater_id: str, token_hash: str, *, name: str, rotate: bool = False
    ) -> bool:
        """Give the human rater ``rater_id`` the salted hash of a voting token, registering the
        rater (called ``name``) if new; True if registered now. An id taken by a rater of
        another kind, or a rater who has a token already while ``rotate`` is False, is a
        :class:`RaterError` and nothing changes. The token itself is never stored."""
        with self.transaction() as con:
            row = con.execute(
                "SELECT kind, token_hash FROM raters WHERE rater_id = ?", [rater_id]
            ).fetchone()
            if row is None:
                con.execute(
                    "INSERT INTO raters (rater_id, kind, name, created_at, token_hash) "
                    "VALUES (?, 'human', ?, ?, ?)",
                    [rater_id, name, time.time(), token_hash],
                )
                return True
            kind, stored = row
            if kind != "human":
                raise RaterError(
                    f"rater id {rater_id!r} is taken by a {kind} rater in {self.path}; "
                    "choose another name"
                )
            if stored is not None and not rotate:
                raise RaterError(
                    f"rater {rater_id!r} already has a voting link; pass --new-token to issue a "
                    "new one (the old link then stops working)"
                )
            con.execute(
                "UPDATE raters SET token_hash = ? WHERE rater_id = ?", [token_hash, rater_id]
            )
        return False

    def _upsert_entity(
        self,
        con: duckdb.DuckDBPyConnection,
        table: str,
        key: str,
        value: str,
        fields: dict[str, Any],
        where: str,
    ) -> bool:
        """Insert a contestant or rater row, or fill in its NULL fields; refuse changes."""
        names = list(fields)
        row = con.execute(
            f"SELECT {', '.join(names)} FROM {table} WHERE {key} = ?", [value]
        ).fetchone()
        if row is None:
            con.execute(
                f"INSERT INTO {table} ({key}, {', '.join(names)}, created_at) "
                f"VALUES ({', '.join(['?'] * (len(names) + 2))})",
                [value, *fields.values(), time.time()],
            )
            return True
        stored = dict(zip(names, row, strict=True))
        if "extra" in stored and stored["extra"] is not None:
            stored["extra"] = _json(json.loads(stored["extra"]), where)  # canonical text
        differ = [
            f"{k}: stored {stored[k]!r}, given {v!r}"
            for k, v in fields.items()
            if v is not None and stored[k] is not None and stored[k] != v
        ]
        _require(
            not differ,
            f"{where} is already registered in {self.path} with different "
            f"values ({'; '.join(differ)}); its definition never changes: use a new id",
        )
        fill = {k: v for k, v in fields.items() if v is not None and stored[k] is None}
        if fill:
            con.execute(
                f"UPDATE {table} SET {', '.join(f'{k} = ?' for k in fill)} WHERE {key} = ?",
                [*fill.values(), value],
            )
        return False

    def add_comparisons(
        self,
        rows: Iterable[Mapping[str, Any]],
        *,
        add_contestants: bool = False,
        labels: Sequence[str] | None = None,
    ) -> ComparisonsAdded:
        """Store pairwise votes, all or nothing, in one transaction; idempotent.

        Each row is a mapping with the ``comparisons`` columns: ``prompt`` (str), ``seed``
        (int), ``left_id`` and ``right_id`` (registered contestants, not equal), ``outcome``
        (one of :data:`OUTCOMES`), ``rater_id``, ``rater_kind`` (one of :data:`RATER_KINDS`),
        ``time`` (epoch seconds), and optionally ``left_image``, ``right_image`` (a path or a
        hash), ``session`` (str) and ``extra`` (a JSON object). ``comparison_id`` may be given
        (a row read back from :meth:`comparisons`) but must then equal the content hash.

        The same vote (prompt, seed, left, right, rater and time) given again, in this call or
        an earlier one, is stored once; given again with another outcome it is an error.
        Unknown raters are registered with their kind; a rater stored with another kind is an
        error. Unknown contestants are an error unless ``add_contestants`` (then they are
        registered with only their id). Every error is a :class:`StoreError` naming the row
        (``rows[i]``, or ``labels[i]`` such as ``votes.jsonl:12``) and the field, and nothing
        of the call is stored.
        """
        rows = list(rows)
        where = list(labels) if labels is not None else [f"rows[{i}]" for i in range(len(rows))]
        _require(len(where) == len(rows), f"got {len(where)} labels for {len(rows)} rows")
        votes = [_comparison_row(row, w) for row, w in zip(rows, where, strict=True)]
        if not votes:
            return ComparisonsAdded(0, 0, 0)
        # The first row of each distinct vote and of each rater: later rows must agree with it.
        unique: dict[str, tuple[dict[str, Any], str]] = {}
        raters: dict[str, tuple[dict[str, Any], str]] = {}
        for vote, w in zip(votes, where, strict=True):
            first, at = unique.setdefault(vote["comparison_id"], (vote, w))
            _same_outcome(first["outcome"], vote, w, f"by {at}")
            first, at = raters.setdefault(vote["rater_id"], (vote, w))
            _same_kind(first["rater_kind"], vote, w, f"by {at}")
        with self.transaction() as con:
            missing = self._missing_contestants(con, votes, where, add_contestants)
            stored_kinds = dict(_fetch_in(con, "rater_id, kind", "raters", "rater_id", raters))
            for rater, kind in stored_kinds.items():
                _same_kind(kind, *raters[rater], f"in {self.path}")
            stored = dict(
                _fetch_in(con, "comparison_id, outcome", "comparisons", "comparison_id", unique)
            )
            for cid, outcome in stored.items():
                _same_outcome(outcome, *unique[cid], f"in {self.path}")
            new = [vote for cid, (vote, _) in unique.items() if cid not in stored]
            new_raters = [
                (r, v["rater_kind"]) for r, (v, _) in raters.items() if r not in stored_kinds
            ]
            _insert_arena_rows(con, missing, new_raters, new)
        return ComparisonsAdded(
            len(votes), len(new), len(votes) - len(new), len(missing), len(new_raters)
        )

    def _missing_contestants(
        self,
        con: duckdb.DuckDBPyConnection,
        votes: list[dict[str, Any]],
        where: list[str],
        add: bool,
    ) -> list[str]:
        """Contestant ids the votes name that are not registered (sorted); an error unless
        ``add``, naming the first row and side that names one."""
        named = {v[side] for v in votes for side in ("left_id", "right_id")}
        known = {
            r[0] for r in _fetch_in(con, "contestant_id", "contestants", "contestant_id", named)
        }
        missing = sorted(named - known)
        if missing and not add:
            vote, at, side = next(
                (v, w, side)
                for v, w in zip(votes, where, strict=True)
                for side in ("left_id", "right_id")
                if v[side] not in known
            )
            everyone = [
                r[0] for r in con.execute("SELECT contestant_id FROM contestants").fetchall()
            ]
            name = vote[side]
            raise StoreError(
                f"{at}: field {side!r}: unknown contestant {name!r}"
                f"{did_you_mean(name, everyone)} ({len(missing)} unknown in all: "
                f"{', '.join(map(repr, missing[:5]))}{', ...' if len(missing) > 5 else ''}); "
                "register contestants first (Store.add_contestant), or let the import register "
                "them with only an id (add_contestants=True, `harness arena import "
                "--add-contestants`). Nothing was stored"
            )
        return missing

    def contestants(self) -> list[dict[str, Any]]:
        """Every contestant ordered by id, with ``extra`` decoded from JSON."""
        return decode_json(self.query("SELECT * FROM contestants ORDER BY contestant_id"))

    def raters(self) -> list[dict[str, Any]]:
        """Every rater ordered by id, with ``extra`` decoded from JSON."""
        return decode_json(self.query("SELECT * FROM raters ORDER BY rater_id"))

    def comparisons(self, rater_kind: RaterKind | None = None) -> list[dict[str, Any]]:
        """The stored votes in time order (ties by ``comparison_id``), only those of raters of
        ``rater_kind`` if given; the ``comparisons`` columns with ``extra`` decoded."""
        sql, params = "SELECT * FROM comparisons", []
        if rater_kind is not None:
            sql += " WHERE rater_kind = ?"
            params.append(check_rater_kind(rater_kind))
        return decode_json(self.query(sql + " ORDER BY time, comparison_id", params))

    def delete_comparison(self, comparison_id: str, *, rater_id: str, session: str) -> bool:
        """Delete the vote ``comparison_id`` if ``rater_id`` cast it in ``session``; False if
        there is no such vote (a rater undoes only their own votes of one session)."""
        with self.transaction() as con:
            gone = con.execute(
                "DELETE FROM comparisons WHERE comparison_id = ? AND rater_id = ? "
                "AND session = ? RETURNING comparison_id",
                [comparison_id, rater_id, session],
            ).fetchall()
        return bool(gone)

    def add_renders(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Register rendered images in one transaction. Each row is a mapping with the
        ``renders`` columns ``contestant_id``, ``prompt_id``, ``prompt``, ``seed``, ``path``,
        ``sha256`` and optionally ``category``, ``extra`` (a JSON object) and ``time`` (default:
        now). A (contestant, prompt id, seed) already registered keeps its row. Returns how many
        rows were new."""
        now = time.time()
        values = []
        for i, row in enumerate(rows):
            where = f"renders rows[{i}]"
            unknown = sorted(set(row) - set(_RENDER_COLUMNS))
            _require(not unknown, f"{where}: unknown field(s) {', '.join(unknown)}")
            missing = [c for c in _RENDER_REQUIRED if row.get(c) is None]
            _require(not missing, f"{where}: missing field(s) {', '.join(missing)}")
            extra = row.get("extra")
            values.append(
                {
                    **{c: row.get(c) for c in _RENDER_COLUMNS},
                    "extra": None if extra is None else _json(extra, f"{where}: field 'extra'"),
                    "time": now if row.get("time") is None else float(row["time"]),
                }
            )
        if not values:
            return 0
        with self.transaction() as con:
            before = _scalar(con, "SELECT count(*) FROM renders", [])
            con.execute(_RENDERS_INSERT, [[v[c] for v in values] for c in _RENDER_COLUMNS])
            return _scalar(con, "SELECT count(*) FROM renders", []) - before


# -- arena helpers -------------------------------------------------------------------------------
_CONTESTANT_FIELDS: dict[str, tuple[type, ...]] = {
    "run_id": _STR,
    "label": _STR,
    "solver": _STR,
    "steps": _INT,
    "guidance": _NUM,
    "shift": _NUM,
}
# Keys a comparison row may have: (types, required).
_COMPARISON_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "prompt": (_STR, True),
    "seed": (_INT, True),
    "left_id": (_STR, True),
    "right_id": (_STR, True),
    "outcome": (_STR, True),
    "rater_id": (_STR, True),
    "rater_kind": (_STR, True),
    "time": (_NUM, True),
    "left_image": (_STR, False),
    "right_image": (_STR, False),
    "session": (_STR, False),
    "extra": ((dict,), False),
    "comparison_id": (_STR, False),
}
_COMPARISON_COLUMNS = (
    "comparison_id",
    "prompt",
    "seed",
    "left_id",
    "right_id",
    "left_image",
    "right_image",
    "outcome",
    "rater_id",
    "rater_kind",
    "time",
    "session",
    "extra",
)
_COMPARISONS_INSERT = f"""
INSERT INTO comparisons ({", ".join(_COMPARISON_COLUMNS)})
SELECT {", ".join(["unnest(?)"] * len(_COMPARISON_COLUMNS))}
"""
_INT64 = (-(2**63), 2**63 - 1)
_RENDER_COLUMNS = (
    "contestant_id", "prompt_id", "prompt", "category", "seed", "path", "sha256", "extra", "time",
)  # fmt: skip
_RENDER_REQUIRED = ("contestant_id", "prompt_id", "prompt", "seed", "path", "sha256")
_RENDERS_INSERT = f"""
INSERT INTO renders ({", ".join(_RENDER_COLUMNS)})
SELECT {", ".join(["unnest(?)"] * len(_RENDER_COLUMNS))}
ON CONFLICT DO NOTHING
"""


def check_rater_kind(kind: Any, what: str = "rater kind") -> RaterKind:
    """``kind`` if it is one of :data:`RATER_KINDS`, else a "did you mean" :class:`StoreError`."""
    _require(
        kind in RATER_KINDS,
        f"{what}: {kind!r} is not one of {', '.join(RATER_KINDS)}{did_you_mean(kind, RATER_KINDS)}",
    )
    return kind


def comparison_hash(vote: Mapping[str, Any]) -> str:
    """Content hash of a vote's identity: who judged which pair, for which prompt and seed,
    when. The outcome is left out so that the same vote with another outcome is caught as a
    conflict rather than stored as a second vote; the time is in float seconds, so an ISO time
    and the same instant in epoch seconds hash alike."""
    key = [
        vote["prompt"],
        vote["seed"],
        vote["left_id"],
        vote["right_id"],
        vote["rater_id"],
        float(vote["time"]),
    ]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]


def _comparison_row(rec: Any, where: str) -> dict[str, Any]:
    """A validated comparison row with every column of ``_COMPARISON_COLUMNS``."""
    _require(isinstance(rec, Mapping), f"{where}: expected a mapping of fields, got {rec!r}")
    unknown = [k for k in rec if k not in _COMPARISON_FIELDS]
    if unknown:
        k = unknown[0]
        raise StoreError(
            f"{where}: unknown field {k!r}{did_you_mean(k, _COMPARISON_FIELDS)}; allowed: "
            f"{', '.join(_COMPARISON_FIELDS)}"
        )
    vote: dict[str, Any] = {}
    for key, (kinds, required) in _COMPARISON_FIELDS.items():
        value = rec.get(key)
        _require(value is not None or not required, f"{where}: field {key!r} is missing")
        _check_type(value, kinds, f"{where}: field {key!r}")
        vote[key] = value
    for key in ("left_id", "right_id", "rater_id"):
        _require(vote[key] != "", f"{where}: field {key!r} is empty")
    _require(
        _INT64[0] <= vote["seed"] <= _INT64[1],
        f"{where}: field 'seed': {vote['seed']} does not fit in 64 bits",
    )
    vote["time"] = float(vote["time"])
    _require(math.isfinite(vote["time"]), f"{where}: field 'time' must be finite")
    _require(
        vote["outcome"] in OUTCOMES,
        f"{where}: field 'outcome': {vote['outcome']!r} is not one of {', '.join(OUTCOMES)}"
        f"{did_you_mean(vote['outcome'], OUTCOMES)}",
    )
    check_rater_kind(vote["rater_kind"], f"{where}: field 'rater_kind'")
    _require(
        vote["left_id"] != vote["right_id"],
        f"{where}: field 'right_id': contestant {vote['left_id']!r} is compared with itself",
    )
    if vote["extra"] is not None:
        vote["extra"] = _json(vote["extra"], f"{where}: field 'extra'")
    cid = comparison_hash(vote)
    _require(
        vote["comparison_id"] in (None, cid),
        f"{where}: field 'comparison_id': "
        f"{vote['comparison_id']!r} is not this vote's content hash {cid!r}",
    )
    vote["comparison_id"] = cid
    return vote


def _same_outcome(outcome: str, vote: dict[str, Any], where: str, source: str) -> None:
    _require(
        outcome == vote["outcome"],
        f"{where}: field 'outcome': this vote (rater {vote['rater_id']!r} at time "
        f"{vote['time']}, {vote['left_id']!r} vs {vote['right_id']!r}, seed {vote['seed']}) "
        f"is already recorded {source} with outcome {outcome!r}, not {vote['outcome']!r}. "
        "Nothing was stored",
    )


def _same_kind(kind: str, vote: dict[str, Any], where: str, source: str) -> None:
    _require(
        kind == vote["rater_kind"],
        f"{where}: field 'rater_kind': rater {vote['rater_id']!r} is recorded {source} as "
        f"{kind!r}, not {vote['rater_kind']!r}; a rater has one kind. Nothing was stored",
    )


def _insert_arena_rows(
    con: duckdb.DuckDBPyConnection,
    contestants: list[str],
    raters: list[tuple[str, str]],
    votes: list[dict[str, Any]],
) -> None:
    """Insert new contestants (id only), raters (id, kind) and votes, each in one statement."""
    now = time.time()
    if contestants:
        con.execute(
            "INSERT INTO contestants (contestant_id, created_at) SELECT unnest(?), ?",
            [contestants, now],
        )
    if raters:
        ids, kinds = (list(c) for c in zip(*raters, strict=True))
        con.execute(
            "INSERT INTO raters (rater_id, kind, created_at) SELECT unnest(?), unnest(?), ?",
            [ids, kinds, now],
        )
    if votes:
        con.execute(_COMPARISONS_INSERT, [[v[c] for v in votes] for c in _COMPARISON_COLUMNS])
