"""The preference-tuning trainer's config (``python -m trainers.preference``).

Public parameter paths a study sweeps: ``method``, ``reward.name``, ``lora.rank``,
``train.steps``, ``train.lr``, and each method's own settings: ``refl.weight``,
``refl.stop_min``, ``grpo.noise_level`` (the SDE's a), ``grpo.group_size``, ``grpo.kl_weight``,
``grpo.clip_range``, ``dpo.beta``, ``dpo.pairs``. The architecture, text encoder, timesteps and
shift are the starting model's (``init``).
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
from trainers.finetune.config import LoraSettings

RewardName = Literal["attribute", "realism", "clip", "model", "judge"]
"""The names in :data:`REWARDS` (a test checks they agree)."""
REWARD_NAMES: tuple[str, ...] = get_args(RewardName)
NON_DIFFERENTIABLE: frozenset[str] = frozenset({"judge"})
"""Rewards ReFL cannot back-propagate (a test checks each reward's ``differentiable``)."""


class RewardSettings(Strict):
    """One reward of a preference-tuning config (``reward``, ``second_reward``)."""

    name: RewardName = "attribute"
    """The reward's name in :data:`REWARDS`."""
    path: str | None = None
    """``clip``: the CLIP model directory (null: ``$HARNESS_CLIP_PATH``, else the default id in
    the Hugging Face cache); ``model``: the reward model's directory (required); ``judge``: a
    local vision-language model directory instead of the ``HARNESS_JUDGE_*`` server. The
    ``attribute`` and ``realism`` rewards take none."""
    scale: float = Field(1.0, allow_inf_nan=False)
    """The reward is multiplied by this (to mix or weight rewards on different scales)."""


Method = Literal["refl", "grpo", "dpo"]
"""The values of ``method``: the names in ``trainers.preference.methods.METHODS`` (a test
checks)."""
METHODS: tuple[str, ...] = get_args(Method)


class PromptSettings(Strict):
    """The prompts preference tuning trains on and the held-out prompts it is evaluated on.

    Embedded data: training prompts are captions of the training split's compositions, held-out
    prompts captions of compositions never trained on (the ``heldout`` split). A ``file`` (one
    prompt per line) gives both instead: its last ``heldout`` lines are held out."""

    train: int = Field(64, ge=1)
    """How many distinct training prompts (the embedded data's; or the file's first lines)."""
    heldout: int = Field(32, ge=1)
    """Held-out prompts: every reward is reported on them as well as on training prompts."""
    file: str | None = None
    seeds: list[int] = Field(default_factory=lambda: [0, 1])
    """Sampling seeds of the reward evaluation (the same for every run: paired)."""


class ReflSettings(Strict):
    """ReFL (ImageReward, Xu et al. 2023), adapted to flow matching: denoise without gradient
    from noise to a random stop step, predict x0 from the velocity there with gradient
    (``x0 = x_t - t v``) and back-propagate ``-reward(x0)``; mixed with the flow-matching loss on
    the data against over-optimisation."""

    weight: float = Field(1.0, gt=0.0)
    """lambda of ``loss = flow_weight * L_flow - lambda * mean(reward)``."""
    flow_weight: float = Field(1.0, ge=0.0)
    """The flow-matching loss on the training data (ImageReward's pre-training loss); 0: none."""
    steps: int = Field(8, ge=2)
    """Euler steps of the denoising rollout (its schedule is the model's shift)."""
    stop_min: int = Field(4, ge=0)
    """The stop step is drawn uniformly from [stop_min, steps - 1]: the late, nearly clean steps
    (ImageReward draws from the last quarter of 40)."""
    prompts_per_step: int = Field(8, ge=1)
    guidance: float | None = Field(None, ge=0.0)
    """Classifier-free guidance of the rollout; null: ``eval.guidance``."""

    @model_validator(mode="after")
    def _stop_in_range(self) -> ReflSettings:
        if self.stop_min >= self.steps:
            raise ValueError(f"refl.stop_min {self.stop_min} must be below refl.steps {self.steps}")
        return self


class GrpoSettings(Strict):
    """Flow-GRPO (Liu et al. 2025): the ODE sampler turned into an SDE with the same marginals
    (``sigma_t = a sqrt(t / (1 - t))``), G samples per prompt, group-normalised advantages, a
    clipped probability ratio and a KL penalty to the starting model."""

    noise_level: float = Field(0.7, gt=0.0)
    """a: the SDE's noise scale (Flow-GRPO's default 0.7)."""
    group_size: int = Field(4, ge=2)
    """G: samples per prompt; the advantage is the reward normalised within its group."""
    prompts_per_step: int = Field(2, ge=1)
    denoise_steps: int = Field(6, ge=2)
    """Denoising steps of the training rollouts (fewer than ``eval.steps``: Flow-GRPO's
    denoising reduction)."""
    clip_range: float = Field(0.2, gt=0.0)
    kl_weight: float = Field(0.04, ge=0.0)
    """beta: weight of the KL divergence to the starting model's transition."""
    updates_per_rollout: int = Field(1, ge=1)
    """Optimizer steps that reuse one rollout (the ratio moves off 1 from the second)."""
    guidance: float | None = Field(None, ge=0.0)
    """Classifier-free guidance of the rollouts; null: ``eval.guidance``."""


class DpoSettings(Strict):
    """Diffusion-DPO (Wallace et al. 2024) in its flow-matching form: a frozen reference, the
    same noise and t for winner and loser."""

    beta: float = Field(500.0, gt=0.0)
    pairs: Literal["arena", "online"] = "arena"
    """``arena``: the pairs file ``pairs_file``, written from the arena's votes by ``harness
    arena pairs`` (human, judge or domain verdicts; ties and both-bad left out and counted);
    ``online``: every step, G samples per prompt from the current model scored by ``reward``,
    the best against the worst."""
    pairs_file: str | None = None
    """Required for ``pairs: arena``: ``harness arena pairs --out FILE``'s file."""
    group_size: int = Field(4, ge=2)
    """Online pairs: samples per prompt."""
    prompts_per_step: int = Field(4, ge=1)
    """Online pairs: prompts per step (one pair each, unless its samples tie)."""

    @model_validator(mode="after")
    def _file_for_arena(self) -> DpoSettings:
        if self.pairs == "arena" and not self.pairs_file:
            raise ValueError(
                "dpo.pairs arena trains on the arena's votes: write them with `harness arena "
                "pairs --out FILE` and give dpo.pairs_file, or use dpo.pairs: online"
            )
        return self


class PreferenceConfig(Strict):
    trainer: Literal["preference"] = "preference"
    seed: int = 0
    init: str
    """A finished run directory (its ``final/`` is loaded) or an export directory: the model to
    tune, and the reference of GRPO's KL and DPO."""
    method: Method = "grpo"
    reward: RewardSettings = RewardSettings()
    """The reward trained on (ReFL needs a differentiable one; GRPO and online DPO any)."""
    second_reward: RewardSettings = RewardSettings(name="realism")
    """A reward not trained on, reported beside it: a trained reward that rises while this one
    and domain FID get worse is reward hacking."""
    data: DataConfig | None = None
    """ReFL's flow-matching data and the domain evaluation's; null: the starting run's."""
    prompts: PromptSettings = PromptSettings()
    lora: LoraSettings = LoraSettings(rank=8)
    refl: ReflSettings = ReflSettings()
    grpo: GrpoSettings = GrpoSettings()
    dpo: DpoSettings = DpoSettings(pairs="online")
    train: TrainConfig = TrainConfig(steps=100, batch_size=8, lr=1e-4, warmup_steps=0)
    eval: EvalConfig = EvalConfig(every=100, num_images=128, loss_images=0)
    sample: SampleConfig = SampleConfig()
    log: LogConfig = LogConfig()
    """Metric trackers besides metrics.jsonl (``trainers/trackers.py``); not in the hash."""

    @model_validator(mode="after")
    def _method_fields(self) -> PreferenceConfig:
        if self.second_reward == self.reward:
            raise ValueError(
                "second_reward must differ from reward: it is the reward not trained on"
            )
        if self.method == "refl" and self.reward.name in NON_DIFFERENTIABLE:
            raise ValueError(
                f"method refl back-propagates the reward, but reward {self.reward.name!r} is not "
                "differentiable; use method grpo (or dpo with pairs: online) for it, or a "
                "differentiable reward (attribute, realism, clip, model)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        for m in METHODS:  # only the chosen method's settings are its identity
            if m != self.method:
                data.pop(m)
        return data

    def hash(self) -> str:
        return config_hash(self.to_dict())


def parse_preference_config(data: dict[str, Any], source: str = "<dict>") -> PreferenceConfig:
    return parse_config(data, source, PreferenceConfig)


def load_preference_config(path: str | Path) -> PreferenceConfig:
    return load_config(path, parse_preference_config)
