"""How fast the embedded default learns: attribute accuracy and domain FID against wall time.

    uv run python bench/convergence.py --config studies/configs/shapes-tiny.json \
        --out bench/out/convergence

Runs the real trainer (a subprocess, as the harness would) and prints, per evaluation, the step,
the wall-clock seconds since launch, the prompt-following accuracy on seen and held-out
compositions, and the domain FID. Chance level of ``attr_acc_mean`` is the mean of 1/|values|
over the five attributes (0.29). An existing run directory is resumed, not restarted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainers.data.shapes import ATTRIBUTES  # noqa: E402
from trainers.rundir import read_jsonl  # noqa: E402

CHANCE = sum(1 / len(v) for v in ATTRIBUTES.values()) / len(ATTRIBUTES)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", type=Path, default=REPO / "studies/configs/shapes-tiny.json")
    p.add_argument("--out", type=Path, default=REPO / "bench/out/convergence")
    p.add_argument(
        "--threshold", type=float, default=0.6, help="accuracy that counts as well above chance"
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cmd = [
        sys.executable,
        "-m",
        "trainers.flow",
        "--config",
        str(args.config),
        "--run-dir",
        str(args.out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise SystemExit(f"trainer exited with {proc.returncode}; see {args.out}/stderr.log")
    report(args.out, t0, args.threshold)


def report(run_dir: Path, t0: float, threshold: float) -> None:
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    by_step: dict[int, dict[str, float]] = {}
    times: dict[int, float] = {}
    for m in metrics:
        by_step.setdefault(m["step"], {})[m["name"]] = m["value"]
        times[m["step"]] = m["time"]
    rows = [(s, v) for s, v in sorted(by_step.items()) if "attr_acc_mean" in v]
    print(f"chance attr_acc_mean = {CHANCE:.3f}")
    cols = [
        "step",
        "wall s",
        "attr_acc_mean",
        "attr_all_correct",
        "heldout_attr_acc_mean",
        "domain_fid",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|---:|---:|---:|---:|---:|---:|")
    first = None
    for s, v in rows:
        wall = times[s] - t0
        print(
            f"| {s} | {wall:.0f} | {v['attr_acc_mean']:.3f} | {v['attr_all_correct']:.3f} "
            f"| {v['heldout_attr_acc_mean']:.3f} | {v['domain_fid']:.1f} |"
        )
        if first is None and v["attr_acc_mean"] >= threshold:
            first = (s, wall)
    ips = [m["value"] for m in metrics if m["name"] == "train/images_per_s"]
    if ips:
        print(f"median training images/s: {sorted(ips)[len(ips) // 2]:.1f}")
    if first:
        step, wall = first
        print(f"attr_acc_mean >= {threshold} first at step {step}, {wall:.0f} s after launch")
    else:
        print(f"attr_acc_mean never reached {threshold}")
    print(json.dumps({"run_dir": str(run_dir), "evaluations": len(rows)}))


if __name__ == "__main__":
    main()
