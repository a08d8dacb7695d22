"""Helpers for tests that run the trainer as a real subprocess."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

# A config small enough for a 2-core CPU: micro backbone, 16x16 images.
TINY: dict[str, Any] = {
    "seed": 0,
    "model": {"backbone": "sd3", "preset": "micro"},
    "data": {"kind": "shapes", "resolution": 16, "size": 256, "seed": 0},
    "text": {"encoder": "vocab", "width": 32, "layers": 1, "cfg_dropout": 0.1},
    "timesteps": {"sampler": "logit_normal"},
    "train": {
        "steps": 30,
        "batch_size": 8,
        "lr": 1e-3,
        "warmup_steps": 5,
        "log_every": 5,
        "checkpoint_every": 10,
    },
    "eval": {"every": 1000, "num_images": 8, "reference_images": 64, "steps": 4},
    "sample": {"steps": 4, "num_prompts": 4, "seeds": [0, 1]},
}


def config(**overrides: dict[str, Any]) -> dict[str, Any]:
    """TINY with per-section overrides, e.g. config(train={"steps": 5})."""
    cfg = copy.deepcopy(TINY)
    for section, values in overrides.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def trainer_cmd(config_path: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainers.flow",
        "--config",
        str(config_path),
        "--run-dir",
        str(run_dir),
    ]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO)
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run_trainer(
    cfg: dict[str, Any], run_dir: Path, timeout: float = 300
) -> subprocess.CompletedProcess:
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = write_config(run_dir.parent / f"{run_dir.name}.json", cfg)
    return subprocess.run(
        trainer_cmd(cfg_path, run_dir),
        env=env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def status(run_dir: Path) -> dict[str, Any] | None:
    p = run_dir / "status.json"
    return json.loads(p.read_text()) if p.exists() else None
