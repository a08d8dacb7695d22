"""The contract between judges and the arena: a judge looks at pairs of images and says which
one is better for the prompt.

A pair is two contestants' renders for the same prompt and seed (``renders`` table), so the
same initial noise: the comparison is paired. A judge answers one :class:`Verdict` per pair, in
order. ``outcome`` is one of the store's outcomes (``left``, ``right``, ``tie``, ``both_bad``)
or ``None`` when the judge could not give one (its answer did not parse, the API kept failing):
the arena then stores no comparison for the pair, and the judge has recorded why in the
``judgments`` table. A judge never guesses an outcome it did not get.

Judges: :mod:`evaluators.domain_judge` (the embedded data's attribute network; offline) and
:mod:`evaluators.mllm_judge` (an OpenAI-compatible chat API or a local transformers
vision-language model). ``harness judge --judge NAME`` picks pairs with the rating engine's
pair sampler, asks the judge, and stores its verdicts as comparisons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

Outcome = Literal["left", "right", "tie", "both_bad"]


@dataclass(frozen=True)
class PairItem:
    """Two contestants' images for one prompt and seed; ``left`` is shown first."""

    prompt: str
    seed: int
    left_id: str
    right_id: str
    left_image: Path
    right_image: Path
    category: str | None = None


@dataclass(frozen=True)
class Verdict:
    """A judge's answer for one pair: the outcome (None: no usable answer) and what backs it
    (reasons, the answers in each order, judgment keys), stored in ``comparisons.extra``."""

    outcome: Outcome | None
    detail: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class PairJudge(Protocol):
    """Anything that judges pairs. ``rater_id`` names it in the store (``raters.rater_id``,
    e.g. ``domain`` or ``judge:qwen2-vl-7b:v1``); ``kind`` is ``"judge"`` (an MLLM) or
    ``"domain"`` (the domain judge)."""

    rater_id: str
    kind: Literal["judge", "domain"]

    def judge_pairs(self, items: Sequence[PairItem]) -> list[Verdict]:
        """One verdict per item, in order."""
        ...
