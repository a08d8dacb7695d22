"""The runner after kills, without trainer processes (fast): orphaned and half-re-queued
trials resume exactly once, trainers killed from outside are retried a bounded number of
times, a seeded sampler does not repeat itself after a restart, torn runner files are read
as absent. The end-to-end form is tests/harness/test_kill_campaign.py."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console

import harness.runner as runner_module
from harness.launch import Outcome, TrainerProcess
from harness.runner import SeedRun, StudyRunner, TrialJob, _tell
from harness.spec import SpecError, load_study
from tests.harness.test_runner import write_study
from trainers.rundir import RunDir

# The runner records heartbeats itself; these tests ask trials outside Study.optimize.
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def make_runner(tmp_path: Path, search: dict | None = None, **extra) -> StudyRunner:
    spec = load_study(
        write_study(tmp_path / "rec.yaml", search or {"timesteps.sampler": ["uniform"]}, 2, **extra)
    )
    log = io.StringIO()
    runner = StudyRunner(spec, tmp_path / "work", console=Console(file=log, width=200))
    runner.log = log  # type: ignore[attr-defined]
    return runner


def started_trial(runner: StudyRunner, study: optuna.Study, owner_pid: int) -> optuna.Trial:
    """A trial as `_new_job` leaves it, owned by the runner ``owner_pid``."""
    trial = study.ask()
    runner.spec.suggest(trial)
    trial.set_user_attr("run_number", trial.number)
    trial.set_user_attr("runner", {"host": runner.host, "runner_pid": owner_pid})
    return trial


def groups(study: optuna.Study) -> list[tuple[int, str, dict]]:
    return [
        (t.user_attrs.get("run_number", t.number), t.state.name, t.params)
        for t in study.get_trials(deepcopy=False)
    ]


def waiting(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


def test_an_orphan_is_requeued_once_even_if_recovery_is_killed_half_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = make_runner(tmp_path)
    study = runner.open_study()
    trial = started_trial(runner, study, dead_pid())
    run = RunDir(runner.work.run_dir("rec", trial.number) / "s0")
    run.create()
    (run.root / "runner.json").write_text("")  # torn: written by a runner killed mid-write
    # The recovering runner is killed after queueing the retry, before failing the trial.
    real = runner.storage.set_trial_state_values

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.storage, "set_trial_state_values", killed)
    with pytest.raises(KeyboardInterrupt):
        runner.recover_orphans(study)
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING, TrialState.WAITING]
    monkeypatch.setattr(runner.storage, "set_trial_state_values", real)
    # The next start finishes the job: the orphan fails, its group keeps one retry.
    runner.recover_orphans(study)
    runner.recover_orphans(study)  # and again: nothing more
    (first, retry) = study.get_trials()
    assert first.state == TrialState.FAIL and retry.state == TrialState.WAITING
    assert retry.user_attrs["run_number"] == first.number
    assert retry.system_attrs["fixed_params"] == first.params
    assert runner.counts(study)["groups"] == 1


def test_a_trial_failed_but_never_requeued_is_requeued_on_the_next_start(tmp_path: Path) -> None:
    # A runner interrupted (Ctrl-C) and then killed between failing the trial and re-queueing
    # it (the order of older versions, or Optuna's stale-heartbeat retry).
    runner = make_runner(tmp_path)
    study = runner.open_study()
    trial = started_trial(runner, study, dead_pid())
    trial.set_user_attr("error", "stopped at step 4 by a signal")
    trial.set_user_attr("requeue", True)
    _tell(study, trial, state=TrialState.FAIL)
    stale = started_trial(runner, study, dead_pid())  # failed by the heartbeat check
    runner.storage.set_trial_state_values(stale._trial_id, TrialState.FAIL)
    failed = started_trial(runner, study, dead_pid())  # a real failure: never retried
    failed.set_user_attr("error", "non-finite loss")
    _tell(study, failed, state=TrialState.FAIL)
    runner.recover_orphans(study)
    runner.recover_orphans(study)
    retries = waiting(study)
    assert sorted(t.user_attrs["run_number"] for t in retries) == [trial.number, stale.number]
    assert "never re-queued" in runner.log.getvalue()  # type: ignore[attr-defined]


def test_a_trial_whose_runner_died_inside_its_claim_is_requeued_with_its_config(
    tmp_path: Path,
) -> None:
    # A grid configuration taken from the queue by a runner killed before it suggested
    # (recorded) the parameters or its ownership: the retry keeps the configuration.
    runner = make_runner(tmp_path, {"timesteps.sampler": ["uniform", "cosmap"]}, design="grid")
    study = runner.open_study()
    taken = study.ask()  # killed here: no params, no run_number, no owner, no runner.json
    runner.recover_orphans(study)
    (retry,) = [t for t in waiting(study) if "run_number" in t.user_attrs]
    assert retry.user_attrs["run_number"] == taken.number
    queued = study.get_trials()[taken.number].system_attrs["fixed_params"]
    assert retry.system_attrs["fixed_params"] == queued
    # A trial owned by a live runner (this process) is left alone.
    live = started_trial(runner, study, __import__("os").getpid())
    runner.recover_orphans(study)
    assert study.get_trials()[live.number].state == TrialState.RUNNING


def test_orphan_recovery_stops_a_trainer_that_has_no_runner_json(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    study = runner.open_study()
    trial = started_trial(runner, study, dead_pid())
    seed_dir = runner.work.run_dir("rec", trial.number) / "s0"
    seed_dir.mkdir(parents=True)
    # A "trainer" launched the way TrainerProcess does (own session, --run-dir), whose runner
    # was killed before writing runner.json.
    code = "import time; time.sleep(60)"
    fake = subprocess.Popen(
        [sys.executable, "-c", code, "--run-dir", str(seed_dir)], start_new_session=True
    )
    # Reaped as soon as it exits (a real orphan's parent is init), so it is seen to end.
    reaper = threading.Thread(target=fake.wait, daemon=True)
    reaper.start()
    try:
        assert runner_module._trainer_groups([seed_dir]) == {fake.pid}
        runner.recover_orphans(study)
        reaper.join(timeout=30)
        assert fake.returncode == -signal.SIGTERM  # stopped before the retry was queued
        assert len(waiting(study)) == 1
    finally:
        fake.kill()
        fake.wait()


def fake_job(runner: StudyRunner, study: optuna.Study) -> tuple[TrialJob, SeedRun]:
    trial = study.ask()
    seed = SeedRun(0, 0, RunDir(runner.work.root / "s0"), "rec/0000/s0")
    return TrialJob(trial, trial.number, {}, [seed], 0.0), seed


def test_a_trainer_killed_from_outside_is_retried_up_to_retries_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = make_runner(tmp_path, retries=2)
    assert runner.spec.retries == 2
    study = runner.open_study()
    job, seed = fake_job(runner, study)
    launches: list[int] = []

    def killed(job, seed, slot):
        launches.append(1)
        return Outcome("failed", "trainer was killed by SIGKILL", exit_code=-9, died=True)

    monkeypatch.setattr(runner, "_launch_seed", killed)
    outcome = runner._train_seed(job, seed, None)
    assert len(launches) == 3 and outcome.state == "failed"
    assert outcome.reason == "trainer was killed by SIGKILL (after 2 retries)"
    assert study.get_trials()[job.trial.number].user_attrs["retries_used"] == 2
    out = runner.log.getvalue()  # type: ignore[attr-defined]
    assert "retry 1/2 from its checkpoint" in out and "retry 2/2" in out
    # Killed once, then finished: complete.
    results = iter([killed(job, seed, None), Outcome("complete", final={"loss": 1.0})])
    monkeypatch.setattr(runner, "_launch_seed", lambda job, seed, slot: next(results))
    assert runner._train_seed(job, seed, None).state == "complete"
    # A failure the trainer reported itself is not retried.
    launches.clear()

    def reported(job, seed, slot):
        launches.append(1)
        return Outcome("failed", "non-finite loss at step 3", exit_code=1)

    monkeypatch.setattr(runner, "_launch_seed", reported)
    assert runner._train_seed(job, seed, None).reason == "non-finite loss at step 3"
    assert len(launches) == 1


def test_retries_defaults_to_one_and_is_validated(tmp_path: Path) -> None:
    assert make_runner(tmp_path).spec.retries == 1
    with pytest.raises(SpecError, match="retries: expected an integer from 0 to 100"):
        load_study(
            write_study(tmp_path / "bad.yaml", {"timesteps.sampler": ["uniform"]}, 1, retries=-1)
        )


def test_only_a_trainer_without_status_counts_as_died(tmp_path: Path) -> None:
    proc = TrainerProcess("trainers.flow", tmp_path / "run", devices=None)
    proc.run.create()
    assert proc._classify(-9).died
    proc.run.write_status("failed", 3, "non-finite loss")
    assert not proc._classify(1).died
    proc.run.write_status("stopped", 3)
    assert not proc._classify(0).died


def test_metrics_rewritten_by_a_resumed_trainer_are_read_again(tmp_path: Path) -> None:
    proc = TrainerProcess("trainers.flow", tmp_path / "run", devices=None)
    run = proc.run
    run.create()
    for step in (1, 2, 3):
        run.log_metrics(step, {"loss": float(step)})
    assert [m["step"] for m in proc.new_metrics()] == [1, 2, 3]
    RunDir(run.root).truncate_after(1)  # the resumed trainer, then it logs again
    RunDir(run.root).log_metrics(2, {"loss": 2.5})
    assert [(m["step"], m["value"]) for m in proc.new_metrics()] == [(1, 1.0), (2, 2.5)]


def test_a_seeded_sampler_proposes_new_configurations_after_a_restart(tmp_path: Path) -> None:
    search = {"train.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}}
    opt = {"sampler": "random", "pruner": "none", "seed": 0}
    first = make_runner(tmp_path, search, optuna=opt)
    study = first.open_study()
    trial = study.ask()
    first.spec.suggest(trial)
    _tell(study, trial, values=[1.0])
    again = StudyRunner(first.spec, tmp_path / "work").open_study()
    retry = again.ask()
    again_params = first.spec.suggest(retry)
    assert again_params != trial.params  # the same seed alone would propose trial 0's lr
    # Reproducible: the same history gives the same proposal.
    other = tmp_path / "other"
    other.mkdir()
    twin = make_runner(other, search, optuna=opt)
    twin_study = twin.open_study()
    t0 = twin_study.ask()
    twin.spec.suggest(t0)
    _tell(twin_study, t0, values=[1.0])
    t1 = StudyRunner(twin.spec, other / "work").open_study().ask()
    assert twin.spec.suggest(t1) == again_params


def _one_trial_then_restart(runner: StudyRunner, tmp_path: Path) -> optuna.Study:
    """Tell one trial, restart the runner (a new StudyRunner on the same work dir), tell a
    second; the restarted study."""

    def ask_tell(study: optuna.Study, value: float) -> None:
        trial = study.ask()
        runner.spec.suggest(trial)
        _tell(study, trial, values=[value])

    ask_tell(runner.open_study(), 0.0)
    again = StudyRunner(runner.spec, tmp_path / "work").open_study()
    ask_tell(again, 1.0)
    return again


def test_a_grid_design_still_runs_each_configuration_once_across_restarts(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, {"timesteps.sampler": ["uniform", "cosmap"]}, design="grid")
    again = _one_trial_then_restart(runner, tmp_path)
    assert {t.params["timesteps.sampler"] for t in again.trials} == {"uniform", "cosmap"}
    assert len(again.trials) == 2


def test_a_killed_tell_is_copied_to_the_store_on_the_next_start(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    study = runner.open_study()
    trial = started_trial(runner, study, dead_pid())
    runner.store.upsert_trial("rec", trial.number, "running", params=trial.params)
    _tell(study, trial, values=[1.5])  # ... and the runner was killed before writing the store
    runner.recover_orphans(study)
    (row,) = runner.store.trials("rec")
    assert row["state"] == "complete" and row["values"] == [1.5]
    assert json.loads(json.dumps(row["params"])) == trial.params


def test_a_runner_killed_while_enqueueing_the_design_leaves_none_out(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, {"timesteps.sampler": ["uniform", "cosmap"]}, design="grid")
    study = optuna.create_study(
        study_name="rec", storage=runner.storage, sampler=runner.spec.make_sampler()
    )
    study.enqueue_trial(runner.spec.configurations()[0])  # ... and killed here
    study = runner.open_study()
    study = StudyRunner(runner.spec, tmp_path / "work").open_study()  # and again: no duplicate
    queued = [t.system_attrs["fixed_params"] for t in waiting(study)]
    assert queued == runner.spec.configurations()


def test_the_grid_sampler_takes_the_next_grid_point_after_a_restart(tmp_path: Path) -> None:
    # design: search with sampler: grid (write_study's default). The grid sampler's seed
    # shuffles its grid ids, so a reseeded one would map trial 1's id to trial 0's point.
    runner = make_runner(tmp_path, {"timesteps.sampler": ["uniform", "cosmap"]})
    assert runner.spec.optuna.sampler == "grid" and runner.spec.design == "search"
    again = _one_trial_then_restart(runner, tmp_path)
    assert {t.params["timesteps.sampler"] for t in again.trials} == {"uniform", "cosmap"}


def test_ingesting_a_resumed_run_dir_again_adds_no_rows(tmp_path: Path) -> None:
    runner = make_runner(tmp_path)
    run = RunDir(tmp_path / "seed")
    run.create()
    run.write_config({"seed": 0}, "abc")
    for step in range(1, 9):  # the killed attempt, checkpointed at 4, ingested once
        run.log_metrics(step, {"loss": 1.0 / step})
    runner.store.ingest_run_dir("rec/0000/s0", run.root)
    resumed = RunDir(run.root)
    resumed.truncate_after(4)
    for step in range(5, 9):
        resumed.log_metrics(step, {"loss": 2.0 / step})
    runner.store.ingest_run_dir("rec/0000/s0", run.root)
    rows = runner.store.metrics("rec/0000/s0")
    assert [(r["step"], r["value"]) for r in rows] == [
        (s, (1.0 if s <= 4 else 2.0) / s) for s in range(1, 9)
    ]
