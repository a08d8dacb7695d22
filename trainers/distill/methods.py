"""The registry of distillation methods: ``distill.method`` -> class (imported lazily)."""

from __future__ import annotations

import importlib

from trainers.distill.base import Context, DistillMethod
from trainers.distill.config import METHODS

# Name -> (module, class); the names are ``Method``'s values, in its order (a test checks it).
_CLASSES: dict[str, tuple[str, str]] = {
    "progressive": ("trainers.distill.progressive", "Progressive"),
    "consistency": ("trainers.distill.consistency", "Consistency"),
    "reflow": ("trainers.distill.reflow", "Reflow"),
    "dmd": ("trainers.distill.dmd", "Dmd"),
    "add": ("trainers.distill.add", "Add"),
}


def method_class(name: str) -> type[DistillMethod]:
    if name not in _CLASSES:
        raise KeyError(f"unknown distillation method {name!r}; allowed: {', '.join(METHODS)}")
    module, cls = _CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def build_method(ctx: Context) -> DistillMethod:
    """The configured method, built on ``ctx`` and moved to its device."""
    return method_class(ctx.cfg.distill.method)(ctx).to(ctx.device)
