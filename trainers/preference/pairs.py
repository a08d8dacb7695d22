"""Preference pairs for Diffusion-DPO: a file of pairs (the arena's votes, written by
``harness arena pairs``), or online from a reward.

:class:`PreferencePairs` is the file format both sides agree on: prompts, winner and loser images
(uint8), each pair's source (``arena:<rater_kind>``) and the counts of what the export left out
and why. The trainer reads the file once and caches it in its run directory, so a resumed run
trains on the pairs it started with whatever was voted since, and training never touches the
arena's store while raters vote. How votes become pairs (ties, both-bad, attention checks and
missing images left out and counted) is ``harness/preference_pairs.py``'s.

**Online** (:func:`online_pairs`). From a group of samples of each prompt scored by a reward
(Flow-GRPO's groups), the best and the worst sample make a pair.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from trainers.config import ConfigError
from trainers.files import atomic_write_bytes

__all__ = [
    "SKIP_REASONS",
    "PairsError",
    "PreferencePairs",
    "online_pairs",
]

SKIP_REASONS: tuple[str, ...] = (
    "rater_kind",
    "gold",
    "contestant",
    "tie",
    "both_bad",
    "missing_image",
    "resolution",
)
"""Why a comparison is left out of the pairs, in the order they are checked
(``harness/preference_pairs.py``); :attr:`PreferencePairs.counts` has each."""
_FORMAT = 1  # PreferencePairs file format version


class PairsError(ConfigError):
    """No usable preference pairs: a missing store or pairs file, or nothing left after the
    filters; the message names the file, what was left out and the fix."""


@dataclass
class PreferencePairs:
    """Preference pairs of images: ``winners[i]`` is preferred over ``losers[i]`` for
    ``prompts[i]``."""

    prompts: list[str]
    winners: Tensor  # [N, 3, H, W] uint8
    losers: Tensor  # [N, 3, H, W] uint8
    source: list[str]  # per pair: "arena:<rater_kind>" or "online"
    counts: dict[str, int] = field(default_factory=dict)  # "read", "used", then SKIP_REASONS

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if self.winners.shape != self.losers.shape or self.winners.shape[:1] != (n,):
            raise ValueError(
                f"{n} prompts need winners and losers [{n}, C, H, W] of one shape, got "
                f"{tuple(self.winners.shape)} and {tuple(self.losers.shape)}"
            )
        if len(self.source) != n:
            raise ValueError(f"{n} prompts but {len(self.source)} sources")

    def __len__(self) -> int:
        return len(self.prompts)

    def save(self, path: Path) -> None:
        """Write the pairs to ``path`` atomically (``torch.save`` of plain tensors and lists,
        readable with ``weights_only=True``)."""
        state = {
            "format": _FORMAT,
            "prompts": list(self.prompts),
            "winners": self.winners.detach().cpu().contiguous(),
            "losers": self.losers.detach().cpu().contiguous(),
            "source": list(self.source),
            "counts": {str(k): int(v) for k, v in self.counts.items()},
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> PreferencePairs:
        """Read pairs written by :meth:`save`; a missing or foreign file is a
        :class:`PairsError`."""
        path = Path(path)
        if not path.is_file():
            raise PairsError(
                f"no preference pairs file at {path}; write it from the arena's votes with "
                "`harness arena pairs --out FILE`"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        keys = {"format", "prompts", "winners", "losers", "source", "counts"}
        if not isinstance(state, dict) or not keys <= set(state):
            raise PairsError(f"{path} is not a preference pairs file (PreferencePairs.save)")
        if state["format"] != _FORMAT:
            raise PairsError(
                f"{path} has pairs format {state['format']}, this code reads {_FORMAT}"
            )
        return cls(
            prompts=list(state["prompts"]),
            winners=state["winners"],
            losers=state["losers"],
            source=list(state["source"]),
            counts=dict(state["counts"]),
        )


def online_pairs(
    prompts: Sequence[str], images: Tensor, rewards: Tensor, group_size: int
) -> tuple[list[str], Tensor, Tensor, Tensor]:
    """Best-versus-worst pairs from groups of scored samples.

    images: [P * G, ...] (any dtype), rewards [P * G], group-major: prompt p's G = group_size
    samples are rows p G .. p G + G - 1. For each group the best (argmax, the first of equals)
    and the worst (argmin) sample make a pair; groups whose best and worst rewards are equal
    carry no preference and are dropped. Returns (prompts, winners [K, ...], losers [K, ...],
    margin [K] = r_best - r_worst) for the K <= P groups kept, in prompt order.
    """
    p = len(prompts)
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 to compare samples, got {group_size}")
    if rewards.dim() != 1 or rewards.shape[0] != p * group_size:
        raise ValueError(
            f"rewards must be [P * G] = [{p * group_size}] ({p} prompts x {group_size}), got "
            f"{tuple(rewards.shape)}"
        )
    if images.shape[0] != p * group_size:
        raise ValueError(
            f"images must have P * G = {p * group_size} rows, got {tuple(images.shape)}"
        )
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite")
    r = rewards.reshape(p, group_size)
    best, worst = r.argmax(dim=1), r.argmin(dim=1)
    rows = torch.arange(p, device=rewards.device)
    margin = r[rows, best] - r[rows, worst]
    keep = (margin > 0).nonzero().flatten()
    grouped = images.reshape(p, group_size, *images.shape[1:])
    keep_i = keep.to(images.device)
    winners = grouped[keep_i, best.to(images.device)[keep_i]]
    losers = grouped[keep_i, worst.to(images.device)[keep_i]]
    return [prompts[i] for i in keep.tolist()], winners, losers, margin[keep]
