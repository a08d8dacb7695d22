"""Copies of the trainer's metrics for the tools users already have: TensorBoard event files
(``<run dir>/tensorboard/``, on by default) and Weights & Biases (when ``wandb`` is installed and
asked for). ``metrics.jsonl`` stays the record the harness reads; trackers only mirror it.

Every trainer gets them through one seam: :meth:`trainers.rundir.RunDir.log_metrics` forwards
each logged step to the trackers that :func:`open_trackers` returned (attached by the trainer
session once it knows the step it starts or resumes at).

Resume: ``metrics.jsonl`` keeps the records up to the checkpoint's step and the steps after it
are trained (and logged) again. TensorBoard's ``purge_step`` does the same to event files: a
writer opened with ``purge_step=step + 1`` makes readers drop the earlier session's points at
steps > ``step`` (step 0 for a run started afresh), so a resumed run shows each step once. W&B
resumes the same run id (kept in ``<run dir>/wandb/run_id``); it drops points whose step is
not above the last one it has.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from trainers.config import ConfigError

TRACKERS: tuple[str, ...] = ("tensorboard", "wandb")
WANDB_DEFAULT_PROJECT = "diffusion-harness"


class Tracker(Protocol):
    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars through ``torch.utils.tensorboard.SummaryWriter``, one tag per metric name."""

    def __init__(self, log_dir: Path, resume_step: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # torch imports tensorboard lazily, only here
            raise ConfigError(
                f"log.trackers includes tensorboard but it cannot be imported ({err}); install "
                "it (`uv add tensorboard`) or set log.trackers to [] in the trainer config"
            ) from None
        self.log_dir = log_dir
        # purge_step: readers drop an earlier session's points after the checkpoint's step, as
        # metrics.jsonl does (truncate_after); a fresh start (0) drops those of an attempt that
        # was killed before its first checkpoint.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, float(value), global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run per run directory; wandb is imported lazily (it is not a dependency).

    wandb's own conventions hold: ``WANDB_API_KEY`` / ``WANDB_MODE`` / ``WANDB_PROJECT`` /
    ``WANDB_ENTITY`` are read by wandb from the environment (the key is never passed, printed
    or stored here). Without a key and without ``WANDB_MODE``, the run is ``offline`` (files
    under ``<run dir>/wandb/``, ``wandb sync`` uploads them): a trainer launched by the harness
    has no terminal to answer wandb's login prompt."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any], resume_step: int = 0):
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "log.trackers includes wandb but the wandb package is not installed; install it "
                "(`uv pip install wandb`) or remove wandb from log.trackers in the trainer config"
            ) from None
        self.dir = run_dir / "wandb"
        self.dir.mkdir(parents=True, exist_ok=True)
        id_file = self.dir / "run_id"
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:  # wandb ids: letters and digits; a stable one lets a resumed run continue it
            run_id = secrets.token_hex(8)
            id_file.write_text(run_id + "\n")
        kwargs: dict[str, Any] = {
            "project": os.environ.get("WANDB_PROJECT") or WANDB_DEFAULT_PROJECT,
            "name": run_dir.name,
            "dir": str(run_dir),
            "id": run_id,
            "resume": "allow",
            "config": dict(config),
        }
        if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
            kwargs["mode"] = "offline"
        self.run = wandb.init(**kwargs)
        self.resume_step = resume_step

    def log(self, step: int, values: Mapping[str, float]) -> None:
        # wandb has no NaN in its charts' JSON either; non-finite values are left out.
        finite = {k: float(v) for k, v in values.items() if math.isfinite(float(v))}
        if finite:
            self.run.log(finite, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(
    names: Sequence[str],
    run_dir: Path,
    *,
    config: Mapping[str, Any] | None = None,
    resume_step: int = 0,
) -> list[Tracker]:
    """The trackers named in ``log.trackers``, writing under ``run_dir``; ``resume_step``: the
    checkpoint's step of a resumed run (0 for a fresh one)."""
    out: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                out.append(TensorBoardTracker(run_dir / "tensorboard", resume_step))
            elif name == "wandb":
                out.append(WandbTracker(run_dir, config or {}, resume_step))
            else:
                raise ConfigError(
                    f"log.trackers: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}"
                )
    except BaseException:
        close_trackers(out)
        raise
    return out


def close_trackers(trackers: Sequence[Tracker]) -> None:
    """Close every tracker; one that fails to close is reported, the others still close."""
    for tracker in trackers:
        try:
            tracker.close()
        except Exception as err:  # a tracker must never turn a finished run into a failed one
            print(f"warning: closing {type(tracker).__name__} failed: {err}", file=sys.stderr)
