"""The trainer registry and the trainers' own configs name each other the same way."""

from __future__ import annotations

import importlib.util
import typing

from trainers.registry import TRAINERS


def test_each_config_names_its_registry_key_and_its_module_exists() -> None:
    for name, trainer in TRAINERS.items():
        field = trainer.config.model_fields["trainer"]
        assert typing.get_args(field.annotation) == (name,), name
        assert field.default == name
        assert importlib.util.find_spec(trainer.module) is not None, trainer.module
        assert {"train/loss", "train/images_per_s"} <= trainer.metrics
