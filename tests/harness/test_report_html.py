"""The HTML report from in-memory Optuna studies (no trainer runs): plots match the study."""

from __future__ import annotations

from pathlib import Path

import optuna

from harness.report_html import write_report_html


def _study(directions: list[str], n: int) -> optuna.Study:
    study = optuna.create_study(directions=directions, sampler=optuna.samplers.RandomSampler(0))

    def objective(trial: optuna.Trial):
        x = trial.suggest_float("x", -1, 1)
        c = trial.suggest_categorical("c", ["a", "b"])
        value = x * x + (c == "b")
        return value if len(directions) == 1 else (value, -x)

    study.optimize(objective, n_trials=n)
    return study


def test_single_objective_report_has_history_slices_and_importances(tmp_path: Path) -> None:
    out = write_report_html(_study(["minimize"], 6), ["loss"], ["minimize"], tmp_path / "r.html")
    page = out.read_text()
    for title in ("Objective history", "Parameter slices (loss)", "Parameter importances (loss)"):
        assert f"<h2>{title}</h2>" in page
    assert page.count("plotly-graph-div") == 3 and "<table>" in page  # the Markdown tables
    assert "Pareto front" not in page


def test_multi_objective_report_has_the_pareto_front(tmp_path: Path) -> None:
    study = _study(["minimize", "maximize"], 5)
    page = write_report_html(study, ["loss", "x"], ["minimize", "maximize"], tmp_path / "m.html")
    assert "<h2>Pareto front</h2>" in page.read_text()


def test_a_study_without_complete_trials_still_gets_a_report(tmp_path: Path) -> None:
    study = optuna.create_study()
    study.enqueue_trial({})
    study.ask()  # one running trial, nothing complete
    page = write_report_html(study, ["loss"], ["minimize"], tmp_path / "e.html").read_text()
    assert "No trial has completed yet." in page and "plotly-graph-div" not in page


def test_multi_objective_importances_rank_the_first_objective_in_its_direction() -> None:
    from harness.report import ablation_markdown, importance_target

    study = _study(["maximize", "maximize"], 6)
    assert (
        importance_target(["maximize", "minimize"])(study.trials[0]) == -study.trials[0].values[0]
    )
    assert importance_target(["minimize"])(study.trials[0]) == study.trials[0].values[0]
    md = ablation_markdown(study, ["loss", "x"], ["maximize", "maximize"])
    assert "## Parameter importances (loss)" in md and "| c |" in md
