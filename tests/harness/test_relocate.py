"""A work directory can be moved or copied: run directories are recorded relative to it (Optuna
user attributes, DuckDB ``runs.run_dir``) and resolved against the work directory a command is
given (harness/workpaths.py). Old stores recorded absolute paths: those still resolve."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import optuna
import pytest
from rich.console import Console
from typer.testing import CliRunner

from harness import app_data
from harness.arena_pipeline import _final_dir
from harness.cli import app
from harness.evaluate_cmd import load_image_set
from harness.runner import StudyRunner
from harness.spec import load_study
from harness.store import Store
from harness.workpaths import resolve_run_dir, to_stored, trial_run_dir
from tests.harness.test_runner import write_study


def test_paths_inside_the_work_dir_are_stored_relative(tmp_path: Path) -> None:
    work = tmp_path / "work"
    assert to_stored(work / "runs" / "s" / "0000", work) == "runs/s/0000"
    assert to_stored(tmp_path / "elsewhere", work) == str((tmp_path / "elsewhere").resolve())
    assert to_stored(work / "runs" / "x", None) == str((work / "runs" / "x").resolve())
    assert resolve_run_dir("runs/s/0000", tmp_path / "moved") == tmp_path / "moved/runs/s/0000"


def test_old_absolute_paths_resolve_as_they_are_else_re_rooted_under_runs(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "runs" / "s" / "0000").mkdir(parents=True)
    recorded = str(old / "runs" / "s" / "0000")
    assert resolve_run_dir(recorded, new) == Path(recorded)  # still there: used as it is
    shutil.move(old, new)
    assert resolve_run_dir(recorded, new) == new / "runs" / "s" / "0000"  # moved: re-rooted
    # A study named "runs": the last "runs" component is tried first, then earlier ones.
    (new / "runs" / "runs" / "0001").mkdir(parents=True)
    assert resolve_run_dir(str(old / "runs/runs/0001"), new) == new / "runs/runs/0001"
    # Found nowhere: the recorded path, so that errors name what was recorded.
    assert resolve_run_dir(str(old / "runs/s/0009"), new) == old / "runs/s/0009"


def test_a_trial_run_by_another_worker_is_found_in_its_work_dir(tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    (theirs / "runs" / "s" / "0003").mkdir(parents=True)
    attrs = {"run_dir": "runs/s/0003", "workdir": str(theirs)}
    assert trial_run_dir(attrs, mine) == theirs / "runs/s/0003"
    assert trial_run_dir(attrs, None) == theirs / "runs/s/0003"  # no work dir given: its own
    (mine / "runs" / "s" / "0003").mkdir(parents=True)
    assert trial_run_dir(attrs, mine) == mine / "runs/s/0003"  # the given work dir first
    assert trial_run_dir({}, mine) is None


@pytest.mark.slow
def test_a_copied_work_dir_still_finds_samples_and_configs(tmp_path: Path) -> None:
    study_file = write_study(tmp_path / "tiny.yaml", {"timesteps.sampler": ["uniform"]}, 1, 8, 8)
    spec = load_study(study_file)
    work = tmp_path / "work"
    log = io.StringIO()
    study = StudyRunner(spec, work, console=Console(file=log, width=200)).run()
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE], log.getvalue()
    (trial,) = study.trials
    assert trial.user_attrs["run_dir"] == "runs/tiny/0000"
    # What optuna-dashboard shows (harness/optuna_attrs.py): named objectives, and headline
    # metrics as separate attributes instead of a blob of every metric.
    assert study.metric_names == ["domain_fid"]
    assert "final_metrics" not in trial.user_attrs
    assert trial.user_attrs["domain_fid"] == pytest.approx(trial.values[0])
    assert {"attr_acc_mean", "eval/flow_loss"} <= set(trial.user_attrs)
    store = Store(work / "harness.duckdb")
    assert store.query("SELECT run_dir FROM runs")[0]["run_dir"] == "runs/tiny/0000/s0"

    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(work, moved)
    shutil.rmtree(work)

    html = tmp_path / "tiny.html"
    res = CliRunner().invoke(
        app, ["study", "report", "tiny", "--workdir", str(moved), "--html", str(html)]
    )
    assert res.exit_code == 0, res.output
    # The best configuration's trainer config and run directory, read from the copy.
    assert "Its trainer config" in res.stdout and '"sampler": "uniform"' in res.stdout
    assert f"`{moved / 'runs' / 'tiny' / '0000'}/s<k>/`" in res.stdout
    # A configuration counts once its seed runs' metrics.jsonl are found.
    assert "1 configuration(s) x 1 training seed(s)" in res.stdout
    store = Store(moved / "harness.duckdb")
    final = [s for s in store.samples("tiny/0000/s0") if s["tag"] == "final"]
    page = html.read_text()
    assert final and page.count('<img src="data:image/png;base64,') == len(final)

    # The app's data, `harness eval` and `arena add` find the run's files in the copy too.
    run = app_data.run(store, "tiny/0000/s0")
    assert run is not None and run["status"]["status"] == "ok"
    assert app_data.sample_image(store, "tiny/0000/s0", final[0]["path"]).startswith(b"\x89PNG")
    images = load_image_set("tiny/0000/s0", store, tag="final")
    assert images.images.shape[0] == len(final)
    assert _final_dir(store, "tiny/0000/s0") == moved / "runs" / "tiny" / "0000" / "s0" / "final"
    # A rerun in the copy finds the finished study and trains nothing.
    again = StudyRunner(spec, moved, console=Console(file=io.StringIO())).run()
    assert len(again.trials) == 1


def test_a_study_on_a_best_teacher_reruns_in_a_moved_work_dir(tmp_path: Path) -> None:
    """``teacher: best:STUDY`` resolves to a run directory in the work directory; the stored
    spec records it relative, so the same study file opens again after the move instead of
    being refused as a different spec. A path recorded absolute (earlier versions) is kept when
    it names the same run."""
    from tests.harness.test_distill_study import distill_study

    old, new = tmp_path / "old", tmp_path / "new"
    store = Store(old / "harness.duckdb")
    store.create_study("teach", {"name": "teach"}, ["minimize"], ["domain_fid"])
    store.register_run("teach/0000", old / "runs/teach/0000", {"n": 0}, "h0", study="teach")
    store.upsert_trial("teach", 0, "complete", values=[1.0], run_id="teach/0000")
    (old / "runs/teach/0000").mkdir(parents=True)
    spec = load_study(distill_study(tmp_path / "d.yaml", "best:teach", ["progressive"]))
    quiet = Console(file=io.StringIO())
    StudyRunner(spec, old, console=quiet).open_study()
    (row,) = store.query("SELECT spec FROM studies WHERE name = 'd'")
    assert '"teacher":"runs/teach/0000"' in row["spec"].replace(" ", "")
    shutil.move(old, new)
    runner = StudyRunner(spec, new, console=quiet)
    runner.open_study()  # not "different spec"
    assert runner.spec.base["teacher"] == str((new / "runs/teach/0000").resolve())
    # A spec recorded by an earlier version, with the absolute path of the old location.
    moved = Store(new / "harness.duckdb")
    with moved.transaction() as con:
        con.execute(
            "UPDATE studies SET spec = replace(spec, 'runs/teach/0000', ?) WHERE name = 'd'",
            [str(old / "runs/teach/0000")],
        )
    StudyRunner(spec, new, console=quiet).open_study()
