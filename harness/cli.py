"""The ``harness`` command line. Heavy imports live inside the handlers so ``--help`` is instant."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Annotated

import click
import typer
import typer.core

from evaluators.judging import judge_names
from evaluators.metrics import METRICS
from evaluators.redact import redact_text, redact_url

METRIC_NAMES = tuple(METRICS)
JUDGE_NAMES = tuple(judge_names())
EXIT_INVALID = 2


def _known_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(refused input -> exit 2, a busy store -> exit 1): the errors whose message is the whole
    story for the user. Anything else is a bug and keeps its traceback. Imported on demand:
    only an error pays for the imports."""
    from pydantic import ValidationError

    from evaluators.image_metrics import NotEnoughImagesError
    from evaluators.judging import JudgeError
    from evaluators.mllm_backends import BackendConfigError
    from evaluators.sinks import RecordError
    from harness.evaluate_cmd import EvalError
    from harness.spec import SpecError
    from harness.store import StoreBusyError, StoreError
    from trainers.config import ConfigError  # PairsError and RewardError are ConfigErrors
    from trainers.errors import DataError, WeightsError

    invalid = (
        StoreError, SpecError, ConfigError, DataError, WeightsError, JudgeError, RecordError,
        EvalError, BackendConfigError, NotEnoughImagesError, ValidationError, UnicodeDecodeError,
        FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
    )  # fmt: skip
    return invalid, (StoreBusyError,)


def _error_message(err: BaseException) -> str:
    if isinstance(err, UnicodeDecodeError):  # its own message names no file
        text = (
            f"a file is not UTF-8 text ({err}); save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        )
    elif (
        isinstance(err, OSError) and err.filename is not None and str(err.filename) not in str(err)
    ):
        text = f"{err.strerror or err}: {err.filename}"
    else:
        text = str(err)
    return redact_text(text)


class _HarnessGroup(typer.core.TyperGroup):
    """The top-level command group: a refused input anywhere below (store, study file, config,
    data, weights, a missing file) prints ``error: MESSAGE`` on stderr and exits 2, a store
    locked by another process exits 1, and only unexpected errors (bugs) show a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as err:
            invalid, busy = _known_errors()
            if isinstance(err, busy):
                typer.echo(f"error: {_error_message(err)}", err=True)
                raise typer.Exit(1) from None
            if isinstance(err, invalid):
                typer.echo(f"error: {_error_message(err)}", err=True)
                raise typer.Exit(EXIT_INVALID) from None
            raise


app = typer.Typer(
    cls=_HarnessGroup,
    help="Diffusion training ablation harness and evaluation arena.",
    no_args_is_help=True,
    add_completion=False,
    # a traceback's locals could hold a storage URL or an API key
    pretty_exceptions_show_locals=False,
)
study_app = typer.Typer(
    help="Run and inspect Optuna studies over training choices.", no_args_is_help=True
)
app.add_typer(study_app, name="study")
arena_app = typer.Typer(
    help="The evaluation arena: pairwise votes between contestants (see `harness leaderboard`).",
    no_args_is_help=True,
)
app.add_typer(arena_app, name="arena")
raters_app = typer.Typer(
    help="Human raters of the arena app and their personal voting links.", no_args_is_help=True
)
app.add_typer(raters_app, name="raters")


WorkdirOpt = Annotated[
    Path, typer.Option("--workdir", help="where runs/, harness.duckdb and optuna.db live")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="override a key of the study file, a dotted path into its structure (repeatable): "
        "--set base.train.steps=100; VALUE is YAML (100, 1e-3, true, null, a bracketed list); "
        "validated like "
        "the file",
    ),
]
DEFAULT_WORKDIR = Path("work")


@study_app.command("run")
def study_run(
    file: Annotated[Path, typer.Argument(help="study YAML file, e.g. studies/timestep.yaml")],
    trials: Annotated[
        int | None,
        typer.Option(
            "--trials",
            "--total-trials",
            min=1,
            help="the study's total number of trials, counting those it already has (not N "
            "more): a finished study rerun with the same N runs nothing; default: the file's "
            "trials:",
        ),
    ] = None,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    html: HtmlOpt = None,
    sets: SetOpt = None,
) -> None:
    """Run a study: Optuna proposes, a trainer process trains each trial, DuckDB records.

    At the end it prints the ablation report (Markdown) and writes it as HTML with plots.
    Rerun the same command to resume: finished trials stay, interrupted ones resume from their
    checkpoint. Ctrl-C stops the trainers cleanly (they checkpoint). Example:

        uv run harness study run studies/timestep.yaml --workdir work

    --set KEY=VALUE overrides a key of the study file (repeatable), e.g. --set
    base.train.steps=100 --set trials=4. A study already in the work directory refuses
    overrides that change it (anything but trials); add --set name=NEW to run them as a new
    study.
    """
    from harness.runner import StudyRunner
    from harness.spec import SpecError, load_study
    from harness.store import StoreError

    try:
        spec = load_study(file, sets or ())
        # The runner resolves references into the work directory (teacher: best:STUDY), which
        # can fail the same way: exit 2 with the message, nothing launched.
        runner = StudyRunner(spec, workdir)
    except SpecError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    try:
        study = runner.run(n_trials=trials)
    except StoreError as err:
        if sets and "different spec" in str(err):  # the study exists: --set changed it
            typer.echo(
                f"error: {_error_message(err)}\n--set {' --set '.join(sets)} changes study "
                f"{spec.name!r}, which already exists in {workdir}: an existing study only "
                "takes --set trials=N (or --trials N); add --set name=NEW to run the "
                "overrides as a new study",
                err=True,
            )
            raise typer.Exit(EXIT_INVALID) from None
        raise
    except KeyboardInterrupt:
        typer.echo("stopped; rerun the same command to resume", err=True)
        raise typer.Exit(130) from None
    _print_report(study, spec.model_dump(mode="json"), spec.metrics, spec.directions, workdir, html)


def _print_report(
    study, spec: dict, metrics: list[str], directions: list[str], workdir: Path, html, as_json=False
) -> None:
    """The report on stdout (Markdown, or JSON with ``as_json``) and as HTML with plots."""
    import json

    from harness.effects import analyse
    from harness.report import ablation_markdown

    baseline, design = spec.get("baseline"), spec.get("design", "search")
    sampler = (spec.get("optuna") or {}).get("sampler", "tpe")
    analysis = analyse(
        study, metrics, directions, baseline, design, sampler, spec.get("repeats"), workdir=workdir
    )
    if as_json:
        typer.echo(json.dumps(analysis.to_json(), indent=1))
    else:
        typer.echo(
            ablation_markdown(
                study,
                metrics,
                directions,
                baseline,
                design=design,
                sampler=sampler,
                analysis=analysis,
                workdir=workdir,
            )
        )
    path = _write_html(study, metrics, directions, workdir, html, baseline, analysis)
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
        "--html", help="where to write the HTML report (default: WORKDIR/reports/NAME.html)"
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

    given = storage
    row = _studies_row(name, workdir)
    if storage is None and row is not None:
        storage = (json.loads(row["spec"]).get("optuna") or {}).get("storage")
    url = storage or Workdir(workdir).optuna_url
    if storage is None and not (workdir / "optuna.db").exists():
        typer.echo(
            f"error: no studies in {workdir} (no optuna.db); pass --workdir or --storage", err=True
        )
        raise typer.Exit(EXIT_INVALID)
    try:
        return optuna.load_study(study_name=name, storage=url)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(url)]
        typer.echo(
            f"error: no study {name!r} in {_redact(url)}; "
            f"studies there: {', '.join(names) or 'none'}",
            err=True,
        )
        raise typer.Exit(EXIT_INVALID) from None
    except Exception as err:  # unreachable server, refused login, unknown driver, bad URL
        if (
            isinstance(err, (ImportError, optuna.exceptions.OptunaError))
            or "sqlalchemy" in type(err).__module__
        ):
            typer.echo(
                f"error: cannot open the storage {_redact(url)}: "
                f"{redact_text(f'{type(err).__name__}: {err}')}"
                + (
                    ""
                    if given
                    else " (the store keeps storage URLs without their password: pass --storage "
                    "with the full URL, or give the driver the password, e.g. PGPASSWORD)"
                ),
                err=True,
            )
            raise typer.Exit(EXIT_INVALID) from None
        raise


def _write_html(
    study, metrics, directions, workdir: Path, out: Path | None, baseline: dict | None, analysis
) -> Path:
    from harness.report_html import write_report_html
    from harness.store import Store

    out = out or workdir / "reports" / f"{study.study_name}.html"
    store = Store(workdir / "harness.duckdb") if (workdir / "harness.duckdb").exists() else None
    return write_report_html(
        study, metrics, directions, out, store, baseline, analysis, workdir=workdir
    )


@study_app.command("report")
def study_report(
    name: Annotated[str, typer.Argument(help="study name (the file's name: key)")],
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    storage: StorageOpt = None,
    html: HtmlOpt = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="print the analysis as JSON (configurations, effects, ranks) instead of Markdown",
        ),
    ] = False,
) -> None:
    """Print the ablation report (Markdown, or JSON) and write it as HTML with plots.

    Markdown on stdout: each configuration's effect against the baseline (or the best) per
    metric, paired over training seeds, with its 95% interval, probability of improvement,
    verdict and the seeds an unresolved difference would need; a rank table; each
    configuration's mean over seeds with its interval and the evaluation-only noise apart;
    steps to reach the baseline; importances; the best configuration; every trial. The HTML file
    adds the effect and per-seed plots, the objective history, metric-vs-step curves and the
    best configuration's samples. Example:

        uv run harness study report timestep --workdir work --json > timestep.json
    """
    import json

    study = _load(name, workdir, storage)
    row = _studies_row(name, workdir)
    metrics, directions = (
        (list(row["objectives"]), list(row["directions"]))
        if row
        else (["objective"], [d.name.lower() for d in study.directions])
    )
    spec = json.loads(row["spec"]) if row else {}
    _print_report(study, spec, metrics, directions, workdir, html, as_json)


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
    """The studies of a work directory: those in its local Optuna file and those whose study
    file named a database URL (recorded in its DuckDB store); or those in ``--storage``."""
    import json

    import optuna

    from harness.runner import Workdir
    from harness.store import Store

    urls: list[str] = []
    if storage is not None:
        urls.append(storage)
    else:
        if (workdir / "optuna.db").exists():
            urls.append(Workdir(workdir).optuna_url)
        if (workdir / "harness.duckdb").exists():
            for row in Store(workdir / "harness.duckdb").query("SELECT spec FROM studies"):
                url = (json.loads(row["spec"]).get("optuna") or {}).get("storage")
                if url and url not in urls:
                    urls.append(url)
    if not urls:
        typer.echo(f"no studies in {workdir}")
        return
    for url in urls:
        try:
            summaries = optuna.get_all_study_summaries(url)
        except Exception as err:  # one unreachable database must not hide the others
            why = redact_text(f"{type(err).__name__}: {err}")
            typer.echo(f"{_redact(url)}: cannot read ({why})", err=True)
            continue
        where = "" if url == Workdir(workdir).optuna_url else f"  ({_redact(url)})"
        for s in summaries:
            typer.echo(f"{s.study_name}: {s.n_trials} trials{where}")


def _redact(url: str) -> str:
    """A storage URL without its password (postgresql://user:secret@host -> user:***@host)."""
    return redact_url(url)


@study_app.command("check")
def study_check(
    file: Annotated[Path, typer.Argument(help="study YAML file, e.g. studies/timestep.yaml")],
    sets: SetOpt = None,
) -> None:
    """Validate a study file and print its search space; runs nothing.

    An invalid file lists every problem on stderr, each with its key path, and exits 2.
    --set KEY=VALUE applies the same overrides as `study run --set`. Example:

        uv run harness study check studies/timestep.yaml --set base.train.steps=100
    """
    from harness.spec import SpecError, load_study

    try:
        spec = load_study(file, sets or ())
    except SpecError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    typer.echo(spec.summary())


# -- the arena -----------------------------------------------------------------------------------
@arena_app.command("import")
def arena_import(
    file: Annotated[Path, typer.Argument(help="JSONL file of votes, one JSON object per line")],
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    add_contestants: Annotated[
        bool,
        typer.Option(
            "--add-contestants",
            help="register contestant ids the store does not know (with only their id) "
            "instead of refusing the file",
        ),
    ] = False,
) -> None:
    """Import pairwise votes into WORKDIR/harness.duckdb, all or nothing.

    One JSON object per line with "prompt", "seed", "left", "right" (contestant
    ids), "winner" (left, right, tie or both_bad), "rater", "rater_kind" (human,
    judge or domain; default human), "time" (epoch seconds or ISO 8601 with a UTC
    offset), and optionally "left_image", "right_image", "session", "extra".
    Limits: "prompt" at most 2000 characters; "left", "right", "rater" and "session" at most 200;
    "left_image" and "right_image" at most 1000.
    A malformed line exits 2 naming FILE:LINE, and nothing of the file is stored.
    Importing the same votes again stores nothing new. Example:

        uv run harness arena import votes.jsonl --workdir work
    """
    from harness.arena import import_comparisons

    store = _open_store(workdir, create=True)
    with _store_errors():
        result = import_comparisons(store, file, add_contestants=add_contestants)
    message = (
        f"{file}: {result.rows} comparisons read, {result.inserted} new, "
        f"{result.already_present} already stored"
    )
    if result.contestants_added:
        message += f"; {result.contestants_added} new contestants registered (id only)"
    typer.echo(message)


@arena_app.command("add")
def arena_add(
    run_ids: Annotated[list[str], typer.Argument(help="run ids (the `runs` table)")],
    steps: Annotated[
        str, typer.Option("--steps", help="sampler steps, comma-separated: one contestant each")
    ] = "25",
    solver: Annotated[
        str,
        typer.Option("--solver", help="euler or heun (a distilled run uses its own sampler)"),
    ] = "euler",
    guidance: Annotated[
        float,
        typer.Option(
            "--guidance",
            help="classifier-free guidance (a distilled run has its teacher's built in: 1.0)",
        ),
    ] = 3.0,
    label: Annotated[str | None, typer.Option("--label", help="display name")] = None,
    enhancer: Annotated[
        str | None,
        typer.Option(
            "--enhancer",
            help="rewrite prompts before rendering: shapes, openai[:MODEL] or transformers:PATH "
            "(a contestant of its own: its id ends in +BACKEND@VERSION)",
        ),
    ] = None,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
) -> None:
    """Register contestants: each run's exported model at each sampler setting.

    Ids read RUN@SOLVER-STEPS-cfgGUIDANCE[+ENHANCER@VERSION]; adding one again changes nothing.
    Each run must be registered and have final/. Examples:

        uv run harness arena add timestep/0000/s0 timestep/0001/s0 --steps 8,25 --guidance 3.0
        uv run harness arena add timestep/0001/s0 --steps 25 --enhancer shapes
    """
    from harness.arena_pipeline import add_run_contestants, parse_int_list
    from harness.prompt_following import parse_enhancer

    store = _open_store(workdir, create=False)
    with _store_errors():
        added = add_run_contestants(
            store,
            run_ids,
            steps=parse_int_list(steps, "--steps"),
            solver=solver,
            guidance=guidance,
            label=label,
            enhancer=parse_enhancer(enhancer) if enhancer else None,
        )
    for c in added:
        typer.echo(f"{c.contestant_id}: {'added' if c.created else 'already registered'}")


@arena_app.command("render")
def arena_render(
    prompts: Annotated[
        str,
        typer.Option(
            "--prompts",
            help="'embedded' (shapes captions), 'terse' (1-3 attributes named) or a text file",
        ),
    ] = "embedded",
    num_prompts: Annotated[
        int | None,
        typer.Option("--num-prompts", min=1, help="prompts to use (default: 16 / whole file)"),
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="seeds 0..K-1 per prompt")] = 2,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto")] = "cpu",
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
) -> None:
    """Render every contestant on the same prompts and seeds (so the same initial noise).

    PNGs go to WORKDIR/arena/renders/<contestant>/ and the `renders` table. What is already
    rendered is skipped, so rerun after Ctrl-C or after adding contestants. Example:

        uv run harness arena render --num-prompts 16 --seeds 2 --workdir work
    """
    from harness.arena_pipeline import load_prompts, render_contestants

    store = _open_store(workdir, create=False)
    with _store_errors():
        prompt_set = load_prompts(prompts, num_prompts)
        try:
            summary = render_contestants(
                store, workdir, prompt_set, list(range(seeds)), device=device
            )
        except KeyboardInterrupt:
            typer.echo("stopped; rendered batches are kept, rerun to resume", err=True)
            raise typer.Exit(130) from None
    typer.echo(
        f"{summary.contestants} contestants x {len(prompt_set)} prompts x {seeds} seeds: "
        f"{summary.rendered} rendered, {summary.skipped} already there"
    )
    if summary.not_renderable:
        typer.echo(f"not rendered (no run): {', '.join(summary.not_renderable)}")


@arena_app.command("pairs")
def arena_pairs_cmd(
    out: Annotated[Path, typer.Option("--out", help="the pairs file to write (.pt)")],
    rater_kind: Annotated[
        list[str] | None,
        typer.Option("--rater-kind", help="human, judge or domain (repeat; default: all)"),
    ] = None,
    contestant: Annotated[
        list[str] | None,
        typer.Option("--contestant", help="only votes between these (repeat; default: all)"),
    ] = None,
    resolution: Annotated[
        int | None, typer.Option("--resolution", min=1, help="image size to keep (square)")
    ] = None,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
) -> None:
    """Write the arena's votes as preference pairs for Diffusion-DPO.

    Each vote that names a winner is a pair (the winner's and the loser's rendered image and the
    prompt); ties, both-bad, attention checks and votes without an image file are left out and
    counted. Train on the file with a preference config `{"method": "dpo", "dpo": {"pairs":
    "arena", "pairs_file": FILE}}`. Example:

        uv run harness arena pairs --out work/pairs.pt --rater-kind human --workdir work
    """
    from harness.preference_pairs import DEFAULT_RATER_KINDS, arena_pairs
    from trainers.preference.pairs import SKIP_REASONS, PairsError

    store = _open_store(workdir, create=False)
    with _store_errors():
        try:
            pairs = arena_pairs(
                store.path,
                rater_kinds=rater_kind or DEFAULT_RATER_KINDS,
                contestants=contestant,
                resolution=resolution,
            )
        except PairsError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(EXIT_INVALID) from None
        pairs.save(out)
    c = pairs.counts
    left_out = ", ".join(f"{c[r]} {r}" for r in SKIP_REASONS if c.get(r)) or "none"
    typer.echo(f"{c['used']} pairs of {c['read']} votes written to {out} (left out: {left_out})")


@arena_app.command("agreement")
def arena_agreement(
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON rows")] = False,
) -> None:
    """How far each judge agrees with the human votes, and with itself when sides swap.

    Compared on the same prompt, seed and contestant pair; tie and both_bad both count as
    "no preference". Example:

        uv run harness arena agreement --workdir work --json
    """
    import json

    from harness.arena_pipeline import judge_agreement

    store = _open_store(workdir, create=False)
    with _store_errors():
        rows = judge_agreement(store)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no judge comparisons in {store.path}; run `harness judge` first")
        return

    def pct(hits: int, n: int) -> str:
        return f"{100 * hits / n:.0f}% of {n}" if n else "-"

    for r in rows:
        typer.echo(
            f"{r['rater_id']} ({r['kind']}): agreement with humans "
            f"{pct(r['agree'], r['human_pairs'])}, when both pick a winner "
            f"{pct(r['decisive_agree'], r['decisive_pairs'])}; swap consistency "
            f"{pct(r['swap_consistent'], r['swap_pairs'])}"
        )


@app.command("judge")
def judge_cmd(
    judge: Annotated[str, typer.Option("--judge", help=f"one of {', '.join(JUDGE_NAMES)}")],
    pairs: Annotated[int, typer.Option("--pairs", min=1, help="comparisons to ask for")] = 20,
    seed: Annotated[
        int | None, typer.Option("--seed", help="pair-sampler seed (default: votes so far)")
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency", min=1, help="requests in flight at once (openai judge; default 4)"
        ),
    ] = None,
    contestant: Annotated[
        list[str] | None,
        typer.Option("--contestant", help="only pairs among these (repeat; default: all)"),
    ] = None,
    until_width: Annotated[
        float | None,
        typer.Option(
            "--until-width",
            help="judge rounds of --pairs until every 95% interval is <= W rating points",
        ),
    ] = None,
    max_votes: Annotated[
        int | None,
        typer.Option("--max-votes", min=1, help="with --until-width: stop after N verdicts"),
    ] = None,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
) -> None:
    """Judge rendered pairs and store the verdicts as comparisons.

    Pairs come from the rating engine's sampler (the most informative next), items from the
    renders both contestants have, sides at random; --contestant (twice or more) keeps to pairs
    among those, e.g. a tuned model against its base. Ctrl-C keeps what was stored. Example:

        uv run harness judge --judge domain --pairs 50 --workdir work

    --until-width W repeats rounds of --pairs until every contestant's 95% interval on this
    judge's leaderboard is at most W rating points, printing each round; it also stops when
    every (pair, prompt, seed) is judged or after --max-votes verdicts, and then exits 3 and
    says that W was not reached.
    """
    from harness.arena_pipeline import build_judge, judge_round, judge_until_width

    options = {} if concurrency is None else {"concurrency": concurrency}
    if options and judge != "openai":
        raise typer.BadParameter("applies to --judge openai only", param_hint="--concurrency")
    if max_votes is not None and until_width is None:
        raise typer.BadParameter("needs --until-width W", param_hint="--max-votes")
    store = _open_store(workdir, create=False)
    if until_width is not None:
        with _store_errors():
            until = judge_until_width(
                store,
                build_judge(judge, store, **options),
                until_width,
                pairs=pairs,
                max_votes=max_votes,
                contestants=contestant,
                report=typer.echo,
            )
        if until.reason == "interrupted":
            raise typer.Exit(130)
        if not until.reached:
            raise typer.Exit(3)
        return
    with _store_errors():
        judge_obj = build_judge(judge, store, **options)
        summary = judge_round(store, judge_obj, pairs, seed=seed, contestants=contestant)
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(summary.outcomes.items()))
    typer.echo(
        f"{summary.rater_id}: {summary.stored} comparisons stored ({outcomes or 'none'}), "
        f"{summary.no_verdict} without a verdict"
    )
    for reason, n in summary.no_verdict_reasons.items():
        typer.echo(f"  no verdict x{n}: {reason}")
    for a, b, why in summary.skipped:
        typer.echo(f"  skipped {a} vs {b}: {why}")
    if summary.interrupted:
        typer.echo("stopped; the verdicts above are stored", err=True)
        raise typer.Exit(130)


@app.command("leaderboard")
def leaderboard(
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    rater_kind: Annotated[
        str | None,
        typer.Option(
            "--rater-kind",
            metavar="KIND",
            help="only votes by raters of this kind: human, judge, domain, or all (default: all)",
        ),
    ] = None,
    rounds: Annotated[
        int, typer.Option("--rounds", min=1, help="bootstrap rounds for the intervals")
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="seed of the bootstrap")] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the rows as a JSON array instead of a table")
    ] = False,
    by: Annotated[
        str | None,
        typer.Option(
            "--by",
            metavar="PARAM",
            help="instead: each value of this training parameter's effect on win odds "
            "(dotted, e.g. timesteps.sampler), from a contextual Bradley-Terry fit",
        ),
    ] = None,
    style: Annotated[
        str | None,
        typer.Option(
            "--style",
            metavar="MEASURES",
            help="with --by: control for image style, comma-separated: brightness,saturation",
        ),
    ] = None,
) -> None:
    """The arena leaderboard: Bradley-Terry ratings with 95% bootstrap intervals.

    Contestants whose intervals overlap share a rank (rank = 1 + the number of
    contestants ahead beyond doubt). Elo, online in vote order, is the secondary
    view. Contestants with fewer than 20 battles are marked provisional (their
    interval is at least the ridge fit's normal interval). Under the table: how
    many votes, removed greedily, change the top (an upper bound of the minimum).
    --json prints the rows (contestant, label, rating, lower, upper, rank,
    battles, elo, provisional, top_flip_votes, top_flip_cap) as a JSON array.

    --by PARAM fits the votes with the contestants' value of PARAM as a covariate
    (seed replicas pooled) and prints each value's odds ratio of winning against
    the baseline value; --style adds image measures, as style control does;
    --json then prints that report as a JSON object. Examples:

        uv run harness leaderboard --workdir work --rater-kind human
        uv run harness leaderboard --workdir work --by timesteps.sampler --style brightness
    """
    import json

    from harness.arena import leaderboard as compute
    from harness.store import check_rater_kind

    with _store_errors():
        kind = None if rater_kind in (None, "all") else check_rater_kind(rater_kind, "--rater-kind")
    store = _open_store(workdir, create=False)
    if by is not None:
        _leaderboard_by(store, by, kind, style, as_json)
        return
    if style is not None:
        typer.echo("error: --style needs --by PARAM", err=True)
        raise typer.Exit(EXIT_INVALID)
    with _store_errors():
        rows = compute(store, kind, rounds=rounds, seed=seed)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no comparisons in {store.path}" + (f" by {kind} raters" if kind else ""))
        return
    _print_leaderboard(rows, kind, rounds)
    from harness.arena_pipeline import underpowered_pairs

    for p in underpowered_pairs(store, kind, rounds=rounds, seed=seed):
        if p["underpowered"]:
            typer.echo(f"underpowered: {p['a']} vs {p['b']}: {p['reason']}")


def _leaderboard_by(store, param: str, kind: str | None, style: str | None, as_json: bool) -> None:
    """``harness leaderboard --by PARAM``: the effect table (or its JSON)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from harness.arena_effects import choice_effects

    measures = tuple(m.strip() for m in (style or "").split(",") if m.strip())
    try:
        with _store_errors():
            report = choice_effects(store, param, kind, measures)  # type: ignore[arg-type]
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    left_out = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in report.left_out.items() if v)
    table = Table(
        title=f"Effect of {param} on win odds: {kind or 'all'} raters, {report.votes} votes, "
        f"{report.contestants} contestants",
        caption="contextual Bradley-Terry, seeds pooled, per-contestant residuals "
        f"(sd {report.residual_sd} nats); odds ratio vs {report.baseline} with 95% Wald "
        "interval; verdict: does the interval exclude 1"
        + (f"; style per +0.1 of left minus right ({', '.join(measures)})" if measures else "")
        + (f"; left out: {left_out}" if left_out else ""),
    )
    for name, justify in [
        ("level", "left"),
        ("odds ratio [95%]", "right"),
        ("log-odds ± SE", "right"),
        ("votes", "right"),
        ("contestants", "right"),
        ("verdict", "left"),
    ]:
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in report.rows:
        name = {"baseline": f"{r['name']} (baseline)", "style": f"style: {r['name']}"}.get(
            r["kind"], r["name"]
        )
        ratio = (
            "1 (reference)"
            if r["kind"] == "baseline"
            else f"{r['odds_ratio']:.2f} [{r['odds_ratio_lower']:.2f}, {r['odds_ratio_upper']:.2f}]"
        )
        table.add_row(
            name,
            ratio,
            f"{r['log_odds']:+.2f} ± {r['se']:.2f}",
            str(r["votes"]),
            str(r["contestants"]),
            r["verdict"],
        )
    Console().print(table)


def _print_leaderboard(rows: list[dict], kind: str | None, rounds: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from evaluators.ratings import PROVISIONAL_BATTLES

    votes = sum(r["battles"] for r in rows) // 2
    flip = rows[0].get("top_flip_votes")
    cap = rows[0].get("top_flip_cap")
    flip_text = f"{flip}" if flip is not None else f">{cap}"
    table = Table(
        title=f"Arena leaderboard: {kind or 'all'} raters, {votes} comparisons",
        caption=f"Bradley-Terry, 95% bootstrap interval over {rounds} rounds; * provisional: "
        f"fewer than {PROVISIONAL_BATTLES} battles (interval at least the ridge fit's normal "
        f"one). Votes to remove to change the top: {flip_text} (greedy: an upper bound, the "
        "true minimum is at most this)",
    )
    for name, justify in [
        ("rank", "right"),
        ("contestant", "left"),
        ("rating", "right"),
        ("95% interval", "right"),
        ("battles", "right"),
        ("elo", "right"),
    ]:
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in rows:
        name = r["contestant"] + (f" ({r['label']})" if r["label"] else "")
        name += " *" if r.get("provisional") else ""
        table.add_row(
            str(r["rank"]),
            name,
            f"{r['rating']:.1f}",
            f"[{r['lower']:.1f}, {r['upper']:.1f}]",
            str(r["battles"]),
            f"{r['elo']:.1f}",
        )
    Console().print(table)


def _open_store(workdir: Path, *, create: bool):
    """The work directory's DuckDB store; a missing file exits 2 unless ``create``."""
    from harness.store import Store, StoreError

    path = workdir / "harness.duckdb"
    if not create and not path.exists():
        typer.echo(
            f"error: no store in {workdir} ({path} does not exist); pass --workdir", err=True
        )
        raise typer.Exit(EXIT_INVALID)
    try:
        return Store(path)
    except StoreError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_INVALID) from None


@contextmanager
def _store_errors() -> Iterator[None]:
    """Refused input (StoreError) -> its message on stderr and exit 2; a file that stayed
    locked by another process (StoreBusyError) -> exit 1: the input was fine. An MLLM judge
    that cannot work as configured (no server URL, key refused, no model) -> exit 2."""
    from evaluators.mllm_backends import BackendConfigError  # stdlib imports only
    from harness.store import StoreBusyError, StoreError

    try:
        yield
    except StoreBusyError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    except (StoreError, BackendConfigError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_INVALID) from None


@app.command("eval")
def eval_cmd(
    target: Annotated[
        str,
        typer.Argument(
            help="a run id in the store (STUDY/TRIAL/sK, e.g. timestep/0000/s0), a run "
            "directory, or an image folder"
        ),
    ],
    metrics: Annotated[
        str,
        typer.Option("--metrics", help=f"comma list of {', '.join(METRIC_NAMES)}"),
    ] = "fid,kid,cmmd,clip_score",
    reference: Annotated[
        str | None,
        typer.Option(
            "--reference",
            help="real images: 'embedded' (shapes val split) or FOLDER (default: the run's data)",
        ),
    ] = None,
    reference_size: Annotated[
        int, typer.Option("--reference-size", min=2, help="reference images (cached)")
    ] = 1000,
    tag: Annotated[
        str | None, typer.Option("--tag", help="sample set, e.g. step_000500 (default: final)")
    ] = None,
    inception: Annotated[
        str | None,
        typer.Option(
            "--inception", help="Inception weights .pth (else env HARNESS_INCEPTION_WEIGHTS)"
        ),
    ] = None,
    clip: Annotated[
        str | None,
        typer.Option("--clip", help="CLIP model dir or cached hub id (else env HARNESS_CLIP_PATH)"),
    ] = None,
    resize: Annotated[
        str, typer.Option("--resize", help="Inception resize: clean or legacy-tf")
    ] = "clean",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")] = "cpu",
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
) -> None:
    """Score a run's samples (or an image folder) and store the scores with their provenance.

    FID and KID use Inception (torch-fidelity weights), CMMD and CLIP score use CLIP; nothing
    is downloaded: weights come from --inception / --clip, the environment variables, or the
    torch hub / Hugging Face caches. Reference features are cached. Examples:

        uv run harness eval timestep/0000/s0 --metrics fid,kid,cmmd,clip_score --workdir work
        uv run harness eval work/runs/timestep/0000/s0 --metrics cmmd --clip ~/models/clip-vit
        uv run harness eval my_images/ --metrics fid --reference real_images/
    """
    from harness.evaluate_cmd import run

    code = run(
        target, workdir, metrics, reference=reference, reference_size=reference_size, tag=tag,
        inception=inception, clip=clip, resize=resize, batch_size=batch_size, device=device,
    )  # fmt: skip
    raise typer.Exit(code)


# -- prompt enhancement ------------------------------------------------------------------------
prompts_app = typer.Typer(
    help="Prompt enhancement: does rewriting terse prompts make trained models follow them?",
    no_args_is_help=True,
)
app.add_typer(prompts_app, name="prompts")


@prompts_app.command("measure")
def prompts_measure(
    runs: Annotated[
        list[str],
        typer.Argument(help="run ids (timestep/0000/s0) or trials (timestep/0000: every seed)"),
    ],
    enhancer: Annotated[
        str,
        typer.Option(
            "--enhancer", help="shapes (embedded, learned), openai[:MODEL] or transformers:PATH"
        ),
    ] = "shapes",
    sets: Annotated[
        str, typer.Option("--sets", help="comma list of prompt sets: terse, full")
    ] = "terse,full",
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="sampling seeds 0..K-1")] = 2,
    steps: Annotated[int, typer.Option("--steps", min=1, help="sampler steps")] = 25,
    solver: Annotated[str, typer.Option("--solver", help="euler or heun")] = "euler",
    guidance: Annotated[float, typer.Option("--guidance", min=0.0)] = 3.0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, ...")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="print the comparison as JSON")] = False,
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
) -> None:
    """Prompt following with and without a prompt enhancer, over training seeds.

    Renders each run's export on the terse prompt set (1-3 attributes named) and on full
    captions, as written and enhanced, at the same sampling seeds; scores the attributes each
    original prompt names with the embedded attribute network; stores every value in the
    `scores` table with the enhancer's provenance; prints enhanced - as written per set with a
    95% interval over the runs and a verdict. Example:

        uv run harness prompts measure timestep/0001 --enhancer shapes --workdir work
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from harness.live import progress_bar
    from harness.prompt_following import comparisons_json, expand_runs, measure, parse_enhancer

    store = _open_store(workdir, create=False)
    cfg = parse_enhancer(enhancer)
    set_names = [s.strip() for s in sets.split(",") if s.strip()]
    with _store_errors():
        run_ids = expand_runs(store, runs)
    with _store_errors(), progress_bar(Console(stderr=True), disable=as_json) as bar:
        task = bar.add_task("rendering", total=None)

        def advance(n: int, what: str) -> None:
            bar.update(task, advance=n, description=what)

        _, comparisons, prov = measure(
            store, run_ids, cfg, sets=set_names, seeds=list(range(seeds)), steps=steps,
            solver=solver, guidance=guidance, device=device, progress=advance,
            on_total=lambda n: bar.update(task, total=n),
        )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(comparisons_json(comparisons, prov, run_ids), indent=2))
        return
    table = Table(title=f"prompt following, enhancer {prov.get('backend')}@{prov.get('version')}")
    columns = ("set", "as written", "enhanced", "difference [95% CI]", "seeds", "rewritten")
    for col in columns:
        table.add_column(col, no_wrap=True)
    for c in comparisons:
        ci = "" if c.n_seeds < 2 else f" [{c.ci_low:+.3f}, {c.ci_high:+.3f}]"
        table.add_row(
            c.prompt_set, f"{c.as_written:.3f}", f"{c.enhanced:.3f}", f"{c.estimate:+.3f}{ci}",
            str(c.n_seeds), f"{c.rewritten:.0%}",
        )  # fmt: skip
    console = Console()
    console.print(table)
    console.print(
        "prompt following: the share of the attributes each original prompt names that the "
        "attribute network sees; difference = enhanced - as written, paired over the runs"
    )
    for c in comparisons:
        console.print(f"{c.prompt_set}: {c.verdict}")


# -- the arena app and its raters ----------------------------------------------------------------
HostOpt = Annotated[
    str, typer.Option("--host", help="host name the link uses (the machine running `harness app`)")
]
PortOpt = Annotated[int, typer.Option("--port", min=1, max=65535, help="the app's port")]


@app.command("app")
def app_cmd(
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    port: PortOpt = 8501,
    address: Annotated[
        str,
        typer.Option(
            "--address",
            help="interface to listen on: 127.0.0.1 (default) is this machine only; "
            "0.0.0.0 lets every network reach it (raters on other machines)",
        ),
    ] = "127.0.0.1",
) -> None:
    """Start the arena app (Streamlit): leaderboard, rating sessions, studies and runs.

    It works on WORKDIR/harness.duckdb and only reads, except for votes, so it can run while studies
    and judges write. Raters open their personal link (`harness raters add NAME`). It listens
    on 127.0.0.1 (this machine) unless --address says otherwise; Ctrl-C or a SIGTERM stops the
    server. Example:

        uv run harness app --workdir work --port 8501 --address 0.0.0.0
    """
    import os
    import sys

    main_py = Path(__file__).resolve().parent.parent / "app" / "main.py"
    if not (workdir / "harness.duckdb").exists():
        typer.echo(f"note: no store in {workdir} yet; the app shows it once a study writes one")
    command = [
        sys.executable, "-m", "streamlit", "run", str(main_py),
        "--server.headless", "true", "--server.port", str(port),
        "--server.address", address, "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "viewer", "--runner.magicEnabled", "false",
        "--client.showErrorDetails", "none",
        "--", "--workdir", str(workdir.resolve()),
    ]  # fmt: skip
    env = {**os.environ, "HARNESS_WORKDIR": str(workdir.resolve())}
    raise typer.Exit(_serve(command, env))


APP_STOP_TIMEOUT_S = 10.0


def _serve(command: list[str], env: dict[str, str]) -> int:
    """Run the Streamlit server in its own process group until it exits; SIGTERM, SIGINT and
    SIGHUP to this process stop it: forwarded to its group, then SIGKILL after
    :data:`APP_STOP_TIMEOUT_S`. (``subprocess.call`` would leave it running on a SIGTERM.)"""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(command, env=env, start_new_session=True)
    stop: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stop.append(signum)
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in handled}
    deadline: float | None = None
    try:
        while True:
            try:  # short waits: a handler that ran during a blocking wait would not wake it
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if stop and deadline is None:
                    deadline = time.monotonic() + APP_STOP_TIMEOUT_S
                if deadline is not None and time.monotonic() > deadline:
                    with suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if proc.poll() is None:  # an unexpected error here: never leave the server behind
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    if stop:
        return 130 if stop[0] == signal.SIGINT else 128 + stop[0]
    return code


@raters_app.command("add")
def raters_add(
    name: Annotated[str, typer.Argument(help="the person's name, e.g. 'Ana Lima'")],
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    host: HostOpt = "localhost",
    port: PortOpt = 8501,
    new_token: Annotated[
        bool, typer.Option("--new-token", help="replace the rater's token (the old link dies)")
    ] = False,
) -> None:
    """Register a human rater and print their personal rating link.

    The link is shown once: only a salted hash of its token is stored. Example:

        uv run harness raters add "Ana Lima" --workdir work --host arena.lab --port 8501
    """
    from harness.raters import add_rater, rating_link

    store = _open_store(workdir, create=True)
    with _store_errors():
        rater_id, token = add_rater(store, name, rotate=new_token)
    typer.echo(f"rater {rater_id}: send this personal link (it is not stored; keep it private)")
    typer.echo(rating_link(token, host, port))


@raters_app.command("list")
def raters_list(workdir: WorkdirOpt = DEFAULT_WORKDIR) -> None:
    """Human raters with their votes and reliability (share of gold pairs answered right)."""
    from harness.voting import reliability

    store = _open_store(workdir, create=False)
    for r in reliability(store):
        acc = "-" if r["gold_accuracy"] is None else f"{r['gold_accuracy']:.0%}"
        typer.echo(
            f"{r['rater_id']} ({r['name']}): {r['votes']} votes, gold {r['gold_correct']}/"
            f"{r['gold']} right ({acc})"
        )


@raters_app.command("gold")
def raters_gold(workdir: WorkdirOpt = DEFAULT_WORKDIR) -> None:
    """Add gold pairs (attention checks) for human raters: pure noise as the known loser.

    Renders a pure-noise image for every prompt and seed the contestants were rendered on
    (contestant gold:noise). About one pair in ten a rater sees
    is then an attention check; gold votes measure reliability and never enter the
    leaderboard. Run it again after rendering new prompts. Example:

        uv run harness raters gold --workdir work
    """
    from harness.voting import GOLD_NOISE_ID, add_gold_noise

    store = _open_store(workdir, create=False)
    with _store_errors():
        added = add_gold_noise(store, workdir / "arena" / "gold-noise")
    typer.echo(f"{GOLD_NOISE_ID}: {added} new noise renders")


# -- reading the store from the shell ---------------------------------------------------------
@app.command("sql")
def sql_cmd(
    query: Annotated[
        str, typer.Argument(help="one read-only SQL statement (SELECT, DESCRIBE ...)")
    ],
    workdir: WorkdirOpt = DEFAULT_WORKDIR,
    fmt: Annotated[
        str, typer.Option("--format", help="table (aligned text), csv or jsonl (one object a line)")
    ] = "table",
) -> None:
    """Query the results store (WORKDIR/harness.duckdb) with DuckDB SQL and print the rows.

    Safe while studies, judges and raters write: the query holds the file only while it runs,
    like any store operation (a DuckDB CLI or notebook connection to the file would block
    every write; from Python use harness.store.open_snapshot). Tables and columns: README, "The
    results store". Examples:

        uv run harness sql "SELECT study, number, state, values FROM trials" --workdir work
        uv run harness sql "DESCRIBE metrics"
        uv run harness sql "SELECT * FROM comparisons" --format csv > votes.csv
    """
    import csv
    import json
    import sys

    import duckdb

    from harness.store import StoreError

    if fmt not in ("table", "csv", "jsonl"):
        typer.echo(f"error: --format must be table, csv or jsonl, not {fmt!r}", err=True)
        raise typer.Exit(EXIT_INVALID)
    store = _open_store(workdir, create=False)
    try:
        rows = store.query(query)
    except StoreError as err:
        typer.echo(f"error: harness sql reads only; {err}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    except duckdb.Error as err:  # a syntax error, an unknown table or column
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    columns = list(rows[0]) if rows else []
    if fmt == "jsonl":
        for row in rows:
            typer.echo(json.dumps(row, default=str))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows([row[c] for c in columns] for row in rows)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(*columns, show_lines=False, box=None)
        for row in rows:
            table.add_row(*("NULL" if row[c] is None else str(row[c]) for c in columns))
        Console(soft_wrap=True).print(table)
        typer.echo(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # python -m harness.cli
    app()
