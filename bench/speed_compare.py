"""Trainer speed of two commits, measured side by side on this machine.

    uv run python bench/speed_compare.py                       # 32f44ca vs the working tree
    uv run python bench/speed_compare.py --base 32f44ca --head HEAD --rounds 3 --parallel 2

Each commit is checked out into a temporary git worktree (the working tree itself is used for
``--head .``), and the default study's training run (``studies/timestep.yaml``'s base config,
uniform sampler, seed 0: 240 steps of batch 32 at 16 px, evaluation and samples at the end) is
launched as the study runner launches it: ``python -m trainers.flow --config --run-dir`` with
``OMP_NUM_THREADS=--threads``, ``--parallel`` copies side by side (the study runs two). The two
commits alternate (base, head, base, head, ...) so that drift in the machine's speed hits both.

Reported per commit (median over rounds): training images/s (the trainer's own
``train/images_per_s``, which leaves out evaluation; summed over the parallel copies) and the
wall time of a whole run (process start to exit, evaluation and export included), and the ratio
head / base. Both commits read the same config file; a commit that rejects it fails loudly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_throughput import study_base  # bench/ is the script directory

REPO = Path(__file__).resolve().parents[1]


def study_config(steps: int | None) -> dict:
    """The default study's first configuration (uniform sampler, seed 0), as the runner writes
    it; ``steps`` overrides its training steps (evaluation at the end)."""
    config = study_base(REPO / "studies" / "timestep.yaml")
    if steps is not None:
        config["train"]["steps"] = steps
        config["eval"]["every"] = steps
    return config


def checkout(rev: str, root: Path) -> Path:
    """A worktree of ``rev`` under ``root`` (``.`` is the working tree itself)."""
    if rev == ".":
        return REPO
    path = root / rev.replace("/", "_")
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(path), rev],
        check=True,
        capture_output=True,
    )
    return path


def run_once(tree: Path, config: Path, work: Path, parallel: int, threads: int) -> dict:
    """``parallel`` trainer processes of ``tree`` side by side; their images/s and wall times."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(tree)}
    env["HARNESS_CAPTURED"] = "1"
    procs, dirs = [], []
    start = time.perf_counter()
    for i in range(parallel):
        run_dir = work / f"run{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        dirs.append(run_dir)
        cmd = [sys.executable, "-m", "trainers.flow", "--config", str(config)]
        procs.append(
            subprocess.Popen(
                [*cmd, "--run-dir", str(run_dir)],
                cwd=tree,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
    walls = []
    for p in procs:
        _, err = p.communicate()
        walls.append(time.perf_counter() - start)
        if p.returncode:
            raise SystemExit(f"{tree}: trainer failed ({p.returncode}):\n{err.decode()[-3000:]}")
    ips = []
    for d in dirs:
        rates = [
            r["value"]
            for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
            if r["name"] == "train/images_per_s"
        ]
        ips.append(statistics.median(rates))
    return {"images_per_s": sum(ips), "wall_s": max(walls)}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", default="32f44ca", help="the commit to compare against")
    p.add_argument("--head", default=".", help="a commit, or . for the working tree")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parallel", type=int, default=2, help="trainer processes side by side")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process")
    p.add_argument("--steps", type=int, default=None, help="override train.steps (and eval)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="speed-compare-"))
    trees = {}
    try:
        trees = {"base": checkout(args.base, root), "head": checkout(args.head, root)}
        config = root / "config.json"
        config.write_text(json.dumps(study_config(args.steps)))
        results: dict[str, list[dict]] = {"base": [], "head": []}
        for r in range(args.rounds):
            for name in ("base", "head"):
                out = run_once(trees[name], config, root / name, args.parallel, args.threads)
                results[name].append(out)
                print(
                    f"round {r + 1} {name:4s} {out['images_per_s']:7.1f} img/s "
                    f"{out['wall_s']:6.1f} s",
                    flush=True,
                )
    finally:
        for tree in trees.values():
            if tree != REPO:
                subprocess.run(
                    ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                    check=False,
                    capture_output=True,
                )
        shutil.rmtree(root, ignore_errors=True)

    summary = {
        name: {
            "rev": getattr(args, name),
            "images_per_s": statistics.median(x["images_per_s"] for x in rows),
            "wall_s": statistics.median(x["wall_s"] for x in rows),
            "rounds": rows,
        }
        for name, rows in results.items()
    }
    ratio = summary["head"]["images_per_s"] / summary["base"]["images_per_s"]
    wall = summary["base"]["wall_s"] / summary["head"]["wall_s"]
    summary["speedup"] = {"images_per_s": ratio, "wall": wall}
    print(
        f"\nbase {args.base}: {summary['base']['images_per_s']:.1f} img/s, "
        f"{summary['base']['wall_s']:.1f} s per run\n"
        f"head {args.head}: {summary['head']['images_per_s']:.1f} img/s, "
        f"{summary['head']['wall_s']:.1f} s per run\n"
        f"speed-up: {ratio:.2f}x images/s, {wall:.2f}x wall time "
        f"({args.parallel} processes x {args.threads} thread(s), {args.rounds} rounds)"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
