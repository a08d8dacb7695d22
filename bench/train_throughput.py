"""Training throughput, peak memory and (on CUDA) MFU of one preset.

    uv run python bench/train_throughput.py --preset tiny --resolution 32 --batch-size 64
    uv run python bench/train_throughput.py --preset dit-b --resolution 256 --batch-size 32 \
        --device cuda --compile          # pixel space, patch 2 -> 16384 tokens: use --patch-size 8

It builds the real trainer (``FlowTrainer``) on the embedded data, runs warm-up steps, then
times ``--steps`` optimizer steps. FLOPs per step are counted once with
``torch.utils.flop_counter.FlopCounterMode`` (forward + backward of the real step), so MFU =
achieved FLOP/s / the device's peak dense bf16 FLOP/s (``--peak-tflops``, default H100 SXM 989).
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainers.config import parse_config
from trainers.rundir import RunDir
from trainers.train import Dist, FlowTrainer


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="tiny")
    p.add_argument("--backbone", default="sd3")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="device peak dense bf16 TFLOP/s for MFU"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    overrides = {"patch_size": args.patch_size} if args.patch_size else {}
    cfg = parse_config(
        {
            "model": {"backbone": args.backbone, "preset": args.preset, "overrides": overrides},
            "data": {"resolution": args.resolution, "size": max(4 * args.batch_size, 512)},
            "train": {
                "steps": 10**9,
                "batch_size": args.batch_size,
                "precision": args.precision,
                "compile": args.compile,
            },
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = FlowTrainer(cfg, RunDir(tmp), Dist(device=torch.device(args.device)))
        n_params = sum(p.numel() for p in trainer.net.denoiser.parameters())
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        for _ in range(args.warmup):
            trainer.train_step()
        with FlopCounterMode(display=False) as counter:
            trainer.train_step()
        flops_per_step = counter.get_total_flops()
        sync()
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        sync()
        elapsed = time.perf_counter() - t0

    images_per_s = args.steps * args.batch_size / elapsed
    result = {
        "preset": args.preset,
        "backbone": args.backbone,
        "params_M": round(n_params / 1e6, 2),
        "resolution": args.resolution,
        "patch_size": args.patch_size or "preset",
        "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "compile": args.compile,
        "images_per_s": round(images_per_s, 1),
        "step_ms": round(1000 * elapsed / args.steps, 1),
        "gflop_per_image": round(flops_per_step / args.batch_size / 1e9, 3),
        "achieved_tflops": round(flops_per_step * args.steps / elapsed / 1e12, 3),
    }
    if args.device == "cuda":
        result["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["mfu"] = round(result["achieved_tflops"] / args.peak_tflops, 3)
    else:
        result["peak_rss_MiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
