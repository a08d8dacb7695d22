"""The distillation trainer's config (``python -m trainers.distill``).

The public parameter paths studies sweep are ``distill.method`` and ``distill.steps`` (the
student's sampling steps), plus each method's own settings under ``distill.<method>.*``. The
student's architecture, data, text encoder and shift are the teacher's: they are read from the
teacher run's ``config.json`` (``data`` may be given when the teacher is a bare export).
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

Method = Literal["progressive", "consistency", "reflow", "dmd", "add"]
"""The values of ``distill.method``: the names in ``trainers.distill.methods`` (a test checks)."""
METHODS: tuple[str, ...] = get_args(Method)


class ProgressiveSettings(Strict):
    """Progressive distillation (Salimans & Ho 2022): rounds that halve the step count."""

    teacher_steps: int = Field(8, ge=2)
    """The first round's teacher: guided Euler with this many steps. Each round halves it until
    ``distill.steps``, so it must be ``distill.steps`` times a power of two."""


class ConsistencySettings(Strict):
    """Latent consistency distillation (Song et al. 2023; Luo et al. 2023, LCM)."""

    grid: int = Field(32, ge=2)
    """N: the teacher solver's discretisation of [0, 1] (shifted like sampling)."""
    skip: int = Field(4, ge=1)
    """k: LCM's skipping step; the teacher solves from t_{n+k} to t_n in one guided Euler step."""
    target_ema: float = Field(0.95, ge=0.0, lt=1.0)
    """mu: decay of the EMA target network theta^- (LCM: 0.95)."""
    huber_c: float | None = Field(None, gt=0.0)
    """Pseudo-Huber c; null: 0.00054 * sqrt(d) (Song & Dhariwal 2023), d = values per image."""


class ReflowSettings(Strict):
    """Reflow (Liu et al. 2023, InstaFlow): straighten on teacher pairs, then distil."""

    pairs: int = Field(2048, ge=1)
    """(noise, teacher image) pairs generated once by the teacher's guided ODE (cached)."""
    pair_steps: int = Field(25, ge=1)
    """Teacher Euler steps per pair."""
    distill_fraction: float = Field(0.5, ge=0.0, lt=1.0)
    """When ``distill.steps`` is 1: the share of ``train.steps`` spent, after reflow, on
    distilling the straightened model to one step (InstaFlow's second stage). 0: reflow only."""


class DmdSettings(Strict):
    """Distribution matching distillation (Yin et al. 2024, DMD; DMD2)."""

    fake_lr: float | None = Field(None, gt=0.0)
    """Learning rate of the fake-score network; null: ``train.lr``."""
    fake_updates: int = Field(2, ge=1)
    """Fake-score updates per student update (DMD2's two time-scale rule uses 5)."""
    regression_weight: float = Field(0.25, ge=0.0)
    """lambda_reg of DMD's regression loss on teacher (noise, image) pairs (DMD: 0.25)."""
    pairs: int = Field(512, ge=1)
    """Teacher pairs for the regression loss (generated once, cached)."""
    pair_steps: int = Field(25, ge=1)


class AddSettings(Strict):
    """Adversarial diffusion distillation (Sauer et al. 2023)."""

    distill_weight: float = Field(2.5, ge=0.0)
    """lambda of ``L = L_adv + lambda * L_distill`` (ADD: 2.5)."""
    disc_lr: float | None = Field(None, gt=0.0)
    """Learning rate of the discriminator heads; null: ``train.lr``."""
    r1_weight: float = Field(1e-5, ge=0.0)
    """R1 gradient penalty on real images (ADD: 1e-5)."""
    encoder: str = "shapes-ssl"
    """Frozen feature network of the discriminator: a name in ``trainers.repa.ENCODERS`` or a
    local ViT (DINOv2, as ADD) directory; the same loading code as REPA's encoder."""


class DistillSettings(Strict):
    method: Method = "progressive"
    steps: int = Field(4, ge=1)
    """The student's sampling steps (NFE; the student samples without classifier-free guidance:
    the teacher's guidance is distilled into it)."""
    guidance: float = Field(1.5, ge=0.0)
    """The teacher's classifier-free guidance scale whose guided output the student learns."""
    progressive: ProgressiveSettings = ProgressiveSettings()
    consistency: ConsistencySettings = ConsistencySettings()
    reflow: ReflowSettings = ReflowSettings()
    dmd: DmdSettings = DmdSettings()
    add: AddSettings = AddSettings()

    @model_validator(mode="after")
    def _progressive_rounds(self) -> DistillSettings:
        if self.method == "progressive":
            t, s = self.progressive.teacher_steps, self.steps
            if t <= s or t % s or (t // s) & (t // s - 1):
                raise ValueError(
                    f"distill.progressive.teacher_steps ({t}) must be distill.steps ({s}) times a "
                    f"power of two >= 2, e.g. {s * 2}, {s * 4} or {s * 8}"
                )
        return self

    def settings(self) -> Strict:
        """The chosen method's own settings."""
        return getattr(self, self.method)


class DistillConfig(Strict):
    trainer: Literal["distill"] = "distill"
    seed: int = 0
    teacher: str
    """A finished flow run directory (its ``final/`` is loaded, its ``config.json`` gives the
    data) or an exported model directory (``final/``, with ``harness.json``)."""
    data: DataConfig | None = None
    """The training data; null: the teacher run's. Needed when the teacher is a bare export."""
    distill: DistillSettings = DistillSettings()
    train: TrainConfig = TrainConfig(steps=400, batch_size=32, lr=1e-4, warmup_steps=0)
    eval: EvalConfig = EvalConfig(every=400, num_images=128, loss_images=0)
    sample: SampleConfig = SampleConfig()
    log: LogConfig = LogConfig()
    """Metric trackers besides metrics.jsonl (``trainers/trackers.py``); not in the hash."""

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        # Only the chosen method's settings are part of the config's identity.
        data["distill"] = {
            k: v
            for k, v in data["distill"].items()
            if k in ("method", "steps", "guidance", self.distill.method)
        }
        return data

    def hash(self) -> str:
        return config_hash(self.to_dict())


def parse_distill_config(data: dict[str, Any], source: str = "<dict>") -> DistillConfig:
    return parse_config(data, source, DistillConfig)


def load_distill_config(path: str | Path) -> DistillConfig:
    return load_config(path, parse_distill_config)
