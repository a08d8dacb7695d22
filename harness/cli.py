"""The ``harness`` command line. Heavy imports live inside the handlers so ``--help`` is instant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Diffusion training ablation harness and evaluation arena.",
    no_args_is_help=True,
    add_completion=False,
)
study_app = typer.Typer(
    help="Run and inspect Optuna studies over training choices.", no_args_is_help=True
)
app.add_typer(study_app, name="study")

EXIT_INVALID = 2


WorkdirOpt = Annotated[
    Path, typer.Option("--workdir", help="where runs/, harness.duckdb and optuna.db live")
]
DEFAULT_WORKDIR = Path("work")


@study_app.command("run")
def study_run(
    file: Annotated[Path, typer.Argument(help="study YAML file, e.g. studies/timestep.yaml")],
    trials: Annotated[
        int | None, typer.Option("--trials", help="run this many trials instead of the file's")
    ] = None,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    html: HtmlOpt = None,
) -> None:
    """Run a study: Optuna proposes, a trainer process trains each trial, DuckDB records.

    At the end it prints the ablation report (Markdown) and writes it as HTML with plots.
    Rerun the same command to resume: finished trials stay, interrupted ones resume from their
    checkpoint. Ctrl-C stops the trainers cleanly (they checkpoint). Example:

        uv run harness study run studies/timestep.yaml --workdir work
    """
    from harness.report import ablation_markdown
    from harness.runner import StudyRunner
    from harness.spec import SpecError, load_study

    try:
        spec = load_study(file)
    except SpecError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(EXIT_INVALID) from None
    runner = StudyRunner(spec, workdir)
    try:
        study = runner.run(n_trials=trials)
    except KeyboardInterrupt:
        typer.echo("stopped; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    typer.echo(ablation_markdown(study, spec.metrics, spec.directions))
    path = _write_html(study, spec.metrics, spec.directions, workdir, html)
    typer.echo(f"HTML report with plots: {path}", err=True)


StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Optuna storage URL; default: the one the study file named, else the work dir's",
    ),
]
HtmlOpt = Annotated[
    Path | None,
    typer.Option(
        "--html", help="where to write the HTML report [default: WORKDIR/reports/NAME.html]"
    ),
]


def _studies_row(name: str, workdir: Path) -> dict | None:
    from harness.store import Store

    path = workdir / "harness.duckdb"
    if not path.exists():
        return None
    rows = Store(path).query(
        "SELECT spec, objectives, directions FROM studies WHERE name = ?", [name]
    )
    return rows[0] if rows else None


def _load(name: str, workdir: Path, storage: str | None = None):
    """The Optuna study ``name``: from ``storage``, else the URL its study file named (recorded
    in the DuckDB store), else the work directory's local file."""
    import json

    import optuna

    from harness.runner import Workdir

    row = _studies_row(name, workdir)
    if storage is None and row is not None:
        storage = (json.loads(row["spec"]).get("optuna") or {}).get("storage")
    url = storage or Workdir(workdir).optuna_url
    if storage is None and not (workdir / "optuna.db").exists():
        typer.echo(f"no studies in {workdir} (no optuna.db); pass --workdir or --storage", err=True)
        raise typer.Exit(EXIT_INVALID)
    try:
        return optuna.load_study(study_name=name, storage=url)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(url)]
        typer.echo(
            f"no study {name!r} in {url}; studies there: {', '.join(names) or 'none'}", err=True
        )
        raise typer.Exit(EXIT_INVALID) from None


def _write_html(study, metrics, directions, workdir: Path, out: Path | None) -> Path:
    from harness.report_html import write_report_html
    from harness.store import Store

    out = out or workdir / "reports" / f"{study.study_name}.html"
    store = Store(workdir / "harness.duckdb") if (workdir / "harness.duckdb").exists() else None
    return write_report_html(study, metrics, directions, out, store)


@study_app.command("report")
def study_report(
    name: Annotated[str, typer.Argument(help="study name (the file's name: key)")],
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    storage: StorageOpt = None,
    html: HtmlOpt = None,
) -> None:
    """Print the ablation report (Markdown) and write it as HTML with plots.

    Markdown on stdout: each swept choice with the objective and its 95% CI, secondary metrics,
    parameter importances, the best trial with its config, and every trial's state. The HTML
    file adds the objective history, parameter slices and importances, metric-vs-step curves
    per trial, and the best trial's samples.
    """
    from harness.report import ablation_markdown

    study = _load(name, workdir, storage)
    row = _studies_row(name, workdir)
    metrics, directions = (
        (list(row["objectives"]), list(row["directions"]))
        if row
        else (["objective"], [d.name.lower() for d in study.directions])
    )
    typer.echo(ablation_markdown(study, metrics, directions))
    path = _write_html(study, metrics, directions, workdir, html)
    typer.echo(f"HTML report with plots: {path}", err=True)


@study_app.command("status")
def study_status(
    name: Annotated[str, typer.Argument(help="study name")],
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    storage: StorageOpt = None,
) -> None:
    """Trials by state, and the best value so far."""
    study = _load(name, workdir, storage)
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    typer.echo(f"{name}: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())))
    done = [t for t in study.trials if t.values]
    if done and len(study.directions) == 1:
        typer.echo(
            f"best: trial {study.best_trial.number} = {study.best_value:.4g} {study.best_params}"
        )


@study_app.command("list")
def study_list(workdir: WorkdirOpt = DEFAULT_WORKDIR, storage: StorageOpt = None) -> None:
    """The studies in a work directory (or in the Optuna storage ``--storage``)."""
    import optuna

    from harness.runner import Workdir

    if storage is None and not (workdir / "optuna.db").exists():
        typer.echo(f"no studies in {workdir}")
        return
    for s in optuna.get_all_study_summaries(storage or Workdir(workdir).optuna_url):
        typer.echo(f"{s.study_name}: {s.n_trials} trials")


@study_app.command("check")
def study_check(
    file: Annotated[Path, typer.Argument(help="study YAML file, e.g. studies/timestep.yaml")],
) -> None:
    """Validate a study file and print its search space; runs nothing.

    An invalid file lists every problem on stderr, each with its key path, and exits 2.
    Example:

        uv run harness study check studies/timestep.yaml
    """
    from harness.spec import SpecError, load_study

    try:
        spec = load_study(file)
    except SpecError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(EXIT_INVALID) from None
    typer.echo(spec.summary())


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # python -m harness.cli
    app()
