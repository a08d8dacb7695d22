"""Studies, trials, runs and what a run directory holds (metrics, samples, per-image
evaluation results): the store's methods for them and the ingest of a run directory."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import duckdb

from evaluators.sinks import decode_json
from harness.store.core import (
    _INT,
    _NUM,
    _STR,
    StoreCore,
    StoreError,
    _float,
    _json,
    _require,
    _scalar,
)
from harness.store.schema import DIRECTIONS, TRIAL_STATES, Direction, TrialState
from harness.workpaths import resolve_run_dir, store_work_root, to_stored


class IngestError(StoreError, ValueError):
    """A run directory file (metrics.jsonl, samples/manifest.jsonl) has a malformed record."""


@dataclass(frozen=True)
class IngestResult:
    """What :meth:`Store.ingest_run_dir` did: records read from the run directory, rows that
    were new, and rows whose stored value changed (the file is the source of truth)."""

    metrics_read: int
    metrics_inserted: int
    metrics_updated: int
    samples_read: int
    samples_inserted: int
    samples_updated: int


class RunTables(StoreCore):
    """The store's studies, trials, runs, metrics and samples."""

    # -- studies and trials ------------------------------------------------------------------------
    def create_study(
        self,
        name: str,
        spec: Mapping[str, Any],
        directions: Sequence[Direction],
        objectives: Sequence[str],
    ) -> bool:
        """Record a study. Returns True if created, False if it already exists with the same
        spec, directions and objectives; raises :class:`StoreError` naming what differs if the
        name is taken by a different study.

        spec: the validated study spec (JSON-serializable); directions: one of "minimize" /
        "maximize" per objective; objectives: the metric names the trial values refer to.
        """
        _require(
            isinstance(name, str) and name != "",
            f"study name must be a non-empty string, got {name!r}",
        )
        directions, objectives = list(directions), list(objectives)
        _require(
            len(objectives) >= 1 and len(directions) == len(objectives),
            f"study {name!r}: need one direction per objective, got directions={directions} "
            f"for objectives={objectives}",
        )
        bad = [d for d in directions if d not in DIRECTIONS]
        _require(not bad, f"study {name!r}: unknown direction(s) {bad}; allowed: {DIRECTIONS}")
        _require(
            all(isinstance(o, str) and o for o in objectives)
            and len(set(objectives)) == len(objectives),
            f"study {name!r}: objectives must be distinct non-empty names, got {objectives}",
        )
        spec_json = _json(dict(spec), f"study {name!r} spec")
        wanted = {"spec": json.loads(spec_json), "directions": directions, "objectives": objectives}
        with self.transaction() as con:
            row = con.execute(
                "SELECT spec, directions, objectives FROM studies WHERE name = ?", [name]
            ).fetchone()
            if row is None:
                con.execute(
                    "INSERT INTO studies (name, spec, directions, objectives, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [name, spec_json, directions, objectives, time.time()],
                )
                return True
        stored = {"spec": json.loads(row[0]), "directions": row[1], "objectives": row[2]}
        if stored == wanted:
            return False
        diffs = _diff(stored, wanted)
        raise StoreError(
            f"study {name!r} already exists in {self.path} with a different spec (differs at: "
            f"{', '.join(diffs[:8])}{', ...' if len(diffs) > 8 else ''}); use a new study name "
            "or delete the old study's rows"
        )

    def upsert_trial(
        self,
        study: str,
        number: int,
        state: TrialState,
        *,
        params: Mapping[str, Any] | None = None,
        values: Sequence[float] | None = None,
        error: str | None = None,
        stderr_tail: str | None = None,
        started_at: float | None = None,
        ended_at: float | None = None,
        gpu_seconds: float | None = None,
        run_id: str | None = None,
    ) -> None:
        """Insert trial ``number`` of ``study`` or update it. ``state`` is always written; every
        other field left as None keeps its stored value, so a runner can write params at start
        and values at the end. ``values`` holds one float per study objective.
        Times are epoch seconds. The study must exist (:meth:`create_study`)."""
        _require(state in TRIAL_STATES, f"trial state {state!r} is not one of {TRIAL_STATES}")
        _require(
            isinstance(number, int) and not isinstance(number, bool) and number >= 0,
            f"trial number must be an int >= 0, got {number!r}",
        )
        params_json = None if params is None else _json(dict(params), "trial params")
        vals = None if values is None else [float(v) for v in values]
        with self.transaction() as con:
            row = con.execute("SELECT objectives FROM studies WHERE name = ?", [study]).fetchone()
            _require(row is not None, f"unknown study {study!r} in {self.path}: create_study first")
            _require(
                vals is None or len(vals) == len(row[0]),
                f"study {study!r} has {len(row[0])} objective(s) {row[0]}, "
                f"trial {number} got {len(vals or [])} value(s) {vals}",
            )
            con.execute(
                """
                INSERT INTO trials (study, number, state, params, values, error, stderr_tail,
                    started_at, ended_at, gpu_seconds, run_id, updated_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT DO UPDATE SET
                    state = excluded.state,
                    params = coalesce(excluded.params, params),
                    values = coalesce(excluded.values, values),
                    error = coalesce(excluded.error, error),
                    stderr_tail = coalesce(excluded.stderr_tail, stderr_tail),
                    started_at = coalesce(excluded.started_at, started_at),
                    ended_at = coalesce(excluded.ended_at, ended_at),
                    gpu_seconds = coalesce(excluded.gpu_seconds, gpu_seconds),
                    run_id = coalesce(excluded.run_id, run_id),
                    updated_at = excluded.updated_at
                """,
                [
                    study,
                    number,
                    state,
                    params_json,
                    vals,
                    error,
                    stderr_tail,
                    started_at,
                    ended_at,
                    gpu_seconds,
                    run_id,
                    time.time(),
                ],
            )

    def trials(self, study: str) -> list[dict[str, Any]]:
        """The study's trials ordered by number: the ``trials`` columns as a dict each, with
        ``params`` decoded from JSON."""
        rows = self.query("SELECT * FROM trials WHERE study = ? ORDER BY number", [study])
        return decode_json(rows, "params")

    # -- runs, metrics, samples ----------------------------------------------------------------
    def register_run(
        self,
        run_id: str,
        run_dir: str | Path,
        config: Mapping[str, Any],
        config_hash: str,
        *,
        study: str | None = None,
        trial: int | None = None,
        repeat: int | None = None,
    ) -> None:
        """Record a run: its directory (stored relative to the store's folder, the work
        directory, when inside it, else absolute: :mod:`harness.workpaths`), resolved config
        and config hash, and the study trial it belongs to (None for a run trained by hand)
        with its seed index ``repeat`` (its training seed is the config's ``seed``). Registering
        the same run again updates its directory and fills in study/trial; a different config
        hash for an existing run_id is an error (a run's config never changes)."""
        config_json = _json(dict(config), f"run {run_id!r} config")
        with self.transaction() as con:
            row = con.execute("SELECT config_hash FROM runs WHERE run_id = ?", [run_id]).fetchone()
            if row is not None and row[0] != config_hash:
                raise StoreError(
                    f"run {run_id!r} is already registered in {self.path} with config hash "
                    f"{row[0]}, not {config_hash}: a run's config never changes; use a new run_id"
                )
            con.execute(
                """
                INSERT INTO runs (run_id, study, trial, run_dir, config, config_hash,
                    registered_at, repeat, seed)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT DO UPDATE SET
                    run_dir = excluded.run_dir,
                    study = coalesce(excluded.study, study),
                    trial = coalesce(excluded.trial, trial),
                    repeat = coalesce(excluded.repeat, repeat)
                """,
                [
                    run_id,
                    study,
                    trial,
                    to_stored(run_dir, store_work_root(self)),
                    config_json,
                    config_hash,
                    time.time(),
                    repeat,
                    config.get("seed"),
                ],
            )

    def ingest_run_dir(self, run_id: str, run_dir: str | Path) -> IngestResult:
        """Copy a run directory's ``metrics.jsonl`` and ``samples/manifest.jsonl`` into the
        store, in one transaction, idempotently.

        Every record is validated and every sample file hashed (sha256) before the file is
        locked; a malformed record raises :class:`IngestError` naming the file and line, and
        nothing of this ingest is stored. A record already stored is updated if the file now
        says otherwise (a resumed run redoes steps); stored rows absent from the file are kept.
        A torn last line (the trainer is mid-append) is skipped and picked up next time.
        If ``run_id`` is not registered yet, it is registered from ``config.json`` (without a
        study; :meth:`register_run` can add it later).
        """
        from trainers.rundir import RunDir

        run = RunDir(run_dir)
        metrics = _read_metrics(run.metrics)
        samples = _read_manifest(run.manifest, run.samples)
        images = _read_eval_images(run)
        config = run.read_config()
        with self.transaction() as con:
            registered = con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone()
            if registered is None:
                if config is None:
                    raise StoreError(
                        f"run {run_id!r} is not registered in {self.path} and {run.config} does "
                        "not exist: register_run first"
                    )
                con.execute(
                    "INSERT INTO runs (run_id, run_dir, config, config_hash, registered_at, "
                    "seed) VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        run_id,
                        to_stored(run.root, store_work_root(self)),
                        _json(config, f"{run.config}"),
                        str(config.get("config_hash", "")),
                        time.time(),
                        config.get("seed"),
                    ],
                )
            m_new, m_changed = _upsert(con, "metrics", run_id, metrics, _METRICS_UPSERT)
            s_new, s_changed = _upsert(con, "samples", run_id, samples, _SAMPLES_UPSERT)
            _upsert(con, "eval_images", run_id, images, _EVAL_IMAGES_UPSERT)
        return IngestResult(
            len(metrics), m_new, m_changed - m_new, len(samples), s_new, s_changed - s_new
        )

    def run_dir_path(self, stored: str | Path) -> Path:
        """Where a ``runs.run_dir`` value is now: relative ones under this store's work
        directory, old absolute ones as they are or re-rooted (:func:`resolve_run_dir`)."""
        return resolve_run_dir(stored, store_work_root(self))

    def metrics(self, run_id: str, name: str | None = None) -> list[dict[str, Any]]:
        """The run's metric rows (``run_id, step, name, value, time``) ordered by step and name,
        optionally only metric ``name``."""
        sql = "SELECT * FROM metrics WHERE run_id = ?"
        params: list[Any] = [run_id]
        if name is not None:
            sql += " AND name = ?"
            params.append(name)
        return self.query(sql + " ORDER BY step, name", params)

    def samples(self, run_id: str) -> list[dict[str, Any]]:
        """The run's sample rows ordered by tag and path, with ``extra`` decoded from JSON.
        ``path`` is relative to ``<run_dir>/samples/``."""
        rows = self.query("SELECT * FROM samples WHERE run_id = ? ORDER BY tag, path", [run_id])
        return decode_json(rows)


# -- ingest helpers ------------------------------------------------------------------------------
# Both upserts insert a whole run's rows in one statement from list parameters (unnest zips
# them): over 100x faster than executemany, which runs one statement per row in DuckDB.
# A stored row is rewritten only when the file says something else (a resumed run redid it).
_EVAL_IMAGES_UPSERT = """
INSERT INTO eval_images (run_id, step, split, row, sample_seed, labels, correct)
SELECT ?, unnest(?), unnest(?), unnest(?), unnest(?), unnest(?), unnest(?)
ON CONFLICT DO UPDATE SET sample_seed = excluded.sample_seed, labels = excluded.labels,
    correct = excluded.correct
WHERE correct IS DISTINCT FROM excluded.correct OR labels IS DISTINCT FROM excluded.labels
"""


def _read_eval_images(run: Any) -> list[tuple[Any, ...]]:
    """Rows of ``eval_images`` from a run directory's ``evals/step_*.npz`` files (the features
    stay in the files); a malformed file raises :class:`IngestError` naming it."""
    from trainers.evaluate import read_eval_images

    rows = []
    for step, path in sorted(run.eval_image_files().items()):
        try:
            im = read_eval_images(path)
        except ValueError as err:
            raise IngestError(str(err)) from None
        for split, seeds, labels, correct in (
            ("seen", im.seen_seeds, im.seen_labels, im.seen_correct),
            ("heldout", im.heldout_seeds, im.heldout_labels, im.heldout_correct),
        ):
            rows += [
                (step, split, i, int(seeds[i]), labels[i].tolist(), correct[i].tolist())
                for i in range(len(seeds))
            ]
    return rows


_METRICS_UPSERT = """
INSERT INTO metrics (run_id, step, name, value, time)
SELECT ?, unnest(?), unnest(?), unnest(?), unnest(?)
ON CONFLICT DO UPDATE SET value = excluded.value, time = excluded.time
WHERE value IS DISTINCT FROM excluded.value
"""
SAMPLE_COLUMNS = (
    "path",
    "tag",
    "step",
    "prompt_id",
    "prompt",
    "seed",
    "steps",
    "nfe",
    "cfg",
    "solver",
    "shift",
    "sha256",
    "extra",
)
_SAMPLES_UPSERT = f"""
INSERT INTO samples (run_id, {", ".join(SAMPLE_COLUMNS)})
SELECT ?, {", ".join(["unnest(?)"] * len(SAMPLE_COLUMNS))}
ON CONFLICT DO UPDATE SET {", ".join(f"{c} = excluded.{c}" for c in SAMPLE_COLUMNS[1:])}
WHERE ({", ".join(SAMPLE_COLUMNS[1:])})
    IS DISTINCT FROM ({", ".join(f"excluded.{c}" for c in SAMPLE_COLUMNS[1:])})
"""


# Manifest keys with a column of their own; any other key goes into ``extra`` (JSON).
_SAMPLE_FIELDS: dict[str, tuple[type, ...]] = {
    "tag": _STR,
    "step": _INT,
    "prompt_id": _INT,
    "prompt": _STR,
    "seed": _INT,
    "steps": _INT,
    "nfe": _INT,
    "cfg": _NUM,
    "solver": _STR,
    "shift": _NUM,
}


def _upsert(
    con: duckdb.DuckDBPyConnection, table: str, run_id: str, rows: list[tuple[Any, ...]], sql: str
) -> tuple[int, int]:
    """(rows inserted, rows inserted or changed)."""
    if not rows:
        return 0, 0
    count = f"SELECT count(*) FROM {table} WHERE run_id = ?"
    columns = [list(column) for column in zip(*rows, strict=True)]
    before = _scalar(con, count, [run_id])
    changed = _scalar(con, sql, [run_id, *columns])
    return _scalar(con, count, [run_id]) - before, changed


def _numbered_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for each record of a JSONL file, via ``read_jsonl``."""
    from trainers.rundir import read_jsonl

    try:
        records = read_jsonl(path)
    except ValueError as err:  # read_jsonl names the file and the line
        raise IngestError(f"{err}; nothing was ingested") from err
    if not records:
        return []
    # read_jsonl drops blank lines (and at most a torn last one), so the k-th record is on the
    # k-th non-blank line. The file is append-only, so reading it again cannot reorder lines.
    lines = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
    return list(zip(lines, records, strict=False))


def _read_metrics(path: Path) -> list[tuple[Any, ...]]:
    """Validated (step, name, value, time) rows; the last record for a (step, name) wins."""
    rows: dict[tuple[int, str], tuple[Any, ...]] = {}
    for line, rec in _numbered_records(path):
        where = f"{path}: line {line}"
        _check_record(rec, where)
        step = _get(rec, "step", _INT, where, required=True)
        name = _get(rec, "name", _STR, where, required=True)
        _require(name != "", f"{where}: metric name is empty", IngestError)
        value = _get(rec, "value", _NUM, where)
        when = _get(rec, "time", _NUM, where)
        rows[(step, name)] = (step, name, _float(value), _float(when))
    return list(rows.values())


def _read_manifest(path: Path, samples_dir: Path) -> list[tuple[Any, ...]]:
    """Validated sample rows in ``SAMPLE_COLUMNS`` order, each file hashed (sha256)."""
    rows: dict[str, tuple[Any, ...]] = {}
    for line, rec in _numbered_records(path):
        where = f"{path}: line {line}"
        _check_record(rec, where)
        rel = _get(rec, "path", _STR, where, required=True)
        pure = PurePosixPath(rel)
        _require(
            rel != "" and not pure.is_absolute() and ".." not in pure.parts,
            f"{where}: sample path {rel!r} must be relative to {samples_dir}",
            IngestError,
        )
        file = samples_dir / pure
        _require(file.is_file(), f"{where}: sample file {file} does not exist", IngestError)
        with open(file, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        fields = {k: _get(rec, k, kinds, where) for k, kinds in _SAMPLE_FIELDS.items()}
        if fields["tag"] is None and len(pure.parts) > 1:
            fields["tag"] = pure.parts[0]
        for k in ("cfg", "shift"):
            fields[k] = _float(fields[k])
        extra = {k: v for k, v in rec.items() if k not in _SAMPLE_FIELDS and k != "path"}
        fields.update(path=rel, sha256=digest, extra=_json(extra, where) if extra else None)
        rows[rel] = tuple(fields[c] for c in SAMPLE_COLUMNS)
    return list(rows.values())


def _check_record(rec: Any, where: str) -> None:
    _require(isinstance(rec, dict), f"{where}: expected a JSON object, got {rec!r}", IngestError)


def _get(
    rec: dict[str, Any], key: str, kinds: tuple[type, ...], where: str, required: bool = False
) -> Any:
    value = rec.get(key)
    if value is None:
        _require(not required, f"{where}: missing {key!r} in {rec}", IngestError)
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise IngestError(f"{where}: {key!r} must be {names} (or null), got {value!r}")
    return value


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            here = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(here)
            else:
                out.extend(_diff(a[key], b[key], here))
        return out
    if a == b or (
        isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    ):
        return []
    return [prefix or "<root>"]
