"""`harness sql`: read the store from the shell while it is being written."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.store import Store
from tests.app.arena_fixture import build

runner = CliRunner()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("sql") / "work").workdir


def _sql(work: Path, *args: str):
    return runner.invoke(app, ["sql", *args, "--workdir", str(work)])


def test_formats_show_the_same_rows(work: Path) -> None:
    query = "SELECT number, state FROM trials WHERE study = 'toy' ORDER BY number"
    expected = Store(work / "harness.duckdb").query(query)
    table = _sql(work, query)
    assert table.exit_code == 0, table.output
    assert "complete" in table.output and "failed" in table.output and "(3 rows)" in table.output
    as_csv = _sql(work, query, "--format", "csv")
    assert as_csv.exit_code == 0
    parsed = list(csv.DictReader(io.StringIO(as_csv.output)))
    assert [(int(r["number"]), r["state"]) for r in parsed] == [
        (r["number"], r["state"]) for r in expected
    ]
    as_jsonl = _sql(work, query, "--format", "jsonl")
    assert [json.loads(line) for line in as_jsonl.output.splitlines()] == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["DELETE FROM trials"], "reads only"),
        (["SELECT * FROM no_such_table"], "no_such_table"),
        (["SELECT 1", "--format", "xml"], "--format must be"),
    ],
)
def test_bad_queries_are_clear_errors_and_change_nothing(
    work: Path, args: list[str], message: str
) -> None:
    before = Store(work / "harness.duckdb").query("SELECT count(*) AS n FROM trials")
    result = _sql(work, *args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert Store(work / "harness.duckdb").query("SELECT count(*) AS n FROM trials") == before


def test_no_store_is_a_clear_error(tmp_path: Path) -> None:
    result = _sql(tmp_path, "SELECT 1")
    assert result.exit_code == 2 and "no store" in result.output
