"""The fine-tuning trainer's config (``python -m trainers.finetune``).

Public parameter paths a study sweeps: ``method``, ``lora.rank``, ``lora.alpha``,
``lora.dropout``, ``prior.weight``, ``train.steps``, ``train.lr``, the data selection under
``subset.*`` and the subject under ``dreambooth.*``. The architecture, text encoder, timesteps
and shift are the starting model's (``init``), read from its run's ``config.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import Field, model_validator

from trainers.config import (
    DataConfig,
    EvalConfig,
    LogConfig,
    SampleConfig,
    Strict,
    TrainConfig,
    config_hash,
    load_config,
    parse_config,
)

Method = Literal["ct", "sft", "dreambooth"]
"""The values of ``method``: the names in ``trainers.finetune.methods.METHODS`` (a test
checks)."""
METHODS: tuple[str, ...] = get_args(Method)


class LoraSettings(Strict):
    """LoRA (Hu et al. 2021) through peft on the backbone's attention projections; rank 0 is
    full fine-tuning of every backbone weight."""

    rank: int = Field(0, ge=0)
    """r: the adapters' rank; 0: no adapter, every backbone weight trains."""
    alpha: float | None = Field(None, gt=0.0)
    """lora_alpha: the update is scaled by alpha / r; null: alpha = r (scale 1)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None
    """Module names to adapt; null: to_q, to_k, to_v, to_out.0 (every backbone has them)."""


class SubsetSettings(Strict):
    """Which training images to fine-tune on (``ct`` / ``sft``); all of them when empty."""

    where: dict[str, list[str]] = Field(default_factory=dict)
    """Embedded data: keep images whose attributes take one of these values, e.g.
    ``{background: [white]}`` (a domain shift) or ``{shape: [circle], size: [large]}``."""
    captions_containing: list[str] = Field(default_factory=list)
    """Any data: keep images whose caption contains every one of these words."""
    size: int | None = Field(None, ge=1)
    """At most this many images (the first of the selection, in data order)."""

    @property
    def empty(self) -> bool:
        return not self.where and not self.captions_containing and self.size is None


class DreamboothSettings(Strict):
    """DreamBooth (Ruiz et al. 2023): a new subject from a few instance images, named by a rare
    identifier token in the caption template of the base data."""

    subject: str = "star"
    """A name in ``trainers.data.subject.SUBJECTS``: a shape class the base never saw."""
    token: str = Field("sks", pattern=r"^[a-z0-9]+$")
    """The identifier that names the subject in prompts (one lower-case word)."""
    instances: int = Field(4, ge=1, le=16)
    """Instance images of the subject (the paper uses 3-5)."""
    instance_seed: int = 0
    """Seed of the instance images' contexts (which colour, size, position, background)."""
    eval_prompts: int = Field(32, ge=1)
    """Subject prompts (new contexts) evaluated for subject and prompt fidelity."""
    eval_seeds: list[int] = Field(default_factory=lambda: [0, 1])


class PriorSettings(Strict):
    """Prior preservation: class images the starting model generates for ordinary captions,
    trained on alongside the instances with weight lambda."""

    weight: float = Field(1.0, ge=0.0)
    """lambda of ``loss = L_instance + lambda * L_prior``; 0 turns prior preservation off."""
    images: int = Field(64, ge=1)
    """Class images generated once (cached in the run directory)."""
    steps: int = Field(25, ge=1)
    """Euler steps of the starting model for the class images."""
    guidance: float = Field(3.0, ge=0.0)


class FinetuneConfig(Strict):
    trainer: Literal["finetune"] = "finetune"
    seed: int = 0
    init: str
    """A finished run directory (its ``final/`` is loaded) or an export directory (with
    ``harness.json``): the model to fine-tune."""
    method: Method = "sft"
    data: DataConfig | None = None
    """The data to fine-tune on; null: the starting run's (``ct`` usually names new data)."""
    subset: SubsetSettings = SubsetSettings()
    lora: LoraSettings = LoraSettings()
    dreambooth: DreamboothSettings = DreamboothSettings()
    prior: PriorSettings = PriorSettings()
    cfg_dropout: float | None = Field(None, ge=0.0, le=1.0)
    """Caption dropout while fine-tuning; null: the starting run's."""
    train: TrainConfig = TrainConfig(steps=200, batch_size=16, lr=1e-4, warmup_steps=0)
    eval: EvalConfig = EvalConfig(every=200, num_images=128, loss_images=0)
    sample: SampleConfig = SampleConfig()
    log: LogConfig = LogConfig()
    """Metric trackers besides metrics.jsonl (``trainers/trackers.py``); not in the hash."""

    @model_validator(mode="after")
    def _method_fields(self) -> FinetuneConfig:
        if self.method == "sft" and self.subset.empty:
            raise ValueError(
                "method sft fine-tunes on a curated subset: give subset.where, "
                "subset.captions_containing or subset.size (method ct trains on all the data)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        if self.method != "dreambooth":  # only the chosen method's settings are its identity
            data.pop("dreambooth")
            data.pop("prior")
        return data

    def hash(self) -> str:
        return config_hash(self.to_dict())


def parse_finetune_config(data: dict[str, Any], source: str = "<dict>") -> FinetuneConfig:
    return parse_config(data, source, FinetuneConfig)


def load_finetune_config(path: str | Path) -> FinetuneConfig:
    return load_config(path, parse_finetune_config)
