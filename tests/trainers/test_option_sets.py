"""Every option set of the trainers is defined once: each config ``Literal`` (the values a config
accepts) names exactly the entries of the registry that implements it, in the same order."""

from typing import get_args

import pytest
import torch

from trainers.config import REPA_BACKBONES, Solver, TimestepSampler
from trainers.distill import methods
from trainers.distill.config import METHODS, Method
from trainers.models import BACKBONES, build_denoiser
from trainers.sampling import SOLVERS, STUDENT_SAMPLERS, StudentSampler
from trainers.timesteps import SAMPLERS


def test_solver_literal_names_the_solver_registry() -> None:
    assert get_args(Solver) == tuple(SOLVERS)


def test_student_sampler_literal_names_the_student_sampler_registry() -> None:
    assert get_args(StudentSampler) == tuple(STUDENT_SAMPLERS)


def test_timestep_sampler_literal_names_the_timestep_transforms() -> None:
    assert get_args(TimestepSampler) == tuple(SAMPLERS)


def test_distill_methods_are_the_method_literal_and_the_registry() -> None:
    assert get_args(Method) == METHODS == tuple(methods._CLASSES)


@pytest.mark.parametrize("name", METHODS)
def test_each_method_class_has_its_name_and_a_registered_sampler(name: str) -> None:
    cls = methods.method_class(name)
    assert cls.name == name
    assert cls.sampler in STUDENT_SAMPLERS


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="allowed: progressive, consistency"):
        methods.method_class("nope")


def test_repa_backbones_are_the_backbones_with_transformer_blocks() -> None:
    """REPA hooks ``transformer_blocks[layer - 1]``: the backbones it allows are exactly the
    registered ones that have them (built on the meta device: no memory, no time)."""
    assert set(REPA_BACKBONES) <= set(BACKBONES)
    with torch.device("meta"):
        has_blocks = tuple(
            name
            for name in BACKBONES
            if hasattr(
                build_denoiser(
                    name, "micro", sample_size=16, channels=3, text_dim=16, pooled_dim=16
                ).transformer,
                "transformer_blocks",
            )
        )
    assert has_blocks == REPA_BACKBONES
