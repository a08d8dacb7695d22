"""The live console view: counts, best so far, per-trial progress (terminal and log modes)."""

from __future__ import annotations

import io

from rich.console import Console

from harness.live import StudyView


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=200, color_system=None), buf


def test_log_mode_prints_one_line_per_quarter_and_the_summary() -> None:
    console, buf = _console(terminal=False)
    view = StudyView(console, "demo", 6, ["domain_fid"], ["minimize"])
    with view.show():
        view.started(0, "timesteps.sampler=cosmap", "CPU", total=100)
        for step in range(10, 101, 10):
            view.metric(0, step, "train/loss", 1.0 / step)
        view.metric(7, 10, "train/loss", 0.5)  # a trial the view never saw: ignored
        view.ended(0, "complete", [12.5])
    lines = buf.getvalue().splitlines()
    progress = [ln for ln in lines if ln.startswith("trial 0: step")]
    assert [ln.split(",")[0] for ln in progress] == [
        "trial 0: step 30/100 (30%)",  # the first record at or past 25%
        "trial 0: step 50/100 (50%)",
        "trial 0: step 80/100 (80%)",
    ]
    assert "train/loss 0.03333" in progress[0]
    assert lines[-1] == (
        "study demo: 1/6 done (1 complete, 0 pruned, 0 failed), 0 running; "
        "best domain_fid=12.5 (trial 0)"
    )


def test_counts_and_best_follow_the_direction() -> None:
    console, _ = _console(terminal=False)
    view = StudyView(
        console, "d", 9, ["acc"], ["maximize"], counts={"complete": 2, "failed": 1}, best=(1, [0.5])
    )
    for n in (3, 4, 5, 6):
        view.started(n, "", "CPU", total=10)
    view.ended(3, "complete", [0.4])  # worse than the stored best: best stays
    view.ended(4, "complete", [0.9])
    view.ended(5, "pruned")
    view.ended(6, "failed")
    assert view.summary() == (
        "study d: 7/9 done (4 complete, 1 pruned, 2 failed), 0 running; best acc=0.9 (trial 4)"
    )
    minimize = StudyView(console, "m", 2, ["fid"], ["minimize"])
    minimize.ended(0, "complete", [3.0])
    minimize.ended(1, "complete", [1.0])
    assert minimize.best == (1, [1.0])


def test_terminal_render_shows_each_running_trial() -> None:
    console, buf = _console(terminal=True)
    view = StudyView(console, "demo", 4, ["domain_fid"], ["minimize"])
    view.started(2, "timesteps.shift=3.0", "GPU 1", total=300)
    view.metric(2, 150, "train/loss", 0.25)
    view.metric(2, 150, "domain_fid", 480.0)
    view.started(3, "timesteps.shift=1.0", "GPU 0", total=300)
    console.print(view)
    out = buf.getvalue()
    assert "0/4 done (0 complete, 0 pruned, 0 failed), 2 running" in out
    row = next(ln for ln in out.splitlines() if ln.lstrip().startswith("2 "))
    for cell in ("GPU 1", "timesteps.shift=3.0", "150/300", "0.25", "480"):
        assert cell in row, row
    assert "trial 2: step" not in out  # no log lines on a terminal
