"""Helpers for tests that run the trainer as a real subprocess."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

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


def check_eval_images(images: Any, logged: dict[str, float]) -> None:
    """The logged domain metrics, recomputed from a per-image evaluation file
    (``trainers.evaluate.EvalImages``): they must agree to float tolerance."""
    from trainers.data.shapes import ATTRIBUTE_NAMES
    from trainers.domain import frechet_distance

    assert list(images.attributes) == list(ATTRIBUTE_NAMES)
    for prefix, correct in (("", images.seen_correct), ("heldout_", images.heldout_correct)):
        accs = [correct[:, j].mean() for j in range(len(ATTRIBUTE_NAMES))]
        for name, acc in zip(ATTRIBUTE_NAMES, accs, strict=True):
            assert logged[f"{prefix}attr_acc/{name}"] == pytest.approx(acc)
        assert logged[f"{prefix}attr_acc_mean"] == pytest.approx(np.mean(accs))
        assert logged[f"{prefix}attr_all_correct"] == pytest.approx(correct.all(1).mean())
    f = images.seen_features
    fid = frechet_distance(
        f.mean(0), np.cov(f, rowvar=False), images.reference_mean, images.reference_cov
    )
    assert logged["domain_fid"] == pytest.approx(fid, rel=1e-6, abs=1e-10)
