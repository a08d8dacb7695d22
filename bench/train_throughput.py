"""Training throughput, peak memory and (on CUDA) MFU of one preset.

    uv run python bench/train_throughput.py --preset tiny --resolution 32 --batch-size 64
    uv run python bench/train_throughput.py --preset dit-b --resolution 256 --batch-size 32 \
        --device cuda --compile          # pixel space, patch 2 -> 16384 tokens: use --patch-size 8

It builds the real trainer (``FlowTrainer``) on the embedded data, runs warm-up steps, then
times ``--steps`` optimizer steps. FLOPs per step are counted once with
``torch.utils.flop_counter.FlopCounterMode`` (forward + backward of the real step), so MFU =
achieved FLOP/s / the device's peak dense bf16 FLOP/s (``--peak-tflops``, default H100 SXM 989).
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS on CPU.

On a CPU the achieved FLOP/s is set against the machine's peak, computed (not measured) as
threads x clock x FLOPs per cycle per core (:func:`cpu_peak_gflops`): fp32 with AVX-512 is two
FMA units x 16 lanes x 2 = 64 FLOPs/cycle (AVX2: 32); bf16 with AMX is 1024 multiply-adds per
cycle per core = 2048 FLOPs/cycle (AVX512-BF16 alone: 2 units x 32 pairs x 2 = 128). The clock
is /proc/cpuinfo's "cpu MHz" (a VM reports its nominal clock; turbo is not counted), and two FMA
units per core is an assumption true of server Xeons, not read off the CPU.

    uv run python bench/train_throughput.py --study studies/timestep.yaml --threads 1
        # the default study's exact model (UNet micro + MiniLM, batch 32 at 16 px)
    PYTHONPATH=/tmp/old-checkout uv run python bench/train_throughput.py --config CONFIG.json
        # the same measurement of another commit's trainer (a worktree of it)
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


def cpu_peak_gflops(threads: int) -> dict[str, float]:
    """Peak GFLOP/s of ``threads`` cores from /proc/cpuinfo (see the module docstring)."""
    info = Path("/proc/cpuinfo").read_text()
    mhz = float(
        next(line for line in info.splitlines() if line.startswith("cpu MHz")).split(":")[1]
    )
    flags = set(next(line for line in info.splitlines() if line.startswith("flags")).split())
    fp32 = 64 if "avx512f" in flags else 32 if "fma" in flags else 8
    bf16 = 2048 if "amx_bf16" in flags else 128 if "avx512_bf16" in flags else fp32
    ghz = mhz / 1000
    return {
        "clock_ghz": ghz,
        "fp32": threads * ghz * fp32,
        "bf16": threads * ghz * bf16,
    }


def study_base(path: Path) -> dict:
    """The first configuration (seed 0) of a study file, as the runner writes it."""
    from harness.spec import load_study

    spec = load_study(path)
    params = spec.configurations()[0] if spec.design != "search" else {}
    return spec.seed_config(params, 0)


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
    p.add_argument(
        "--study", type=Path, default=None, help="train this study's first configuration instead"
    )
    p.add_argument(
        "--config", type=Path, default=None, help="train this trainer config (JSON) instead"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    overrides = {"patch_size": args.patch_size} if args.patch_size else {}
    raw = (
        study_base(args.study)
        if args.study
        else json.loads(args.config.read_text())
        if args.config
        else {
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
    if args.study or args.config:
        raw["train"].update(steps=10**9, precision=args.precision, compile=args.compile)
        args.batch_size = raw["train"]["batch_size"]
        args.preset, args.backbone = raw["model"]["preset"], raw["model"]["backbone"]
        args.resolution = raw["data"]["resolution"]
    cfg = parse_config(raw)
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
        peak = cpu_peak_gflops(torch.get_num_threads())
        result["cpu_peak_gflops"] = {k: round(v, 1) for k, v in peak.items()}
        dtype = "bf16" if args.precision == "bf16" else "fp32"
        achieved = flops_per_step * args.steps / elapsed / 1e9
        result["achieved_gflops"] = round(achieved, 1)
        result["fraction_of_peak"] = round(achieved / peak[dtype], 3)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
