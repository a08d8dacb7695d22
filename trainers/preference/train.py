"""The preference-tuning trainer process: ``python -m trainers.preference --config C.json
--run-dir DIR``.

The post-training seam (``trainers/post.py``): the flow trainer's run directory, resume,
SIGTERM, EMA, evaluation, samples and export, starting from a finished model (``init``), with

- the method (``trainers/preference/methods.py``): ``refl``, ``grpo`` or ``dpo``; it owns the
  step and what it keeps between steps (a GRPO rollout, DPO's pairs);
- what trains: LoRA adapters (peft, ``lora.rank > 0``) or every backbone weight; the text
  encoder stays frozen; a frozen copy of the starting denoiser is the reference (GRPO's KL,
  DPO's implicit reward);
- evaluation: the flow trainer's (embedded data: domain FID and attribute accuracy), the trained
  reward and the second reward (``trainers/preference/rewards.py``) on training prompts and on
  held-out prompts, each logged as ``reward/<name>/<train|heldout>``, and the drift of the
  domain metrics from the starting model, evaluated before the first step
  (``prior_drift/<metric>``): a trained reward that rises while the second reward, held-out
  prompts and domain FID get worse is reward hacking, and the run shows it;
- export: ``final/`` holds the merged model; a LoRA run also writes its adapter to
  ``final/lora/``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainers.config import ConfigError, DataConfig
from trainers.finetune.lora import add_lora
from trainers.post import PostTrainer, check_single_process, flow_view, resolve_init
from trainers.preference.config import PreferenceConfig, load_preference_config
from trainers.preference.methods import METHODS
from trainers.preference.rewards import Reward, build_reward
from trainers.rundir import RunDir
from trainers.train import Dist, FlowNet, main

# Offset of the preference prompts in the embedded data's index space: neither the sample grid
# (0..), the periodic evaluation (100_000..) nor the arena (200_000..).
_PROMPT_INDEX_OFFSET = 300_000


def preference_prompts(
    settings: Any, data: DataConfig, *, file: str | None = None
) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts), distinct within each list.

    Embedded data: captions of the training split (compositions the model was trained on) and
    of the held-out split (compositions it never saw), in a fixed order. ``file``: one prompt
    per line; its last ``settings.heldout`` lines are held out, the first ``settings.train`` of
    the rest are trained on.
    """
    if file is not None:
        path = Path(file).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"prompts.file {file} does not exist; give a text file, one prompt a line"
            )
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ConfigError(f"prompts.file {file} is not UTF-8 text ({err})") from None
        texts = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
        if len(texts) < settings.heldout + 1:
            raise ConfigError(
                f"prompts.file {file} has {len(texts)} distinct prompts; it needs more than "
                f"prompts.heldout ({settings.heldout}) so that some are left to train on"
            )
        return texts[: -settings.heldout][: settings.train], texts[-settings.heldout :]
    if data.kind != "shapes":
        raise ConfigError(
            "preference tuning on a folder of images needs its prompts: give prompts.file "
            "(one prompt a line)"
        )
    from trainers.data.shapes import sample_attrs

    def distinct(split: str, n: int) -> list[str]:
        out: dict[str, None] = {}
        i = 0
        while len(out) < n and i < 100 * n + 1000:
            out[sample_attrs(data.seed, split, _PROMPT_INDEX_OFFSET + i).caption] = None  # type: ignore[arg-type]
            i += 1
        return list(out)

    return distinct("train", settings.train), distinct("heldout", settings.heldout)


class PreferenceTrainer(PostTrainer):
    def __init__(self, cfg: PreferenceConfig, run: RunDir, dist_: Dist):
        check_single_process(dist_, "preference tuning")
        self.pcfg = cfg
        self.method = METHODS[cfg.method](cfg)
        self.init = resolve_init(cfg.init, cfg.data)
        view = flow_view(
            self.init,
            seed=cfg.seed,
            train=cfg.train,
            eval=cfg.eval,
            sample=cfg.sample,
            data=cfg.data,
        )
        self.train_prompts, self.heldout_prompts = preference_prompts(
            cfg.prompts, view.data, file=cfg.prompts.file
        )
        super().__init__(view, run, dist_)
        # Rewards are built after the model (their weights do not touch the global RNG stream
        # that initialised LoRA) and before training, so a bad reward fails at once.
        self.reward: Reward = build_reward(cfg.reward, self.device)
        self.second_reward: Reward = build_reward(cfg.second_reward, self.device)
        self.method.check(self)
        self.method.prepare(self)

    # -- the model ------------------------------------------------------------------------
    def build_net(self) -> FlowNet:
        exported = self.load_init()
        denoiser = exported.denoiser
        # The reference: the starting denoiser, frozen (a copy; LoRA's disabled adapters would
        # spare the memory, a copy works for full fine-tuning too).
        self.reference = copy.deepcopy(denoiser).requires_grad_(False).eval()
        if self.pcfg.lora.rank > 0:
            add_lora(denoiser.transformer, self.pcfg.lora)
        return FlowNet(denoiser, exported.text_encoder)

    def adapter_info(self) -> dict[str, Any]:
        return self.preference_info()

    def preference_info(self) -> dict[str, Any]:
        """What the export records of how it was tuned (``harness.json``'s ``preference``)."""
        return {
            "method": self.pcfg.method,
            "reward": self.reward.provenance(),
            "settings": self.pcfg.to_dict()[self.pcfg.method],
        }

    def export_info(self) -> dict[str, Any]:
        return super().export_info() | {"preference": self.preference_info()}

    def sample_meta(self) -> dict[str, Any]:
        return {"method": self.pcfg.method}

    # -- one step -------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float]:
        return self.method.train_step(self)

    def state(self) -> dict[str, Any]:
        return super().state() | {"method": self.method.state()}

    def load_extra_state(self, ckpt: dict[str, Any]) -> None:
        self.method.load_state(ckpt.get("method") or {})

    def text(self, prompts: Sequence[str]) -> Any:
        """The frozen text encoder's embeddings of ``prompts``."""
        with torch.no_grad():
            return self.net.text_encoder(list(prompts))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model samples -> images in [-1, 1] scale; differentiable (the VAE decodes latents with
        gradients, so that ReFL's reward reaches the model in latent space too)."""
        return self.data.vae.decode_differentiable(x) if self.data.latent else x

    # -- evaluation -----------------------------------------------------------------------
    def evaluate_start(self) -> bool:
        return True  # the starting model's rewards and domain metrics: the "before"

    def start_evaluated(self) -> bool:
        return f"reward/{self.reward.name}/heldout" in self.step0_values()

    def evaluate(self) -> dict[str, float]:
        values = super().evaluate()
        if not self.dist.main:
            return values
        e = self.cfg.eval
        generate = self._generator_fn(self.ema_model(), e.solver, e.steps, e.guidance)
        extra = self.reward_metrics(generate)
        extra |= self.drift(values)
        self.run.log_metrics(self.step, extra)
        return values | extra

    @torch.no_grad()
    def reward_metrics(self, generate: Any) -> dict[str, float]:
        """``reward/<name>/<split>``: the mean of each reward (trained and second) over the
        images of the first ``prompts.heldout`` training prompts and of the held-out prompts,
        at every seed of ``prompts.seeds``."""
        seeds = self.pcfg.prompts.seeds
        n = len(self.heldout_prompts)
        out: dict[str, float] = {}
        for split, prompts in (
            ("train", self.train_prompts[:n]),
            ("heldout", self.heldout_prompts),
        ):
            items = [(p, s) for p in prompts for s in seeds]
            images = generate([p for p, _ in items], [s for _, s in items]).to(self.device)
            for reward in (self.reward, self.second_reward):
                values = torch.cat(
                    [
                        reward(images[i : i + 64], [p for p, _ in items[i : i + 64]]).float()
                        for i in range(0, len(items), 64)
                    ]
                )
                out[f"reward/{reward.name}/{split}"] = float(values.mean())
        return out


def run(argv: Sequence[str] | None = None) -> int:
    return main(
        argv,
        prog="python -m trainers.preference",
        description="Tune a finished model to a reward or to preference pairs (ReFL, Flow-GRPO "
        "or Diffusion-DPO; full or LoRA) and write the tuned run directory.",
        load=load_preference_config,
        make_trainer=PreferenceTrainer,
    )
