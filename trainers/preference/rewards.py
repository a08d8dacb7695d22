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
  captions can be scored (:func:`evaluators.domain_judge.parse_caption`); any other prompt is a
  :class:`RewardError`.
- ``realism`` (differentiable): how much an image looks like the real data, whatever the prompt:
  minus the squared Mahalanobis distance of its attribute-net features to the Gaussian of real
  validation images' features (:func:`trainers.domain.reference_stats`, 512 images at the
  images' resolution), divided by the feature dimension. It is the second reward, not trained
  on: a model that learns to please ``attribute`` with images no real data looks like (reward
  hacking: saturated colours, adversarial textures) raises ``attribute`` while this one falls.
  Real images score about -1 (the expected value over the covariance's rank), Gaussian noise
  about -2.
- ``clip`` (differentiable): CLIP score, ``100 * max(cos(image, text), 0)`` (torchmetrics'
  definition), with a local transformers ``CLIPModel`` (``path``, else ``$HARNESS_CLIP_PATH``,
  else ``openai/clip-vit-large-patch14`` in the Hugging Face cache; never downloaded).
  Preprocessing is done in torch so that it is differentiable: ``[0, 1]``, bicubic antialiased
  resize to the vision tower's ``image_size``, the processor's mean and std.
- ``model`` (differentiable): a CLIP-architecture preference model in transformers format
  (PickScore, HPSv2 converted) from the directory ``path``: ``logit_scale.exp() * cos(image,
  text)``, PickScore's formula; otherwise exactly the ``clip`` reward.
- ``judge`` (not differentiable): the MLLM judge's absolute rating
  (:class:`evaluators.mllm_judge.MLLMJudge`): the mean of its prompt adherence and visual
  quality, each 1-10. The server is ``HARNESS_JUDGE_BASE_URL`` / ``HARNESS_JUDGE_MODEL`` /
  ``HARNESS_JUDGE_API_KEY`` (``path`` given: the local vision-language model in that directory
  instead). An image the judge gave no usable answer for is a :class:`RewardError` naming how
  many: a reward is never skipped silently. Answers are kept in memory
  (:class:`MemoryJudgmentCache`), so an image asked twice with its prompt costs one request.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from evaluators.domain_judge import parse_caption
from evaluators.extractors import (
    CLIP_SCORE_DEFAULT_ID,
    _clip_weights_sha256,
    load_clip,
    resolve_clip_dir,
)
from evaluators.mllm_backends import ENV_API_KEY, BackendConfigError, redact
from evaluators.mllm_judge import ImageItem, build_local_judge, build_openai_judge
from evaluators.sinks import JudgmentCache, JudgmentMode, JudgmentRow, decode_json, to_json
from trainers.config import ConfigError
from trainers.data.shapes import ATTRIBUTE_NAMES, DATASET_VERSION, to_uint8
from trainers.domain import AttributeNet, load_attribute_net, reference_stats
from trainers.preference.config import REWARD_NAMES, RewardName, RewardSettings

__all__ = [
    "REWARDS",
    "REWARD_NAMES",
    "AttributeReward",
    "ClipReward",
    "JudgeReward",
    "MemoryJudgmentCache",
    "ModelReward",
    "RealismReward",
    "Reward",
    "RewardError",
    "RewardName",
    "RewardSettings",
    "build_reward",
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
# CLIP-architecture rewards: clip and model

_TEXT_CACHE_SIZE = 4096


class ClipReward(Reward):
    """CLIP score ``100 * max(cos(image, text), 0)`` (torchmetrics' definition)."""

    name = "clip"
    version = "1"
    differentiable = True

    def __init__(self, settings: RewardSettings, device: torch.device | str) -> None:
        super().__init__(settings, device)
        self.directory = self._directory(settings)
        model, processor = load_clip(self.directory)
        self.model = model.to(self.device)
        self.tokenizer = processor.tokenizer
        config = model.config
        self.image_size = int(config.vision_config.image_size)
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32, device=self.device)
        self.max_length = min(
            int(self.tokenizer.model_max_length), int(config.text_config.max_position_embeddings)
        )
        self.weights_sha256 = _clip_weights_sha256(self.directory)
        self.model_name = getattr(config, "_name_or_path", "") or self.directory.name
        self._text: dict[str, Tensor] = {}  # prompt -> unit text embedding [D] (no grad)

    def _directory(self, settings: RewardSettings) -> Path:
        return resolve_clip_dir(settings.path, CLIP_SCORE_DEFAULT_ID)

    def image_embeds(self, images: Tensor) -> Tensor:
        """Unit image embeddings ``[B, D]`` float32 of ``[-1, 1]`` images on the reward's
        device, differentiable: ``[0, 1]``, bicubic antialiased resize to ``image_size``,
        the processor's mean and std."""
        x = (images.float().clamp(-1.0, 1.0) + 1.0) / 2.0
        s = self.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=True)
        x = (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
        dtype = next(self.model.vision_model.parameters()).dtype
        out = self.model.get_image_features(pixel_values=x.to(dtype))
        return F.normalize(_as_tensor(out).float(), dim=-1)

    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """Unit text embeddings ``[B, D]`` float32 (no gradient; remembered per prompt)."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self._text))
        fresh: dict[str, Tensor] = {}
        if todo:
            # Outside inference mode: remembered embeddings must be usable in autograd later.
            with torch.inference_mode(False), torch.no_grad():
                tokens = self.tokenizer(
                    todo,
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                out = self.model.get_text_features(
                    input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
                )
                fresh = dict(zip(todo, F.normalize(_as_tensor(out).float(), dim=-1), strict=True))
            if len(self._text) + len(fresh) > _TEXT_CACHE_SIZE:
                self._text.clear()
            self._text.update(fresh)
        return torch.stack([fresh[p] if p in fresh else self._text[p] for p in prompts])

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)  # [B]
        return self._from_cosine(cos)

    def _from_cosine(self, cos: Tensor) -> Tensor:
        return 100.0 * cos.clamp(min=0.0)

    def _details(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "weights_sha256": self.weights_sha256,
            "image_size": self.image_size,
            "resize": "torch bicubic, antialiased",
            "score": "100 * max(cos(image, text), 0)",
        }


class ModelReward(ClipReward):
    """A CLIP-architecture preference model (PickScore, HPSv2 in transformers format):
    ``logit_scale.exp() * cos(image, text)``."""

    name = "model"
    version = "1"

    def _directory(self, settings: RewardSettings) -> Path:
        if settings.path is None:
            raise RewardError(
                "reward 'model' needs path: the directory of a CLIP-architecture preference "
                "model in transformers format (e.g. PickScore: `hf download "
                "yuvalkirstain/PickScore_v1 --local-dir DIR`), then set path: DIR"
            )
        directory = Path(settings.path).expanduser()
        if not (directory / "config.json").is_file():
            what = "does not exist" if not directory.exists() else "has no config.json"
            raise RewardError(
                f"reward model path {str(directory)!r} {what}: give the directory of a "
                "CLIP-architecture preference model saved by transformers (config.json, the "
                "weights, the tokenizer and preprocessor_config.json)"
            )
        return directory

    def _from_cosine(self, cos: Tensor) -> Tensor:
        return self.model.logit_scale.detach().float().exp() * cos

    def _details(self) -> dict[str, Any]:
        details = super()._details()
        details["score"] = "logit_scale.exp() * cos(image, text)"
        details["logit_scale"] = float(self.model.logit_scale.detach().float().exp())
        return details


def _as_tensor(out: Any) -> Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return out if isinstance(out, Tensor) else out.pooler_output


# ----------------------------------------------------------------------------------------------
# the MLLM judge


class MemoryJudgmentCache:
    """A :class:`~evaluators.sinks.JudgmentCache` in memory: the judge reward's answers for
    the run (no store). Rows go through canonical JSON as in the store, and the oldest are
    forgotten past ``max_rows``."""

    def __init__(self, max_rows: int = 65_536) -> None:
        self.max_rows = max_rows
        self._rows: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def upsert_judgments(self, rows: Sequence[JudgmentRow], *, replace: bool = True) -> int:
        """Store ``rows``; a stored key is replaced if ``replace``, else kept."""
        stored = []
        for row in rows:
            r: dict[str, Any] = {"raw": None, "error": None, "latency_s": None, **row}
            r["result"] = None if r["result"] is None else to_json(r["result"], "judgment result")
            stored.append(r)
        with self._lock:
            for r in stored:
                key = r["judgment_key"]
                if replace or key not in self._rows:
                    self._rows.pop(key, None)
                    self._rows[key] = r
            while len(self._rows) > self.max_rows:
                del self._rows[next(iter(self._rows))]
        return len(rows)

    def cached_judgments(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Stored judgments by key (``result`` decoded); keys not stored are absent."""
        with self._lock:
            rows = {k: dict(self._rows[k]) for k in keys if k in self._rows}
        decode_json(list(rows.values()), "result")
        return rows

    def judgments(
        self,
        *,
        judge: str | None = None,
        model: str | None = None,
        mode: JudgmentMode | None = None,
    ) -> list[dict[str, Any]]:
        """Stored judgments in time order, optionally of one judge / model / mode."""
        with self._lock:
            rows = [
                dict(r)
                for r in self._rows.values()
                if (judge is None or r["judge"] == judge)
                and (model is None or r["model"] == model)
                and (mode is None or r["mode"] == mode)
            ]
        rows.sort(key=lambda r: r["time"])
        return decode_json(rows, "result")


_USERINFO = re.compile(r"(?<=://)[^/\s@]+@")


class JudgeReward(Reward):
    """The MLLM judge's absolute rating: ``(prompt_adherence + visual_quality) / 2``, 1-10."""

    name = "judge"
    version = "1"
    differentiable = False

    def __init__(
        self,
        settings: RewardSettings,
        device: torch.device | str,
        *,
        store: JudgmentCache | None = None,
        env: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        """``store``: where answers are kept (default: a :class:`MemoryJudgmentCache`);
        ``env``: used instead of ``os.environ`` for ``HARNESS_JUDGE_*``; ``options``: the
        judge's (:func:`evaluators.mllm_judge.build_judge`)."""
        super().__init__(settings, device)
        env = os.environ if env is None else env
        self._api_key = env.get(ENV_API_KEY) or None
        store = MemoryJudgmentCache() if store is None else store
        try:
            if settings.path is not None:
                local = dict(options, device=str(self.device))
                self.judge = build_local_judge(settings.path, store, **local)
            else:
                self.judge = build_openai_judge(store, env=env, **options)
        except BackendConfigError as err:
            raise RewardError(f"reward judge cannot start: {self._scrub(str(err))}") from None
        backend = self.judge.backend
        base_url = getattr(backend, "base_url", None)
        self._host = _host(base_url) if base_url else None

    def _scrub(self, text: str) -> str:
        """``text`` without credentials: URL user info and the API key."""
        return redact(_USERINFO.sub("", text), self._api_key)

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]
        with tempfile.TemporaryDirectory(prefix="harness-judge-reward-") as tmp:
            items = []
            for i, (image, prompt) in enumerate(zip(pixels, prompts, strict=True)):
                path = Path(tmp) / f"{i:06d}.png"
                Image.fromarray(image).save(path)
                items.append(ImageItem(prompt, path))
            try:
                scores = self.judge.absolute_scores(items)
            except BackendConfigError as err:
                raise RewardError(f"reward judge failed: {self._scrub(str(err))}") from None
        failed = [s for s in scores if s.prompt_adherence is None or s.visual_quality is None]
        if failed:
            first = self._scrub(str(failed[0].error))
            raise RewardError(
                f"the judge gave no usable rating for {len(failed)} of {len(scores)} images "
                f"(first: {first}); a reward is never skipped: check the judge server "
                "(HARNESS_JUDGE_BASE_URL, HARNESS_JUDGE_MODEL) and its logs, or use another reward"
            )
        values = [
            (s.prompt_adherence + s.visual_quality) / 2.0  # type: ignore[operator]  # checked
            for s in scores
        ]
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def _details(self) -> dict[str, Any]:
        backend = self.judge.backend
        details = {
            "judge": backend.name,
            "model": backend.model,
            "rubric_version": self.judge.rubric_version,
            "rater_id": self.judge.rater_id,
            "score": "(prompt_adherence + visual_quality) / 2, each 1-10",
        }
        if self._host is not None:
            details["host"] = self._host
        return details


def _host(url: str) -> str:
    """``host[:port]`` of ``url``: no scheme, user info, path or query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{host}:{port}" if port is not None else host


# ----------------------------------------------------------------------------------------------
# the registry

REWARDS: dict[str, Callable[[RewardSettings, torch.device], Reward]] = {
    "attribute": AttributeReward,
    "realism": RealismReward,
    "clip": ClipReward,
    "model": ModelReward,
    "judge": JudgeReward,
}
"""``reward.name`` -> the reward's constructor ``(settings, device)``."""


def build_reward(settings: RewardSettings, device: torch.device | str) -> Reward:
    """The reward ``settings`` name, on ``device`` (its networks are loaded there)."""
    if settings.name not in REWARDS:
        raise RewardError(
            f"unknown reward {settings.name!r}; allowed: {', '.join(sorted(REWARDS))}"
        )
    return REWARDS[settings.name](settings, torch.device(device))
