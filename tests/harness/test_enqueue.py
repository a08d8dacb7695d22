"""`optuna.enqueue`: the study file's first trials run first, once, within the trial budget
(the trainer launch is replaced by an instant result: the queueing is what is tested)."""

from __future__ import annotations

import io
from pathlib import Path

import optuna
import pytest
import yaml
from rich.console import Console

from harness.runner import StudyRunner, TrialJob
from harness.spec import load_study
from tests.trainers.trainer_utils import config

FIRST = [
    {"timesteps.sampler": "mode", "timesteps.shift": 1.0},
    {"timesteps.sampler": "logit_normal", "timesteps.logit_mean": 0.5, "timesteps.logit_std": 1.0},
    {"timesteps.sampler": "cosmap"},
]


def _study(tmp_path: Path, trials: int) -> Path:
    doc = {
        "name": "queued",
        "base": config(),
        "search": {
            "timesteps.sampler": ["uniform", "logit_normal", "mode", "cosmap"],
            "timesteps.logit_mean": {
                "type": "float",
                "low": -1.0,
                "high": 1.0,
                "when": {"timesteps.sampler": "logit_normal"},
            },
            "timesteps.logit_std": {
                "type": "float",
                "low": 0.5,
                "high": 2.0,
                "when": {"timesteps.sampler": "logit_normal"},
            },
            "timesteps.shift": [1.0, 1.5, 2.0],
        },
        "objective": {"metric": "domain_fid", "direction": "minimize"},
        "trials": trials,
        "optuna": {"sampler": "tpe", "pruner": "none", "seed": 0, "enqueue": FIRST},
    }
    path = tmp_path / "queued.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _run(tmp_path: Path, trials: int, monkeypatch: pytest.MonkeyPatch) -> optuna.Study:
    def instant(self, study, trial, group):  # what the trainer would have reported
        params = self.spec.suggest(trial)
        study.tell(trial, float(len(params)))
        return TrialJob(trial, group, params, [], 0.0)  # no seed run left to train

    monkeypatch.setattr(StudyRunner, "_start_job", instant)
    console = Console(file=io.StringIO())
    return StudyRunner(load_study(_study(tmp_path, trials)), tmp_path / "w", console).run()


def _given(params: dict, first: dict) -> dict:
    """The trial's values of the parameters the enqueued trial fixed."""
    return {k: params.get(k) for k in first}


def test_enqueued_trials_run_first_once_and_within_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = _run(tmp_path, 2, monkeypatch)  # budget below the queue: only the first two run
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert [_given(t.params, first) for t, first in zip(done, FIRST, strict=False)] == FIRST[:2]
    assert len(study.get_trials(states=(optuna.trial.TrialState.WAITING,))) == 1

    study = _run(tmp_path, 5, monkeypatch)  # rerun with a larger budget: nothing enqueued twice
    trials = study.get_trials()
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert len(trials) == 5
    assert [_given(t.params, first) for t, first in zip(trials, FIRST[:2], strict=False)] == FIRST[
        :2
    ]
    # The third enqueued trial fixes only the sampler: the rest came from TPE.
    assert trials[2].params["timesteps.sampler"] == "cosmap"
    assert set(trials[2].params) == {"timesteps.sampler", "timesteps.shift"}


def test_the_pruner_sees_a_configurations_mean_only_once_every_seed_reached_the_step(
    tmp_path: Path,
) -> None:
    from harness.runner import SeedRun
    from trainers.rundir import RunDir

    doc = yaml.safe_load(_study(tmp_path, 2).read_text())
    doc["optuna"] = {"sampler": "random", "pruner": "median", "seed": 0}
    doc["repeats"] = 3
    path = tmp_path / "seeded.yaml"
    path.write_text(yaml.safe_dump(doc))
    runner = StudyRunner(load_study(path), tmp_path / "w", Console(file=io.StringIO()))
    study = runner.open_study()
    trial = study.ask()
    seeds = [SeedRun(k, k, RunDir(tmp_path / f"s{k}"), f"x/s{k}") for k in range(3)]
    job = TrialJob(trial, 0, {}, seeds, 0.0)
    runner._on_metric(job, 0, 10, "domain_fid", 3.0)
    runner._on_metric(job, 1, 10, "domain_fid", 6.0)
    runner._on_metric(job, 0, 20, "domain_fid", 2.0)
    runner._on_metric(job, 0, 10, "train/loss", 1.0)  # not the objective: never reported
    assert study.trials[0].intermediate_values == {}  # seed 2 has not reached step 10 yet
    runner._on_metric(job, 2, 10, "domain_fid", 9.0)
    assert study.trials[0].intermediate_values == {10: 6.0}  # the mean of the three seeds
    runner._on_metric(job, 1, 20, "domain_fid", 4.0)
    runner._on_metric(job, 2, 20, "domain_fid", 6.0)
    assert study.trials[0].intermediate_values == {10: 6.0, 20: 4.0}
