"""A distillation study through the harness: ``teacher: best:STUDY`` resolves to the best
trial of a study run in the same work directory, students train as trials, and students and
teacher become arena contestants (students without guidance, at their own sampler)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from harness.arena_pipeline import add_run_contestants, load_prompts, render_contestants
from harness.report import ablation_markdown
from harness.runner import StudyRunner, resolve_teacher_ref
from harness.spec import SpecError, load_study
from harness.store import Store
from tests.harness.test_runner import write_study

pytestmark = pytest.mark.slow


def distill_study(path: Path, teacher: str, methods: list[str], **extra: object) -> Path:
    study = {
        "name": path.stem,
        "trainer": "distill",
        "base": {
            "teacher": teacher,
            "distill": {"steps": 1, "progressive": {"teacher_steps": 2}},
            "train": {"steps": 4, "batch_size": 4, "warmup_steps": 0, "log_every": 2},
            "eval": {"every": 100, "num_images": 4, "reference_images": 64},
            "sample": {"num_prompts": 2},
        },
        "search": {"distill.method": methods},
        "objective": {"metric": "domain_fid", "direction": "minimize"},
        "trials": len(methods),
        "optuna": {"sampler": "grid", "pruner": "none", "seed": 0},
        **extra,
    }
    path.write_text(yaml.safe_dump(study))
    return path


def test_teacher_ref_resolves_to_the_best_trial_or_says_what_is_missing(tmp_path: Path) -> None:
    store = Store(tmp_path / "h.duckdb")
    spec = load_study(distill_study(tmp_path / "d.yaml", "best:teach", ["progressive"]))
    with pytest.raises(SpecError, match=r"no study 'teach'.*studies/teach\.yaml"):
        resolve_teacher_ref(spec, store)
    store.create_study("teach", {"name": "teach"}, ["maximize"], ["attr_acc_mean"])
    with pytest.raises(SpecError, match="no complete trial"):
        resolve_teacher_ref(spec, store)
    for number, value in [(0, 0.5), (1, 0.9), (2, 0.7)]:
        run_id = f"teach/{number:04d}"
        store.register_run(run_id, tmp_path / run_id, {"n": number}, f"h{number}", study="teach")
        store.upsert_trial("teach", number, "complete", values=[value], run_id=run_id)
    store.upsert_trial("teach", 3, "failed")
    resolved = resolve_teacher_ref(spec, store)
    assert resolved.base["teacher"] == str((tmp_path / "teach/0001").resolve())  # maximize
    plain = load_study(distill_study(tmp_path / "p.yaml", str(tmp_path), ["progressive"]))
    assert resolve_teacher_ref(plain, store) is plain


def test_study_run_without_the_teacher_study_exits_2_with_the_fix(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from harness.cli import app

    study = distill_study(tmp_path / "d.yaml", "best:timestep", ["progressive"])
    result = CliRunner().invoke(app, ["study", "run", str(study), "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2, result.output
    assert "no study 'timestep'" in result.output
    assert "harness study run studies/timestep.yaml" in result.output
    assert not (tmp_path / "w" / "runs").exists()


def test_missing_teacher_path_fails_the_check(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"base\.teacher: .* does not exist"):
        load_study(distill_study(tmp_path / "d.yaml", str(tmp_path / "nope"), ["progressive"]))


def test_distill_study_on_the_best_teacher_then_arena(tmp_path: Path) -> None:
    work = tmp_path / "work"
    teach = load_study(write_study(tmp_path / "teach.yaml", {"timesteps.shift": [2.0]}, 1, steps=8))
    StudyRunner(teach, work, console=Console(file=io.StringIO())).run()
    # The multi-objective variant (as studies/distill-pareto.yaml): quality against NFE.
    spec = load_study(
        distill_study(
            tmp_path / "students.yaml",
            "best:teach",
            ["progressive", "dmd"],
            objective=[
                {"metric": "domain_fid", "direction": "minimize"},
                {"metric": "eval/nfe", "direction": "minimize"},
            ],
            optuna={
                "sampler": "nsga2",
                "pruner": "none",
                "seed": 0,
                "enqueue": [{"distill.method": "progressive"}, {"distill.method": "dmd"}],
            },
        )
    )
    log = io.StringIO()
    study = StudyRunner(spec, work, console=Console(file=log, width=200)).run()
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"], log.getvalue()
    report = ablation_markdown(study, spec.metrics, spec.directions)
    front = report.split("## Pareto front", 1)[1]
    best = min(study.trials, key=lambda t: t.values[0])
    assert f"- trial {best.number}: " in front  # same NFE: the lower FID dominates
    assert all(t.values[1] == 1.0 for t in study.trials)  # eval/nfe = distill.steps

    store = Store(work / "harness.duckdb")
    teacher_trials = store.trials("teach")
    best = min(teacher_trials, key=lambda r: r["values"][0])
    students = store.trials("students")
    assert {r["params"]["distill.method"] for r in students} == {"progressive", "dmd"}
    for r in students:
        cfg = store.query("SELECT config FROM runs WHERE run_id = ?", [r["run_id"]])[0]["config"]
        teacher_dir = store.query("SELECT run_dir FROM runs WHERE run_id = ?", [best["run_id"]])
        # The store records it relative to the work dir; the trainer is given it absolute.
        assert json.loads(cfg)["teacher"] == str(store.run_dir_path(teacher_dir[0]["run_dir"]))

    added = add_run_contestants(store, [best["run_id"]], steps=[1, 4], guidance=1.5)
    added += add_run_contestants(store, [r["run_id"] for r in students], steps=[1])
    by_run = {a.run_id: a for a in added if a.steps == 1}
    assert by_run[best["run_id"]].guidance == 1.5 and by_run[best["run_id"]].solver == "euler"
    dmd = next(r["run_id"] for r in students if r["params"]["distill.method"] == "dmd")
    prog = next(r["run_id"] for r in students if r["params"]["distill.method"] == "progressive")
    assert (by_run[dmd].solver, by_run[dmd].guidance) == ("consistency", 1.0)
    assert (by_run[prog].solver, by_run[prog].guidance) == ("euler", 1.0)
    summary = render_contestants(
        store,
        work,
        load_prompts("embedded", 2),
        [0],
        contestants=[a.contestant_id for a in added],
        progress=False,
    )
    assert summary.rendered == 2 * len(added) and not summary.not_renderable
