"""The shipped terse prompt set (trainers/data/terse.py, terse_prompts.jsonl)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.data.shapes import ATTRIBUTES, HELDOUT_PAIRS
from trainers.data.terse import (
    TERSE_PROMPTS_FILE,
    TersePrompt,
    load_terse_prompts,
    prompt_category,
    terse_prompts,
)

REPO = Path(__file__).resolve().parents[2]


def test_shipped_set_shape_and_categories() -> None:
    prompts = terse_prompts()
    assert 80 <= len(prompts) <= 110
    assert len({p.prompt for p in prompts}) == len(prompts)
    heldout = [p for p in prompts if p.category == "heldout"]
    assert 0.25 <= len(heldout) / len(prompts) <= 0.4
    for p in prompts:
        assert isinstance(p, TersePrompt)
        assert 1 <= len(p.attributes) <= 3
        assert all(v in ATTRIBUTES[k] for k, v in p.attributes.items())
        pair = (p.attributes.get("shape"), p.attributes.get("colour"))
        assert (p.category == "heldout") == (pair in HELDOUT_PAIRS)
    assert {(p.attributes["shape"], p.attributes["colour"]) for p in heldout} == HELDOUT_PAIRS
    # Terse: never the canonical caption's template.
    assert not any("background" in p.prompt for p in prompts)


def test_category_needs_both_shape_and_colour() -> None:
    assert prompt_category({"shape": "triangle", "colour": "blue"}) == "heldout"
    assert prompt_category({"shape": "triangle"}) == "seen"
    assert prompt_category({"colour": "blue", "size": "small"}) == "seen"
    assert prompt_category({"shape": "triangle", "colour": "red"}) == "seen"


def test_file_is_what_the_generator_writes() -> None:
    result = subprocess.run(
        [sys.executable, "bench/make_terse_prompts.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": ""},
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"prompt": "x"}', "exactly the keys"),
        ('{"prompt": "", "attributes": {"shape": "circle"}}', "non-empty string"),
        ('{"prompt": "x", "attributes": {}}', "1-3 attributes"),
        ('{"prompt": "x", "attributes": {"hue": "red"}}', "unknown attribute 'hue'"),
        ('{"prompt": "x", "attributes": {"colour": "pink"}}', "unknown colour 'pink'"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "p.jsonl"
    good = json.dumps({"prompt": "red ball", "attributes": {"shape": "circle", "colour": "red"}})
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(ValueError, match=match) as info:
        load_terse_prompts(path)
    assert f"{path}:3" in str(info.value)


def test_duplicates_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    good = json.dumps({"prompt": "red ball", "attributes": {"colour": "red"}})
    path.write_text(f"{good}\n{good}\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: prompt 'red ball' repeats line 1"):
        load_terse_prompts(path)
    with pytest.raises(FileNotFoundError, match="make_terse_prompts"):
        load_terse_prompts(tmp_path / "none.jsonl")
    path.write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_terse_prompts(path)


def test_shipped_file_sits_in_the_package() -> None:
    assert TERSE_PROMPTS_FILE.parent == REPO / "trainers" / "data"
