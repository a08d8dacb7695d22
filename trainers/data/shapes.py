"""The embedded procedural text-to-image data set: captioned coloured shapes.

Every image is a function of ``(seed, split, index)``: the same triple gives the same attributes,
the same jitter and the same pixels on every machine. Some (shape, colour) pairs never appear in
the ``train`` split; the ``heldout`` split contains only those pairs, so a model's prompt
following can be tested on compositions it never saw (GenEval-style compositional test).

Bump ``DATASET_VERSION`` whenever rendering or the attribute lists change: the domain
evaluator's cached attribute network is keyed by it.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

DATASET_VERSION = "shapes-v1"

# Attribute name -> its values, in label order. Defined once; labels are indices into these.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "diamond"),
    "colour": ("red", "green", "blue", "yellow", "purple", "cyan"),
    "size": ("small", "large"),
    "position": ("center", "top left", "top right", "bottom left", "bottom right"),
    "background": ("black", "white", "gray"),
}
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(ATTRIBUTES)

# (shape, colour) pairs that never occur in the training split.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("triangle", "blue"), ("circle", "yellow"), ("square", "purple"), ("diamond", "red")}
)

Split = Literal["train", "val", "heldout", "all"]
SPLITS: tuple[str, ...] = ("train", "val", "heldout", "all")
# Each split draws from its own stream so that train/val/heldout never share an image.
_SPLIT_STREAM = {"train": 0, "val": 1, "heldout": 2, "all": 3}

_RGB = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 210, 220),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
_CENTRES = {
    "center": (0.5, 0.5),
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
}
_RADIUS = {"small": 0.13, "large": 0.21}  # fraction of the image side
_SUPERSAMPLE = 4  # draw at 4x and downsample (box filter) for anti-aliased edges


@dataclass(frozen=True)
class ShapeAttrs:
    shape: str
    colour: str
    size: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        pos = "in the center" if self.position == "center" else f"in the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {pos} on a {self.background} background"

    @property
    def labels(self) -> tuple[int, ...]:
        return tuple(ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTE_NAMES)

    @property
    def is_heldout(self) -> bool:
        return (self.shape, self.colour) in HELDOUT_PAIRS


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_STREAM[split], index])


def sample_attrs(seed: int, split: Split, index: int) -> ShapeAttrs:
    """Attributes of item ``index`` of ``split`` (deterministic)."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    rng = _rng(seed, split, index)
    while True:  # rejection keeps the other attributes uniform within the split
        values = {name: vals[rng.integers(len(vals))] for name, vals in ATTRIBUTES.items()}
        attrs = ShapeAttrs(**values)
        if split == "all":
            return attrs
        if attrs.is_heldout == (split == "heldout"):
            return attrs


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        offsets = [np.pi / 4 + k * np.pi / 2 for k in range(4)]
        r = r * 1.1
    elif shape == "diamond":
        offsets = [k * np.pi / 2 for k in range(4)]
        r = r * 1.25
    elif shape == "triangle":
        offsets = [-np.pi / 2 + k * 2 * np.pi / 3 for k in range(3)]
        r = r * 1.25
    elif shape == "star":
        # Not one of ATTRIBUTES["shape"]: the DreamBooth subject (trainers/data/subject.py), a
        # five-pointed star pointing up; 10 vertices alternate the outer radius and 0.45 of it.
        outer = r * 1.3
        points = []
        for k in range(10):
            o, rad = -np.pi / 2 + k * np.pi / 5, outer if k % 2 == 0 else 0.45 * outer
            points.append((cx + rad * np.cos(o + angle), cy + rad * np.sin(o + angle)))
        return points
    else:
        raise ValueError(shape)
    return [(cx + r * np.cos(o + angle), cy + r * np.sin(o + angle)) for o in offsets]


def render(attrs: ShapeAttrs, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Render ``attrs`` to an ``(H, W, 3)`` uint8 array with a little positional jitter."""
    big = resolution * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), _RGB[attrs.background])
    draw = ImageDraw.Draw(img)
    fx, fy = _CENTRES[attrs.position]
    jitter = rng.uniform(-0.03, 0.03, size=2)
    cx, cy = (fx + jitter[0]) * big, (fy + jitter[1]) * big
    r = _RADIUS[attrs.size] * big * rng.uniform(0.93, 1.07)
    colour = _RGB[attrs.colour]
    if attrs.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        angle = rng.uniform(-0.12, 0.12)  # a slight rotation; never enough to turn square->diamond
        draw.polygon(_polygon(attrs.shape, cx, cy, r, angle), fill=colour)
    img = img.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def render_item(
    seed: int, split: Split, index: int, resolution: int
) -> tuple[np.ndarray, ShapeAttrs]:
    attrs = sample_attrs(seed, split, index)
    # The render stream is separate from the attribute stream so that adding an attribute
    # value later does not silently shift every image's jitter.
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index, 1])
    return render(attrs, resolution, rng), attrs


def partial_caption(attrs: ShapeAttrs, names: Iterable[str]) -> str:
    """A caption of ``attrs`` naming only the attributes in ``names`` (the shape always: it is
    the caption's noun), in the order and wording of :attr:`ShapeAttrs.caption` with the
    other attributes left out, e.g. ``a red circle``, ``a large circle on a white
    background``; all five names give the full caption. Used by curriculum stages with
    ``caption_attributes`` (``trainers/curriculum.py``)."""
    named = set(names)
    unknown = named - set(ATTRIBUTE_NAMES)
    if unknown:
        raise ValueError(
            f"unknown attribute(s) {sorted(unknown)}; allowed: {', '.join(ATTRIBUTE_NAMES)}"
        )
    words = ["a"]
    words += [getattr(attrs, n) for n in ("size", "colour") if n in named]
    words.append(attrs.shape)
    if "position" in named:
        words.append("in the center" if attrs.position == "center" else f"in the {attrs.position}")
    if "background" in named:
        words.append(f"on a {attrs.background} background")
    return " ".join(words)


def caption_vocabulary() -> list[str]:
    """Every word any caption of this data set can contain, sorted."""
    words = {"a", "in", "the", "on", "background"}
    for vals in ATTRIBUTES.values():
        for v in vals:
            words.update(v.split())
    return sorted(words)


class ShapesDataset(torch.utils.data.Dataset):
    """``size`` items of one split, pre-rendered to a uint8 tensor (a few MB at 32x32)."""

    def __init__(
        self, seed: int = 0, split: Split = "train", size: int = 10_000, resolution: int = 32
    ):
        if size <= 0:
            raise ValueError(f"data.size must be positive, got {size}")
        self.seed, self.split, self.resolution = seed, split, resolution
        items = [render_item(seed, split, i, resolution) for i in range(size)]
        self.images = (
            torch.from_numpy(np.stack([im for im, _ in items])).permute(0, 3, 1, 2).contiguous()
        )
        self.attrs = [a for _, a in items]
        self.captions = [a.caption for a in self.attrs]
        self.labels = torch.tensor([a.labels for a in self.attrs], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.attrs)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": to_model_range(self.images[i]),
            "caption": self.captions[i],
            "labels": self.labels[i],
        }

    def fingerprint(self) -> str:
        """Content hash of the rendered pixels and captions (used in cache keys and tests)."""
        h = hashlib.sha256(self.images.numpy().tobytes())
        h.update("\n".join(self.captions).encode())
        return h.hexdigest()[:16]


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images_uint8.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped)."""
    return images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


@cache
def _caption_table() -> dict[str, ShapeAttrs]:
    """Every caption the embedded data can produce -> its attributes (4*6*2*5*3 = 720)."""
    table = {}
    for values in itertools.product(*ATTRIBUTES.values()):
        attrs = ShapeAttrs(**dict(zip(ATTRIBUTE_NAMES, values, strict=True)))
        table[attrs.caption] = attrs
    return table


def parse_caption(prompt: str) -> ShapeAttrs | None:
    """The attributes a shapes caption asks for, or None if ``prompt`` is not one.

    Exact lookup (surrounding whitespace and case ignored): the captions are generated from a
    template, so anything else is not a prompt the attribute network can check."""
    return _caption_table().get(" ".join(prompt.lower().split()))
