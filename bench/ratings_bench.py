"""How long the arena's rating engine takes on a big arena: aggregation and the BT bootstrap.

    uv run python bench/ratings_bench.py

Simulates 1,000,000 battles among 50 contestants (Bradley-Terry outcomes from strengths drawn
from N(0, 1) nats, 5 % ties and 5 % both_bad), then times, each ``--repeat`` times (the
minimum and the median are printed):

- building the list of ``(left, right, outcome)`` tuples from arrays (what a caller reading
  DuckDB rows pays before calling the engine; reported, not part of the engine);
- :func:`evaluators.ratings.aggregate` on that list;
- :func:`evaluators.ratings.fit_bradley_terry` on the counts (the point estimate);
- :func:`evaluators.ratings.bootstrap_ratings` with 1,000 rounds (includes its own point fit);
- :func:`evaluators.ratings.online_elo` over the battles once (secondary view, pure Python).

Wall-clock seconds on whatever else the machine is doing: the load average is printed with the
figures, because the development machine is shared.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluators import ratings as R  # noqa: E402


def simulate(n: int, m: int, seed: int) -> tuple[list[str], np.ndarray, ...]:
    """Index arrays (left, right, outcome) of ``m`` battles and the true strengths (nats)."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(0.0, 1.0, n)
    left = rng.integers(0, n, m)
    right = rng.integers(0, n - 1, m)
    right[right >= left] += 1
    p = 1.0 / (1.0 + np.exp(-(theta[left] - theta[right])))
    u = rng.random(m)
    outcome = np.where(u < 0.9 * p, 0, np.where(u < 0.9, 1, np.where(u < 0.95, 2, 3)))
    names = [f"model-{k:02d}" for k in range(n)]
    return names, left, right, outcome, theta


def timed(fn: Callable[[], object], repeat: int) -> tuple[object, list[float]]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"numpy {np.__version__}, scipy {scipy.__version__}; load average {load}"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--contestants", type=int, default=50)
    p.add_argument("--battles", type=int, default=1_000_000)
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-elo", action="store_true", help="skip the (slow, pure Python) Elo pass")
    args = p.parse_args()

    names, left, right, outcome, theta = simulate(args.contestants, args.battles, args.seed)
    print(f"machine: {machine()}")
    print(f"{args.battles:,} battles among {args.contestants} contestants, {args.rounds} rounds")

    def build() -> list[R.Battle]:
        return [
            (names[a], names[b], R.OUTCOMES[o])
            for a, b, o in zip(left.tolist(), right.tolist(), outcome.tolist(), strict=True)
        ]

    battles, t_build = timed(build, args.repeat)
    counts, t_agg = timed(lambda: R.aggregate(battles), args.repeat)
    rating, t_fit = timed(lambda: R.fit_bradley_terry(counts), args.repeat)
    boot, t_boot = timed(
        lambda: R.bootstrap_ratings(counts, rounds=args.rounds, seed=args.seed), args.repeat
    )
    rows = [
        ("build tuples (caller, not engine)", t_build),
        ("aggregate", t_agg),
        ("fit_bradley_terry (point)", t_fit),
        (f"bootstrap_ratings ({args.rounds} rounds)", t_boot),
    ]
    if not args.no_elo:
        _, t_elo = timed(lambda: R.online_elo(battles), 1)
        rows.append(("online_elo (1 pass)", t_elo))

    print("| step | min s | median s |")
    print("|---|---:|---:|")
    for label, t in rows:
        print(f"| {label} | {min(t):.3f} | {statistics.median(t):.3f} |")

    truth = R.POINTS_PER_NAT * (theta - theta.mean()) + R.INITIAL_RATING
    width = boot.upper - boot.lower
    # Strength-blind ties are not a Bradley-Terry process (they pull the fit towards the mean),
    # so this is a sanity check of the order, not of the scale.
    print(
        f"check: corr(fit, truth) = {np.corrcoef(rating, truth)[0, 1]:.5f}, "
        f"median {boot.confidence:.0%} interval width = {np.median(width):.1f} points"
    )
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
