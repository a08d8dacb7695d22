"""Rewards for preference tuning that use this floor's models: CLIP score, a CLIP-architecture
preference model from a local path, and the MLLM judge's absolute rating.

They implement :class:`trainers.preference.rewards.Reward` (the contract: images ``[B, 3, H,
W]`` in ``[-1, 1]`` and their prompts -> ``[B]``, higher is better) and reach the preference
trainer as entry points of the group ``harness.rewards`` (``pyproject.toml``), so the trainers
never import this package.

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

import os
import re
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from evaluators.extractors import (
    CLIP_SCORE_DEFAULT_ID,
    _clip_weights_sha256,
    load_clip,
    resolve_clip_dir,
)
from evaluators.mllm_backends import ENV_API_KEY, BackendConfigError, redact
from evaluators.mllm_judge import ImageItem, build_local_judge, build_openai_judge
from evaluators.sinks import JudgmentCache, JudgmentMode, JudgmentRow, decode_json, to_json
from trainers.data.shapes import to_uint8
from trainers.preference.rewards import Reward, RewardError, RewardSettings

__all__ = ["ClipReward", "JudgeReward", "MemoryJudgmentCache", "ModelReward"]

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
