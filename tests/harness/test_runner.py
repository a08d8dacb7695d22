"""The study runner end to end: real trainer processes, Optuna, DuckDB, resume after SIGKILL."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from harness.cli import app
from harness.report import ablation_markdown, mean_ci
from harness.runner import StudyRunner
from harness.spec import load_study
from harness.store import Store
from tests.trainers.trainer_utils import REPO, config, env

pytestmark = pytest.mark.slow


def write_study(
    path: Path, search: dict, trials: int, steps: int = 8, eval_every: int = 4, **extra
) -> Path:
    base = config(
        train={"steps": steps, "checkpoint_every": 4, "log_every": 4}, eval={"every": eval_every}
    )
    study = {
        "name": path.stem,
        "base": base,
        "search": search,
        "objective": {"metric": "domain_fid", "direction": "minimize"},
        "trials": trials,
        "optuna": {"sampler": "grid", "pruner": "none", "seed": 0},
        **extra,
    }
    path.write_text(yaml.safe_dump(study))
    return path


def study_run_cmd(study_file: Path, workdir: Path) -> list[str]:
    """`harness study run` as a separate process (as a user or a second worker runs it)."""
    return [
        sys.executable,
        "-m",
        "harness.cli",
        "study",
        "run",
        str(study_file),
        "--workdir",
        str(workdir),
    ]


def test_tiny_study_runs_records_and_reports(tmp_path: Path) -> None:
    spec = load_study(
        write_study(tmp_path / "tiny.yaml", {"timesteps.sampler": ["uniform", "cosmap"]}, 2)
    )
    log = io.StringIO()
    runner = StudyRunner(spec, tmp_path / "work", console=Console(file=log, width=200))
    study = runner.run()
    # Log mode (not a terminal): a progress line per trial at half-way, then the summary.
    out = log.getvalue()
    assert "trial 0: step 4/8 (50%), train/loss" in out and "trial 1: step 4/8 (50%)" in out
    assert "study tiny: 2/2 done (2 complete, 0 pruned, 0 failed), 0 running; best" in out
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2
    assert {t.params["timesteps.sampler"] for t in study.trials} == {"uniform", "cosmap"}
    store = Store(tmp_path / "work" / "harness.duckdb")
    rows = store.trials("tiny")
    assert [r["state"] for r in rows] == ["complete", "complete"]
    assert all(r["values"] and r["run_id"] for r in rows)
    n = store.query("SELECT count(*) AS n FROM metrics WHERE name = 'domain_fid'")[0]["n"]
    assert n == 4  # two evaluations (step 4 and the end) per trial
    assert store.query("SELECT count(*) AS n FROM samples")[0]["n"] > 0
    # The objective is the last domain_fid the trainer wrote.
    for t in study.trials:
        final = [m for m in store.metrics(f"tiny/{t.number:04d}/s0") if m["name"] == "domain_fid"][
            -1
        ]
        assert t.values[0] == pytest.approx(final["value"])
    report = ablation_markdown(study, spec.metrics, spec.directions)
    assert "## Effects against the best configuration: sampler=" in report
    assert "**One training seed per configuration**" in report and "## Rank table" in report
    # The CLI report: Markdown on stdout, HTML with the plots and the best trial's samples.
    html_path = tmp_path / "tiny.html"
    res = CliRunner().invoke(
        app,
        ["study", "report", "tiny", "--workdir", str(tmp_path / "work"), "--html", str(html_path)],
    )
    assert res.exit_code == 0, res.output
    assert "## Rank table" in res.stdout and '"sampler": "' in res.stdout  # best config
    page = html_path.read_text()
    for title in ("Effects against", "Objective history", "domain_fid against step"):
        assert f"<h2>{title}" in page, title
    assert "sampler=cosmap" in page and "sampler=uniform" in page  # curves named by values
    best_samples = store.samples(f"tiny/{study.best_trial.number:04d}/s0")
    final = [s for s in best_samples if s["tag"] == "final"]
    assert final and page.count('<img src="data:image/png;base64,') == len(final)
    # Rerunning a finished study runs nothing more.
    again = StudyRunner(spec, tmp_path / "work").run()
    assert len(again.trials) == 2


def test_failing_trial_is_recorded_and_the_study_goes_on(tmp_path: Path) -> None:
    spec = load_study(write_study(tmp_path / "fails.yaml", {"train.lr": [1e30, 1e-3]}, 2))
    study = StudyRunner(spec, tmp_path / "work").run()
    by_lr = {t.params["train.lr"]: t for t in study.trials}
    assert by_lr[1e30].state == optuna.trial.TrialState.FAIL
    assert "non-finite loss" in by_lr[1e30].user_attrs["error"]
    assert by_lr[1e-3].state == optuna.trial.TrialState.COMPLETE
    failed = [
        r
        for r in Store(tmp_path / "work" / "harness.duckdb").trials("fails")
        if r["state"] == "failed"
    ]
    assert len(failed) == 1 and "non-finite loss" in failed[0]["error"] and failed[0]["stderr_tail"]


def test_sigkill_runner_and_trainer_then_resume(tmp_path: Path) -> None:
    study_file = write_study(
        tmp_path / "killed.yaml",
        {"timesteps.sampler": ["uniform", "cosmap"]},
        2,
        steps=200,
        eval_every=200,  # evaluations are the slow part; this test is about resuming
    )
    work = tmp_path / "work"
    cmd = study_run_cmd(study_file, work)
    runner = subprocess.Popen(
        cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    ckpt = work / "runs" / "killed" / "0000" / "s0" / "checkpoints" / "latest.pt"
    deadline = time.time() + 240
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.1)
    assert ckpt.exists(), (
        runner.communicate(timeout=5)[0] if runner.poll() is not None else "no checkpoint"
    )
    trainer_pid = json.loads((ckpt.parents[1] / "runner.json").read_text())["trainer_pid"]
    runner.send_signal(signal.SIGKILL)
    os.killpg(trainer_pid, signal.SIGKILL)
    runner.wait()
    time.sleep(0.5)
    assert not (ckpt.parents[1] / "status.json").exists()

    proc = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = optuna.load_study(
        study_name="killed", storage=f"sqlite:///{(work / 'optuna.db').resolve()}"
    )
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2
    # No duplicate, none lost: the killed trial 0 resumed in its own run directory (as a new
    # trial number that keeps run_number 0), and the other grid point ran once.
    runs = [t.user_attrs["run_number"] for t in complete]
    assert len(set(runs)) == 2 and 0 in runs
    assert {t.params["timesteps.sampler"] for t in complete} == {"uniform", "cosmap"}
    assert "resuming at step" in (ckpt.parents[1] / "stdout.log").read_text()


def test_mean_ci_matches_scipy() -> None:
    from scipy import stats

    values = [1.0, 2.0, 4.0, 7.0]
    mean, half = mean_ci(values)
    lo, hi = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=stats.sem(values))
    assert mean == pytest.approx(3.5) and half == pytest.approx((hi - lo) / 2)
    assert mean_ci([2.0]) == (2.0, None)


def test_a_repeated_config_reuses_the_result(tmp_path: Path) -> None:
    # One possible configuration, two trials: the second is a repeat and must not retrain.
    study_file = write_study(
        tmp_path / "repeat.yaml",
        {"timesteps.sampler": ["cosmap"]},
        2,
        optuna={"sampler": "random", "pruner": "none", "seed": 0},
    )
    study = StudyRunner(load_study(study_file), tmp_path / "work").run()
    first, second = study.trials
    assert first.state == second.state == optuna.trial.TrialState.COMPLETE
    assert second.user_attrs["repeat_of"] == 0 and second.values == first.values
    assert not (tmp_path / "work" / "runs" / "repeat" / "0001").exists()
    report = ablation_markdown(study, ["domain_fid"], ["minimize"])
    assert "result reused" in report


def test_pruned_trial_gets_sigterm_and_is_recorded_as_pruned(tmp_path: Path, monkeypatch) -> None:
    from harness.spec import StudySpec

    # Prune at the first reported objective value (domain FID is always > 0).
    monkeypatch.setattr(
        StudySpec, "make_pruner", lambda self: optuna.pruners.ThresholdPruner(upper=0.0)
    )
    study_file = write_study(
        tmp_path / "pruned.yaml", {"timesteps.sampler": ["uniform"]}, 1, steps=400
    )
    study = StudyRunner(load_study(study_file), tmp_path / "work").run()
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    run = tmp_path / "work" / trial.user_attrs["run_dir"] / "s0"  # relative to the work dir
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "stopped" and status["step"] < 400  # stopped early by SIGTERM
    assert (run / "checkpoints" / "latest.pt").exists()
    rows = Store(tmp_path / "work" / "harness.duckdb").trials("pruned")
    assert rows[0]["state"] == "pruned"


def test_a_trial_left_running_by_a_worker_on_another_host_is_retried_after_its_heartbeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import harness.runner as runner_module

    monkeypatch.setattr(runner_module, "GRACE_S", 2)
    monkeypatch.setattr(runner_module, "HEARTBEAT_S", 1)
    spec = load_study(write_study(tmp_path / "remote.yaml", {"timesteps.sampler": ["cosmap"]}, 1))
    runner = StudyRunner(spec, tmp_path / "work")
    # A worker on another machine asked for trial 0, started it, then went silent (its
    # process cannot be checked from here: only the lapsed heartbeat tells).
    study = runner.open_study()
    with pytest.warns(UserWarning, match="Heartbeat of storage"):
        remote = study.ask()
    spec.suggest(remote)
    remote.set_user_attr("run_number", 0)
    runner.storage.record_heartbeat(remote._trial_id)
    run_dir = runner.work.run_dir("remote", 0) / "s0"
    run_dir.mkdir(parents=True)
    info = {"host": "elsewhere", "runner_pid": 1, "trainer_pid": 1, "trial": 0}
    (run_dir / "runner.json").write_text(json.dumps(info))
    # Stale once more than GRACE_S has passed; SQLite's heartbeat timestamps have whole
    # seconds, so wait a second and a half beyond it.
    time.sleep(3.5)
    study = runner.run()
    first, retry = study.trials
    assert first.state == optuna.trial.TrialState.FAIL
    assert retry.state == optuna.trial.TrialState.COMPLETE
    assert runner.storage.get_trial(retry._trial_id).system_attrs["failed_trial"] == 0
    assert retry.user_attrs["run_number"] == 0 and retry.params == first.params
    assert (run_dir / "status.json").exists()  # it ran in the trial's own run directory


def test_ctrl_c_stops_the_trainer_cleanly_and_the_rerun_resumes_it(tmp_path: Path) -> None:
    # Two seeds per configuration on two slots: Ctrl-C stops both seed runs of trial 0 (they
    # checkpoint), and the rerun resumes each from its own checkpoint.
    study_file = write_study(
        tmp_path / "ctrlc.yaml",
        {"timesteps.sampler": ["uniform", "cosmap"]},
        2,
        steps=200,
        eval_every=200,
        repeats=2,
        resources={"devices": "cpu", "trials_per_device": 2},
    )
    work = tmp_path / "work"
    cmd = study_run_cmd(study_file, work)
    runner = subprocess.Popen(
        cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seed_dirs = [work / "runs" / "ctrlc" / "0000" / f"s{k}" for k in (0, 1)]
    deadline = time.time() + 240
    while time.time() < deadline and not all(
        (d / "checkpoints" / "latest.pt").exists() for d in seed_dirs
    ):
        time.sleep(0.1)
    runner.send_signal(signal.SIGINT)  # what Ctrl-C sends (the trainer has its own session)
    out = runner.communicate(timeout=120)[0]
    assert runner.returncode == 130, out[-3000:]
    assert "rerun the same command to resume" in out
    # The trainers were stopped, not killed: they checkpointed and said so.
    statuses = [json.loads((d / "status.json").read_text()) for d in seed_dirs]
    assert all(s["status"] == "stopped" and s["step"] > 0 for s in statuses), statuses
    store = Store(work / "harness.duckdb")
    (row,) = [r for r in store.trials("ctrlc") if r["number"] == 0]
    assert row["state"] == "failed" and "by a signal" in row["error"]
    proc = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = optuna.load_study(
        study_name="ctrlc", storage=f"sqlite:///{(work / 'optuna.db').resolve()}"
    )
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    # Trial 0 resumed in its own run directory (a new trial number keeping run_number 0).
    runs = sorted(t.user_attrs["run_number"] for t in complete)
    assert len(complete) == 2 and runs[0] == 0 and runs[1] != 0
    for d, status in zip(seed_dirs, statuses, strict=True):
        assert f"resuming at step {status['step']}" in (d / "stdout.log").read_text()
        assert json.loads((d / "status.json").read_text())["status"] == "ok"


def test_repeats_train_each_configuration_per_seed_and_optuna_sees_the_mean(
    tmp_path: Path,
) -> None:
    study_file = write_study(
        tmp_path / "seeds.yaml",
        {"timesteps.sampler": ["uniform", "cosmap"]},
        2,
        repeats=2,
        design="grid",
        baseline={"timesteps.sampler": "uniform"},
        resources={"devices": "cpu", "trials_per_device": 2},
    )
    study_file.write_text(study_file.read_text().replace("trials: 2\n", ""))
    spec = load_study(study_file)
    work = tmp_path / "work"
    study = StudyRunner(spec, work).run()
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    store = Store(work / "harness.duckdb")
    for t in study.trials:
        # Relative to the work directory, which may be moved (tests/harness/test_relocate.py).
        assert t.user_attrs["run_dir"] == f"runs/seeds/{t.number:04d}"
        root = work / t.user_attrs["run_dir"]
        assert t.user_attrs["seeds"] == [0, 1]
        configs = [json.loads((root / f"s{k}" / "config.json").read_text()) for k in (0, 1)]
        assert [c["seed"] for c in configs] == [0, 1]
        per_seed = t.user_attrs["seed_values"]["domain_fid"]
        finals = []
        for k in (0, 1):
            rows = store.metrics(f"seeds/{t.number:04d}/s{k}", "domain_fid")
            finals.append(rows[-1]["value"])
            assert (root / f"s{k}" / "evals").is_dir()  # per-image results of each evaluation
        assert per_seed == pytest.approx(finals)
        assert t.values[0] == pytest.approx(sum(finals) / 2)  # Optuna sees the mean
    runs = store.query("SELECT run_id, repeat, seed FROM runs ORDER BY run_id")
    assert [(r["repeat"], r["seed"]) for r in runs] == [(0, 0), (1, 1)] * 2
    assert store.query("SELECT count(*) AS n FROM eval_images")[0]["n"] > 0
    # Seed k of both configurations started from the same weights (common random numbers) and
    # the two configurations differ: their seed-0 runs are not copies of each other.
    a, b = (work / t.user_attrs["run_dir"] for t in study.trials)
    assert (a / "s0" / "stdout.log").exists() and (b / "s1" / "stdout.log").exists()
    # The report pairs the seeds: two seeds give an interval.
    res = CliRunner().invoke(app, ["study", "report", "seeds", "--workdir", str(work), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    fid = [e for e in doc["effects"] if e["metric"] == "domain_fid"]
    assert len(fid) == 1 and fid[0]["n_seeds"] == 2 and fid[0]["ci_low"] is not None
    assert doc["baseline"]["label"] == "sampler=uniform"
    # Seed runs that finished are never trained again: with the Optuna file lost, a rerun asks
    # the same configurations again and takes every seed's result from its run directory.
    logs = {p: p.stat().st_size for p in (work / "runs").rglob("stdout.log")}
    (work / "optuna.db").unlink()
    again = StudyRunner(spec, work).run()
    assert {p: p.stat().st_size for p in logs} == logs
    assert [t.values[0] for t in again.trials] == pytest.approx([t.values[0] for t in study.trials])
