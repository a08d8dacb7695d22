"""The rewards preference tuning optimises: a score per generated image and its prompt.

A :class:`Reward` takes images ``[B, 3, H, W]`` (float in ``[-1, 1]``, any device, may require
gradients) and their ``B`` prompts and returns ``[B]`` float32 on the images' device, higher is
better, multiplied by ``RewardSettings.scale`` (so rewards on different scales can be mixed).
Images are clamped to ``[-1, 1]`` first, as a sampler's output is before it is saved. A
*differentiable* reward lets gradients flow to the images (ReFL back-propagates through it);
the others return a detached tensor (GRPO and online DPO only rank samples). Each reward's
:meth:`~Reward.provenance` (JSON; never a secret) says what was measured and with which weights.

:data:`REWARDS` names them (``reward.name``; the :data:`RewardName` literal, a test checks):

- ``attribute`` (differentiable): prompt following on the embedded shapes data. The domain
  evaluator's attribute net (:func:`trainers.domain.load_attribute_net`, frozen) classifies the
  five attributes of each image; the reward is the mean over attributes of the softmax
  probability of the value the caption asks for, in ``[0, 1]``. Only the embedded data's
  captions can be scored (:func:`trainers.data.shapes.parse_caption`); any other prompt is a
  :class:`RewardError`.
- ``realism`` (differentiable): how much an image looks like the real data, whatever the prompt:
  minus the squared Mahalanobis distance of its attribute-net features to the Gaussian of real
  validation images' features (:func:`trainers.domain.reference_stats`, 512 images at the
  images' resolution), divided by the feature dimension. It is the second reward, not trained
  on: a model that learns to please ``attribute`` with images no real data looks like (reward
  hacking: saturated colours, adversarial textures) raises ``attribute`` while this one falls.
  Real images score about -1 (the expected value over the covariance's rank), Gaussian noise
  about -2.
- ``clip``, ``model``, ``judge``: provided by ``evaluators/rewards.py`` (CLIP score, a
  CLIP-architecture preference model from a local path, the MLLM judge's absolute rating).

Rewards are plugins: :data:`REWARDS` holds the two that need only this floor; the others are
entry points of the group ``harness.rewards`` (``pyproject.toml``), loaded by name when a config
asks for one. So ``trainers`` never imports ``evaluators`` (the packages' floors), and another
package can add a reward by declaring an entry point.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from trainers.config import ConfigError
from trainers.data.shapes import ATTRIBUTE_NAMES, DATASET_VERSION, parse_caption
from trainers.domain import AttributeNet, load_attribute_net, reference_stats
from trainers.preference.config import REWARD_NAMES, RewardName, RewardSettings

__all__ = [
    "ENTRY_POINT_GROUP",
    "REWARDS",
    "REWARD_NAMES",
    "AttributeReward",
    "RealismReward",
    "Reward",
    "RewardError",
    "RewardName",
    "RewardSettings",
    "build_reward",
    "reward_class",
]


class RewardError(ConfigError):
    """A reward that cannot be built or cannot score these prompts; the message names the
    problem and the fix."""


# ----------------------------------------------------------------------------------------------
# the base class


class Reward:
    """A score per image and prompt (see the module docstring). Subclasses set ``name``,
    ``version`` (bump when the score of the same images changes) and ``differentiable``, and
    implement ``_score`` (the unscaled reward of images on ``self.device``) and ``_details``
    (their part of the provenance)."""

    name: ClassVar[str]
    version: ClassVar[str]
    differentiable: ClassVar[bool]

    def __init__(self, settings: RewardSettings, device: torch.device | str) -> None:
        if settings.name != self.name:
            raise RewardError(f"{type(self).__name__} got settings for reward {settings.name!r}")
        self.settings = settings
        self.scale = float(settings.scale)
        self.device = torch.device(device)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """The rewards ``[B]`` (float32, on the images' device, times ``scale``) of ``images``
        ``[B, 3, H, W]`` in ``[-1, 1]`` for ``prompts`` (``B`` strings); gradients flow to
        ``images`` when the reward is differentiable, else the result is detached."""
        _check_inputs(images, prompts)
        if len(images) == 0:
            return torch.zeros(0, device=images.device)
        x = images.to(self.device).float().clamp(-1.0, 1.0)
        # Autocast off: a caller's bf16 autocast would silently score in low precision.
        with torch.autocast(device_type=self.device.type, enabled=False):
            if self.differentiable:
                raw = self._score(x, list(prompts))
            else:
                with torch.no_grad():
                    raw = self._score(x.detach(), list(prompts))
        out = (raw.float() * self.scale).to(images.device)
        return out if self.differentiable else out.detach()

    def provenance(self) -> dict[str, Any]:
        """What the reward is (JSON-able; weights by sha256, never a secret)."""
        return {
            "name": self.name,
            "version": self.version,
            "scale": self.scale,
            "differentiable": self.differentiable,
            **self._details(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(scale={self.scale}, device={str(self.device)!r})"

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        raise NotImplementedError

    def _details(self) -> dict[str, Any]:
        return {}


def _check_inputs(images: Tensor, prompts: Sequence[str]) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(
            f"images must be float in [-1, 1], got dtype {images.dtype} "
            "(convert uint8 images with trainers.data.shapes.to_model_range)"
        )
    if isinstance(prompts, str) or len(prompts) != len(images):
        got = "a string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"one prompt per image: {len(images)} images but {got}")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings, got {bad[:3]!r}")


def _no_path(settings: RewardSettings) -> None:
    if settings.path is not None:
        raise RewardError(
            f"reward {settings.name!r} takes no path (got {settings.path!r}); remove path, "
            "or pick the clip or model reward for a model directory"
        )


def _state_sha256(net: torch.nn.Module) -> str:
    """sha256 over the state dict's names and tensor bytes (in name order)."""
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode() + b"\0")
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# the embedded data's rewards: attribute and realism


class _AttributeNetReward(Reward):
    """A reward computed by the domain evaluator's attribute net (frozen, eval mode)."""

    def __init__(
        self,
        settings: RewardSettings,
        device: torch.device | str,
        *,
        net: AttributeNet | None = None,
    ) -> None:
        """``net``: an :class:`~trainers.domain.AttributeNet` (tests); default: the cached
        default net (trained once, ~25 s on a CPU)."""
        super().__init__(settings, device)
        _no_path(settings)
        if net is None:
            net = load_attribute_net(device=self.device)
        self.net = net.to(self.device).eval().requires_grad_(False)
        self.weights_sha256 = _state_sha256(self.net)

    def _details(self) -> dict[str, Any]:
        return {
            "net": f"attribute_net-{self.net.recipe_hash or 'custom'}",
            "dataset_version": DATASET_VERSION,
            "weights_sha256": self.weights_sha256,
        }


class AttributeReward(_AttributeNetReward):
    """Mean over the five attributes of the net's probability of the asked value, in [0, 1]."""

    name = "attribute"
    version = "1"
    differentiable = True

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        labels = torch.tensor([_asked_labels(p) for p in prompts], device=self.device)  # [B, 5]
        logits = self.net(images)  # {name: [B, n_values]}
        p_asked = [
            torch.softmax(logits[name].float(), dim=1).gather(1, labels[:, j, None])[:, 0]
            for j, name in enumerate(ATTRIBUTE_NAMES)
        ]  # 5 x [B]
        return torch.stack(p_asked, 1).mean(1)

    def _details(self) -> dict[str, Any]:
        return {**super()._details(), "score": "mean over attributes of p(asked value)"}


def _asked_labels(prompt: str) -> tuple[int, ...]:
    attrs = parse_caption(prompt)
    if attrs is None:
        raise RewardError(
            f"the attribute reward cannot score the prompt {prompt!r}: it only knows the "
            "embedded shapes data's captions (e.g. 'a small red circle in the top left on a "
            "gray background'); train on the embedded data's prompts, or use the clip, model "
            "or judge reward"
        )
    return attrs.labels


REALISM_REFERENCE: dict[str, Any] = {"seed": 0, "split": "val", "size": 512}
"""The real images whose feature Gaussian the realism reward measures against."""
REALISM_RIDGE = 1e-3
"""Added to the reference covariance's diagonal, times its mean variance, before inverting it:
the covariance is singular (dead ReLU features, rank below the feature dimension)."""


class RealismReward(_AttributeNetReward):
    """``-(f - mu)^T (Sigma + ridge I)^-1 (f - mu) / F`` of the net's features ``f`` (``F``
    of them) against real images at the images' resolution; prompts are ignored."""

    name = "realism"
    version = "1"
    differentiable = True

    def __init__(
        self,
        settings: RewardSettings,
        device: torch.device | str,
        *,
        net: AttributeNet | None = None,
    ) -> None:
        super().__init__(settings, device, net=net)
        self._reference: dict[int, tuple[Tensor, Tensor]] = {}  # resolution -> (mu, precision)

    def reference(self, resolution: int) -> tuple[Tensor, Tensor]:
        """``(mu [F], precision [F, F])`` float32 on the reward's device, of real images at
        ``resolution`` (computed once per resolution; the statistics are cached on disk)."""
        if resolution not in self._reference:
            mu, sigma = reference_stats(self.net, resolution=resolution, **REALISM_REFERENCE)
            ridge = REALISM_RIDGE * float(sigma.diagonal().mean())
            eye = torch.eye(len(mu), dtype=torch.float64)
            precision = torch.cholesky_inverse(torch.linalg.cholesky(sigma + ridge * eye))
            self._reference[resolution] = (
                mu.float().to(self.device),
                precision.float().to(self.device),
            )
        return self._reference[resolution]

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        h, w = images.shape[-2:]
        if h != w:
            raise ValueError(f"the realism reward compares square images, got {h}x{w}")
        mu, precision = self.reference(int(h))
        d = self.net.features(images) - mu  # [B, F]
        return -((d @ precision) * d).sum(1) / d.shape[1]

    def _details(self) -> dict[str, Any]:
        return {
            **super()._details(),
            "score": "-squared Mahalanobis distance / feature dim",
            "reference": REALISM_REFERENCE,
            "ridge": REALISM_RIDGE,
        }


# ----------------------------------------------------------------------------------------------
# the registry

REWARDS: dict[str, Callable[[RewardSettings, torch.device], Reward]] = {
    "attribute": AttributeReward,
    "realism": RealismReward,
}
"""``reward.name`` -> the reward's constructor ``(settings, device)``: the built-in rewards."""

ENTRY_POINT_GROUP = "harness.rewards"


def reward_class(name: str) -> Callable[[RewardSettings, torch.device], Reward]:
    """The constructor of reward ``name``: built in, else the entry point of that name in the
    group :data:`ENTRY_POINT_GROUP`."""
    if name in REWARDS:
        return REWARDS[name]
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in found:
        known = sorted({*REWARDS, *found})
        raise RewardError(
            f"unknown reward {name!r}; known: {', '.join(known)}. A reward outside this "
            f"package is an entry point in the group {ENTRY_POINT_GROUP!r}; if {name!r} is one "
            "of this project's own, reinstall it (`uv sync`) so that its entry points exist"
        )
    return found[name].load()


def build_reward(settings: RewardSettings, device: torch.device | str) -> Reward:
    """The reward ``settings`` name, on ``device`` (its networks are loaded there)."""
    return reward_class(settings.name)(settings, torch.device(device))
