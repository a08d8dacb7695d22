"""The study's live console view: trials done / running / failed / pruned, the best so far, and
a progress bar per running trial.

On a terminal it is a ``rich.live.Live`` display redrawn twice a second, with the runner's event
lines (trial started / complete / failed) printed above it. When output is not a terminal (CI,
``| tee``, a batch job's log) nothing is redrawn; each running trial instead prints one progress
line at every quarter of its steps, so logs stay short and still show where each trial is.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

LOSS_METRIC = "train/loss"
STATES = ("complete", "running", "pruned", "failed")


@dataclass
class TrialLine:
    number: int
    params: str
    where: str
    total: int | None
    started: float = field(default_factory=time.time)
    step: int = 0
    loss: float | None = None
    objective: float | None = None
    quarter: int = 0  # progress lines printed so far (non-terminal mode)

    def eta(self, now: float) -> float | None:
        if not self.total or self.step <= 0:
            return None
        return (now - self.started) * (self.total - self.step) / self.step


def _seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


class StudyView:
    """Thread-safe: worker threads report events, the Live display renders from another."""

    def __init__(
        self,
        console: Console,
        name: str,
        target: int,
        metrics: Sequence[str],
        directions: Sequence[str],
        counts: dict[str, int] | None = None,
        best: tuple[int, list[float]] | None = None,
    ):
        self.console = console
        self.name = name
        self.target = target
        self.metrics = list(metrics)
        self.directions = list(directions)
        self.counts = {s: (counts or {}).get(s, 0) for s in STATES}
        self.counts["running"] = 0
        self.best = best  # (trial number, values); single-objective only
        self.running: dict[int, TrialLine] = {}
        self.lock = threading.Lock()

    # -- events (worker threads) -----------------------------------------------------------
    def started(self, number: int, params: str, where: str, total: int | None) -> None:
        with self.lock:
            self.running[number] = TrialLine(number, params, where, total)
            self.counts["running"] = len(self.running)

    def metric(self, number: int, step: int, name: str, value: float | None) -> None:
        with self.lock:
            line = self.running.get(number)
            if line is None:
                return
            line.step = max(line.step, step)
            if name == LOSS_METRIC:
                line.loss = value
            elif name == self.metrics[0]:
                line.objective = value
            quarter = 4 * line.step // line.total if line.total else 0
            report = not self.console.is_terminal and quarter > line.quarter and quarter < 4
            if report:
                line.quarter = quarter
            text = self._progress_text(line) if report else None
        if text is not None:
            self.console.print(text)

    def ended(self, number: int, state: str, values: list[float] | None = None) -> None:
        with self.lock:
            self.running.pop(number, None)
            self.counts["running"] = len(self.running)
            if state in self.counts:
                self.counts[state] += 1
            if state == "complete" and values is not None and len(self.metrics) == 1:
                better = (
                    self.best is None
                    or (self.directions[0] == "minimize" and values[0] < self.best[1][0])
                    or (self.directions[0] == "maximize" and values[0] > self.best[1][0])
                )
                if better:
                    self.best = (number, list(values))

    # -- rendering ----------------------------------------------------------------------------
    def summary(self) -> str:
        c = self.counts
        done = c["complete"] + c["pruned"] + c["failed"]
        text = (
            f"study {self.name}: {done}/{self.target} done ({c['complete']} complete, "
            f"{c['pruned']} pruned, {c['failed']} failed), {c['running']} running"
        )
        if self.best is not None:
            text += f"; best {self.metrics[0]}={self.best[1][0]:.4g} (trial {self.best[0]})"
        return text

    def _progress_text(self, line: TrialLine) -> str:
        now = time.time()
        total = f"/{line.total}" if line.total else ""
        pct = f" ({100 * line.step // line.total}%)" if line.total else ""
        return (
            f"trial {line.number}: step {line.step}{total}{pct}, {LOSS_METRIC} {_num(line.loss)}, "
            f"{_seconds(now - line.started)} elapsed, ~{_seconds(line.eta(now))} left"
        )

    def __rich__(self) -> RenderableType:
        with self.lock:
            now = time.time()
            table = Table(box=None, pad_edge=False, show_edge=False)
            for col in ("trial", "on", "params", "progress", "step", LOSS_METRIC, self.metrics[0]):
                table.add_column(col, no_wrap=col != "params", overflow="ellipsis")
            table.add_column("left", justify="right")
            for line in sorted(self.running.values(), key=lambda x: x.number):
                bar = ProgressBar(total=line.total or 1, completed=line.step, width=20)
                step = f"{line.step}/{line.total}" if line.total else str(line.step)
                table.add_row(
                    str(line.number),
                    line.where,
                    line.params,
                    bar,
                    step,
                    _num(line.loss),
                    _num(line.objective),
                    _seconds(line.eta(now)),
                )
            parts: list[Any] = [Text(self.summary(), style="bold")]
            if self.running:
                parts.append(table)
            return Group(*parts)

    @contextlib.contextmanager
    def show(self) -> Iterator[None]:
        """Redraw the view while the block runs (terminal only), then print the summary."""
        if self.console.is_terminal:
            from rich.live import Live

            with Live(self, console=self.console, refresh_per_second=2, transient=True):
                yield
        else:
            yield
        self.console.print(self.summary())


def progress_bar(console: Any, label: str = "{task.description}", disable: bool = False) -> Any:
    """The harness's rich progress bar for batch work (rendering, judging, feature extraction):
    a label column, the bar, done/total, elapsed and remaining time."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
    )
