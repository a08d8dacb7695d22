"""The domain judge: pairwise verdicts on the embedded shapes data from the attribute network.

It implements :class:`evaluators.judging.PairJudge` (kind ``"domain"``) offline, with no model
download: the judge is the same attribute network (:mod:`trainers.domain`) whose accuracies
are the studies' objective, so its verdicts rank contestants on what the studies optimise.

How one pair is decided (rule version :data:`RULE_VERSION`):

1. **The prompt.** It must be a caption of the embedded data (``a small red circle in the top
   left on a gray background``); it is parsed into the asked value of each of the five
   attributes by exact lookup among every caption the data set can produce (720). Any other
   prompt gets no verdict (``outcome None``): the network knows nothing else, and a judge never
   guesses.
2. **Prompt following first.** For each image the net predicts every attribute (argmax of its
   head); ``matched`` is how many of the five asked values it sees. The image that shows more
   of the prompt wins. If both show fewer than ``min_matched`` (default 3 of 5), neither
   follows the prompt: ``both_bad``.
3. **Image quality as the tie-breaker** (equal ``matched``): the net's *confidence*, the mean
   over attributes of its top softmax probability, i.e. how unambiguously the image shows *a*
   shape, colour, size, position and background, whichever they are. Why this signal: the net
   was trained on clean rendered shapes (with mild noise augmentation), so a crisp, well-formed
   shape on a flat background gets probabilities near 1, while smeared, noisy, half-formed or
   two-blob images (the typical failures of an undertrained or few-step sampler) spread
   probability over several values. It is not a perceptual quality model: it cannot prefer one
   clean image to another clean one, which is why a difference up to ``margin`` (default 0.02)
   is a ``tie``. Measured with the default net on 40 real validation images: clean images
   score 0.99-1.00; with Gaussian noise (std 0.8) 0.66-0.98 (and often fewer attributes seen),
   so the clean image won all 40; after a 5x5 box blur 0.91-1.00 (clean won 22, tied 18, lost 0).

Each image is scored alone (a batch of one, float64 softmax), so an image's score does not
depend on what else is judged with it and swapping sides swaps the outcome exactly. The verdict
detail records what was computed and nothing else: per side the image's sha256, the asked and
seen value and probabilities per attribute, ``matched`` and ``confidence``, and which rule
decided. With a store (a :class:`~evaluators.sinks.JudgmentCache`), each image's scores also go
to the ``judgments`` table (mode ``absolute``, one row per image and prompt) as the audit trail
the judge contract asks for.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image

from evaluators.judging import Outcome, PairItem, Verdict
from evaluators.sinks import JudgmentCache, JudgmentRow
from trainers.data.shapes import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    ShapeAttrs,
    parse_caption,
    to_model_range,
)

if TYPE_CHECKING:
    from trainers.domain import AttributeNet

RULE_VERSION = "1"
"""Bump when the decision rule or the quality signal changes: it is part of the rater id."""

DEFAULT_MIN_MATCHED = 3
DEFAULT_MARGIN = 0.02


@dataclass(frozen=True)
class ImageScore:
    """What the net saw in one image for one prompt."""

    sha256: str
    matched: int  # asked attribute values the net sees, 0..5
    confidence: float  # mean over attributes of the top softmax probability
    attributes: dict[str, dict[str, Any]]  # name -> {asked, seen, p_asked, p_seen}

    def as_detail(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "matched": self.matched,
            "of": len(ATTRIBUTE_NAMES),
            "confidence": round(self.confidence, 6),
            "attributes": self.attributes,
        }


def decide(
    left: ImageScore,
    right: ImageScore,
    *,
    min_matched: int = DEFAULT_MIN_MATCHED,
    margin: float = DEFAULT_MARGIN,
) -> tuple[Outcome, str]:
    """The outcome for two scored images and the rule that decided it (symmetric by design:
    swapping the arguments swaps left and right and changes nothing else)."""
    if left.matched < min_matched and right.matched < min_matched:
        return "both_bad", "both_fail_prompt"
    if left.matched != right.matched:
        return ("left" if left.matched > right.matched else "right"), "prompt_following"
    gap = left.confidence - right.confidence
    if abs(gap) <= margin:
        return "tie", "quality_within_margin"
    return ("left" if gap > 0 else "right"), "quality"


def load_image(path: Path) -> tuple[torch.Tensor, str]:
    """A PNG/JPEG as float ``[1, 3, H, W]`` in [-1, 1], and the sha256 of its bytes."""
    data = Path(path).read_bytes()
    with Image.open(Path(path)) as im:
        pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    x = to_model_range(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None])
    return x, hashlib.sha256(data).hexdigest()


class DomainJudge:
    """The attribute network as a pair judge (see the module docstring for the rule).

    Args:
        net: a trained :class:`trainers.domain.AttributeNet`; default: the cached default
            net (:func:`trainers.domain.load_attribute_net`, trained once, ~25 s on a CPU).
        store: if given (a :class:`~evaluators.sinks.JudgmentCache`), every image score is
            recorded in the ``judgments`` table.
        min_matched: an image showing fewer asked attributes than this fails the prompt.
        margin: confidence differences up to this are a tie.
    """

    kind: Literal["domain"] = "domain"

    def __init__(
        self,
        net: AttributeNet | None = None,
        *,
        store: JudgmentCache | None = None,
        min_matched: int = DEFAULT_MIN_MATCHED,
        margin: float = DEFAULT_MARGIN,
        device: str | torch.device = "cpu",
    ) -> None:
        if not 0 <= min_matched <= len(ATTRIBUTE_NAMES):
            raise ValueError(f"min_matched must be in 0..{len(ATTRIBUTE_NAMES)}, got {min_matched}")
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        if net is None:
            from trainers.domain import load_attribute_net

            net = load_attribute_net(device=device)
        self.net = net.eval()
        self.device = next(net.parameters()).device
        self.store = store
        self.min_matched = min_matched
        self.margin = margin
        self.model = f"attribute_net-{net.recipe_hash or 'custom'}"
        # One rater per net and rule: verdicts of another net or rule are another rater's.
        self.rater_id = f"domain:{net.recipe_hash or 'custom'}:r{RULE_VERSION}"
        self._scores: dict[tuple[str, str], ImageScore] = {}

    @torch.no_grad()
    def score(self, image: torch.Tensor, sha256: str, attrs: ShapeAttrs) -> ImageScore:
        """Score one image ``[1, 3, H, W]`` in [-1, 1] against the caption's attributes."""
        key = (sha256, attrs.caption)
        if key in self._scores:
            return self._scores[key]
        logits = self.net(image.to(self.device))  # {name: [1, n_values]}
        asked = attrs.labels
        per_attr: dict[str, dict[str, Any]] = {}
        matched, top = 0, []
        for j, name in enumerate(ATTRIBUTE_NAMES):
            p = torch.softmax(logits[name][0].double().cpu(), dim=0)  # [n_values] float64
            seen = int(p.argmax())
            matched += seen == asked[j]
            top.append(float(p[seen]))
            per_attr[name] = {
                "asked": ATTRIBUTES[name][asked[j]],
                "seen": ATTRIBUTES[name][seen],
                "p_asked": round(float(p[asked[j]]), 6),
                "p_seen": round(float(p[seen]), 6),
            }
        result = ImageScore(sha256, matched, float(np.mean(top)), per_attr)
        self._scores[key] = result
        return result

    def judge_pairs(self, items: Sequence[PairItem]) -> list[Verdict]:
        """One verdict per item, in order; None (with the reason) for a prompt that is not a
        shapes caption or an image that cannot be read."""
        verdicts, scored = [], []
        for item in items:
            verdict, scores = self._judge_one(item)
            verdicts.append(verdict)
            scored.extend(scores)
        if self.store is not None and scored:
            self.store.upsert_judgments(self._rows(scored), replace=False)
        return verdicts

    def _judge_one(self, item: PairItem) -> tuple[Verdict, list[tuple[str, ImageScore]]]:
        base = {"judge": "domain", "rule": RULE_VERSION, "model": self.model}
        attrs = parse_caption(item.prompt)
        if attrs is None:
            error = (
                f"prompt {item.prompt!r} is not a caption of the embedded shapes data; the "
                "domain judge only judges those (use an MLLM judge for other prompts)"
            )
            return Verdict(None, {**base, "error": error}), []
        scores = []
        for path in (item.left_image, item.right_image):
            try:
                image, sha = load_image(path)
            except (OSError, ValueError) as err:
                return Verdict(None, {**base, "error": f"cannot read image {path}: {err}"}), []
            scores.append(self.score(image, sha, attrs))
        outcome, rule = decide(*scores, min_matched=self.min_matched, margin=self.margin)
        detail = {
            **base,
            "decided_by": rule,
            "min_matched": self.min_matched,
            "margin": self.margin,
            "left": scores[0].as_detail(),
            "right": scores[1].as_detail(),
        }
        return Verdict(outcome, detail), [(item.prompt, s) for s in scores]

    def _rows(self, scored: list[tuple[str, ImageScore]]) -> list[JudgmentRow]:
        """One ``judgments`` row per distinct (prompt, image) score (keyed like the MLLM
        judge's cache: image hashes, prompt, judge, model, rubric version, mode, order); a key
        already stored keeps its row."""
        rows: dict[str, JudgmentRow] = {}
        now = time.time()
        for prompt, s in scored:
            ident = [[s.sha256], prompt, "domain", self.model, RULE_VERSION, "absolute", "single"]
            key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]
            rows[key] = JudgmentRow(
                judgment_key=key,
                judge="domain",
                model=self.model,
                mode="absolute",
                rubric_version=RULE_VERSION,
                prompt=prompt,
                images=[s.sha256],
                parsed=True,
                result=s.as_detail(),
                time=now,
            )
        return list(rows.values())


def build_domain_judge(store: JudgmentCache | None = None, **options: Any) -> DomainJudge:
    """The judge registry's constructor for ``--judge domain`` (options: DomainJudge's)."""
    return DomainJudge(store=store, **options)
