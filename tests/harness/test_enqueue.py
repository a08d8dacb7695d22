"""`optuna.enqueue`: the study file's first trials run first, once, within the trial budget
(the trainer launch is replaced by an instant result: the queueing is what is tested)."""

from __future__ import annotations

import io
from pathlib import Path

import optuna
import pytest
import yaml
from rich.console import Console

from harness.runner import StudyRunner
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
    def instant(self, study, trial, group, slot):  # what the trainer would have reported
        params = self.spec.suggest(trial)
        study.tell(trial, float(len(params)))

    monkeypatch.setattr(StudyRunner, "_run_trial", instant)
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
