"""Readers beside a busy store: snapshots for notebooks, the WAL other tools read, and a writer
that is not starved by a stream of readers.

Child processes are spawned and import this module; it imports no torch (see test_store.py).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest

from harness.store import Store, StoreError, open_snapshot

SPEC = {"name": "s"}


def _insert(store: Store, run: str, steps: range) -> None:
    with store.transaction() as con:
        con.executemany(
            "INSERT INTO metrics VALUES (?, ?, 'loss', ?, 0.0)", [(run, s, 1.0) for s in steps]
        )


def _count(con: duckdb.DuckDBPyConnection) -> int:
    ((n,),) = con.execute("SELECT count(*) FROM metrics").fetchall()
    return int(n)


def test_a_snapshot_held_open_never_blocks_writes(tmp_path: Path) -> None:
    """The notebook recipe: a snapshot connection stays open while the store takes writes
    at full speed (a direct read-only connection to the file would block them), and shows
    the state at the time it was taken."""
    work = tmp_path / "work"
    store = Store(work / "harness.duckdb", timeout=2)
    _insert(store, "r", range(10))
    con = open_snapshot(work)  # the work directory or the file both work
    try:
        start = time.monotonic()
        for k in range(5):
            _insert(store, f"w{k}", range(3))
        assert time.monotonic() - start < 2  # no StoreBusyError, no long waits
        assert _count(con) == 10  # the snapshot's state; the store has moved on
        assert con.sql("SELECT run_id, count(*) AS n FROM metrics GROUP BY 1").df()["n"].sum() == 10
        with pytest.raises(duckdb.Error):  # read-only by default
            con.execute("DELETE FROM metrics")
        fresh = open_snapshot(work / "harness.duckdb")
        assert _count(fresh) == 25
        fresh.close()
    finally:
        con.close()
    assert store.query("SELECT count(*) AS n FROM metrics")[0]["n"] == 25  # nothing lost


def test_the_file_alone_holds_every_commit(tmp_path: Path) -> None:
    """Each write is checkpointed before the file is let go: no WAL is left beside it, so a
    copy of just the .duckdb file (mailed to a colleague, copied by a test) loses nothing,
    and other tools opening the file see every commit."""
    path = tmp_path / "harness.duckdb"
    store = Store(path)
    _insert(store, "r", range(2))
    assert not Path(str(path) + ".wal").exists()
    copy = tmp_path / "copy.duckdb"
    copy.write_bytes(path.read_bytes())
    plain = duckdb.connect(str(copy), read_only=True)  # e.g. the DuckDB CLI
    assert _count(plain) == 2
    plain.close()


def test_snapshot_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store at"):
        open_snapshot(tmp_path / "nowhere")
    store = Store(tmp_path / "harness.duckdb")
    store.snapshot(tmp_path / "copy.duckdb")
    with pytest.raises(StoreError, match="exists"):
        store.snapshot(tmp_path / "copy.duckdb")
    with pytest.raises(StoreError, match="in-memory"):
        Store(":memory:").snapshot(tmp_path / "m.duckdb")


def _snapshot_writer(path: str, ready: Any, stop: Any) -> None:
    store = Store(path, timeout=60)
    ready.put("writer")
    k = 0
    while not stop.is_set():
        _insert(store, f"w{k}", range(20))  # transactions of 20 rows
        k += 1


def test_snapshots_never_see_half_a_transaction(tmp_path: Path) -> None:
    path = str(tmp_path / "harness.duckdb")
    Store(path)
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    writer = ctx.Process(target=_snapshot_writer, args=(path, ready, stop))
    writer.start()
    try:
        ready.get(timeout=60)
        counts = []
        for _ in range(15):
            con = open_snapshot(path)
            counts.append(_count(con))
            con.close()
    finally:
        stop.set()
        writer.join(60)
    assert writer.exitcode == 0
    assert all(n % 20 == 0 for n in counts), counts
    assert counts == sorted(counts) and counts[-1] > 0, counts


def _hogging_reader(path: str, ready: Any, stop: Any) -> None:
    """Read in a loop, each read holding the file 50 ms: with several of these, some reader
    holds the shared lock at every moment."""
    store = Store(path, timeout=60)
    ready.put("reader")
    while not stop.is_set():
        with store.read() as con:
            con.execute("SELECT count(*) FROM metrics").fetchall()
            time.sleep(0.05)


def test_a_writer_is_not_starved_by_overlapping_readers(tmp_path: Path) -> None:
    """Three processes keep the shared lock held without a gap; a write must still get in
    quickly (readers queue behind a waiting writer), not wait for its timeout."""
    path = str(tmp_path / "harness.duckdb")
    Store(path)
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    readers = [ctx.Process(target=_hogging_reader, args=(path, ready, stop)) for _ in range(3)]
    for p in readers:
        p.start()
    try:
        for _ in readers:
            ready.get(timeout=60)
        time.sleep(0.5)  # the readers are overlapping now
        store = Store(path, timeout=20)
        waits = []
        for k in range(5):
            start = time.monotonic()
            _insert(store, f"v{k}", range(1))
            waits.append(time.monotonic() - start)
    finally:
        stop.set()
        for p in readers:
            p.join(30)
    assert [p.exitcode for p in readers] == [0, 0, 0]
    print(f"write waits beside 3 overlapping readers: {[round(w, 3) for w in waits]}")
    assert max(waits) < 2.0, waits
