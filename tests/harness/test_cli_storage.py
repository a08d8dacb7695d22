"""`study status/report/list` find a study kept in a database URL (not the work dir's optuna.db)
through the URL its study file named, recorded in the work dir's DuckDB store, or --storage."""

from __future__ import annotations

from pathlib import Path

import optuna
from typer.testing import CliRunner

from harness.cli import _redact, app
from harness.store import Store


def _db_backed_study(tmp_path: Path) -> tuple[Path, str]:
    """A work dir whose store records study 'remote' with storage in another sqlite file
    (standing in for PostgreSQL), holding 3 completed trials; the work dir has no optuna.db."""
    url = f"sqlite:///{tmp_path / 'elsewhere' / 'shared.db'}"
    (tmp_path / "elsewhere").mkdir()
    study = optuna.create_study(study_name="remote", storage=url, direction="minimize")
    for x in (3.0, 1.0, 2.0):
        study.enqueue_trial({"timesteps.shift": x})
    study.optimize(lambda t: t.suggest_float("timesteps.shift", 1.0, 3.0) ** 2, n_trials=3)
    workdir = tmp_path / "work"
    spec = {"name": "remote", "optuna": {"storage": url}}
    Store(workdir / "harness.duckdb").create_study("remote", spec, ["minimize"], ["domain_fid"])
    return workdir, url


def test_status_report_and_list_find_the_recorded_database(tmp_path: Path) -> None:
    workdir, url = _db_backed_study(tmp_path)
    assert not (workdir / "optuna.db").exists()
    run = CliRunner().invoke
    res = run(app, ["study", "status", "remote", "--workdir", str(workdir)])
    assert res.exit_code == 0, res.output
    assert "3 complete" in res.output and "best: trial 1 = 1" in res.output

    res = run(app, ["study", "report", "remote", "--workdir", str(workdir)])
    assert res.exit_code == 0, res.output
    assert "# Study remote" in res.output and "domain_fid (minimize)" in res.output
    assert (workdir / "reports" / "remote.html").stat().st_size > 10_000

    res = run(app, ["study", "list", "--workdir", str(workdir)])
    assert res.exit_code == 0, res.output
    assert f"remote: 3 trials  ({url})" in res.output


def test_storage_option_overrides_and_unknown_names_are_listed(tmp_path: Path) -> None:
    _, url = _db_backed_study(tmp_path)
    empty = tmp_path / "empty"
    run = CliRunner().invoke
    res = run(app, ["study", "status", "remote", "--workdir", str(empty), "--storage", url])
    assert res.exit_code == 0, res.output
    assert "3 complete" in res.output
    res = run(app, ["study", "status", "remot", "--workdir", str(empty), "--storage", url])
    assert res.exit_code == 2
    assert "no study 'remot'" in res.output and "remote" in res.output
    res = run(app, ["study", "status", "remote", "--workdir", str(empty)])
    assert res.exit_code == 2 and "pass --workdir or --storage" in res.output


def test_storage_urls_are_shown_without_passwords() -> None:
    assert (
        _redact("postgresql://ana:s3cret@db:5432/optuna") == "postgresql://ana:***@db:5432/optuna"
    )
    assert _redact("postgresql://ana@db/optuna") == "postgresql://ana@db/optuna"
    assert _redact("sqlite:///x.db") == "sqlite:///x.db"
