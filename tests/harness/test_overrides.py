"""`harness study run/check FILE --set KEY=VALUE`: dotted overrides into the study file's
structure, values parsed as YAML, validated like the file (harness/spec.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from harness.cli import app
from harness.runner import StudyRunner
from harness.spec import SpecError, load_study, parse_override
from tests.trainers.trainer_utils import config


def write_study(path: Path, **extra: object) -> Path:
    study = {
        "name": path.stem,
        "base": config(),
        "search": {"timesteps.shift": {"type": "float", "low": 1.0, "high": 3.0}},
        "objective": {"metric": "domain_fid", "direction": "minimize"},
        "trials": 2,
        **extra,
    }
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("base.train.steps=100", "base.train.steps", 100),
        ("base.train.lr=1e-3", "base.train.lr", 1e-3),  # a float, as in the study files
        ("base.train.compile=true", "base.train.compile", True),
        ("base.sample.seeds=[0, 1]", "base.sample.seeds", [0, 1]),
        ("base.data.vae=null", "base.data.vae", None),
        ("name=my-study", "name", "my-study"),
        ("base.sample.prompts=[a red circle]", "base.sample.prompts", ["a red circle"]),
    ],
)
def test_values_are_yaml(text: str, key: str, value: object) -> None:
    assert parse_override(text) == (key, value)


def test_overrides_reach_base_search_and_top_level_keys(tmp_path: Path) -> None:
    path = write_study(tmp_path / "s.yaml")
    spec = load_study(
        path,
        [
            "base.train.steps=7",
            "search.timesteps.shift.high=5",  # a dotted parameter name is matched whole
            "trials=4",
            "name=other",
        ],
    )
    assert spec.base["train"]["steps"] == 7 and spec.trials == 4 and spec.name == "other"
    assert spec.search["timesteps.shift"].high == 5.0
    assert load_study(path).base["train"]["steps"] == config()["train"]["steps"]  # file as is


def test_overrides_edit_a_base_file(tmp_path: Path) -> None:
    (tmp_path / "base.json").write_text(json.dumps(config()))
    path = write_study(tmp_path / "s.yaml", base="base.json")
    assert load_study(path, ["base.train.steps=9"]).base["train"]["steps"] == 9


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("base.train.stepz=100", "base.train.stepz: unknown key (did you mean 'steps'?)"),
        ("base.train.steps=abc", "base.train.steps: Input should be a valid integer"),
        ("trials=0", "trials: expected an integer >= 1, got 0"),
        ("nmae=x", "nmae: unknown key (did you mean 'name'?)"),
        ("base.train.steps", "expected KEY=VALUE"),
        ("name.x=1", "name is \"s\", not a mapping, so it has no key 'x'"),
        ("base..steps=1", "has an empty part"),
        ("base.train.steps=[1", "the value is not valid YAML"),
    ],
)
def test_bad_overrides_are_errors_naming_the_key(
    tmp_path: Path, override: str, message: str
) -> None:
    path = write_study(tmp_path / "s.yaml")
    with pytest.raises(SpecError) as err:
        load_study(path, [override])
    assert message in str(err.value)
    res = CliRunner().invoke(app, ["study", "check", str(path), "--set", override])
    assert res.exit_code == 2 and message in res.output


def test_problems_caused_by_an_override_say_so(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        load_study(write_study(tmp_path / "s.yaml"), ["base.train.stepz=1"])
    assert "(set by --set base.train.stepz)" in str(err.value)


def test_study_check_applies_overrides(tmp_path: Path) -> None:
    path = write_study(tmp_path / "s.yaml")
    res = CliRunner().invoke(
        app, ["study", "check", str(path), "--set", "trials=5", "--set", "name=renamed"]
    )
    assert res.exit_code == 0, res.output
    assert "renamed" in res.output and "5" in res.output


def test_an_existing_study_takes_only_a_new_trials_count(tmp_path: Path) -> None:
    path = write_study(tmp_path / "s.yaml")
    work = tmp_path / "work"
    quiet = Console(file=io.StringIO())
    StudyRunner(load_study(path), work, console=quiet).open_study()  # the study exists now
    # The trial budget is not part of the stored spec: more trials are the same study.
    StudyRunner(load_study(path, ["trials=5"]), work, console=quiet).open_study()
    res = CliRunner().invoke(
        app, ["study", "run", str(path), "--workdir", str(work), "--set", "base.train.steps=3"]
    )
    assert res.exit_code == 2
    assert "already exists" in res.output and "spec.base.train.steps" in res.output
    assert "--set base.train.steps=3 changes study 's'" in res.output
    assert "--set name=NEW" in res.output
