"""README.md stays true: every `uv run harness ...` command in its bash blocks names a real
subcommand with real options (and run ids in the real format), the cheap ones run and exit 0,
and every subcommand's --help works. The commands are read from the README itself, so the test
fails when the README drifts from the CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from harness.cli import app

REPO = Path(__file__).resolve().parents[1]
ROOT = typer.main.get_command(app)
RUN_ID = re.compile(r"[\w.-]+/\d{4}/s\d+")
"""``<study>/<trial, 4 digits>/s<seed index>``: harness/runner.py's run ids."""
TRIAL_ID = re.compile(r"[\w.-]+/\d{4}")
"""``<study>/<trial>``: every seed run of a trial, where a command takes trials too."""
TAKES_TRIALS = (("prompts", "measure"),)


def readme_commands() -> list[list[str]]:
    """The arguments after `uv run harness` of every such line in the README's bash blocks
    (trailing comments and [optional] brackets dropped)."""
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" # ", 1)[0].strip()
            if line.startswith("uv run harness"):
                tokens = shlex.split(line.replace("[", " ").replace("]", " "))
                out.append(tokens[3:])
    return out


def is_group(cmd: Any) -> bool:
    return hasattr(cmd, "list_commands")  # typer ships its own copy of click: duck-typed


def subcommand(args: list[str]) -> tuple[list[str], Any, list[str]]:
    """(the command path, its click command, the arguments after it)."""
    cmd: Any = ROOT
    path: list[str] = []
    rest = list(args)
    while is_group(cmd) and rest and rest[0] in children(cmd):
        path.append(rest[0])
        cmd = children(cmd)[rest.pop(0)]
    return path, cmd, rest


def children(group: Any) -> dict[str, Any]:
    ctx = typer.Context(group)
    return {n: c for n in group.list_commands(ctx) if (c := group.get_command(ctx, n))}


def all_commands() -> list[list[str]]:
    out: list[list[str]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        out.append(path)
        if is_group(cmd):
            for name, sub in children(cmd).items():
                walk(sub, [*path, name])

    walk(ROOT, [])
    return out


COMMANDS = readme_commands()


def test_the_readme_has_harness_commands() -> None:
    assert len(COMMANDS) >= 15  # the parser still finds them
    assert ["study", "check", "studies/timestep.yaml"] in COMMANDS


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a)[:60])
def test_readme_command_names_real_subcommands_options_and_run_ids(args: list[str]) -> None:
    path, cmd, rest = subcommand(args)
    assert not is_group(cmd), f"no subcommand named in {args}"
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    for token in rest:
        name = token.split("=", 1)[0]
        if name.startswith("--"):
            assert name in known, f"`harness {' '.join(path)}` has no option {name}"
        elif re.fullmatch(r"[\w-]+/\d+(/.*)?", token):  # looks like a run id
            trial_ok = tuple(path) in TAKES_TRIALS and TRIAL_ID.fullmatch(token)
            assert RUN_ID.fullmatch(token) or trial_ok, (
                f"{token!r} is not a run id (e.g. timestep/0000/s0)"
            )


@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p) or "harness")
def test_every_help_exits_0(path: list[str]) -> None:
    res = CliRunner().invoke(app, [*path, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage:" in res.output


def test_cheap_readme_commands_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # study files are named relative to the repository
    checks = [a for a in COMMANDS if a[:2] == ["study", "check"]]
    assert checks
    for args in checks:
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, f"harness {' '.join(args)}: {res.output}"
    lists = [a for a in COMMANDS if a[:2] == ["study", "list"]]
    assert lists
    for args in lists:  # on an empty work directory
        res = CliRunner().invoke(app, [*args, "--workdir", str(tmp_path / "empty")])
        assert res.exit_code == 0, res.output
        assert "no studies" in res.output
    assert CliRunner().invoke(app, ["--help"]).exit_code == 0
