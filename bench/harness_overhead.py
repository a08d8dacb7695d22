"""What the harness costs per trial, apart from training: launch to first training step, and
trainer end to trial recorded (ingested into DuckDB, told to Optuna).

    uv run python bench/harness_overhead.py --trials 4 --out bench/out/overhead

Runs a short study of the embedded default (the default study's base config with few steps,
``log_every: 1`` so the first step is timestamped) through the real runner and trainer
processes, then reads the timestamps the pieces already record:

- launch -> first step: the trial's ``started_at`` in the store (before its config is written
  and the trainer launched) to the ``time`` of the first ``train/loss`` record in metrics.jsonl.
  This is process start, imports, data and model construction, and one training step.
- end -> ingested: ``status.json``'s ``time`` (the trainer's last write) to the trial's
  ``ended_at`` in the store (after the run directory was ingested and Optuna was told). This is
  process exit, the runner's poll interval (0.5 s), the DuckDB ingest and the Optuna update.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.runner import StudyRunner  # noqa: E402
from harness.spec import load_study  # noqa: E402
from harness.store import Store  # noqa: E402
from trainers.rundir import read_jsonl  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trials", type=int, default=4, help="at most 4 (one per sampler)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=REPO / "bench/out/overhead")
    args = p.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty: pass a fresh --out")
    args.out.mkdir(parents=True, exist_ok=True)
    default = yaml.safe_load((REPO / "studies/timestep.yaml").read_text())
    base = default["base"]
    base["train"].update(steps=args.steps, log_every=1, checkpoint_every=args.steps)
    base["eval"].update(every=args.steps, num_images=8)
    study = {
        "name": "overhead",
        "base": base,
        "search": {"timesteps.sampler": ["uniform", "logit_normal", "mode", "cosmap"]},
        "objective": {"metric": "domain_fid", "direction": "minimize"},
        "trials": args.trials,
        "optuna": {"sampler": "grid", "pruner": "none", "seed": 0},
    }
    path = args.out / "overhead.yaml"
    path.write_text(yaml.safe_dump(study))
    t0 = time.time()
    StudyRunner(load_study(path), args.out / "work").run()
    wall = time.time() - t0
    store = Store(args.out / "work" / "harness.duckdb")
    rows = []
    for t in store.trials("overhead"):
        if not t["run_id"]:  # a repeat of an earlier config: nothing was launched
            continue
        run_dir = Path(
            store.query("SELECT run_dir FROM runs WHERE run_id = ?", [t["run_id"]])[0]["run_dir"]
        )
        first = next(m for m in read_jsonl(run_dir / "metrics.jsonl") if m["name"] == "train/loss")
        end = json.loads((run_dir / "status.json").read_text())["time"]
        rows.append((t["number"], first["time"] - t["started_at"], t["ended_at"] - end))
    print("| trial | launch -> first step (s) | end -> ingested (s) |")
    print("|---:|---:|---:|")
    for n, a, b in rows:
        print(f"| {n} | {a:.2f} | {b:.2f} |")
    med = (statistics.median(r[1] for r in rows), statistics.median(r[2] for r in rows))
    print(f"| median | {med[0]:.2f} | {med[1]:.2f} |")
    print(f"study wall time: {wall:.1f} s for {len(rows)} trials of {args.steps} steps")


if __name__ == "__main__":
    main()
