"""The terse prompt set that ships for evaluating prompt enhancers (``trainers/enhance.py``).

``terse_prompts.jsonl`` (next to this module) holds ~96 short, natural prompts like "red ball",
"big blue box on white" or "a triangle in the top right", one JSON object per line::

    {"prompt": "violet box, lower right", "attributes": {"shape": "square", "colour": "purple",
     "position": "bottom right"}}

Each names 1-3 attributes of the shapes data (canonical values of
:data:`trainers.data.shapes.ATTRIBUTES`); about a third name a held-out (shape, colour) pair
(:data:`~trainers.data.shapes.HELDOUT_PAIRS`). A prompt's category is ``heldout`` when it names
both shape and colour and that pair is held out, else ``seen``.

The file is generated once by ``bench/make_terse_prompts.py`` (fixed seed) from sentence
templates and word lists written separately from the shapes enhancer's training templates, so
an enhancer's measured gain on this set is not memorisation of its own training prompts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np

from trainers.data.shapes import ATTRIBUTE_NAMES, ATTRIBUTES, HELDOUT_PAIRS

TERSE_PROMPTS_FILE = Path(__file__).with_name("terse_prompts.jsonl")

Category = Literal["seen", "heldout"]


@dataclass(frozen=True)
class TersePrompt:
    """One terse prompt and the attributes it names (canonical values)."""

    prompt: str
    attributes: dict[str, str] = field(hash=False)
    category: Category = "seen"


def prompt_category(attributes: dict[str, str]) -> Category:
    """``heldout`` if ``attributes`` name a held-out (shape, colour) pair, else ``seen``."""
    pair = (attributes.get("shape"), attributes.get("colour"))
    return "heldout" if pair in HELDOUT_PAIRS else "seen"


def parse_line(line: str, where: str) -> TersePrompt:
    """One JSONL line -> :class:`TersePrompt`; ``where`` (``file:line``) names it in errors."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise ValueError(f"{where}: not valid JSON ({e}); each line is one JSON object") from None
    if not isinstance(obj, dict) or set(obj) != {"prompt", "attributes"}:
        raise ValueError(
            f"{where}: expected an object with exactly the keys 'prompt' and 'attributes', "
            f"got {obj!r}"
        )
    prompt, attributes = obj["prompt"], obj["attributes"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r}")
    if not isinstance(attributes, dict) or not 1 <= len(attributes) <= 3:
        raise ValueError(
            f"{where}: 'attributes' must be an object naming 1-3 attributes, got {attributes!r}"
        )
    for name, value in attributes.items():
        if name not in ATTRIBUTES:
            raise ValueError(
                f"{where}: unknown attribute {name!r}; allowed: {', '.join(ATTRIBUTES)}"
            )
        if value not in ATTRIBUTES[name]:
            raise ValueError(
                f"{where}: unknown {name} {value!r}; allowed: {', '.join(ATTRIBUTES[name])}"
            )
    return TersePrompt(prompt, dict(attributes), prompt_category(attributes))


def load_terse_prompts(path: str | Path) -> list[TersePrompt]:
    """Read and validate a terse prompt file (errors name the file and line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"terse prompt file {path} does not exist; regenerate it with "
            "`uv run python bench/make_terse_prompts.py`"
        ) from None
    prompts: list[TersePrompt] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        item = parse_line(line, f"{path}:{number}")
        if item.prompt in seen:
            raise ValueError(
                f"{path}:{number}: prompt {item.prompt!r} repeats line {seen[item.prompt]}"
            )
        seen[item.prompt] = number
        prompts.append(item)
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


@cache
def _shipped() -> tuple[TersePrompt, ...]:
    return tuple(load_terse_prompts(TERSE_PROMPTS_FILE))


def terse_prompts() -> list[TersePrompt]:
    """The shipped terse prompt set (``terse_prompts.jsonl``), in file order."""
    return list(_shipped())


def named_labels(prompts: Sequence[TersePrompt]) -> np.ndarray:
    """``[N, A]`` int64: each prompt's label per attribute (``ATTRIBUTE_NAMES`` order), -1 for
    the attributes it does not name."""
    out = np.full((len(prompts), len(ATTRIBUTE_NAMES)), -1, dtype=np.int64)
    for i, p in enumerate(prompts):
        for j, a in enumerate(ATTRIBUTE_NAMES):
            if a in p.attributes:
                out[i, j] = ATTRIBUTES[a].index(p.attributes[a])
    return out


def named_accuracy(predicted: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: the fraction of named attributes (label >= 0) predicted right ``[N]`` float,
    and whether all of them are ``[N]`` bool. ``predicted``/``labels``: ``[N, A]`` ints."""
    named = labels >= 0
    if not named.any(axis=1).all():
        raise ValueError("every prompt must name at least one attribute")
    hit = (predicted == labels) & named
    return hit.sum(1) / named.sum(1), (hit | ~named).all(1)
