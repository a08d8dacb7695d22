"""Throughput of the MLLM judge (judgments/s) against an OpenAI-compatible server on loopback
that answers every request after a fixed simulated latency.

    uv run python bench/judge_bench.py [--latency 0.2] [--pairs 48] [--concurrency 1 4 16]

For each concurrency the judge starts from an empty store (a DuckDB file in a temporary
directory, so the cache writes are counted) and judges ``--pairs`` pairs, i.e. two requests
(both orders) per pair. A judgment is one answered request. The ideal throughput is
``concurrency / latency``; what is lost against it is the judge's own overhead (PNG reading and
base64, the HTTP client, parsing, DuckDB writes) and the loopback server's. A second pass over
the same pairs is all cache hits: it sends no request and shows the cost of the cache lookup.

Wall-clock seconds on whatever else the machine is doing: the load average is printed with the
figures, because the development machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evaluators.judging import PairItem  # noqa: E402
from evaluators.mllm_backends import LoopbackChatServer, RecordedRequest, Reply  # noqa: E402
from evaluators.mllm_judge import build_judge  # noqa: E402
from harness.store import Store  # noqa: E402


def make_pairs(directory: Path, pairs: int, size: int, seed: int) -> list[PairItem]:
    """``pairs`` pairs of distinct random-noise PNGs (noise: PNG cannot compress it away)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(pairs):
        paths = []
        for side in ("l", "r"):
            path = directory / f"{i:04d}{side}.png"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
            paths.append(path)
        items.append(PairItem(f"prompt {i}", i, "left", "right", paths[0], paths[1]))
    return items


def run(items: list[PairItem], concurrency: int, latency: float, workdir: Path) -> dict:
    answer = json.dumps({"winner": "A", "reason": "simulated"})

    def respond(request: RecordedRequest, n: int) -> Reply:
        return Reply(answer, delay_s=latency)

    store = Store(workdir / f"judge-c{concurrency}.duckdb")
    with LoopbackChatServer(respond) as server:
        env = {"HARNESS_JUDGE_BASE_URL": server.url, "HARNESS_JUDGE_MODEL": "bench"}
        judge = build_judge("openai", store, env=env, concurrency=concurrency)
        t0 = time.perf_counter()
        verdicts = judge.judge_pairs(items)
        cold = time.perf_counter() - t0
        sent = len(server.requests)
        t0 = time.perf_counter()
        judge.judge_pairs(items)
        warm = time.perf_counter() - t0
        assert len(server.requests) == sent, "the second pass must be all cache hits"
    assert all(v.outcome == "tie" for v in verdicts)  # "always A" flips with the order
    return {
        "concurrency": concurrency,
        "judgments": sent,
        "seconds": cold,
        "per_s": sent / cold,
        "ideal_per_s": concurrency / latency if latency > 0 else float("inf"),
        "max_in_flight": server.max_in_flight,
        "cached_per_s": sent / warm,
    }


def _efficiency(r: dict) -> str:
    if r["ideal_per_s"] == float("inf"):  # --latency 0: no ideal, the figure is pure overhead
        return "-"
    return f"{r['per_s'] / r['ideal_per_s']:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.2, help="simulated seconds/request")
    parser.add_argument("--pairs", type=int, default=48, help="pairs per run (2 requests each)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--image-size", type=int, default=256, help="PNG side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        items = make_pairs(workdir, args.pairs, args.image_size, args.seed)
        png_kib = sum(p.stat().st_size for p in workdir.glob("*.png")) / 1024 / (2 * args.pairs)
        results = [run(items, c, args.latency, workdir) for c in args.concurrency]

    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}; latency {args.latency} s, {args.pairs} pairs, "
        f"{args.image_size}x{args.image_size} PNG ({png_kib:.0f} KiB each)"
    )
    print(
        "| concurrency | judgments | seconds | judgments/s | ideal/s | efficiency "
        "| max in flight | cached judgments/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['concurrency']} | {r['judgments']} | {r['seconds']:.2f} | {r['per_s']:.1f} "
            f"| {r['ideal_per_s']:.1f} | {_efficiency(r)} "
            f"| {r['max_in_flight']} | {r['cached_per_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
