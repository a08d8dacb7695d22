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

EXIT_NOT_BUILT = 3


@study_app.command("run")
def study_run(
    file: Annotated[Path, typer.Argument(help="study YAML file, e.g. studies/timestep.yaml")],
) -> None:
    """Run a study (not built yet: the study runner is the next issue).

    Until then, train one configuration by hand with the trainer:

        uv run python -m trainers.flow --config studies/configs/shapes-tiny.json --run-dir runs/tiny
    """
    typer.echo(
        f"The study runner is not built yet, so {file} cannot run. "
        "Train one configuration by hand:\n"
        "  uv run python -m trainers.flow --config studies/configs/shapes-tiny.json "
        "--run-dir runs/tiny",
        err=True,
    )
    raise typer.Exit(EXIT_NOT_BUILT)


def main() -> None:  # pragma: no cover
    app()
