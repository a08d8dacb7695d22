"""The default study's training step under alternative settings, timed side by side.

    uv run python bench/step_variants.py                          # all variants, 5 rounds
    uv run python bench/step_variants.py --variants plain,new --rounds 8

One process builds one trainer per variant from ``studies/timestep.yaml``'s first configuration
(UNet micro + MiniLM, batch 32 at 16 px, one thread), then times 4 steps of each in turn for
``--rounds`` rounds, so that drift in the machine's speed hits every variant alike. Reported:
median ms per image, and per 32 images (one step of the study).

Variants:
  new      the trainer as it is (fused AdamW, foreach EMA, channels-last UNet weights)
  plain    the reference settings: per-tensor AdamW, EMA loop, contiguous weights
  bf16     ``train.precision: bf16`` (autocast; AMX where the CPU has it)
  b96      batch 96: the ceiling of training three seeds as one batch in one process
  math     scaled-dot-product attention forced to the math kernel instead of flash
  compile  ``train.compile: true`` (the denoiser compiled in place; compile time printed)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from train_throughput import study_base  # bench/ is the script directory

from trainers.config import parse_config
from trainers.rundir import RunDir
from trainers.train import Dist, FlowTrainer

REPO = Path(__file__).resolve().parents[1]


def build(base: dict, variant: str) -> FlowTrainer:
    raw = copy.deepcopy(base)
    raw["train"].update(
        precision="bf16" if variant == "bf16" else "auto",
        batch_size=96 if variant == "b96" else raw["train"]["batch_size"],
        compile=variant == "compile",
    )
    cfg = parse_config(raw)
    run = RunDir(tempfile.mkdtemp())
    run.create()
    trainer = FlowTrainer(cfg, run, Dist())
    if variant == "plain":
        trainer.net.denoiser.to(memory_format=torch.contiguous_format)
        t = cfg.train
        trainer.opt = torch.optim.AdamW(
            trainer.params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay, foreach=False
        )
        trainer.sched = torch.optim.lr_scheduler.LambdaLR(trainer.opt, trainer.sched.lr_lambdas[0])
        trainer.ema.foreach = False
    return trainer


def context(variant: str) -> Callable[[], contextlib.AbstractContextManager]:
    if variant == "math":
        return lambda: sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--variants", default="new,plain,bf16,b96,math")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = study_base(REPO / "studies" / "timestep.yaml")
    variants = args.variants.split(",")
    trainers = {}
    for v in variants:
        trainer = build(base, v)
        t0 = time.perf_counter()
        with context(v)():
            for _ in range(3):
                trainer.train_step()
        print(f"{v:8s} first 3 steps {time.perf_counter() - t0:6.1f} s", flush=True)
        trainers[v] = trainer
    per_image: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v, trainer in trainers.items():
            with context(v)():
                t0 = time.perf_counter()
                for _ in range(4):
                    trainer.train_step()
                elapsed = time.perf_counter() - t0
            per_image[v].append(elapsed / 4 / trainer.cfg.train.batch_size)
    for v in variants:
        ms = sorted(per_image[v])[len(per_image[v]) // 2] * 1000
        print(f"{v:8s} {ms:6.2f} ms/image  {32 * ms:5.0f} ms per 32 images")


if __name__ == "__main__":
    main()
