"""The store's connection, locking and schema: :class:`StoreCore`, which every table's methods
build on.

Concurrency contract (DuckDB 2.0 locks the whole file for any read-write opener and blocks even
read-only openers while it is held): no process keeps the file. Every operation attaches the
file to the process's in-memory DuckDB instance (a few milliseconds; creating an instance
per operation cost tens, and a vote takes several operations), runs one short transaction,
commits and detaches. Attaching is retried with exponential backoff and jitter while the
file is locked by another process, up to ``Store(timeout=...)`` seconds, then
:class:`StoreBusyError` names the file and the holder. Any other error is raised at once.
A write is checkpointed into the file before it detaches, so the file alone holds every
commit (a copy of just the ``.duckdb`` file loses nothing).

DuckDB's own file lock is not enough between our processes: under load, 4 writer processes and
a reader doing one-row transactions lost committed rows and hit "Could not read enough bytes"
(a process read the file while another was still writing it; we did not pin down where DuckDB
lets go of its lock early). So every
operation on a file also holds an flock on the sidecar ``<file>.lock`` for its whole
attach-transaction-detach: shared for reads, exclusive for writes (``_file_lock``), taken
through the turnstile ``<file>.queue`` so that a waiting writer is not starved by readers.
DuckDB's lock and its retry loop stay, for processes that do not take ours (a duckdb CLI
session). A notebook reads a copy instead (:func:`open_snapshot`): a connection it keeps
open to the file itself would block every write.

Inside one process, operations on the same file are
serialized by a lock (DuckDB shares one database instance per file inside a process, and
refuses a read-only and a read-write connection to it at the same time).

``Store(":memory:")`` is the in-process backend for tests: it keeps one in-memory database for
the life of the object (there is nothing to lock) and hands each operation its own cursor.
"""

from __future__ import annotations

import atexit
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
_POLL_CAP_S = 0.004  # between tries of our own flock (see _file_lock)
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


class NotAStoreError(StoreError):
    """The file at the store's path is not a harness store (not a DuckDB database at all, or a
    DuckDB database without the store's schema). It is never overwritten or migrated."""


# DuckDB 2.0: 'IO Error: The file "F" exists, but it is not a valid DuckDB database file!'
_NOT_A_DATABASE = "not a valid DuckDB database file"
_TRUNCATED = "Could not read enough bytes from file"


@dataclass
class LockStats:
    """How often this Store had to wait for the file lock (for logs and benchmarks)."""

    opens: int = 0  # successful opens of the file
    retries: int = 0  # attempts refused by another process's lock, then retried
    open_s: float = 0.0  # total time spent opening, lock waits included
    max_open_s: float = 0.0  # longest single open, lock waits included
    max_hold_s: float = 0.0  # longest time one operation held the file, from attach to detach


# One lock per file per process: DuckDB shares a database instance per path inside a process,
# so two threads' transactions on it could conflict; serializing them costs nothing here.
_PROCESS_LOCKS: dict[str, threading.Lock] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()
_HELD = threading.local()
# file key -> (pid, in-memory DuckDB connection the file is attached to): see StoreCore._base.
_BASES: dict[str, tuple[int, duckdb.DuckDBPyConnection]] = {}
_ALIAS = "harness_store"


@atexit.register
def _close_bases() -> None:
    """Close this process's DuckDB instances before the interpreter tears down (left to
    garbage collection at exit, DuckDB's bindings report them as leaked)."""
    for pid, con in list(_BASES.values()):
        if pid == os.getpid():
            with suppress(duckdb.Error):
                con.close()
    _BASES.clear()


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
                    con = self._attach(read_only, start)
                    attached = time.monotonic()
                    try:
                        yield con
                    finally:
                        self._detach(con, read_only)
                        held_s = time.monotonic() - attached
                        self.stats.max_hold_s = max(self.stats.max_hold_s, held_s)
            finally:
                held.discard(self._key)

    @contextmanager
    def _file_lock(self, shared: bool, start: float) -> Iterator[None]:
        """flock ``<file>.lock`` (shared or exclusive) until the block ends, waiting at most the
        timeout counted from ``start``. Without flock (not POSIX) or a writable directory: no-op.

        Fairness: flock itself prefers nobody, so a stream of overlapping readers could keep a
        writer (a vote) out indefinitely, and a process that polls with a long backoff loses
        to ones that happen to poll at the right moment (13 s waits for one vote were measured
        that way). So every operation first takes ``<file>.queue`` exclusively, only while it
        acquires ``<file>.lock``: a writer waiting for the readers to finish holds the queue,
        new readers line up behind it, and polling stays short (:data:`_POLL_CAP_S`)."""
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
            queue = os.open(self.path + ".queue", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            queue = None
        try:
            if queue is not None:
                self._flock(fcntl, queue, fcntl.LOCK_EX, start, shared)
            try:
                self._flock(fcntl, fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, start, shared)
            finally:
                if queue is not None:
                    os.close(queue)  # releases the queue: the next in line may go
                    queue = None
            yield
        finally:
            if queue is not None:
                os.close(queue)
            os.close(fd)  # releases the flock

    def _flock(self, fcntl: Any, fd: int, mode: int, start: float, shared: bool) -> None:
        """Take ``flock(fd, mode)``, polling every 1 to :data:`_POLL_CAP_S` seconds (flock has
        no timeout) until the store's timeout counted from ``start``."""
        delay = 0.001
        warned = False
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
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
                time.sleep(min(delay * random.uniform(0.5, 1.0), max(self.timeout - waited, 0)))
                delay = min(delay * 2, _POLL_CAP_S)

    def _backoff(self, delay: float, waited: float) -> float:
        """Sleep about ``delay`` and return the next delay. Exponential backoff with "equal
        jitter": half fixed, half random, so that processes that collided once do not collide
        again in lockstep."""
        pause = delay / 2 + random.uniform(0, delay / 2)
        time.sleep(min(pause, max(self.timeout - waited, 0.0)))
        return min(delay * 2, _BACKOFF_CAP_S)

    def _base(self) -> duckdb.DuckDBPyConnection:
        """This process's in-memory DuckDB instance that the file is attached to for each
        operation (one per file, used under the file's process lock). Attaching a file to a
        live instance costs a few milliseconds; creating an instance with ``duckdb.connect``
        costs tens (measured in bench/vote_latency.py), and a vote takes several operations."""
        pid, con = _BASES.get(self._key, (None, None))
        if con is None or pid != os.getpid():  # a forked child must not share its parent's
            con = duckdb.connect(":memory:")
            _BASES[self._key] = (os.getpid(), con)
        return con

    def _attach(self, read_only: bool, start: float) -> duckdb.DuckDBPyConnection:
        """Attach the file (``USE``d, so that statements name tables unqualified), retrying
        while another process holds DuckDB's file lock, until the timeout counted from
        ``start``."""
        base = self._base()
        mode = " (READ_ONLY)" if read_only else ""
        path = self.path.replace("'", "''")
        delay = _BACKOFF_FIRST_S
        warned = False
        while True:
            try:
                base.execute(f"ATTACH '{path}' AS {_ALIAS}{mode}")
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
            base.execute(f"USE {_ALIAS}")
            self.stats.opens += 1
            self._record_wait(time.monotonic() - start)
            return base

    def _detach(self, base: duckdb.DuckDBPyConnection, read_only: bool) -> None:
        """Detach the file: DuckDB lets go of it, after checkpointing a write into the file
        itself, so that the file alone always holds every commit (a copy of just
        ``harness.duckdb`` loses nothing; keeping commits in the WAL saved no measurable time)."""
        base.execute("USE memory")
        if not read_only:
            base.execute(f"CHECKPOINT {_ALIAS}")
        base.execute(f"DETACH {_ALIAS}")

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
            "Store(timeout=...). To read the store from a notebook or a shell while studies "
            "run, use harness.store.open_snapshot(PATH) or `harness sql`, which never hold it. "
            f"DuckDB said: {message}"
        )

    # -- schema ----------------------------------------------------------------------------------
    def _ensure_schema(self) -> None:
        if not self.memory and Path(self.path).exists():
            try:
                with self.read() as con:  # a current file needs no write lock at all
                    version = self._check_version(con)
                    if version == schema.SCHEMA_VERSION:
                        return
                    if version == 0:
                        self._refuse_foreign_database(con)
            except duckdb.IOException as err:
                if _NOT_A_DATABASE in str(err):
                    raise NotAStoreError(
                        f"{self.path} is not a harness store: DuckDB cannot open it as a database "
                        "(garbage bytes, a text file?). It was left untouched. Move it away and "
                        "rerun to start a new store, or pass the --workdir that holds your store."
                    ) from None
                if _TRUNCATED in str(err):
                    raise NotAStoreError(
                        f"{self.path} is damaged: DuckDB cannot read it whole (truncated?). It "
                        "was left untouched. Restore it from a backup, or move it away and rerun "
                        f"to start a new store. DuckDB said: {err}"
                    ) from None
                raise
        with self.transaction() as con:
            version = self._check_version(con)  # again: another process may have migrated it
            for target in range(version + 1, schema.SCHEMA_VERSION + 1):
                con.execute(schema.MIGRATIONS[target - 1])
                log.info("%s: schema migrated to version %d", self.path, target)
            if version == 0:
                con.execute("INSERT INTO schema_version VALUES (?)", [schema.SCHEMA_VERSION])
            elif version < schema.SCHEMA_VERSION:
                con.execute("UPDATE schema_version SET version = ?", [schema.SCHEMA_VERSION])

    def _refuse_foreign_database(self, con: duckdb.DuckDBPyConnection) -> None:
        """A DuckDB file with tables but no ``schema_version`` is someone else's database:
        migrating it would write our tables into it."""
        tables = [
            r[0]
            for r in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
                "ORDER BY table_name LIMIT 5"
            ).fetchall()
        ]
        if tables:
            raise NotAStoreError(
                f"{self.path} is a DuckDB database but not a harness store (no schema_version "
                f"table; it has tables {', '.join(tables)}). It was left untouched. Pass the "
                "--workdir that holds your store, or move this file away."
            )

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

    def snapshot(self, dest: str | Path) -> Path:
        """Copy the store, as of one committed state, to ``dest`` (a new file; its WAL, if
        any, goes beside it as ``<dest>.wal``) and return the path.

        The copy is taken under the shared lock, so no write is half in it, and holds the file
        only as long as copying takes. Open the copy with DuckDB, pandas or anything else for
        as long as you like: nothing you do there blocks or sees the studies and votes still
        being written here (see :func:`open_snapshot`)."""
        import shutil

        if self.memory:
            raise StoreError("an in-memory store has no file to snapshot")
        dest = Path(dest).expanduser().resolve()
        if dest.exists():
            raise StoreError(f"{dest} exists; a snapshot is written to a new file")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, self._file_lock(True, time.monotonic()):
            # Writers hold the exclusive lock for their whole transaction and detach before
            # releasing it: under the shared lock the file and its WAL are at rest.
            shutil.copyfile(self.path, dest)
            wal = Path(self.path + ".wal")
            if wal.exists():
                shutil.copyfile(wal, str(dest) + ".wal")
        return dest

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


def open_snapshot(path: str | Path, *, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection to a private snapshot of the store at ``path`` (the ``.duckdb``
    file or the work directory that holds ``harness.duckdb``): the way to read results from a
    notebook while studies, judges and raters write. ::

        from harness.store import open_snapshot
        con = open_snapshot("work")
        con.sql("SELECT * FROM trials").df()           # pandas
        con.sql("SELECT * FROM metrics").pl()          # polars, if installed

    Opening the store's file directly with ``duckdb.connect`` (even ``read_only=True``) locks
    it, and every harness write then waits until that connection closes. The snapshot is a
    copy taken in a few milliseconds under the store's shared lock (:meth:`StoreCore.snapshot`),
    in a temporary folder removed when the process exits; call it again for fresher data.
    ``read_only=False`` lets you create tables in the copy (they never reach the store)."""
    import atexit
    import shutil
    import tempfile

    source = Path(path).expanduser()
    if source.is_dir():
        source = source / "harness.duckdb"
    if not source.exists():
        raise StoreError(f"no store at {source}: pass the .duckdb file or the work directory")
    folder = tempfile.mkdtemp(prefix="harness-snapshot-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    copy = StoreCore(source).snapshot(Path(folder) / "harness.duckdb")
    return duckdb.connect(str(copy), read_only=read_only)


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
