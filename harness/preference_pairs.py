"""The arena's votes as preference pairs for Diffusion-DPO (``harness arena pairs``).

Every stored comparison (the ``comparisons`` table: a vote between two contestants' images of
one prompt and seed) whose outcome names a side is a pair: the named side's image is the winner,
the other the loser. The image of a side is its ``renders`` row for (contestant, prompt, seed)
when that file exists, else the comparison's own ``left_image`` / ``right_image`` when that is
an existing file (a path; a ``sha256:...`` hash is not a file). Left out, and counted by reason
in :attr:`~trainers.preference.pairs.PreferencePairs.counts` (in this order of checks; a vote is
counted under the first reason that applies):

- ``rater_kind``: its rater kind was not asked for;
- ``gold``: an attention check (``extra.gold`` true; it measures the rater, not the models);
- ``contestant``: a side is not among the allowed contestants;
- ``tie`` / ``both_bad``: no preference;
- ``missing_image``: a side has no readable image file;
- ``resolution``: an image's size differs from the requested one (``resolution`` x
  ``resolution``, else the first used image's size).

Every vote is its own pair: a pair of images voted on by several raters appears once per vote
(as Pick-a-Pic's pairs do in Diffusion-DPO), and contradicting votes both stay, so the
disagreement weighs in the loss as it does in the data. The order is the store's, by vote time
then comparison id, so the same store gives the same pairs. The pairs go to a file
(:meth:`~trainers.preference.pairs.PreferencePairs.save`) that a ``dpo`` trainer config names
(``dpo.pairs_file``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from harness.store import RATER_KINDS, Store
from trainers.names import did_you_mean
from trainers.preference.pairs import SKIP_REASONS, PairsError, PreferencePairs

__all__ = ["DEFAULT_RATER_KINDS", "arena_pairs"]

DEFAULT_RATER_KINDS: tuple[str, ...] = ("human", "judge", "domain")
_FIX = (
    "cast votes in the arena (`harness app`), import votes (`harness arena import`), or let a "
    "judge vote (`harness judge`)"
)


def arena_pairs(
    store_path: str | Path,
    *,
    rater_kinds: Sequence[str] = DEFAULT_RATER_KINDS,
    contestants: Sequence[str] | None = None,
    resolution: int | None = None,
) -> PreferencePairs:
    """The arena's votes in the store at ``store_path`` as preference pairs (module docstring).

    rater_kinds: whose votes count (of ``human``, ``judge``, ``domain``). contestants: if given,
    only votes between two of these (each must be registered). resolution: the images' size
    (square), else the first used image's. Images are read with PIL as RGB, ``[3, H, W]`` uint8.
    The store is only read. A missing store, or no pair left, is a :class:`PairsError` naming
    the store, what was left out and the fix.
    """
    path = Path(store_path).expanduser()
    if not path.is_file():
        raise PairsError(
            f"no results store at {path} to read arena votes from; give the store file the "
            f"arena uses (e.g. WORKDIR/harness.duckdb), then {_FIX}"
        )
    for kind in rater_kinds:
        if kind not in RATER_KINDS:
            raise PairsError(
                f"unknown rater kind {kind!r}{did_you_mean(kind, RATER_KINDS)}; "
                f"choose from {', '.join(RATER_KINDS)}"
            )
    if resolution is not None and resolution < 1:
        raise PairsError(f"resolution must be >= 1, got {resolution}")
    store = Store(path)
    allowed = None if contestants is None else set(contestants)
    if allowed is not None:
        known = [
            row["contestant_id"] for row in store.query("SELECT contestant_id FROM contestants")
        ]
        unknown = sorted(allowed - set(known))
        if unknown:
            raise PairsError(
                f"contestant {unknown[0]!r}{did_you_mean(unknown[0], known)} is not registered "
                f"in {store.path} ({len(unknown)} unknown: {', '.join(map(repr, unknown))})"
            )
    renders: dict[tuple[str, str, int], list[str]] = {}
    for row in store.query(
        "SELECT contestant_id, prompt, seed, path FROM renders "
        "ORDER BY contestant_id, prompt_id, seed"
    ):
        renders.setdefault((row["contestant_id"], row["prompt"], row["seed"]), []).append(
            row["path"]
        )
    votes = store.comparisons()
    loader = _ImageLoader(path.resolve().parent)
    size = None if resolution is None else (resolution, resolution)
    counts = {"read": len(votes), "used": 0, **dict.fromkeys(SKIP_REASONS, 0)}
    prompts: list[str] = []
    winners: list[Tensor] = []
    losers: list[Tensor] = []
    source: list[str] = []
    for vote in votes:
        images = _vote_images(vote, rater_kinds, allowed, renders, loader)
        if not isinstance(images, str):
            size = size or (images[0].shape[1], images[0].shape[2])
            if any((im.shape[1], im.shape[2]) != size for im in images):
                images = "resolution"
        if isinstance(images, str):
            counts[images] += 1
            continue
        win, lose = images if vote["outcome"] == "left" else images[::-1]
        prompts.append(vote["prompt"])
        winners.append(win)
        losers.append(lose)
        source.append(f"arena:{vote['rater_kind']}")
    counts["used"] = len(prompts)
    if not prompts:
        raise PairsError(f"no usable preference pairs in {store.path}: {_describe(counts)}; {_FIX}")
    return PreferencePairs(prompts, torch.stack(winners), torch.stack(losers), source, counts)


# -- arena helpers -------------------------------------------------------------------------------
class _ImageLoader:
    """Reads images as [3, H, W] uint8 once per path; relative paths are tried against the
    store's directory, then the working directory. None for no readable file."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.cache: dict[str, Tensor | None] = {}

    def __call__(self, candidates: Sequence[str | None]) -> Tensor | None:
        for name in candidates:
            if not name or name.startswith("sha256:"):
                continue
            if name not in self.cache:
                self.cache[name] = self._read(Path(name).expanduser())
            if self.cache[name] is not None:
                return self.cache[name]
        return None

    def _read(self, path: Path) -> Tensor | None:
        from PIL import Image, UnidentifiedImageError

        for p in [path] if path.is_absolute() else [self.base / path, path]:
            if p.is_file():
                try:
                    with Image.open(p) as im:
                        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
                except (OSError, UnidentifiedImageError):
                    return None
                return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
        return None


def _vote_images(
    vote: Mapping[str, Any],
    rater_kinds: Sequence[str],
    allowed: set[str] | None,
    renders: Mapping[tuple[str, str, int], list[str]],
    loader: _ImageLoader,
) -> str | tuple[Tensor, Tensor]:
    """The reason ``vote`` is left out (one of :data:`SKIP_REASONS`), else its (left, right)
    images."""
    if vote["rater_kind"] not in rater_kinds:
        return "rater_kind"
    if (vote.get("extra") or {}).get("gold") in (True, "true"):
        return "gold"
    if allowed is not None and not {vote["left_id"], vote["right_id"]} <= allowed:
        return "contestant"
    if vote["outcome"] not in ("left", "right"):
        return str(vote["outcome"])
    images = []
    for side in ("left", "right"):
        key = (vote[f"{side}_id"], vote["prompt"], vote["seed"])
        image = loader([*renders.get(key, []), vote.get(f"{side}_image")])
        if image is None:
            return "missing_image"
        images.append(image)
    return images[0], images[1]


def _describe(counts: Mapping[str, int]) -> str:
    """``read 5 comparisons, left out: 3 tie, 2 gold`` (the reasons with a count)."""
    out = [f"{counts[r]} {r}" for r in SKIP_REASONS if counts.get(r)]
    return f"read {counts['read']} comparison(s)" + (f", left out: {', '.join(out)}" if out else "")
