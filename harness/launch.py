"""Launch one trainer process on a device slot and follow its run directory.

The trainer runs in its own process group (``start_new_session``) so that a runner killed with
SIGKILL does not take it down half-way through a checkpoint, and so that stopping it stops
everything it started (torchrun's workers included). Its stdout/stderr go to the run
directory's ``stdout.log`` / ``stderr.log``; ``HARNESS_CAPTURED=1`` tells it not to tee them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers.rundir import RunDir, read_jsonl

# Reported to the caller as each new metric record appears: (step, name, value).
MetricCallback = Callable[[int, str, float | None], bool]

STDERR_TAIL_CHARS = 4000


@dataclass
class Outcome:
    state: str  # "complete" | "pruned" | "failed"
    reason: str = ""
    stderr_tail: str = ""
    exit_code: int | None = None
    final: dict[str, float] = field(default_factory=dict)  # last value of every metric
    seconds: float = 0.0
    died: bool = False
    """The trainer ended without a status.json: killed from outside (a signal, the OOM killer,
    preemption) or crashed before it could say why. Only such a death is worth a retry from
    the checkpoint; a failure the trainer reported itself would fail the same way again."""


def trainer_command(module: str, run_dir: Path, gpus: int) -> list[str]:
    """``python -m <module>``, or ``torchrun`` with one process per GPU."""
    args = ["--config", str(run_dir / "config.json"), "--run-dir", str(run_dir)]
    if gpus > 1:
        run = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={gpus}",
        ]
        return [*run, "-m", module, *args]
    return [sys.executable, "-m", module, *args]


def _describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (often the out-of-memory killer)" if -code == signal.SIGKILL else ""
        return f"trainer was killed by {name}{hint}"
    return f"trainer exited with code {code} and wrote no status.json"


def _tail(path: Path, chars: int = STDERR_TAIL_CHARS) -> str:
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - chars))
        return f.read().decode(errors="replace")


class TrainerProcess:
    """One trainer run: start, follow metrics, stop on request, classify the outcome."""

    def __init__(
        self,
        module: str,
        run_dir: Path,
        devices: list[str] | None,
        gpus: int = 1,
        cpu_threads: int | None = None,
    ):
        """devices: GPU ids (CUDA_VISIBLE_DEVICES), or None for a CPU slot. cpu_threads: the
        intra-op threads of a CPU trainer (OMP_NUM_THREADS), so that trials sharing the CPU do
        not oversubscribe it; a user's own OMP_NUM_THREADS wins."""
        self.run = RunDir(run_dir)
        self.cmd = trainer_command(module, run_dir, gpus)
        self.env = {**os.environ, "HARNESS_CAPTURED": "1", "PYTHONUNBUFFERED": "1"}
        if devices is not None:
            self.env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        elif cpu_threads is not None and "OMP_NUM_THREADS" not in os.environ:
            self.env["OMP_NUM_THREADS"] = str(cpu_threads)
        repo = str(Path(__file__).resolve().parents[1])
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (repo, os.environ.get("PYTHONPATH")) if p
        )
        self.proc: subprocess.Popen | None = None
        self._seen = 0
        self._inode: int | None = None
        self.pruned = False

    def start(self) -> None:
        self.run.create()
        self.run.clear_status()
        with open(self.run.stdout, "ab") as out, open(self.run.stderr, "ab") as err:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=err, env=self.env, start_new_session=True
            )

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the trainer's whole process group (the trainer checkpoints on SIGTERM)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def new_metrics(self) -> list[dict[str, Any]]:
        """Records appended since the last call. A file replaced meanwhile (a resumed trainer
        drops what its killed attempt wrote after the checkpoint, or replaces a record it
        redoes) is read again from the start: its records are reported again, which the
        callbacks take as the same values."""
        try:
            inode = self.run.metrics.stat().st_ino
        except FileNotFoundError:
            inode = None
        records = read_jsonl(self.run.metrics)
        if inode != self._inode or len(records) < self._seen:
            self._inode, self._seen = inode, 0
        fresh, self._seen = records[self._seen :], len(records)
        return fresh

    def follow(
        self,
        on_metric: MetricCallback,
        on_poll: Callable[[], None] | None = None,
        poll_s: float = 0.5,
    ) -> Outcome:
        """Wait for the trainer to end. ``on_metric`` returns True to prune (SIGTERM);
        ``on_poll`` runs at every poll (the runner's heartbeat)."""
        assert self.proc is not None, "start() first"
        t0 = time.time()
        final: dict[str, float] = {}
        while True:
            done = self.proc.poll() is not None
            for m in self.new_metrics():
                if m["value"] is not None:
                    final[m["name"]] = m["value"]
                if not self.pruned and on_metric(m["step"], m["name"], m["value"]):
                    self.pruned = True
                    self.stop()
            if done:
                break
            if on_poll is not None:
                on_poll()
            time.sleep(poll_s)
        outcome = self._classify(self.proc.returncode)
        outcome.final, outcome.seconds = final, time.time() - t0
        return outcome

    def _classify(self, code: int) -> Outcome:
        status = self.run.read_status()
        tail = _tail(self.run.stderr)
        if status is None:
            return Outcome("failed", _describe_exit(code), tail, code, died=True)
        if self.pruned and status["status"] == "stopped":
            return Outcome("pruned", f"pruned at step {status['step']}", "", code)
        if status["status"] == "ok":
            return Outcome("complete", "", "", code)
        if status["status"] == "stopped":
            return Outcome("failed", f"stopped at step {status['step']} by a signal", tail, code)
        return Outcome("failed", status.get("reason", "failed"), tail, code)
