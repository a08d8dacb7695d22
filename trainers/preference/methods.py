"""The preference-tuning methods: ``method`` -> one optimizer step.

- ``refl`` (ReFL, ImageReward: Xu et al. 2023, adapted to flow matching): denoise without
  gradient from noise to a stop step drawn from the late steps, predict x0 there with gradient
  (``x0 = x_t - t v``), back-propagate ``-lambda * reward(x0)``, plus the flow-matching loss on
  the training data (ImageReward's pre-training loss, against over-optimisation). Needs a
  differentiable reward.
- ``grpo`` (Flow-GRPO: Liu et al. 2025): rollouts of the SDE with the ODE's marginals
  (``trainers/preference/grpo.py``), G per prompt, with fewer denoising steps than evaluation;
  group-normalised advantages of the reward; the clipped ratio objective over every transition
  with a KL penalty to the starting model's transition.
- ``dpo`` (Diffusion-DPO: Wallace et al. 2024, flow-matching form; ``dpo.py``): pairs from the
  arena's votes (the file ``harness arena pairs`` writes; read once and cached in the run
  directory, so a resume trains on the same pairs) or online, the best and worst of G samples
  of the current model scored by the reward.

Every random draw of step k comes from :func:`trainers.train.purpose_generator` streams seeded by
(seed, k) (and, for GRPO, the rollout's step), so a resumed run equals an uninterrupted one; a
GRPO rollout reused over ``updates_per_rollout`` steps is part of the checkpoint.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from trainers.config import ConfigError
from trainers.preference.config import PreferenceConfig
from trainers.preference.dpo import dpo_step_loss
from trainers.preference.grpo import (
    gaussian_kl,
    group_advantages,
    grpo_loss,
    rollout,
    sde_step,
    step_log_prob,
)
from trainers.preference.pairs import PairsError, PreferencePairs, online_pairs
from trainers.sampling import guided_velocity, initial_noise
from trainers.timesteps import sample_timesteps, sampling_schedule
from trainers.train import BatchOrder, purpose_generator, step_generators

if TYPE_CHECKING:
    from trainers.preference.train import PreferenceTrainer

__all__ = ["METHODS", "PreferenceMethod", "refl_reward"]


class PreferenceMethod:
    """A method's hooks into :class:`trainers.preference.train.PreferenceTrainer`.

    - :meth:`check` (after the rewards are built): refuse a configuration that cannot work;
    - :meth:`prepare` (after the model is built, before a resume loads weights): one-off work;
    - :meth:`train_step`: one optimizer step through ``trainer.optimizer_step``; returns (loss,
      grad norm) and adds its metrics with ``trainer.window``;
    - :meth:`state` / :meth:`load_state`: what it keeps between steps, for the checkpoint.
    """

    name: ClassVar[str]

    def __init__(self, cfg: PreferenceConfig):
        self.cfg = cfg

    def check(self, trainer: PreferenceTrainer) -> None:
        """Refuse what cannot work (default: nothing)."""

    def prepare(self, trainer: PreferenceTrainer) -> None:
        """One-off work before training (default: none)."""

    def train_step(self, trainer: PreferenceTrainer) -> tuple[float, float]:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` (default: nothing)."""

    # -- shared ---------------------------------------------------------------------------
    def draw_prompts(self, trainer: PreferenceTrainer, n: int, gen: torch.Generator) -> list[str]:
        """``n`` training prompts drawn with replacement from ``gen``."""
        idx = torch.randint(len(trainer.train_prompts), (n,), generator=gen)
        return [trainer.train_prompts[i] for i in idx.tolist()]


def _velocity(denoiser: Any, text: Any, uncond: Any, guidance: float):
    """``velocity(x, t) -> v`` of ``denoiser`` with classifier-free guidance (grad allowed)."""

    def velocity(x: Tensor, t: float) -> Tensor:
        tt = torch.full((x.shape[0],), float(t), device=x.device)
        return guided_velocity(denoiser, x, tt, text, uncond, guidance)

    return velocity


# ----------------------------------------------------------------------------------------------
# ReFL


def refl_reward(
    velocity: Any,
    noise: Tensor,
    ts: list[float],
    stop: int,
    reward: Any,
) -> Tensor:
    """ReFL's reward of one batch: Euler steps without gradient from ``noise`` (t = ``ts[0]``)
    to ``ts[stop]``, then the velocity there with gradient and the clean-image estimate
    ``x0 = x_t - t v`` scored by ``reward(x0) -> [B]``. Gradients reach the model through that
    last velocity only (ImageReward's ReFL)."""
    x = noise
    with torch.no_grad():  # ReFL: no gradient through the early steps
        for t, t_next in itertools.pairwise(ts[: stop + 1]):
            x = x + (t_next - t) * velocity(x, t)
    x0 = x - ts[stop] * velocity(x, ts[stop]).float()  # the clean-image estimate at the stop
    return reward(x0)


class Refl(PreferenceMethod):
    name = "refl"

    def check(self, trainer: PreferenceTrainer) -> None:
        if not trainer.reward.differentiable:
            raise ConfigError(
                f"method refl back-propagates the reward, but reward {trainer.reward.name!r} is "
                "not differentiable; use method grpo (or dpo with pairs: online) for it, or a "
                "differentiable reward (attribute, realism, clip, model)"
            )

    def train_step(self, trainer: PreferenceTrainer) -> tuple[float, float]:
        s = self.cfg.refl
        gen = purpose_generator(trainer.cfg.seed, trainer.step, 0, "refl")
        prompts = self.draw_prompts(trainer, s.prompts_per_step, gen)
        stop = int(torch.randint(s.stop_min, s.steps, (1,), generator=gen))
        noise = torch.randn((len(prompts), *trainer.data.sample_shape), generator=gen)
        guidance = trainer.cfg.eval.guidance if s.guidance is None else s.guidance
        denoiser = trainer.net.denoiser
        velocity = _velocity(denoiser, trainer.text(prompts), trainer.text([""]), guidance)
        ts = sampling_schedule(s.steps, trainer.shift).tolist()
        with trainer.autocast():
            reward = refl_reward(
                velocity,
                noise.to(trainer.device),
                ts,
                stop,
                lambda x0: trainer.reward(trainer.decode(x0), prompts),
            )
        loss = -s.weight * reward.mean()
        flow_value = 0.0
        if s.flow_weight > 0:
            with trainer.autocast():
                flow = trainer.flow_loss()[0].loss
            flow_value = float(flow.detach())
            loss = loss + s.flow_weight * flow
        trainer.check_finite(loss)
        grad_norm = trainer.optimizer_step(loss)
        trainer.window("train/reward", float(reward.detach().mean()))
        trainer.window("train/flow_loss", flow_value)
        trainer.window("train/refl_stop_t", ts[stop])
        return float(loss.detach()), grad_norm


# ----------------------------------------------------------------------------------------------
# Flow-GRPO


class Grpo(PreferenceMethod):
    name = "grpo"

    def __init__(self, cfg: PreferenceConfig):
        super().__init__(cfg)
        self.batch: dict[str, Any] | None = None  # the rollout the next updates train on

    def state(self) -> dict[str, Any]:
        return {"batch": self.batch}

    def load_state(self, state: dict[str, Any]) -> None:
        self.batch = state.get("batch")

    def _guidance(self, trainer: PreferenceTrainer) -> float:
        g = self.cfg.grpo.guidance
        return trainer.cfg.eval.guidance if g is None else g

    @torch.no_grad()
    def new_rollout(self, trainer: PreferenceTrainer) -> dict[str, Any]:
        """G SDE rollouts for each of ``prompts_per_step`` prompts with the current model, their
        rewards and group-normalised advantages."""
        s = self.cfg.grpo
        gen = purpose_generator(trainer.cfg.seed, trainer.step, 0, "grpo")
        prompts = [
            p
            for p in self.draw_prompts(trainer, s.prompts_per_step, gen)
            for _ in range(s.group_size)
        ]
        noise = torch.randn((len(prompts), *trainer.data.sample_shape), generator=gen)
        schedule = sampling_schedule(s.denoise_steps, trainer.shift)
        denoiser = trainer.net.denoiser
        was_training = denoiser.training
        denoiser.eval()
        velocity = _velocity(
            denoiser, trainer.text(prompts), trainer.text([""]), self._guidance(trainer)
        )
        with trainer.autocast():
            out = rollout(velocity, noise.to(trainer.device), schedule, s.noise_level, gen)
        denoiser.train(was_training)
        rewards = trainer.reward(trainer.decode(out.xs[-1]), prompts).float().cpu()
        return {
            "prompts": prompts,
            "xs": out.xs.cpu(),
            "ts": out.ts.cpu(),
            "log_probs": out.log_probs.cpu(),
            "rewards": rewards,
            "advantages": group_advantages(rewards, s.group_size),
        }

    def train_step(self, trainer: PreferenceTrainer) -> tuple[float, float]:
        s = self.cfg.grpo
        if trainer.step % s.updates_per_rollout == 0 or self.batch is None:
            self.batch = self.new_rollout(trainer)
        b = self.batch
        dev = trainer.device
        prompts, ts = b["prompts"], b["ts"].tolist()
        text, uncond = trainer.text(prompts), trainer.text([""])
        guidance = self._guidance(trainer)
        policy = _velocity(trainer.net.denoiser, text, uncond, guidance)
        reference = _velocity(trainer.reference, text, uncond, guidance)
        adv = b["advantages"].to(dev)
        t_cap = ts[1]
        total: Tensor | None = None
        stats: dict[str, float] = {}
        # Every transition of the rollout, gradients summed (one optimizer step per update).
        for j in range(len(ts) - 1):
            x, x_next = b["xs"][j].to(dev), b["xs"][j + 1].to(dev)
            with trainer.autocast():
                v = policy(x, ts[j])
            step = sde_step(x, v.float(), ts[j], ts[j + 1], s.noise_level, t_cap, None)
            logp = step_log_prob(x_next, step.mean, step.std)
            kl = None
            if s.kl_weight > 0:
                with torch.no_grad(), trainer.autocast():
                    v_ref = reference(x, ts[j])
                ref = sde_step(x, v_ref.float(), ts[j], ts[j + 1], s.noise_level, t_cap, None)
                kl = gaussian_kl(step.mean, ref.mean, step.std)
            loss_j, st = grpo_loss(
                logp, b["log_probs"][j].to(dev), adv, s.clip_range, kl, s.kl_weight
            )
            total = loss_j if total is None else total + loss_j
            for k, val in st.items():
                stats[k] = stats.get(k, 0.0) + val / (len(ts) - 1)
        assert total is not None
        loss = total / (len(ts) - 1)
        trainer.check_finite(loss)
        grad_norm = trainer.optimizer_step(loss)
        trainer.window("train/reward", float(b["rewards"].mean()))
        trainer.window("train/reward_std", float(b["rewards"].std(unbiased=False)))
        for k in ("kl_mean", "clip_frac", "ratio_mean"):
            trainer.window(f"train/{k}", stats[k])
        return float(loss.detach()), grad_norm


# ----------------------------------------------------------------------------------------------
# Diffusion-DPO


class Dpo(PreferenceMethod):
    name = "dpo"

    def __init__(self, cfg: PreferenceConfig):
        super().__init__(cfg)
        self.pairs: PreferencePairs | None = None
        self.order: BatchOrder | None = None

    def prepare(self, trainer: PreferenceTrainer) -> None:
        if self.cfg.dpo.pairs != "arena":
            return
        cache = trainer.run.root / "preference" / "pairs.pt"
        if cache.is_file():  # read once: a resumed run trains on the pairs it started with
            self.pairs = PreferencePairs.load(cache)
        else:
            self.pairs = PreferencePairs.load(Path(self.cfg.dpo.pairs_file or ""))
            want = (3, trainer.cfg.data.resolution, trainer.cfg.data.resolution)
            if tuple(self.pairs.winners.shape[1:]) != want:
                raise PairsError(
                    f"{self.cfg.dpo.pairs_file} holds {tuple(self.pairs.winners.shape[1:])} "
                    f"images but the model makes {want}; export the pairs of contestants "
                    f"rendered at this resolution (`harness arena pairs --resolution "
                    f"{want[1]}`)"
                )
            cache.parent.mkdir(parents=True, exist_ok=True)
            self.pairs.save(cache)
            trainer.run.log_metrics(
                0, {f"pairs/{k}": float(v) for k, v in self.pairs.counts.items()}
            )
        self.order = BatchOrder(len(self.pairs), trainer.cfg.train.batch_size, trainer.cfg.seed + 1)

    def _arena_batch(self, trainer: PreferenceTrainer) -> tuple[list[str], Tensor, Tensor]:
        assert self.pairs is not None and self.order is not None
        idx = self.order.indices(trainer.step, 0, 1)
        prompts = [self.pairs.prompts[i] for i in idx.tolist()]
        return (
            prompts,
            self._x0(trainer, self.pairs.winners[idx]),
            self._x0(trainer, self.pairs.losers[idx]),
        )

    @staticmethod
    def _x0(trainer: PreferenceTrainer, images: Tensor) -> Tensor:
        x = images.float().div(127.5).sub(1.0).to(trainer.device)
        return trainer.data.vae.encode(x) if trainer.data.latent else x

    @torch.no_grad()
    def _online_batch(self, trainer: PreferenceTrainer) -> tuple[list[str], Tensor, Tensor]:
        """The best and worst of G samples of the current model per prompt (by the reward)."""
        d, e = self.cfg.dpo, trainer.cfg.eval
        gen = purpose_generator(trainer.cfg.seed, trainer.step, 0, "dpo-online")
        prompts = self.draw_prompts(trainer, d.prompts_per_step, gen)
        group = [p for p in prompts for _ in range(d.group_size)]
        seeds = torch.randint(0, 2**31 - 1, (len(group),), generator=gen).tolist()
        denoiser = trainer.net.denoiser
        was_training = denoiser.training
        denoiser.eval()
        velocity = _velocity(denoiser, trainer.text(group), trainer.text([""]), e.guidance)
        x = initial_noise(seeds, trainer.data.sample_shape).to(trainer.device)
        for t, t_next in itertools.pairwise(sampling_schedule(e.steps, trainer.shift).tolist()):
            x = x + (t_next - t) * velocity(x, t)
        denoiser.train(was_training)
        rewards = trainer.reward(trainer.decode(x).clamp(-1, 1), group).float().cpu()
        kept, winners, losers, margin = online_pairs(prompts, x.cpu(), rewards, d.group_size)
        trainer.window("train/reward", float(rewards.mean()))
        trainer.window("train/pair_margin", float(margin.mean()) if len(kept) else 0.0)
        return kept, winners.to(trainer.device), losers.to(trainer.device)

    def train_step(self, trainer: PreferenceTrainer) -> tuple[float, float]:
        if self.cfg.dpo.pairs == "arena":
            prompts, x_w, x_l = self._arena_batch(trainer)
        else:
            prompts, x_w, x_l = self._online_batch(trainer)
        if not prompts:  # every group tied: nothing to prefer this step
            trainer.window("train/dpo_pairs", 0.0)
            return 0.0, trainer.optimizer_step(_zero_loss(trainer))
        gens = step_generators(trainer.cfg.seed, trainer.step, 0)
        n = len(prompts)
        t = sample_timesteps(trainer.cfg.timesteps, n, trainer.shift, gens.timesteps)
        eps = torch.randn(x_w.shape, generator=gens.noise).to(trainer.device)
        text2 = trainer.text(prompts + prompts)
        with trainer.autocast():
            out = dpo_step_loss(
                lambda x, tt: trainer.net.denoiser(x, tt, text2),
                lambda x, tt: trainer.reference(x, tt, text2),
                x_w,
                x_l,
                eps,
                t.to(trainer.device),
                self.cfg.dpo.beta,
            )
        trainer.check_finite(out.loss)
        grad_norm = trainer.optimizer_step(out.loss)
        trainer.window("train/dpo_implicit_acc", out.implicit_acc)
        trainer.window("train/dpo_margin", out.reward_margin)
        trainer.window("train/dpo_pairs", float(n))
        return float(out.loss.detach()), grad_norm


def _zero_loss(trainer: PreferenceTrainer) -> Tensor:
    """A loss of 0 that touches every trained parameter (a step with nothing to learn still
    counts, so steps stay aligned with the schedule and the checkpoint)."""
    return sum(p.sum() * 0.0 for p in trainer.trainable_parameters())  # type: ignore[return-value]


METHODS: dict[str, type[PreferenceMethod]] = {m.name: m for m in (Refl, Grpo, Dpo)}
