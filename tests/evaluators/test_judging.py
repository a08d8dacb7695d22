"""The judge registry: every judge is built by name through ``JUDGES``, its kinds are the
``JudgeKind`` values, and a name it does not know is refused with what is allowed."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from torch import nn

from evaluators import judging, ratings
from evaluators.domain_judge import DomainJudge
from evaluators.judging import (
    JUDGES,
    JudgeError,
    JudgeKind,
    PairJudge,
    build_judge,
    judge_names,
)
from evaluators.mllm_judge import MLLMJudge


class StubNet(nn.Module):
    recipe_hash = "stub"

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))


def test_the_registry_covers_every_judge_kind_and_matches_the_classes() -> None:
    assert {f.kind for f in JUDGES.values()} == set(get_args(JudgeKind))
    classes = {"domain": DomainJudge, "openai": MLLMJudge, "local": MLLMJudge}
    assert set(classes) == set(JUDGES)
    for name, factory in JUDGES.items():
        assert classes[name].kind == factory.kind, name
        assert callable(factory.load()), name
    assert judge_names() == ["domain", "openai", "local:<dir>"]
    assert judge_names("judge") == ["openai", "local:<dir>"]


def test_outcomes_are_defined_once() -> None:
    assert ratings.OUTCOMES is judging.OUTCOMES
    assert judging.OUTCOMES == ("left", "right", "tie", "both_bad")


def test_a_judge_is_built_by_name() -> None:
    judge = build_judge("domain", None, net=StubNet())
    assert isinstance(judge, DomainJudge) and isinstance(judge, PairJudge)
    assert judge.rater_id == "domain:stub:r1"


def test_names_the_registry_refuses() -> None:
    with pytest.raises(JudgeError, match=r"unknown judge 'domian' \(did you mean 'domain'\?\)"):
        build_judge("domian", None)
    with pytest.raises(JudgeError, match=r"allowed: domain \(.*\); openai \(.*\); local:<dir>"):
        build_judge("openai:gpt", None)
    with pytest.raises(JudgeError, match=r"judge 'local' needs <dir> after its name"):
        build_judge("local", None)
    with pytest.raises(JudgeError, match="unknown MLLM judge 'domain'"):
        build_judge("domain", None, of_kind="judge")
