"""Generate ``trainers/data/terse_prompts.jsonl``, the terse prompt set for evaluating prompt
enhancers (see ``trainers/data/terse.py``).

    uv run python bench/make_terse_prompts.py            # rewrite the file
    uv run python bench/make_terse_prompts.py --check    # exit 1 if the file is out of date

Deterministic (fixed seed). The sentence templates and word lists here are written separately
from the shapes enhancer's training templates (``trainers/enhance.py``): several frames
("up in the ...", "... backdrop", "just a ...", "...?") never occur in its training prompts, so
an enhancer's gain on this set is not memorisation of its own training data.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from trainers.data.shapes import ATTRIBUTES, HELDOUT_PAIRS
from trainers.data.terse import TERSE_PROMPTS_FILE, load_terse_prompts

SEED = 20_261_207
N_PROMPTS = 96
HELDOUT_EVERY = 3  # every third prompt names a held-out (shape, colour) pair

SHAPE = {
    "circle": ("circle", "ball", "dot", "disc"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangle", "pyramid"),
    "diamond": ("diamond", "rhombus"),
}
COLOUR = {
    "red": ("red", "crimson"),
    "green": ("green", "emerald"),
    "blue": ("blue", "navy"),
    "yellow": ("yellow", "golden"),
    "purple": ("purple", "violet"),
    "cyan": ("cyan", "aqua", "turquoise"),
}
SIZE = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
POSITION = {
    "center": ("centre", "center", "middle"),
    "top left": ("top left", "top-left", "upper left"),
    "top right": ("top right", "top-right", "upper right"),
    "bottom left": ("bottom left", "bottom-left", "lower left"),
    "bottom right": ("bottom right", "bottom-right", "lower right"),
}
BACKGROUND = {"black": ("black",), "white": ("white",), "gray": ("grey", "gray")}
WORDS = {
    "shape": SHAPE,
    "colour": COLOUR,
    "size": SIZE,
    "position": POSITION,
    "background": BACKGROUND,
}

# Sentence templates; the placeholders name the attributes a template states.
TEMPLATES = (
    "{colour} {shape}",
    "{size} {shape} on {background}",
    "{colour} {shape} on {background}",
    "a {shape} in the {position}",
    "{colour} {shape}, {position}",
    "{shape} up in the {position}",
    "{size} {shape}",
    "just a {colour} {shape}",
    "{colour} {shape} with a {background} backdrop",
    "{position}: {colour} {shape}",
    "{size} {colour} {shape}",
    "{shape} on {background}",
    "{colour} {shape}?",
    "one {size} {shape}, {background} backdrop",
    "{colour} {shape} sitting {position}",
    "{size} {colour} one",
    "{colour} thing in the {position}",
    "a {shape} over {background}",
    "{shape}",
    "{shape} please",
    "{colour} one",
    "{colour} {shape} please",
)


def _fields(template: str) -> list[str]:
    return [name for name in ATTRIBUTES if "{" + name + "}" in template]


def _fill(template: str, values: dict[str, str], rng: random.Random) -> str:
    words = {}
    for name in _fields(template):
        word = rng.choice(WORDS[name][values[name]])
        if name == "position" and values[name] == "center" and "in the" not in template:
            word = f"in the {word}"
        words[name] = word
    return template.format(**words)


def generate(seed: int = SEED, n: int = N_PROMPTS) -> list[dict]:
    """``n`` distinct prompts with the attributes they name."""
    rng = random.Random(seed)
    pair_templates = [t for t in TEMPLATES if {"shape", "colour"} <= set(_fields(t))]
    heldout_pairs = sorted(HELDOUT_PAIRS)
    out: list[dict] = []
    seen: set[str] = set()
    while len(out) < n:
        heldout = len(out) % HELDOUT_EVERY == 0
        template = rng.choice(pair_templates if heldout else TEMPLATES)
        names = _fields(template)
        values = {name: rng.choice(ATTRIBUTES[name]) for name in names}
        if heldout:
            values["shape"], values["colour"] = heldout_pairs[(len(out) // 3) % len(heldout_pairs)]
        elif (values.get("shape"), values.get("colour")) in HELDOUT_PAIRS:
            continue  # a seen prompt must not name a held-out pair
        prompt = _fill(template, values, rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "attributes": values})
    return out


def render(items: list[dict]) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TERSE_PROMPTS_FILE)
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    args = parser.parse_args(argv)
    text = render(generate())
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date; run bench/make_terse_prompts.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    prompts = load_terse_prompts(args.out)  # validate what was written
    held = sum(p.category == "heldout" for p in prompts)
    print(f"wrote {len(prompts)} prompts ({held} held-out) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
