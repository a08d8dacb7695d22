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
vision-language model), registered by name in :data:`JUDGES` and built with
:func:`build_judge`. ``harness judge --judge NAME`` picks pairs with the rating engine's pair
sampler, asks the judge, and stores its verdicts as comparisons.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args, runtime_checkable

from trainers.names import did_you_mean

if TYPE_CHECKING:
    from evaluators.sinks import JudgmentCache

Outcome = Literal["left", "right", "tie", "both_bad"]
"""A pairwise verdict: the left image is better, the right one, a tie, or both fail."""
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
JudgeKind = Literal["judge", "domain"]
"""The rater kind of a judge: an MLLM (``judge``) or the domain judge (``domain``)."""


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
    kind: JudgeKind

    def judge_pairs(self, items: Sequence[PairItem]) -> list[Verdict]:
        """One verdict per item, in order."""
        ...


# -- the registry --------------------------------------------------------------------------------
class JudgeError(ValueError):
    """No judge can be built by that name: unknown, missing its argument, or its module cannot
    be imported here."""


@dataclass(frozen=True)
class JudgeFactory:
    """How to build the judge of one name: its rater kind, what it is, and its builder
    (``"module:function"``, imported only when the judge is asked for). The builder is called
    as ``function(store, **options)``, or ``function(arg, store, **options)`` for a judge that
    takes an argument after its name (``arg`` names it: ``local:<dir>``)."""

    kind: JudgeKind
    summary: str
    builder: str
    arg: str | None = None

    def load(self) -> Callable[..., PairJudge]:
        """The builder function (its module imported now)."""
        module, function = self.builder.split(":")
        return getattr(importlib.import_module(module), function)


JUDGES: dict[str, JudgeFactory] = {
    "domain": JudgeFactory(
        "domain",
        "the embedded data's attribute network, offline",
        "evaluators.domain_judge:build_domain_judge",
    ),
    "openai": JudgeFactory(
        "judge",
        "an OpenAI-compatible server from HARNESS_JUDGE_BASE_URL / _MODEL / _API_KEY",
        "evaluators.mllm_judge:build_openai_judge",
    ),
    "local": JudgeFactory(
        "judge",
        "a transformers vision-language model saved in <dir>",
        "evaluators.mllm_judge:build_local_judge",
        arg="<dir>",
    ),
}
"""Every judge by name (``--judge NAME``)."""


def judge_names(kind: JudgeKind | None = None) -> list[str]:
    """How each judge (of ``kind``, if given) is spelled: ``domain``, ``openai``,
    ``local:<dir>``."""
    return [
        name + (f":{f.arg}" if f.arg else "")
        for name, f in JUDGES.items()
        if kind in (None, f.kind)
    ]


def build_judge(
    name: str, store: JudgmentCache | None, *, of_kind: JudgeKind | None = None, **options: Any
) -> PairJudge:
    """The judge called ``name`` (a :data:`JUDGES` name, ``NAME:ARG`` for one that takes an
    argument), built by its factory with ``store`` (where it records its answers; the domain
    judge also works without) and ``options``. ``of_kind``: only judges of that kind are
    allowed. A name that is not allowed, a missing argument or a builder that cannot be
    imported is a :class:`JudgeError` that says what is allowed."""
    key, colon, arg = name.partition(":")
    allowed = {k: f for k, f in JUDGES.items() if of_kind in (None, f.kind)}
    factory = allowed.get(key)
    if factory is None or (colon and factory.arg is None):
        what = {None: "judge", "judge": "MLLM judge", "domain": "domain judge"}[of_kind]
        raise JudgeError(
            f"unknown {what} {name!r}{did_you_mean(key, allowed)}; allowed: "
            + "; ".join(
                f"{spelled} ({f.summary})"
                for spelled, f in zip(judge_names(of_kind), allowed.values(), strict=True)
            )
        )
    if factory.arg is not None and not arg:
        raise JudgeError(f"judge {key!r} needs {factory.arg} after its name: {key}:{factory.arg}")
    try:
        build = factory.load()
    except ImportError as err:
        raise JudgeError(
            f"judge {name!r} needs {factory.builder.split(':')[0]}, which cannot be imported "
            f"here ({err})"
        ) from None
    return build(store, **options) if factory.arg is None else build(arg, store, **options)
