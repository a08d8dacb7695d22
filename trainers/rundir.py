"""The run directory: the only thing a trainer process and the harness share. The harness
writes ``config.json`` and launches ``python -m trainers.<trainer> --config ... --run-dir ...``;
everything it learns about the run (progress, metrics, samples, the model, how it ended) it
reads from these files.

```
run_dir/
  config.json      the full resolved trainer config plus its hash ("config_hash")
  metrics.jsonl    {"step", "name", "value", "time"} one per line, appended
  samples/         PNG images + manifest.jsonl {prompt_id, prompt, seed, nfe, cfg, path, ...}
  checkpoints/     latest.pt: resumable state (model, EMA, optimizer, RNG, step)
  evals/           step_0000500.npz: per-image results of each domain evaluation (the shapes
                   data): labels, correctness, features, sampling seeds and the reference
                   statistics, from which the logged metrics are recomputed
                   (trainers/evaluate.py: read_eval_images, eval_image_files)
  final/           the trained model in the diffusers format (save_pretrained per component)
  status.json      written when the trainer ends: {"status": ok|stopped|failed, "reason", "step"}
  stdout.log stderr.log
```

Every file that a crash could leave half-written is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from trainers.files import atomic_write_bytes

STATUSES = ("ok", "stopped", "failed")

# evals/step_{step:07d}.npz; the pattern accepts any number of digits.
EVAL_IMAGES_RE = re.compile(r"step_(\d+)\.npz")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (a crash mid-append) is skipped."""
    if not path.exists():
        return []
    out = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return out


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.metrics = self.root / "metrics.jsonl"
        self.samples = self.root / "samples"
        self.manifest = self.samples / "manifest.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.checkpoint = self.checkpoints / "latest.pt"
        self.evals = self.root / "evals"
        self.final = self.root / "final"
        self.status = self.root / "status.json"
        self.stdout = self.root / "stdout.log"
        self.stderr = self.root / "stderr.log"

    def create(self) -> None:
        for d in (self.root, self.samples, self.checkpoints):
            d.mkdir(parents=True, exist_ok=True)

    # -- config ---------------------------------------------------------------------------
    def write_config(self, config: dict[str, Any], config_hash: str) -> None:
        atomic_write_json(self.config, {**config, "config_hash": config_hash})

    def read_config(self) -> dict[str, Any] | None:
        if not self.config.exists():
            return None
        return json.loads(self.config.read_text())

    # -- metrics and samples ----------------------------------------------------------------
    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        now = time.time()
        lines = []
        for name, value in values.items():
            v = float(value)
            # JSON has no NaN/inf; write null so every line stays parseable.
            lines.append(
                json.dumps(
                    {
                        "step": step,
                        "name": name,
                        "value": v if math.isfinite(v) else None,
                        "time": now,
                    }
                )
            )
        with open(self.metrics, "a") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics)

    def append_manifest(self, records: list[dict[str, Any]]) -> None:
        self.samples.mkdir(parents=True, exist_ok=True)
        with open(self.manifest, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))

    def eval_images(self, step: int) -> Path:
        """Where the per-image results of the evaluation at ``step`` go."""
        return self.evals / f"step_{step:07d}.npz"

    def eval_image_files(self) -> dict[int, Path]:
        """``{step: path}`` of the per-image evaluation files, by step."""
        if not self.evals.is_dir():
            return {}
        found = {}
        for path in self.evals.iterdir():
            m = EVAL_IMAGES_RE.fullmatch(path.name)
            if m:
                found[int(m.group(1))] = path
        return dict(sorted(found.items()))

    def truncate_after(self, step: int) -> None:
        """Drop metrics, sample records and per-image evaluation files of steps after
        ``step`` (a resumed run redoes them)."""
        for path in (self.metrics, self.manifest):
            records = read_jsonl(path)
            kept = [r for r in records if r.get("step", 0) <= step]
            if len(kept) != len(records) or path.exists():
                atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        for s, path in self.eval_image_files().items():
            if s > step:
                path.unlink(missing_ok=True)

    # -- status ---------------------------------------------------------------------------
    def write_status(self, status: str, step: int, reason: str = "", **extra: Any) -> None:
        assert status in STATUSES, status
        atomic_write_json(
            self.status,
            {"status": status, "step": step, "reason": reason, "time": time.time(), **extra},
        )

    def read_status(self) -> dict[str, Any] | None:
        return json.loads(self.status.read_text()) if self.status.exists() else None

    def clear_status(self) -> None:
        self.status.unlink(missing_ok=True)

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoints / f".latest.pt.tmp{os.getpid()}"
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint)

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint.exists():
            return None
        try:
            return torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        except Exception as err:  # a truncated file is the only way a renamed checkpoint breaks
            raise RuntimeError(
                f"checkpoint {self.checkpoint} cannot be read ({err}); "
                "delete it to restart the run from scratch"
            ) from None
