"""Registry lookups with "did you mean" errors, shared by every name-to-constructor dict.

Torch-free on purpose: the study-file validator imports it without loading torch."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any


def did_you_mean(word: Any, options: Iterable[Any]) -> str:
    """`` (did you mean 'x'?)`` for the closest option, or an empty string."""
    match = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def lookup(registry: Mapping[str, Any], name: str, what: str) -> Any:
    """``registry[name]`` or a KeyError that names the allowed values and the closest match."""
    if name in registry:
        return registry[name]
    raise KeyError(
        f"unknown {what} {name!r}{did_you_mean(name, registry)}; allowed: {', '.join(registry)}"
    )
