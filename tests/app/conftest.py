"""Fixtures of the app's tests: the fixture arena (built once per session, ~1 s) copied per test
so that votes in one test never leak into another."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from arena_fixture import Arena, build

from harness.store import Store


@pytest.fixture(scope="session")
def arena_template(tmp_path_factory: pytest.TempPathFactory) -> Arena:
    return build(tmp_path_factory.mktemp("arena") / "work")


@pytest.fixture
def arena(
    arena_template: Arena, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Arena]:
    """A private copy of the fixture work directory (its DuckDB file and Optuna file; images and
    run directories are shared read-only), set as the app's work directory."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("harness.duckdb", "optuna.db"):
        shutil.copy(arena_template.workdir / name, work / name)
    # Run directories are recorded relative to the work directory: link the shared ones in.
    (work / "runs").symlink_to(arena_template.workdir / "runs", target_is_directory=True)
    monkeypatch.setenv("HARNESS_WORKDIR", str(work))
    yield replace(arena_template, workdir=work, store=Store(work / "harness.duckdb"))
