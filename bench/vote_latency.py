"""How long a human vote waits for the store while raters, a study and a judge write at once.

    uv run python bench/vote_latency.py --voters 10 --seconds 40

Builds the app tests' small arena work directory, then runs, each in its own process, for
``--seconds``: ``--voters`` raters doing what the rating page does per vote (plan the next
pair, record the vote, read the session summary); a study writer ingesting a trial's metrics
(``--metric-rows`` rows per transaction) and updating its trial row; a judge storing batches
of 20 votes and their judgments; and a leaderboard reader reading every comparison. It reports
the wall time of ``record_vote`` (the wait a rater feels between clicking and the vote being
stored) and of vote -> next pair planned, as median / 95th percentile / max over all votes,
and counts that every vote and every writer row was stored.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _voter(root: str, rater_id: str, seconds: float, think: tuple[float, float], out) -> None:
    from harness.store import Store
    from harness.voting import issue, plan_pairs, record_vote, session_summary

    store = Store(Path(root) / "harness.duckdb", timeout=120)
    rng = random.Random(rater_id)
    waits, nexts, votes = [], [], 0
    end = time.monotonic() + seconds
    pairs = plan_pairs(store, rater_id, k=1, rng=rng)
    while time.monotonic() < end and pairs:
        pair = issue(pairs[0])
        time.sleep(rng.uniform(*think))  # the rater looks at the images
        t0 = time.monotonic()
        record_vote(store, pair, rng.choice(["left", "right", "tie"]), rater_id, "bench")
        t1 = time.monotonic()
        pairs = plan_pairs(store, rater_id, k=1, rng=rng)
        session_summary(store, rater_id, "bench")
        t2 = time.monotonic()
        waits.append(t1 - t0)
        nexts.append(t2 - t0)
        votes += 1
    out.put(("voter", rater_id, waits, nexts, votes, store.stats.max_hold_s))


def _study(root: str, seconds: float, rows: int, out) -> None:
    from harness.store import Store

    store = Store(Path(root) / "harness.duckdb", timeout=120)
    end, k, waits = time.monotonic() + seconds, 0, []
    while time.monotonic() < end:
        t0 = time.monotonic()
        with store.transaction() as con:
            con.executemany(
                "INSERT INTO metrics VALUES (?, ?, ?, ?, ?)",
                [(f"bench/{k}", s, "train/loss", 1.0 / (s + 1), 1.7e9) for s in range(rows)],
            )
        store.upsert_trial("toy", 100 + k, "complete", values=[float(k)])
        waits.append(time.monotonic() - t0)
        k += 1
        time.sleep(0.2)
    out.put(("study", "study", waits, [], k, store.stats.max_hold_s))


def _judge(root: str, seconds: float, judge_every: float, out) -> None:
    from harness.store import Store

    store = Store(Path(root) / "harness.duckdb", timeout=120)
    end, k, waits = time.monotonic() + seconds, 0, []
    names = ["c-good", "c-mid", "c-bad"]
    while time.monotonic() < end:
        votes = []
        for j in range(20):
            left, right = random.sample(names, 2)
            votes.append(
                {"prompt": "a red circle", "seed": 0, "left_id": left, "right_id": right,
                 "outcome": "left", "rater_id": "judge", "rater_kind": "judge",
                 "time": 1.8e9 + 20 * k + j}
            )  # fmt: skip
        t0 = time.monotonic()
        store.add_comparisons(votes)
        waits.append(time.monotonic() - t0)
        k += 1
        time.sleep(judge_every)
    out.put(("judge", "judge", waits, [], 20 * k, store.stats.max_hold_s))


def _reader(root: str, seconds: float, out) -> None:
    from harness.store import Store

    store = Store(Path(root) / "harness.duckdb", timeout=120)
    end, k, waits = time.monotonic() + seconds, 0, []
    while time.monotonic() < end:
        t0 = time.monotonic()
        store.query("SELECT * FROM comparisons")
        waits.append(time.monotonic() - t0)
        k += 1
        time.sleep(0.5)
    out.put(("reader", "reader", waits, [], k, store.stats.max_hold_s))


def _summary(xs: list[float]) -> str:
    if not xs:
        return "no samples"
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, int(0.95 * len(xs)))]
    return f"median {statistics.median(xs):.3f} s, p95 {p95:.3f} s, max {xs[-1]:.3f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--voters", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--metric-rows", type=int, default=500)
    ap.add_argument(
        "--think",
        type=float,
        nargs=2,
        default=(1.0, 3.0),
        metavar=("MIN", "MAX"),
        help="seconds a rater looks at a pair before voting (uniform)",
    )
    ap.add_argument("--judge-every", type=float, default=1.0, help="seconds between batches")
    args = ap.parse_args()

    from harness.raters import add_rater
    from harness.store import Store
    from tests.app.arena_fixture import build

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        arena = build(Path(tmp) / "work")
        root = str(arena.workdir)
        raters = [arena.rater_id] + [
            add_rater(arena.store, f"rater {i}")[0] for i in range(1, args.voters)
        ]
        out = ctx.Queue()
        procs = [
            ctx.Process(target=_voter, args=(root, r, args.seconds, tuple(args.think), out))
            for r in raters
        ]
        procs += [
            ctx.Process(target=_study, args=(root, args.seconds, args.metric_rows, out)),
            ctx.Process(target=_judge, args=(root, args.seconds, args.judge_every, out)),
            ctx.Process(target=_reader, args=(root, args.seconds, out)),
        ]
        for p in procs:
            p.start()
        results = [out.get(timeout=args.seconds + 600) for _ in procs]
        for p in procs:
            p.join()
        waits = [w for kind, _, ws, _, _, _ in results if kind == "voter" for w in ws]
        nexts = [w for kind, _, _, ns, _, _ in results if kind == "voter" for w in ns]
        votes = sum(n for kind, _, _, _, n, _ in results if kind == "voter")
        hold = max(h for kind, *_, h in results if kind == "voter")
        stored = Store(Path(root) / "harness.duckdb").query(
            "SELECT count(*) AS n FROM comparisons WHERE rater_kind = 'human' AND session = 'bench'"
        )[0]["n"]
        print(
            f"{args.voters} voters (think {args.think[0]}-{args.think[1]} s), "
            f"{args.seconds:.0f} s, "
            f"study ({args.metric_rows} rows / 0.2 s) + judge (20 votes / {args.judge_every} s) "
            "+ leaderboard reader"
        )
        print(f"votes cast {votes}, stored {stored}")
        print(f"vote stored (record_vote):  {_summary(waits)}")
        print(f"vote -> next pair planned:  {_summary(nexts)}")
        print(f"longest hold of the file by a voter's operation: {hold:.3f} s")
        for kind, _, ws, _, n, h in results:
            if kind != "voter":
                print(f"{kind:6s} ({n} ops): {_summary(ws)}; longest hold {h:.3f} s")


if __name__ == "__main__":
    main()
