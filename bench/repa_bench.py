"""REPA's cost per training step against the same step without it (CPU by default).

    uv run python bench/repa_bench.py --preset tiny --resolution 16 --batch-size 32

Builds the real trainer (``FlowTrainer``) twice on the embedded data, identical but for
``repa.weight`` (0: baseline, REPA off), runs warm-up steps, then times ``--steps`` optimizer
steps of each, alternating rounds so that drift in the machine's load hits both alike. The
extra cost is the frozen encoder's forward pass (no gradient), the projector's forward and
backward, and the cosine loss; the backbone's forward and backward are the same in both.
Reports the median seconds per step of each and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainers.config import parse_config
from trainers.rundir import RunDir
from trainers.train import Dist, FlowTrainer


def build(args: argparse.Namespace, weight: float, root: Path) -> FlowTrainer:
    cfg = parse_config(
        {
            "model": {"backbone": args.backbone, "preset": args.preset},
            "data": {"kind": "shapes", "resolution": args.resolution, "size": 2048},
            "text": {"encoder": "vocab", "width": 64, "layers": 1},
            "train": {"steps": 10_000, "batch_size": args.batch_size, "precision": "fp32"},
            "eval": {"loss_images": 0},
            "repa": {
                "weight": weight,
                "layer": args.layer,
                "encoder": args.encoder,
                "projector_dim": args.projector_dim,
            },
        }
    )
    run = RunDir(root / f"w{weight}")
    run.create()
    return FlowTrainer(cfg, run, Dist())


def time_steps(trainer: FlowTrainer, n: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per step. CPU time is the steadier figure on a shared
    machine: other processes' load stretches wall time but not this process's CPU seconds."""
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        trainer.train_step()
    return (time.perf_counter() - start) / n, (time.process_time() - start_cpu) / n


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="tiny")
    p.add_argument("--backbone", default="sd3", choices=["sd3", "pixart"])
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--encoder", default="shapes-ssl")
    p.add_argument("--projector-dim", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {"baseline": build(args, 0.0, Path(tmp)), "repa": build(args, 0.5, Path(tmp))}
        for t in trainers.values():
            time_steps(t, args.warmup)
        wall: dict[str, list[float]] = {k: [] for k in trainers}
        cpu: dict[str, list[float]] = {k: [] for k in trainers}
        for _ in range(args.rounds):
            for name, t in trainers.items():
                w, c = time_steps(t, args.steps)
                wall[name].append(w)
                cpu[name].append(c)
    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    out = {
        "config": vars(args) | {"json": None},
        "threads": torch.get_num_threads(),
        "wall_s_per_step": med_wall,
        "cpu_s_per_step": med_cpu,
        "wall_rounds": wall,
        "repa_over_baseline_wall": med_wall["repa"] / med_wall["baseline"],
        "repa_over_baseline_cpu": med_cpu["repa"] / med_cpu["baseline"],
    }
    print(json.dumps(out, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
