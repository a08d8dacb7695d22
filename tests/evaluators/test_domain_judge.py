"""The domain judge: caption parsing, the decision rule, verdicts, its audit trail, and on real
data-set images with the trained attribute network (slow: it shares the session's trained net
with tests/evaluators/test_domain.py).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from evaluators.domain_judge import (
    DEFAULT_MARGIN,
    DomainJudge,
    ImageScore,
    decide,
    parse_caption,
)
from evaluators.judging import PairItem, PairJudge
from harness.store import Store
from trainers.data.shapes import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    ShapeAttrs,
    ShapesDataset,
    render,
    sample_attrs,
    to_model_range,
    to_uint8,
)

PROMPT = "a small red circle in the top left on a gray background"
ASKED = parse_caption(PROMPT)
SWAP = {"left": "right", "right": "left", "tie": "tie", "both_bad": "both_bad"}


def test_every_caption_parses_back_and_nothing_else_does():
    combos = list(itertools.product(*ATTRIBUTES.values()))
    assert len(combos) == 720
    for values in combos:
        attrs = ShapeAttrs(**dict(zip(ATTRIBUTE_NAMES, values, strict=True)))
        assert parse_caption(attrs.caption) == attrs
    assert parse_caption("  A Small red circle in the TOP left on a gray  background ") == ASKED
    assert parse_caption("a red circle") is None
    assert parse_caption("a small red circle in the top left on a grey background") is None


def score(matched: int, confidence: float) -> ImageScore:
    return ImageScore("x", matched, confidence, {})


def test_decision_rule_and_its_symmetry():
    assert decide(score(5, 0.9), score(4, 1.0)) == ("left", "prompt_following")
    assert decide(score(2, 0.9), score(3, 0.1)) == ("right", "prompt_following")
    assert decide(score(2, 0.99), score(0, 0.4)) == ("both_bad", "both_fail_prompt")
    assert decide(score(5, 0.99), score(5, 0.95)) == ("left", "quality")
    assert decide(score(5, 0.99), score(5, 0.99 - DEFAULT_MARGIN / 2)) == (
        "tie",
        "quality_within_margin",
    )
    assert decide(score(1, 0.9), score(0, 0.1), min_matched=1) == ("left", "prompt_following")
    rng = random.Random(0)
    for _ in range(2000):
        a = score(rng.randint(0, 5), round(rng.random(), 2))
        b = score(rng.randint(0, 5), round(rng.random(), 2))
        (ab, rule_ab), (ba, rule_ba) = decide(a, b), decide(b, a)
        assert SWAP[ab] == ba and rule_ab == rule_ba


class LookupNet(nn.Module):
    """A stand-in attribute net: logits chosen per test image (keyed by its pixels)."""

    recipe_hash = "stub"

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # so the judge finds a device
        self.table: dict[str, dict[str, torch.Tensor]] = {}

    @staticmethod
    def key(x: torch.Tensor) -> str:
        return hashlib.sha256(x.numpy().tobytes()).hexdigest()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        assert x.shape[0] == 1  # the judge scores images one at a time
        return {k: v[None] for k, v in self.table[self.key(x)].items()}


def make_image(net: LookupNet, path: Path, fill: int, wrong: int, p_top: float) -> Path:
    """A flat PNG that ``net`` reads as ASKED with ``wrong`` attributes misread, each
    attribute's top probability ``p_top``."""
    Image.fromarray(np.full((8, 8, 3), fill, np.uint8)).save(path)
    x = to_model_range(torch.from_numpy(np.asarray(Image.open(path)).copy()).permute(2, 0, 1))
    logits = {}
    for j, name in enumerate(ATTRIBUTE_NAMES):
        n = len(ATTRIBUTES[name])
        top = ASKED.labels[j] if j >= wrong else (ASKED.labels[j] + 1) % n
        p = torch.full((n,), (1 - p_top) / (n - 1), dtype=torch.float64)
        p[top] = p_top
        logits[name] = p.log().float()
    net.table[net.key(x[None])] = logits
    return path


@pytest.fixture
def images(tmp_path: Path) -> tuple[LookupNet, dict[str, Path]]:
    net = LookupNet()
    spec = {  # name: (wrong attributes, top probability)
        "perfect": (0, 0.99),
        "three": (2, 0.99),
        "two": (3, 0.99),
        "one": (4, 0.99),
        "vague": (0, 0.90),
        "close": (0, 0.99 - DEFAULT_MARGIN / 2),
    }
    paths = {
        name: make_image(net, tmp_path / f"{name}.png", 40 * i, *args)
        for i, (name, args) in enumerate(spec.items())
    }
    return net, paths


def item(paths: dict[str, Path], left: str, right: str, prompt: str = PROMPT) -> PairItem:
    return PairItem(prompt, 0, left, right, paths[left], paths[right])


def test_verdicts_follow_the_rule_and_swap_with_the_sides(images, tmp_path: Path):
    net, paths = images
    judge = DomainJudge(net)  # type: ignore[arg-type]
    assert isinstance(judge, PairJudge) and judge.kind == "domain"
    assert judge.rater_id == "domain:stub:r1"
    cases = {
        ("perfect", "three"): ("left", "prompt_following"),
        ("two", "one"): ("both_bad", "both_fail_prompt"),
        ("perfect", "vague"): ("left", "quality"),
        ("perfect", "close"): ("tie", "quality_within_margin"),
        ("three", "two"): ("left", "prompt_following"),
    }
    items = [item(paths, a, b) for a, b in cases]
    swapped = [item(paths, b, a) for a, b in cases]
    verdicts = judge.judge_pairs(items + swapped)
    for (pair, (outcome, rule)), v, s in zip(
        cases.items(), verdicts[: len(cases)], verdicts[len(cases) :], strict=True
    ):
        assert (v.outcome, v.detail["decided_by"]) == (outcome, rule), pair
        assert s.outcome == SWAP[outcome] and s.detail["decided_by"] == rule
        assert v.detail["left"] == s.detail["right"] and v.detail["right"] == s.detail["left"]
    d = verdicts[0].detail
    assert d["left"]["matched"] == 5 and d["right"]["matched"] == 3
    assert d["right"]["attributes"]["shape"] == {
        "asked": "circle", "seen": "square", "p_asked": pytest.approx(0.0033333, abs=1e-6),
        "p_seen": pytest.approx(0.99),
    }  # fmt: skip
    assert d["left"]["sha256"] == hashlib.sha256(paths["perfect"].read_bytes()).hexdigest()
    assert d["left"]["confidence"] == pytest.approx(0.99, abs=1e-6)
    # Deterministic: a fresh judge gives the same verdicts.
    again = DomainJudge(net).judge_pairs(items)  # type: ignore[arg-type]
    assert [v.detail for v in again] == [v.detail for v in verdicts[: len(cases)]]


def test_no_verdict_without_a_caption_or_an_image(images, tmp_path: Path):
    net, paths = images
    judge = DomainJudge(net)  # type: ignore[arg-type]
    paths["missing"] = tmp_path / "missing.png"
    v1, v2 = judge.judge_pairs(
        [
            item(paths, "perfect", "three", prompt="a photo of a cat"),
            item(paths, "perfect", "missing"),
        ]
    )
    assert v1.outcome is None and "not a caption of the embedded shapes data" in v1.detail["error"]
    assert v2.outcome is None and "cannot read image" in v2.detail["error"]
    assert "left" not in v1.detail and "left" not in v2.detail  # nothing it did not compute
    with pytest.raises(ValueError, match="margin must be in"):
        DomainJudge(net, margin=1.5)  # type: ignore[arg-type]


def test_scores_are_recorded_once_in_judgments(images):
    net, paths = images
    store = Store(":memory:")
    judge = DomainJudge(net, store=store)  # type: ignore[arg-type]
    judge.judge_pairs([item(paths, "perfect", "three"), item(paths, "three", "vague")])
    judge.judge_pairs([item(paths, "three", "perfect")])
    rows = store.query("SELECT * FROM judgments ORDER BY result")
    assert len(rows) == 3  # perfect, three, vague: one row per (image, prompt)
    assert {r["judge"] for r in rows} == {"domain"} and all(r["parsed"] for r in rows)
    assert {r["mode"] for r in rows} == {"absolute"} and rows[0]["prompt"] == PROMPT
    matched = sorted(json.loads(r["result"])["matched"] for r in rows)
    assert matched == [3, 5, 5]
    sha = hashlib.sha256(paths["three"].read_bytes()).hexdigest()
    assert [sha] in [list(r["images"]) for r in rows]


# -- with the trained attribute network, on real data-set images ---------------------------------
@pytest.fixture(scope="module")
def real_judge() -> DomainJudge:
    return DomainJudge()  # the default net, trained once per session (cached)


def save(path: Path, x: torch.Tensor) -> Path:
    Image.fromarray(to_uint8(x).permute(1, 2, 0).numpy()).save(path)
    return path


@pytest.mark.slow
def test_real_images_beat_wrong_and_degraded_ones(real_judge: DomainJudge, tmp_path: Path):
    ds = ShapesDataset(seed=11, split="val", size=16, resolution=32)
    x = to_model_range(ds.images)  # [16, 3, 32, 32]
    gen = torch.Generator().manual_seed(0)
    items = []
    for i, attrs in enumerate(ds.attrs):
        real = save(tmp_path / f"real{i}.png", x[i])
        # The image of another caption that differs in colour, position and background.
        other = next(
            sample_attrs(99, "all", k)
            for k in range(10_000)
            if all(
                getattr(sample_attrs(99, "all", k), n) != getattr(attrs, n)
                for n in ("colour", "position", "background")
            )
        )
        px = render(other, 32, np.random.default_rng(i))
        wrong = save(
            tmp_path / f"wrong{i}.png", to_model_range(torch.from_numpy(px.copy()).permute(2, 0, 1))
        )
        noisy = save(
            tmp_path / f"noisy{i}.png",
            (x[i] + 0.8 * torch.randn(x[i].shape, generator=gen)).clamp(-1, 1),
        )
        for bad in (wrong, noisy):
            items.append(PairItem(attrs.caption, 0, "real", "bad", real, bad))
            items.append(PairItem(attrs.caption, 0, "bad", "real", bad, real))
    verdicts = real_judge.judge_pairs(items)
    winners = [
        it.left_id if v.outcome == "left" else it.right_id if v.outcome == "right" else v.outcome
        for it, v in zip(items, verdicts, strict=True)
    ]
    assert winners == ["real"] * len(items)
    assert all(v.detail["left" if it.left_id == "real" else "right"]["matched"] == 5
               for it, v in zip(items, verdicts, strict=True))  # fmt: skip
