"""The results store: one DuckDB file with studies, trials, runs, metrics and samples, and the
arena's contestants, raters and pairwise comparisons.

Concurrency contract (DuckDB 2.0 locks the whole file for any read-write opener and blocks even
read-only openers while it is held, see FIELD-NOTES.md): there is no long-lived connection.
Every operation opens the file, runs one short transaction, commits and closes. Opening is
retried with exponential backoff and jitter while the file is locked by another process, up to
``Store(timeout=...)`` seconds, then :class:`StoreBusyError` names the file and the holder.
Any other error is raised at once.

DuckDB's own file lock is not enough between our processes: under load, 4 writer processes and
a reader doing one-row transactions lost committed rows and hit "Could not read enough bytes"
(a process read the file while another was still writing it; we did not pin down where DuckDB
lets go of its lock early). So every
operation on a file also holds an flock on the sidecar ``<file>.lock`` for its whole
open-transaction-close: shared for reads, exclusive for writes (``_file_lock``). DuckDB's lock
and its retry loop stay, for processes that do not take ours (a duckdb CLI session).

Inside one process, operations on the same file are
serialized by a lock (DuckDB shares one database instance per file inside a process, and
refuses a read-only and a read-write connection to it at the same time).

``Store(":memory:")`` is the in-process backend for tests: it keeps one in-memory database for
the life of the object (there is nothing to lock) and hands each operation its own cursor.

Typical use::

    store = Store("results.duckdb")
    store.create_study("timestep", spec, directions=["minimize"], objectives=["fid"])
    store.register_run("timestep/0", run_dir, config, config_hash, study="timestep", trial=0)
    store.upsert_trial("timestep", 0, "running", params={"shift": 3.0}, run_id="timestep/0")
    store.ingest_run_dir("timestep/0", run_dir)
    store.upsert_trial("timestep", 0, "complete", values=[12.3], ended_at=time.time())
    store.trials("timestep")
    store.query("SELECT name, max(step) AS last FROM metrics WHERE run_id = ? GROUP BY name",
                ["timestep/0"])
    store.add_contestant("timestep/0@euler-8", run_id="timestep/0", solver="euler", steps=8)
    store.add_comparisons([{"prompt": "a red circle", "seed": 0, "left_id": "a", "right_id": "b",
                            "outcome": "left", "rater_id": "ana", "rater_kind": "human",
                            "time": 1.7e9}])

The schema is the SQL in :data:`MIGRATIONS`; README.md ("The results store") documents every
column.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

import duckdb

from trainers.names import did_you_mean

log = logging.getLogger(__name__)

TrialState = Literal["running", "complete", "pruned", "failed"]
Direction = Literal["minimize", "maximize"]
RaterKind = Literal["human", "judge", "domain"]
TRIAL_STATES: tuple[str, ...] = get_args(TrialState)
DIRECTIONS: tuple[str, ...] = get_args(Direction)
RATER_KINDS: tuple[str, ...] = get_args(RaterKind)
# The rating engine's outcomes, evaluators.ratings.OUTCOMES (tests/harness/test_arena.py keeps the
# two equal). Not imported from there so that the store stays free of numpy/scipy.
OUTCOMES: tuple[str, ...] = ("left", "right", "tie", "both_bad")

# -- schema ------------------------------------------------------------------------------------
# MIGRATIONS[i] upgrades a file from schema version i to i + 1; MIGRATIONS[0] creates v1 from an
# empty file. A new file runs them all, so a fresh file and a migrated one cannot drift apart.
# To change the schema: append the SQL that upgrades the previous version, bump SCHEMA_VERSION,
# and document the change in README.md. Times are UTC epoch seconds (DOUBLE), as in
# metrics.jsonl; JSON columns hold canonical JSON text (sorted keys).
_SCHEMA_V1 = f"""
CREATE TABLE schema_version (
    version     INTEGER NOT NULL
);
CREATE TABLE studies (
    name        VARCHAR PRIMARY KEY,
    spec        JSON NOT NULL,
    directions  VARCHAR[] NOT NULL,
    objectives  VARCHAR[] NOT NULL,
    created_at  DOUBLE NOT NULL
);
CREATE TABLE trials (
    study       VARCHAR NOT NULL,
    number      INTEGER NOT NULL,
    state       VARCHAR NOT NULL CHECK (state IN {TRIAL_STATES!r}),
    params      JSON,
    values      DOUBLE[],
    error       VARCHAR,
    stderr_tail VARCHAR,
    started_at  DOUBLE,
    ended_at    DOUBLE,
    gpu_seconds DOUBLE,
    run_id      VARCHAR,
    updated_at  DOUBLE NOT NULL,
    PRIMARY KEY (study, number)
);
CREATE TABLE runs (
    run_id      VARCHAR PRIMARY KEY,
    study       VARCHAR,
    trial       INTEGER,
    run_dir     VARCHAR NOT NULL,
    config      JSON NOT NULL,
    config_hash VARCHAR NOT NULL,
    registered_at DOUBLE NOT NULL
);
CREATE TABLE metrics (
    run_id      VARCHAR NOT NULL,
    step        BIGINT NOT NULL,
    name        VARCHAR NOT NULL,
    value       DOUBLE,
    time        DOUBLE,
    PRIMARY KEY (run_id, step, name)
);
CREATE TABLE samples (
    run_id      VARCHAR NOT NULL,
    path        VARCHAR NOT NULL,
    tag         VARCHAR,
    step        BIGINT,
    prompt_id   INTEGER,
    prompt      VARCHAR,
    seed        BIGINT,
    steps       INTEGER,
    nfe         INTEGER,
    cfg         DOUBLE,
    solver      VARCHAR,
    shift       DOUBLE,
    sha256      VARCHAR NOT NULL,
    extra       JSON,
    PRIMARY KEY (run_id, path)
);
"""


# v2: the arena. A contestant is a trained model at a sampler setting (or an external image set:
# run_id NULL); a comparison is one vote between two contestants' images for the same prompt and
# seed. comparison_id is a content hash of the vote (see _comparison_id), so importing the same
# vote twice stores it once. comparisons.rater_kind copies raters.kind so that per-kind
# leaderboards filter one table. No FOREIGN KEYs: DuckDB refuses to update a referenced row (a
# contestant whose details are filled in later); add_comparisons checks the references instead.
# The value lists are spelled out, not derived from RATER_KINDS / OUTCOMES: a migration is
# history and must not change when the constants do.
_SCHEMA_V2 = """
CREATE TABLE contestants (
    contestant_id VARCHAR PRIMARY KEY,
    run_id      VARCHAR,
    label       VARCHAR,
    solver      VARCHAR,
    steps       INTEGER,
    guidance    DOUBLE,
    shift       DOUBLE,
    extra       JSON,
    created_at  DOUBLE NOT NULL
);
CREATE TABLE raters (
    rater_id    VARCHAR PRIMARY KEY,
    kind        VARCHAR NOT NULL CHECK (kind IN ('human', 'judge', 'domain')),
    name        VARCHAR,
    extra       JSON,
    created_at  DOUBLE NOT NULL
);
CREATE TABLE comparisons (
    comparison_id VARCHAR PRIMARY KEY,
    prompt      VARCHAR NOT NULL,
    seed        BIGINT NOT NULL,
    left_id     VARCHAR NOT NULL,
    right_id    VARCHAR NOT NULL,
    left_image  VARCHAR,
    right_image VARCHAR,
    outcome     VARCHAR NOT NULL CHECK (outcome IN ('left', 'right', 'tie', 'both_bad')),
    rater_id    VARCHAR NOT NULL,
    rater_kind  VARCHAR NOT NULL CHECK (rater_kind IN ('human', 'judge', 'domain')),
    time        DOUBLE NOT NULL,
    session     VARCHAR,
    extra       JSON,
    CHECK (left_id <> right_id)
);
"""


# v3: measurements with provenance and the judges' cache.
# - scores: one image-metric value (FID, KID, CMMD, CLIP score, ...) of an image set. score_id is
#   a content hash of (target, metric, provenance); provenance is canonical JSON naming the
#   extractor, its weights hash, resolution, resize mode, reference set and sample count and the
#   sampler settings and seeds of the images; provenance_hash is its hash, so that scores with
#   different provenance are never compared silently (group by it).
# - judgments: every MLLM/domain judge answer, keyed by a hash of (image hashes, prompt, judge,
#   model, rubric version, mode, order), so nothing is asked twice; an unparseable answer is
#   stored with parsed = false and its raw text, never dropped.
# - renders: the arena's paired images: every contestant rendered on the same prompt set with the
#   same seeds (so the same initial noise); comparisons refer to these images.
# - raters.token_hash: the salted hash of a human rater's personal voting token (never the
#   token itself).
_SCHEMA_V3 = """
CREATE TABLE scores (
    score_id    VARCHAR PRIMARY KEY,
    target      VARCHAR NOT NULL,
    target_kind VARCHAR NOT NULL CHECK (target_kind IN ('run', 'contestant', 'folder')),
    metric      VARCHAR NOT NULL,
    value       DOUBLE NOT NULL,
    num_images  INTEGER NOT NULL,
    provenance  JSON NOT NULL,
    provenance_hash VARCHAR NOT NULL,
    time        DOUBLE NOT NULL
);
CREATE TABLE judgments (
    judgment_key VARCHAR PRIMARY KEY,
    judge       VARCHAR NOT NULL,
    model       VARCHAR NOT NULL,
    mode        VARCHAR NOT NULL CHECK (mode IN ('absolute', 'pairwise')),
    rubric_version VARCHAR NOT NULL,
    prompt      VARCHAR NOT NULL,
    images      VARCHAR[] NOT NULL,
    parsed      BOOLEAN NOT NULL,
    result      JSON,
    raw         VARCHAR,
    error       VARCHAR,
    latency_s   DOUBLE,
    time        DOUBLE NOT NULL
);
CREATE TABLE renders (
    contestant_id VARCHAR NOT NULL,
    prompt_id   INTEGER NOT NULL,
    prompt      VARCHAR NOT NULL,
    category    VARCHAR,
    seed        BIGINT NOT NULL,
    path        VARCHAR NOT NULL,
    sha256      VARCHAR NOT NULL,
    extra       JSON,
    time        DOUBLE NOT NULL,
    PRIMARY KEY (contestant_id, prompt_id, seed)
);
ALTER TABLE raters ADD COLUMN token_hash VARCHAR;
"""

# v4: seeds. A study trains every configuration (trial) ``repeats`` times; each seed run is a
# run of its own (run_id STUDY/TRIAL/sK) with its index and training seed. eval_images holds the
# per-image results of every evaluation (evals/step_*.npz in the run directory; the features
# stay in that file), so that two configurations can be compared on the same prompts and
# sampling seeds.
_SCHEMA_V4 = """
ALTER TABLE runs ADD COLUMN repeat INTEGER;
ALTER TABLE runs ADD COLUMN seed BIGINT;
CREATE TABLE eval_images (
    run_id      VARCHAR NOT NULL,
    step        BIGINT NOT NULL,
    split       VARCHAR NOT NULL,
    row         INTEGER NOT NULL,
    sample_seed BIGINT NOT NULL,
    labels      INTEGER[] NOT NULL,
    correct     BOOLEAN[] NOT NULL,
    PRIMARY KEY (run_id, step, split, row)
);
"""

MIGRATIONS: tuple[str, ...] = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3, _SCHEMA_V4)
SCHEMA_VERSION = 4
assert len(MIGRATIONS) == SCHEMA_VERSION, "every schema version needs its migration"

DEFAULT_TIMEOUT_S = 60.0
_BACKOFF_FIRST_S = 0.005
_BACKOFF_CAP_S = 0.25
_WARN_AFTER_S = 5.0
# DuckDB 2.0: 'IO Error: Could not set lock on file "F": Conflicting lock is held in EXE (PID n)'
_LOCK_MARKERS = ("Could not set lock on file", "Conflicting lock")
_HOLDER = re.compile(r"Conflicting lock is held in (?P<exe>.*?) \(PID (?P<pid>\d+)\)")
_READ_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


class StoreError(Exception):
    """A store operation was refused: bad input, a conflicting record, a schema mismatch."""


class StoreBusyError(StoreError, TimeoutError):
    """The DuckDB file stayed locked by another process for longer than the store's timeout."""


class SchemaVersionError(StoreError):
    """The file was written by a newer schema version than this code knows."""


class IngestError(StoreError, ValueError):
    """A run directory file (metrics.jsonl, samples/manifest.jsonl) has a malformed record."""


@dataclass
class LockStats:
    """How often this Store had to wait for the file lock (for logs and benchmarks)."""

    opens: int = 0  # successful opens of the file
    retries: int = 0  # attempts refused by another process's lock, then retried
    open_s: float = 0.0  # total time spent opening, lock waits included
    max_open_s: float = 0.0  # longest single open, lock waits included


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


@dataclass(frozen=True)
class ComparisonsAdded:
    """What :meth:`Store.add_comparisons` did: rows given, votes newly stored, votes that were
    already stored (or repeated within the rows), and contestants and raters it registered."""

    rows: int
    inserted: int
    already_present: int
    contestants_added: int = 0
    raters_added: int = 0


# One lock per file per process: DuckDB shares a database instance per path inside a process,
# so two threads' transactions on it could conflict; serializing them costs nothing here.
_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()
_HELD = threading.local()


def _process_lock(key: str) -> threading.Lock:
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(key, threading.Lock())


class Store:
    """The results store in one DuckDB file (or ``":memory:"``). Cheap to construct; holds no
    connection to a file between operations. Thread-safe; safe to use from many processes."""

    def __init__(self, path: str | Path, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        """Open (creating or migrating if needed) the store at ``path``.

        timeout: seconds one open may wait for another process's lock before
        :class:`StoreBusyError`. Raises :class:`SchemaVersionError` if the file is newer than
        this code.
        """
        self.memory = str(path) == ":memory:"
        self.path = ":memory:" if self.memory else str(Path(path).expanduser().resolve())
        self.timeout = float(timeout)
        self.stats = LockStats()
        self._mem: duckdb.DuckDBPyConnection | None = None
        if self.memory:
            self._mem = duckdb.connect(":memory:")
            self._key = f":memory:{id(self)}"
        else:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._key = self.path
        self._lock = _process_lock(self._key)
        self._ensure_schema()

    def __repr__(self) -> str:
        return f"Store({self.path!r}, timeout={self.timeout})"

    def close(self) -> None:
        """Release the in-memory database (a no-op for a file: nothing is held open)."""
        if self._mem is not None:
            self._mem.close()
            self._mem = None

    # -- connections ---------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside one transaction: committed when the block ends,
        rolled back if it raises. Keep the block short: the whole file is locked meanwhile.
        Do not commit, nest store operations or keep the connection after the block."""
        with self._session(read_only=False) as con:
            con.begin()
            try:
                yield con
            except BaseException:
                with suppress(duckdb.Error):  # a failed statement may have aborted it already
                    con.rollback()
                raise
            con.commit()

    @contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection (a file is opened with ``read_only=True``) with one consistent
        snapshot for the whole block. Other readers may hold the file at the same time; writers
        wait until the block ends."""
        with self._session(read_only=True) as con:
            con.begin()
            try:
                yield con
            finally:
                con.rollback()  # nothing to keep; on :memory: this also drops stray writes

    @contextmanager
    def _session(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        if self.memory and self._mem is None:
            raise StoreError("this in-memory store is closed")
        held: set[str] | None = getattr(_HELD, "keys", None)
        if held is None:
            held = _HELD.keys = set()
        if self._key in held:
            raise StoreError(
                f"nested store operation on {self.path}: each operation opens its own "
                "connection; use the connection of the enclosing transaction()/read() instead"
            )
        with self._lock:
            held.add(self._key)
            try:
                if self._mem is not None:
                    con = self._mem.cursor()
                    try:
                        yield con
                    finally:
                        con.close()
                    return
                start = time.monotonic()
                with self._file_lock(read_only, start):
                    con = self._open(read_only, start)
                    try:
                        yield con
                    finally:
                        con.close()  # checkpoints and writes everything before the flock goes
            finally:
                held.discard(self._key)

    @contextmanager
    def _file_lock(self, shared: bool, start: float) -> Iterator[None]:
        """flock ``<file>.lock`` (shared or exclusive), retrying with backoff until the timeout
        counted from ``start``. Without flock (not POSIX) or a writable directory: no-op."""
        try:
            import fcntl
        except ImportError:  # Windows: DuckDB's own lock only
            yield
            return
        try:
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:  # e.g. a read-only directory: only readers get here in practice
            log.debug("no sidecar lock for %s (%s); relying on DuckDB's", self.path, err)
            yield
            return
        try:
            delay = _BACKOFF_FIRST_S
            warned = False
            while True:
                try:
                    fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waited = time.monotonic() - start
                    if waited >= self.timeout:
                        self._record_wait(waited)
                        raise StoreBusyError(
                            self._busy_message(
                                f"another harness process holds {self.path}.lock", waited, shared
                            )
                        ) from None
                    if waited >= _WARN_AFTER_S and not warned:
                        warned = True
                        log.warning("waiting for the lock on %s.lock", self.path)
                    self.stats.retries += 1
                    delay = self._backoff(delay, waited)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _backoff(self, delay: float, waited: float) -> float:
        """Sleep about ``delay`` and return the next delay. Exponential backoff with "equal
        jitter": half fixed, half random, so that processes that collided once do not collide
        again in lockstep."""
        pause = delay / 2 + random.uniform(0, delay / 2)
        time.sleep(min(pause, max(self.timeout - waited, 0.0)))
        return min(delay * 2, _BACKOFF_CAP_S)

    def _open(self, read_only: bool, start: float) -> duckdb.DuckDBPyConnection:
        """Connect, retrying while another process holds DuckDB's file lock, until the timeout
        counted from ``start``."""
        delay = _BACKOFF_FIRST_S
        warned = False
        while True:
            try:
                con = duckdb.connect(self.path, read_only=read_only)
            except duckdb.IOException as err:
                message = str(err)
                if not any(marker in message for marker in _LOCK_MARKERS):
                    raise
                waited = time.monotonic() - start
                if waited >= self.timeout:
                    self._record_wait(waited)
                    raise StoreBusyError(self._busy_message(message, waited, read_only)) from err
                if waited >= _WARN_AFTER_S and not warned:
                    warned = True
                    log.warning("waiting for the lock on %s: %s", self.path, _holder(message))
                self.stats.retries += 1
                delay = self._backoff(delay, waited)
                continue
            self.stats.opens += 1
            self._record_wait(time.monotonic() - start)
            return con

    def _record_wait(self, waited: float) -> None:
        self.stats.open_s += waited
        self.stats.max_open_s = max(self.stats.max_open_s, waited)

    def _busy_message(self, message: str, waited: float, read_only: bool) -> str:
        mode = "read-only" if read_only else "read-write"
        return (
            f"DuckDB file {self.path} stayed locked for {waited:.1f} s (timeout {self.timeout} s) "
            f"while opening it {mode}: {_holder(message)}. Another process has it open; store "
            "operations hold it for milliseconds, so a long hold is usually an interactive "
            "session (duckdb CLI, notebook) or a stuck process: close it, or pass a larger "
            f"Store(timeout=...). DuckDB said: {message}"
        )

    # -- schema ----------------------------------------------------------------------------------
    def _ensure_schema(self) -> None:
        if not self.memory and Path(self.path).exists():
            with self.read() as con:  # a current file needs no write lock at all
                if self._check_version(con) == SCHEMA_VERSION:
                    return
        with self.transaction() as con:
            version = self._check_version(con)  # again: another process may have migrated it
            for target in range(version + 1, SCHEMA_VERSION + 1):
                con.execute(MIGRATIONS[target - 1])
                log.info("%s: schema migrated to version %d", self.path, target)
            if version == 0:
                con.execute("INSERT INTO schema_version VALUES (?)", [SCHEMA_VERSION])
            elif version < SCHEMA_VERSION:
                con.execute("UPDATE schema_version SET version = ?", [SCHEMA_VERSION])

    def _check_version(self, con: duckdb.DuckDBPyConnection) -> int:
        """The file's schema version (0 for an empty file); refuses a newer one."""
        exists = con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = 'main' AND table_name = 'schema_version'"
        ).fetchone()
        if not exists or not exists[0]:
            return 0
        rows = con.execute("SELECT version FROM schema_version").fetchall()
        if len(rows) != 1:
            raise StoreError(f"{self.path}: table schema_version must have one row, has {rows}")
        version = int(rows[0][0])
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path} has store schema version {version}, but this code knows versions "
                f"up to {SCHEMA_VERSION}: it was written by a newer diffusion-harness. Upgrade "
                "the harness to read it (files are never downgraded)."
            )
        return version

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
        spec_json = to_json(dict(spec), f"study {name!r} spec")
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
        params_json = None if params is None else to_json(dict(params), "trial params")
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
        """Record a run: its directory (stored absolute), resolved config and config hash, and
        the study trial it belongs to (None for a run trained by hand) with its seed index
        ``repeat`` (its training seed is the config's ``seed``). Registering the same
        run again updates its directory and fills in study/trial; a different config hash for
        an existing run_id is an error (a run's config never changes)."""
        config_json = to_json(dict(config), f"run {run_id!r} config")
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
                    str(Path(run_dir).resolve()),
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
                        str(run.root.resolve()),
                        to_json(config, f"{run.config}"),
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
        fields["extra"] = None if extra is None else to_json(dict(extra), f"{where} extra")
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
            "extra": None if extra is None else to_json(dict(extra), f"{where} extra"),
        }
        with self.transaction() as con:
            return self._upsert_entity(con, "raters", "rater_id", rater_id, fields, where)

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
            stored["extra"] = to_json(json.loads(stored["extra"]), where)  # canonical text
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

    def query(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Run one read-only statement (SELECT, DESCRIBE, SHOW, EXPLAIN ...) and return its rows
        as dicts keyed by column name (JSON columns come back as text). Parameters bind as
        ``?`` (a sequence) or ``$name`` (a mapping)."""
        statements = duckdb.extract_statements(sql)
        if len(statements) != 1 or statements[0].type not in _READ_STATEMENTS:
            kinds = [s.type.name for s in statements]
            raise StoreError(
                f"query() runs one read-only statement, got {kinds}; use transaction() to write"
            )
        with self.read() as con:
            cursor = con.execute(sql, params) if params is not None else con.execute(sql)
            columns = [d[0] for d in cursor.description or []]
            return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


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

_INT = (int,)
_NUM = (int, float)
_STR = (str,)
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


def _scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> Any:
    row = con.execute(sql, params).fetchone()
    assert row is not None, sql
    return row[0]


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
        fields.update(path=rel, sha256=digest, extra=to_json(extra, where) if extra else None)
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


def _float(value: int | float | None) -> float | None:
    return None if value is None else float(value)


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


def check_rater_kind(kind: Any, what: str = "rater kind") -> RaterKind:
    """``kind`` if it is one of :data:`RATER_KINDS`, else a "did you mean" :class:`StoreError`."""
    _require(
        kind in RATER_KINDS,
        f"{what}: {kind!r} is not one of {', '.join(RATER_KINDS)}{did_you_mean(kind, RATER_KINDS)}",
    )
    return kind


def _comparison_id(vote: Mapping[str, Any]) -> str:
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
        vote["extra"] = to_json(vote["extra"], f"{where}: field 'extra'")
    cid = _comparison_id(vote)
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


def _fetch_in(
    con: duckdb.DuckDBPyConnection, columns: str, table: str, key: str, values: Iterable[str]
) -> list[tuple[Any, ...]]:
    """Rows of ``table`` whose ``key`` is one of ``values`` (one statement, list parameter)."""
    return con.execute(
        f"SELECT {columns} FROM {table} WHERE {key} IN (SELECT unnest(?))", [list(values)]
    ).fetchall()


def decode_json(rows: list[dict[str, Any]], column: str = "extra") -> list[dict[str, Any]]:
    """Decode a JSON column of query rows in place (JSON columns come back as text)."""
    for r in rows:
        r[column] = None if r[column] is None else json.loads(r[column])
    return rows


def _check_type(value: Any, kinds: tuple[type, ...], what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
        names = " or ".join(k.__name__ for k in kinds)
        raise StoreError(f"{what} must be {names}, got {value!r}")


def _nonempty(value: Any) -> bool:
    return isinstance(value, str) and value != ""


# -- small helpers -------------------------------------------------------------------------------
def _require(ok: bool, message: str, error: type[StoreError] = StoreError) -> None:
    if not ok:
        raise error(message)


def to_json(obj: Any, what: str) -> str:
    """Canonical JSON text (sorted keys, no NaN: DuckDB's JSON type rejects it)."""
    try:
        return json.dumps(obj, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise StoreError(f"{what} is not storable as JSON: {err}") from None


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


def _holder(message: str) -> str:
    match = _HOLDER.search(message)
    if match is None:
        return "DuckDB did not say which process holds it"
    return f"held by PID {match['pid']} ({match['exe']})"
