"""Tracker output of the trainer (trainers/trackers.py): TensorBoard event files by default,
W&B when asked for (tested with a fake ``wandb`` module: it is not installed)."""

from __future__ import annotations

import math
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.trainers.trainer_utils import config, run_trainer
from trainers.config import ConfigError, FlowConfig, LogConfig, parse_config
from trainers.rundir import RunDir
from trainers.trackers import TensorBoardTracker, WandbTracker, open_trackers


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def next_second() -> None:
    """Readers order event files by name: ``events.out.tfevents.<unix second>.<host>.<pid>.<n>``
    with n a per-process counter. A resumed trainer is a new process seconds later; two writers
    in one test process within one second are ordered by n as a string, so "10" sorts before
    "9" once the worker has opened ten writers. Wait for the next second, as a restart would."""
    time.sleep(1.05 - time.time() % 1.0)


def test_log_config_defaults_to_tensorboard_and_is_not_part_of_the_hash() -> None:
    base = config()
    cfg = parse_config(base)
    assert cfg.log.trackers == ["tensorboard"]
    assert "log" not in cfg.to_dict()  # config.json of a default run is unchanged
    off = parse_config({**base, "log": {"trackers": []}})
    both = parse_config({**base, "log": {"trackers": ["tensorboard", "wandb"]}})
    assert off.log.trackers == [] and off.to_dict()["log"] == {"trackers": []}
    # Trackers change where metrics are copied, not what is trained: same identity.
    assert cfg.hash() == off.hash() == both.hash()


@pytest.mark.parametrize(
    ("trackers", "needle"), [(["mlflow"], "log.trackers.0"), (["wandb", "wandb"], "twice")]
)
def test_bad_trackers_name_the_key(trackers: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_config({**config(), "log": {"trackers": trackers}})


def test_run_dir_forwards_logged_metrics_and_survives_a_failing_tracker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[tuple[int, dict[str, float]]] = []

    class Recorder:
        def log(self, step: int, values: dict[str, float]) -> None:
            seen.append((step, dict(values)))

        def close(self) -> None: ...

    class Broken(Recorder):
        def log(self, step: int, values: dict[str, float]) -> None:
            raise OSError("disk full")

    run = RunDir(tmp_path / "run")
    run.create()
    run.trackers = [Broken(), Recorder()]
    run.log_metrics(5, {"train/loss": 0.5})
    assert seen == [(5, {"train/loss": 0.5})]
    assert [r["value"] for r in run.read_metrics()] == [0.5]
    assert "Broken failed to log: disk full" in capsys.readouterr().err


def test_tensorboard_resume_purges_the_steps_after_the_checkpoint(tmp_path: Path) -> None:
    log_dir = tmp_path / "tensorboard"
    first = TensorBoardTracker(log_dir)
    for step in range(1, 11):
        first.log(step, {"train/loss": float(step)})
    first.close()  # killed after step 10; the checkpoint is at step 5
    next_second()
    resumed = TensorBoardTracker(log_dir, resume_step=5)
    for step in range(6, 9):
        resumed.log(step, {"train/loss": 100.0 + step})
    resumed.close()
    points = scalars(log_dir)["train/loss"]
    assert [s for s, _ in points] == list(range(1, 9))  # each step once
    assert dict(points) == {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 106, 7: 107, 8: 108}


def test_a_fresh_restart_drops_a_killed_attempts_points(tmp_path: Path) -> None:
    log_dir = tmp_path / "tensorboard"
    killed = TensorBoardTracker(log_dir)  # killed before its first checkpoint
    for step in (0, 5, 10):
        killed.log(step, {"train/loss": 1.0})
    killed.close()
    next_second()
    again = TensorBoardTracker(log_dir, resume_step=0)  # metrics.jsonl keeps step 0 only
    for step in (5, 10):
        again.log(step, {"train/loss": 2.0})
    again.close()
    assert scalars(log_dir)["train/loss"] == [(0, 1.0), (5, 2.0), (10, 2.0)]


class FakeWandbRun:
    def __init__(self, calls: list[tuple[str, Any]]):
        self.calls = calls

    def log(self, values: dict[str, float], step: int) -> None:
        self.calls.append(("log", (dict(values), step)))

    def finish(self) -> None:
        self.calls.append(("finish", None))


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    module = types.ModuleType("wandb")

    def init(**kwargs: Any) -> FakeWandbRun:
        calls.append(("init", kwargs))
        return FakeWandbRun(calls)

    module.init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", module)
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_wandb_tracker_calls(
    tmp_path: Path, fake_wandb: list[tuple[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "0003"
    trackers = open_trackers(["wandb"], run_dir, config={"seed": 3})
    assert isinstance(trackers[0], WandbTracker)
    trackers[0].log(10, {"train/loss": 0.25, "eval/fid": math.nan})
    trackers[0].close()
    (kind, kwargs), log, finish = fake_wandb
    assert kind == "init"
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    assert kwargs == {
        "project": "diffusion-harness",
        "name": "0003",
        "dir": str(run_dir),
        "id": run_id,
        "resume": "allow",
        "config": {"seed": 3},
        "mode": "offline",  # neither a key nor WANDB_MODE: no login prompt in a subprocess
    }
    assert log == ("log", ({"train/loss": 0.25}, 10))  # NaN left out
    assert finish == ("finish", None)

    # A resumed run continues the same W&B run; with a key, wandb decides the mode itself
    # and the key is never passed on.
    fake_wandb.clear()
    monkeypatch.setenv("WANDB_API_KEY", "secret-key")
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    open_trackers(["wandb"], run_dir, config={}, resume_step=10)[0].close()
    kwargs = fake_wandb[0][1]
    assert kwargs["id"] == run_id and kwargs["project"] == "mine"
    assert "mode" not in kwargs and "secret-key" not in repr(kwargs)


def test_no_trackers_write_nothing(tmp_path: Path) -> None:
    assert open_trackers([], tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_wandb_not_installed_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match="wandb package is not installed"):
        open_trackers(["tensorboard", "wandb"], tmp_path)


@pytest.mark.slow
def test_tiny_run_writes_tensorboard_scalars_equal_to_metrics_jsonl(tmp_path: Path) -> None:
    cfg = config(train={"steps": 10, "log_every": 5, "checkpoint_every": 10})
    assert FlowConfig.model_validate(cfg).log == LogConfig()  # the default: tensorboard
    run_dir = tmp_path / "run"
    proc = run_trainer(cfg, run_dir)
    assert proc.returncode == 0, proc.stderr
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in RunDir(run_dir).read_metrics():
        if r["value"] is not None:
            expected.setdefault(r["name"], []).append((r["step"], r["value"]))
    got = scalars(run_dir / "tensorboard")
    assert set(got) == set(expected) and "train/loss" in got
    for name, points in expected.items():
        assert [s for s, _ in got[name]] == [s for s, _ in points], name
        # event files store float32
        assert [v for _, v in got[name]] == pytest.approx([v for _, v in points], rel=1e-6)
