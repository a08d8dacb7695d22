"""Bad input a user will produce, one row per class: each exits 2 with ``error``-style message
naming the file, shows no traceback, and leaves what is stored (the DuckDB file's bytes, a
run's status.json) as it was.

A row is (id, setup, expected message fragment). ``setup(tmp)`` builds the work directory and
returns the command (``harness`` arguments, or ``("trainer", ...)`` for the trainer process's
``main``), the file the message must name, and the files that must stay byte for byte."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.store import NotAStoreError, Store


@dataclass
class Case:
    argv: list[str]
    names: Path | str  # the file (or text) the message must name
    unchanged: list[Path] = field(default_factory=list)
    trainer: bool = False


def _store(tmp: Path) -> Path:
    work = tmp / "work"
    Store(work / "harness.duckdb").add_contestant("c-a")
    return work


def _garbage_store(content: bytes) -> Callable[[Path], Case]:
    def setup(tmp: Path) -> Case:
        work = tmp / "work"
        work.mkdir()
        (work / "harness.duckdb").write_bytes(content)
        return Case(["leaderboard", "--workdir", str(work)], work / "harness.duckdb")

    return setup


def _garbage_store_import(tmp: Path) -> Case:
    """`arena import` creates a missing store: a garbage file must not be "created" over."""
    case = _garbage_store(b"\x00\xff" * 3000)(tmp)
    votes = tmp / "votes.jsonl"
    votes.write_text("")
    work = str(case.names.parent)  # type: ignore[union-attr]
    return Case(["arena", "import", str(votes), "--workdir", work], case.names)


def _garbage_store_raters(tmp: Path) -> Case:
    case = _garbage_store(b"not a database\n")(tmp)
    work = str(case.names.parent)  # type: ignore[union-attr]
    return Case(["raters", "add", "Ana", "--workdir", work], case.names)


def _garbage_store_study_list(tmp: Path) -> Case:
    """`study list` opens the store outside the per-command handlers: the top-level one."""
    case = _garbage_store(b"\x89PNG not a database" * 50)(tmp)
    work = str(case.names.parent)  # type: ignore[union-attr]
    return Case(["study", "list", "--workdir", work], case.names)


def _truncated_store(tmp: Path) -> Case:
    work = _store(tmp)
    path = work / "harness.duckdb"
    path.write_bytes(path.read_bytes()[:5000])
    return Case(["raters", "list", "--workdir", str(work)], path)


def _foreign_duckdb(tmp: Path) -> Case:
    """A DuckDB file of someone else's: never migrated into a store."""
    import duckdb

    work = tmp / "work"
    work.mkdir()
    con = duckdb.connect(str(work / "harness.duckdb"))
    con.execute("CREATE TABLE sales (x INTEGER)")
    con.close()
    return Case(["leaderboard", "--workdir", str(work)], work / "harness.duckdb")


def _votes(lines: list[dict | str]) -> Callable[[Path], Case]:
    def setup(tmp: Path) -> Case:
        work = _store(tmp)
        votes = tmp / "votes.jsonl"
        good = {
            "prompt": "a red circle", "seed": 0, "left": "c-a", "right": "c-b",
            "winner": "left", "rater": "ana", "time": 1.7e9,
        }  # fmt: skip
        text = [json.dumps(good)] + [
            x if isinstance(x, str) else json.dumps(good | x) for x in lines
        ]
        votes.write_text("\n".join(text) + "\n")
        return Case(
            ["arena", "import", str(votes), "--workdir", str(work), "--add-contestants"],
            f"{votes}:2",
        )

    return setup


def _missing_votes_file(tmp: Path) -> Case:
    work = _store(tmp)
    missing = tmp / "nope.jsonl"
    return Case(["arena", "import", str(missing), "--workdir", str(work)], missing)


def _missing_study_file(tmp: Path) -> Case:
    missing = tmp / "nope.yaml"
    return Case(["study", "run", str(missing), "--workdir", str(tmp / "work")], missing)


def _study_typo(tmp: Path) -> Case:
    study = tmp / "s.yaml"
    study.write_text("name: s\ntrainer: flow\nobjectiv: {metric: domain_fid}\n")
    return Case(["study", "check", str(study)], "objectiv")


def _study_wrong_type(tmp: Path) -> Case:
    study = tmp / "s.yaml"
    study.write_text("name: s\ntrainer: flow\ntrials: many\n")
    return Case(["study", "check", str(study)], "trials")


def _garbage_weights(tmp: Path) -> Case:
    work = _store(tmp)
    run_dir = tmp / "runs" / "r0"
    final = run_dir / "final"
    (final / "transformer").mkdir(parents=True)
    (final / "harness.json").write_text(json.dumps({"shift": 1.0, "backbone": "sd3"}))
    (final / "transformer" / "config.json").write_text("{}")
    (final / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    Store(work / "harness.duckdb").register_run("r0", run_dir, {}, "h0")
    return Case(["arena", "add", "r0", "--workdir", str(work)], final)


def _zero_option(argv: list[str], names: str) -> Callable[[Path], Case]:
    def setup(tmp: Path) -> Case:
        work = _store(tmp)
        return Case([*argv, "--workdir", str(work)], names)

    return setup


def _trainer_folder(metadata: bytes | None) -> Callable[[Path], Case]:
    """The trainer on an image-folder data set: a non-UTF-8 caption, an empty folder."""

    def setup(tmp: Path) -> Case:
        from tests.trainers.trainer_utils import config, write_config

        data = tmp / "data"
        data.mkdir()
        if metadata is not None:
            (data / "metadata.jsonl").write_bytes(metadata)
        cfg = config(data={"kind": "folder", "path": str(data), "resolution": 16})
        cfg["data"].pop("size", None)
        cfg["data"].pop("seed", None)
        cfg_path = write_config(tmp / "cfg.json", cfg)
        run = tmp / "run"
        return Case(
            ["--config", str(cfg_path), "--run-dir", str(run), "--device", "cpu"],
            data / "metadata.jsonl" if metadata is not None else data,
            trainer=True,
        )

    return setup


CASES: list[tuple[str, Callable[[Path], Case], str]] = [
    ("store-garbage-bytes", _garbage_store(bytes(range(256)) * 20), "is not a harness store"),
    ("store-text-file", _garbage_store(b"hello, I am a text file\n"), "is not a harness store"),
    ("store-garbage-import", _garbage_store_import, "is not a harness store"),
    ("store-garbage-raters", _garbage_store_raters, "is not a harness store"),
    ("store-garbage-study-list", _garbage_store_study_list, "is not a harness store"),
    ("store-truncated", _truncated_store, "is damaged"),
    ("store-foreign-duckdb", _foreign_duckdb, "not a harness store (no schema_version"),
    ("votes-bad-row", _votes([{"winner": "lefty"}]), "'winner' 'lefty' is not one of"),
    ("votes-not-json", _votes(["{oops"]), "not valid JSON"),
    ("votes-long-prompt", _votes([{"prompt": "x" * 2001}]), "more than the 2000 allowed"),
    ("votes-long-id", _votes([{"left": "c" * 201}]), "more than the 200 allowed"),
    ("votes-missing-file", _missing_votes_file, "cannot read comparisons file"),
    ("study-missing-file", _missing_study_file, "nope.yaml"),
    ("study-typo-key", _study_typo, "objectiv"),
    ("study-wrong-type", _study_wrong_type, "trials"),
    ("arena-add-garbage-weights", _garbage_weights, "cannot be loaded"),
    (
        "zero-trials",
        _zero_option(["study", "run", "s.yaml", "--trials", "0"], "--trials"),
        "--trials",
    ),
    ("zero-rounds", _zero_option(["leaderboard", "--rounds", "0"], "--rounds"), "--rounds"),
    (
        "negative-guidance",
        _zero_option(["arena", "add", "r", "--guidance", "-1"], "--guidance"),
        "--guidance",
    ),
    (
        "caption-not-utf8",
        _trainer_folder(b'{"file_name": "a.png", "text": "caf\xe9"}\n'),
        "line 1 is not UTF-8",
    ),
    ("data-folder-empty", _trainer_folder(None), "has no metadata.jsonl"),
]


def _snapshot(paths: list[Path]) -> dict[Path, bytes | None]:
    return {p: p.read_bytes() if p.is_file() else None for p in paths}


@pytest.mark.parametrize(("setup", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_a_clean_message(
    tmp_path: Path,
    setup: Callable[[Path], Case],
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    case = setup(tmp_path)
    watched = [
        *case.unchanged,
        *tmp_path.rglob("harness.duckdb"),
        *tmp_path.rglob("status.json"),
    ]
    before = _snapshot(watched)
    if case.trainer:
        import signal

        from trainers.train import main

        monkeypatch.setenv("HARNESS_CAPTURED", "1")
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = main(case.argv)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        output = capsys.readouterr().err
    else:
        result = CliRunner().invoke(app, case.argv)
        code, output = result.exit_code, result.output
        assert not isinstance(result.exception, Exception) or isinstance(
            result.exception, SystemExit
        ), result.exception

    assert code == 2, output
    assert "Traceback" not in output
    assert expected in output, output
    assert str(case.names) in output, output
    assert _snapshot(watched) == before


def test_not_a_store_is_a_store_error_and_the_file_is_untouched(tmp_path: Path) -> None:
    path = tmp_path / "harness.duckdb"
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(NotAStoreError, match="left untouched"):
        Store(path)
    assert path.read_bytes() == b"garbage" * 100


def test_an_unexpected_error_still_shows_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only known input errors are turned into messages: a bug keeps its traceback."""
    work = _store(tmp_path)

    def boom(*_args, **_kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("harness.arena.leaderboard", boom)
    result = CliRunner().invoke(app, ["leaderboard", "--workdir", str(work)])
    assert isinstance(result.exception, ZeroDivisionError)
