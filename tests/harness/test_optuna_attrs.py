"""What the runner records on Optuna studies and trials for optuna-dashboard and other Optuna
tools (harness/optuna_attrs.py); the runner's use of it is checked end to end in
tests/harness/test_relocate.py (a real tiny study)."""

from __future__ import annotations

import math

import optuna

from harness.optuna_attrs import (
    MAX_HEADLINE,
    copied_attrs,
    headline_attrs,
    set_metric_names_once,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_metric_names_are_set_once_at_creation() -> None:
    study = optuna.create_study(directions=["minimize", "maximize"])
    assert study.metric_names is None  # the dashboard shows "Objective 0", "Objective 1"
    set_metric_names_once(study, ["domain_fid", "attr_acc_mean"])
    assert study.metric_names == ["domain_fid", "attr_acc_mean"]
    set_metric_names_once(study, ["other", "names"])  # a rerun leaves them
    assert study.metric_names == ["domain_fid", "attr_acc_mean"]


def test_headline_attrs_are_the_objectives_and_a_few_headline_metrics() -> None:
    # What a trainer logs: ~30 metrics (per-attribute accuracies, training statistics, ...).
    final = {f"attr_acc/{a}": 0.5 for a in ("shape", "colour", "size", "position", "bg")}
    final |= {f"train/stat_{i}": float(i) for i in range(20)}
    final |= {
        "domain_fid": 12.0,
        "attr_acc_mean": 0.7,
        "heldout_attr_acc_mean": 0.6,
        "eval/flow_loss": 0.4,
        "train/loss": 0.3,
        "eval/nfe": 20.0,
        "subject/fidelity": math.nan,
    }
    attrs = headline_attrs(final, ["eval/nfe", "domain_fid"])
    assert list(attrs) == [
        "eval/nfe",  # the objectives first, in order
        "domain_fid",
        "attr_acc_mean",  # then headline metrics a run logged, in order of preference
        "heldout_attr_acc_mean",
        "eval/flow_loss",
        "train/loss",
    ]
    assert len(attrs) <= 2 + MAX_HEADLINE and attrs["domain_fid"] == 12.0
    # Non-finite values are left out; a metric never logged is not invented.
    assert headline_attrs({"subject/fidelity": math.nan}, ["domain_fid"]) == {}


def test_a_repeat_copies_the_run_and_results_not_the_original_runner() -> None:
    original = {
        "run_dir": "runs/s/0000",
        "workdir": "/w",
        "config_hash": "abc",
        "seeds": [0],
        "seed_values": {"domain_fid": [1.0]},
        "domain_fid": 1.0,
        "attr_acc_mean": 0.5,
        "run_number": 0,
        "runner": {"host": "h", "runner_pid": 1},
        "error": "x",
    }
    copied = copied_attrs(original, ["domain_fid"])
    assert set(copied) == {
        "run_dir",
        "workdir",
        "config_hash",
        "seeds",
        "seed_values",
        "domain_fid",
        "attr_acc_mean",
    }
