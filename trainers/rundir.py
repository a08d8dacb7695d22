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
  tensorboard/     event files mirroring metrics.jsonl (log.trackers; trainers/trackers.py)
  stdout.log stderr.log
```

Every file that a crash could leave half-written is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from trainers.files import atomic_write_bytes

STATUSES = ("ok", "stopped", "failed")

# evals/step_{step:07d}.npz; the pattern accepts any number of digits.
EVAL_IMAGES_RE = re.compile(r"step_(\d+)\.npz")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any | None:
    """A JSON file's content, or None when it is missing, empty or torn (a crash while a
    non-atomic writer had it half-written): callers treat that file as not written yet."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def repair_jsonl_tail(path: Path) -> None:
    """Make a JSONL file end with a newline, so that the next append starts a line of its own:
    a torn last line (a crash mid-append) is cut off; a complete record that only lacks its
    newline gets one."""
    try:
        f = open(path, "rb+")  # noqa: SIM115 (closed by the with below)
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        start = data.rfind(b"\n") + 1  # 0 when the file is one torn line
        try:
            json.loads(data[start:])
        except (json.JSONDecodeError, UnicodeDecodeError):
            f.truncate(start)
        else:
            f.write(b"\n")


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


def _metric_key(record: dict[str, Any]) -> Any:
    return (record.get("step"), record.get("name"))


def _sample_key(record: dict[str, Any]) -> Any:
    return record.get("path")


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size)


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
        self.trackers: list[Any] = []
        """Copies of the logged metrics (``trainers/trackers.py``: TensorBoard, W&B), attached
        by the trainer session: every trainer logs through :meth:`log_metrics`."""
        # path -> ((inode, size) of the file as this process last left it, record keys in it)
        self._keys: dict[Path, tuple[tuple[int, int] | None, set[Any]]] = {}

    def create(self) -> None:
        for d in (self.root, self.samples, self.checkpoints):
            d.mkdir(parents=True, exist_ok=True)

    # -- config ---------------------------------------------------------------------------
    def write_config(self, config: dict[str, Any], config_hash: str) -> None:
        atomic_write_json(self.config, {**config, "config_hash": config_hash})

    def read_config(self) -> dict[str, Any] | None:
        """The config, or None when there is none (or only a torn one: it is written again,
        and a resumed checkpoint checks its own config hash)."""
        return read_json(self.config)

    # -- metrics and samples ----------------------------------------------------------------
    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        """Append one record per value. A (step, name) already in the file (a resumed attempt
        redoing what a killed one wrote after its checkpoint, e.g. the final evaluation) is
        replaced rather than written twice."""
        now = time.time()
        records = []
        for name, value in values.items():
            v = float(value)
            # JSON has no NaN/inf; write null so every line stays parseable.
            records.append(
                {"step": step, "name": name, "value": v if math.isfinite(v) else None, "time": now}
            )
        self._append_unique(self.metrics, records, _metric_key)
        for tracker in self.trackers:
            try:
                tracker.log(step, values)
            except Exception as err:  # a tracker (W&B's network, ...) never stops training
                print(f"warning: {type(tracker).__name__} failed to log: {err}", file=sys.stderr)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics)

    def append_manifest(self, records: list[dict[str, Any]]) -> None:
        """Append sample records; one for a path already listed replaces it (as in the store)."""
        self.samples.mkdir(parents=True, exist_ok=True)
        self._append_unique(self.manifest, records, _sample_key)

    def _append_unique(
        self, path: Path, records: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any]
    ) -> None:
        """Append ``records`` to a JSONL file, after repairing a torn last line (so the first
        new record does not glue onto it); rewrite the file atomically instead when a record's
        key is already there. The keys in the file are cached, keyed by the file's (inode,
        size) as this process left it, so each append reads the file only if someone else
        changed it (a truncation on resume, another writer)."""
        stat = _stat(path)
        cached = self._keys.get(path)
        if cached is None or cached[0] != stat:
            repair_jsonl_tail(path)
            keys = {key(r) for r in read_jsonl(path)}
        else:
            keys = cached[1]
        new_keys = [key(r) for r in records]
        if keys.intersection(new_keys):
            # A dict keeps one record per key in first-seen order; the new record wins.
            merged = {key(r): r for r in read_jsonl(path)}
            merged.update(zip(new_keys, records, strict=True))
            _write_jsonl(path, merged.values())
        else:
            with open(path, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in records))
                f.flush()
        keys.update(new_keys)
        self._keys[path] = (_stat(path), keys)

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
        ``step`` (a resumed run redoes them), and a torn last line (so that later appends
        start on a line of their own). A record written twice (a metric at one step, a sample
        file: a killed attempt's and the resumed attempt's) is kept once, the later winning, as
        the store keys them. Each file is rewritten atomically (a kill during the repair
        leaves the old file or the new one)."""
        for path, key in ((self.metrics, _metric_key), (self.manifest, _sample_key)):
            if not path.exists():
                continue
            # A dict keeps one record per key, in first-seen order, the last record winning.
            kept = {key(r): r for r in read_jsonl(path) if r.get("step", 0) <= step}
            _write_jsonl(path, kept.values())
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
        """How the run ended, or None while it runs (or when it died before writing one; a
        torn file, which only a crashed non-atomic writer leaves, reads as none)."""
        status = read_json(self.status)
        return status if isinstance(status, dict) and "status" in status else None

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
        """The resumable state, or None when there is no checkpoint.

        Loaded with ``weights_only=True``: a checkpoint holds only tensors, numbers, strings and
        containers of them (module/optimizer/scheduler state dicts, the torch RNG state), so a
        crafted file cannot run code when it is unpickled. Raises ``DataError``
        (the trainer exits 2) for a truncated, garbage or crafted file."""
        import pickle

        from trainers.errors import DataError

        if not self.checkpoint.exists():
            return None
        fix = (
            f"delete {self.checkpoint} to restart the run from scratch "
            "(only the latest checkpoint is kept)"
        )
        try:
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "weights_only" in str(err):  # torch's refusal of a non-tensor global
                first = str(err).strip().splitlines()[0][:300]
                raise DataError(
                    f"checkpoint {self.checkpoint} holds objects other than tensors and plain "
                    f"containers and was refused as unsafe to load ({first}); {fix}"
                ) from None
            raise DataError(f"checkpoint {self.checkpoint} cannot be read ({err}); {fix}") from None
        except Exception as err:  # truncated, garbage, not a torch file at all
            raise DataError(
                f"checkpoint {self.checkpoint} cannot be read ({type(err).__name__}: {err}); {fix}"
            ) from None
        if not isinstance(state, dict) or "step" not in state:
            raise DataError(f"checkpoint {self.checkpoint} is not a trainer checkpoint; {fix}")
        return state
