"""Console output of the trainer: a progress bar in a terminal, plain log lines otherwise, and a
copy of stdout/stderr in the run directory when the trainer is run by hand."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress


class _Tee:
    def __init__(self, stream: IO[str], path: Path):
        self._stream = stream
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def write(self, data: str) -> int:
        self._file.write(data)
        return self._stream.write(data)

    def flush(self) -> None:
        self._file.flush()
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def tee_output(stdout_log: Path, stderr_log: Path) -> None:
    """Copy everything printed into the run directory's stdout.log / stderr.log.

    The harness redirects the trainer's streams into those files itself and sets
    ``HARNESS_CAPTURED=1``, so this is only for runs started by hand."""
    sys.stdout = _Tee(sys.stdout, stdout_log)  # type: ignore[assignment]
    sys.stderr = _Tee(sys.stderr, stderr_log)  # type: ignore[assignment]


class Progress:
    """A rich progress bar (loss, images/s) when stderr is a terminal; else one line per log."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        self.total, self.enabled = total, enabled
        self.interactive = enabled and sys.stderr.isatty()
        self._bar: RichProgress | None = None
        self._task: Any = None
        self._start = start
        self._rate = 0.0

    def __enter__(self) -> Progress:
        if self.interactive:
            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TextColumn("{task.fields[ips]:.1f} img/s"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(
                "train", total=self.total, completed=self._start, loss=float("nan"), ips=0.0
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, step: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, loss=loss, ips=self._rate)

    def set_rate(self, images_per_s: float) -> None:
        self._rate = images_per_s

    def log_line(self, step: int, loss: float, images_per_s: float) -> None:
        if self.enabled and not self.interactive:
            print(f"step {step}/{self.total} loss {loss:.4f} {images_per_s:.1f} img/s", flush=True)
