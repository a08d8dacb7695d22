"""The store's connection, locking and schema: :class:`StoreCore`, which every table's methods
build on.

Concurrency contract (DuckDB 2.0 locks the whole file for any read-write opener and blocks even
read-only openers while it is held): there is no long-lived connection.
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
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from evaluators.sinks import to_json
from harness.store import schema

log = logging.getLogger("harness.store")

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


@dataclass
class LockStats:
    """How often this Store had to wait for the file lock (for logs and benchmarks)."""

    opens: int = 0  # successful opens of the file
    retries: int = 0  # attempts refused by another process's lock, then retried
    open_s: float = 0.0  # total time spent opening, lock waits included
    max_open_s: float = 0.0  # longest single open, lock waits included


# One lock per file per process: DuckDB shares a database instance per path inside a process,
# so two threads' transactions on it could conflict; serializing them costs nothing here.
_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()
_HELD = threading.local()


def _process_lock(key: str) -> threading.Lock:
    with _PROCESS_LOCKS_GUARD:
        return _PROCESS_LOCKS.setdefault(key, threading.Lock())


class StoreCore:
    """Opening, locking and migrating the store's file, and read-only queries: the base of
    :class:`harness.store.Store` and of each table's methods."""

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
                if self._check_version(con) == schema.SCHEMA_VERSION:
                    return
        with self.transaction() as con:
            version = self._check_version(con)  # again: another process may have migrated it
            for target in range(version + 1, schema.SCHEMA_VERSION + 1):
                con.execute(schema.MIGRATIONS[target - 1])
                log.info("%s: schema migrated to version %d", self.path, target)
            if version == 0:
                con.execute("INSERT INTO schema_version VALUES (?)", [schema.SCHEMA_VERSION])
            elif version < schema.SCHEMA_VERSION:
                con.execute("UPDATE schema_version SET version = ?", [schema.SCHEMA_VERSION])

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
        if version > schema.SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.path} has store schema version {version}, but this code knows versions "
                f"up to {schema.SCHEMA_VERSION}: it was written by a newer diffusion-harness. "
                "Upgrade the harness to read it (files are never downgraded)."
            )
        return version

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


# -- small helpers -------------------------------------------------------------------------------
_INT = (int,)
_NUM = (int, float)
_STR = (str,)


def _require(ok: bool, message: str, error: type[StoreError] = StoreError) -> None:
    if not ok:
        raise error(message)


def _json(obj: Any, what: str) -> str:
    """Canonical JSON text (:func:`evaluators.sinks.to_json`); :class:`StoreError` if ``obj``
    is not storable as JSON."""
    return to_json(obj, what, StoreError)


def _check_type(value: Any, kinds: tuple[type, ...], what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
        names = " or ".join(k.__name__ for k in kinds)
        raise StoreError(f"{what} must be {names}, got {value!r}")


def _nonempty(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _float(value: int | float | None) -> float | None:
    return None if value is None else float(value)


def _fetch_in(
    con: duckdb.DuckDBPyConnection, columns: str, table: str, key: str, values: Iterable[str]
) -> list[tuple[Any, ...]]:
    """Rows of ``table`` whose ``key`` is one of ``values`` (one statement, list parameter)."""
    return con.execute(
        f"SELECT {columns} FROM {table} WHERE {key} IN (SELECT unnest(?))", [list(values)]
    ).fetchall()


def _scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> Any:
    row = con.execute(sql, params).fetchone()
    assert row is not None, sql
    return row[0]


def _holder(message: str) -> str:
    match = _HOLDER.search(message)
    if match is None:
        return "DuckDB did not say which process holds it"
    return f"held by PID {match['pid']} ({match['exe']})"
