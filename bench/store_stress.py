"""Stress the results store: N writer processes commit one-row transactions while a reader
counts rows in a loop; report any row that was committed but is missing afterwards.

    uv run python bench/store_stress.py --writers 4 --rows 200 --rounds 6

This is how the lost-commit problem behind the sidecar flock (harness/store/core.py) was found and
checked; tests/harness/test_store.py runs a smaller version of it on every CI run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from harness.store import Store


def _writer(path: str, worker: int, rows: int) -> None:
    store = Store(path, timeout=120)
    for step in range(rows):
        with store.transaction() as con:
            con.execute(
                "INSERT INTO metrics VALUES (?, ?, 'loss', ?, 0.0)", [f"w{worker}", step, 1.0]
            )


def _reader(path: str, stop) -> None:
    store = Store(path, timeout=120)
    while not stop.is_set():
        store.query("SELECT count(*) AS n FROM metrics")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            path = str(Path(tmp) / f"round{r}.duckdb")
            Store(path)
            stop = ctx.Event()
            procs = [
                ctx.Process(target=_writer, args=(path, w, args.rows)) for w in range(args.writers)
            ]
            reader = ctx.Process(target=_reader, args=(path, stop))
            start = time.monotonic()
            for p in [*procs, reader]:
                p.start()
            for p in procs:
                p.join()
            stop.set()
            reader.join()
            rows = Store(path).query(
                "SELECT run_id, count(*) AS n FROM metrics GROUP BY run_id ORDER BY run_id"
            )
            got = {row["run_id"]: row["n"] for row in rows}
            lost = {f"w{w}": args.rows - got.get(f"w{w}", 0) for w in range(args.writers)}
            lost = {k: v for k, v in lost.items() if v}
            failed = [p.exitcode for p in procs if p.exitcode]
            bad += bool(lost or failed)
            print(
                f"round {r}: {time.monotonic() - start:.1f} s, "
                f"{'LOST ' + str(lost) if lost else 'nothing lost'}"
                f"{', writer exit codes ' + str(failed) if failed else ''}",
                flush=True,
            )
    print(f"{bad} of {args.rounds} rounds lost rows or failed")


if __name__ == "__main__":
    main()
