"""Flow-GRPO's math (Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL"):
the ODE -> SDE conversion with its per-step Gaussian log-probabilities, rollouts, group-relative
advantages and the clipped policy loss. Pure tensor functions; the trainer wires them up.

Conventions are the flow trainer's (``trainers/flow``): t = 1 is noise, t = 0 is data,
``x_t = (1 - t) x0 + t eps``, the network predicts ``v = eps - x0``, and sampling goes from t = 1
to t = 0 over ``sampling_schedule(steps, shift)``, so every step has ``dt = t_next - t < 0``.

The sampling ODE dx/dt = v is replaced by the SDE with the same marginals (Flow-GRPO eq. 9-12):
the score of x_t is ``-E[eps | x_t] / t = -(x + (1 - t) v) / t``, so the reverse-time SDE step is

    x_next = x + [v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt + sigma_t sqrt(-dt) eps,

with ``eps ~ N(0, I)`` and ``sigma_t = a sqrt(t / (1 - t))`` (``a`` is the paper's noise level,
0.7 in its experiments). Each step is then Gaussian, ``N(mean, std^2 I)`` with
``std = sigma_t sqrt(-dt)``, which gives the policy's log-probabilities. With ``a = 0`` the step
is exactly the Euler ODE step ``x + v dt`` (``trainers.sampling``'s ``euler`` solver).

At t = 1, ``sigma_t`` is infinite; as in the reference implementation (yifan123/flow_grpo,
``sde_step_with_logprob``: ``sigma_max = sigmas[1]``) the ``1 - t`` under the root is replaced by
``1 - t_1``, where ``t_1`` is the schedule's second value (:func:`sde_sigma`'s ``t_cap``).

Log-probabilities are *per dimension*: the mean over the non-batch dimensions of the
per-element Gaussian log density (not its sum), as in the reference implementation, so the
importance ratio ``exp(logp_new - logp_old)`` is the geometric mean of the per-element ratios
and its scale does not depend on the latent size. :func:`gaussian_kl` uses the same mean.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def sde_sigma(t: Tensor | float, a: float, t_cap: float) -> Tensor:
    """The SDE's diffusion coefficient ``sigma_t = a sqrt(t / (1 - min(t, t_cap)))`` (float64).

    ``t_cap < 1`` keeps it finite at t = 1: pass the sampling schedule's second value ``t_1``, so
    every grid time but t = 1 gets the exact ``a sqrt(t / (1 - t))``.
    """
    if not t_cap < 1.0:
        raise ValueError(f"t_cap must be < 1 (sigma_t is infinite at t = 1), got {t_cap}")
    tt = torch.as_tensor(t, dtype=torch.float64)
    return a * torch.sqrt(tt / (1.0 - torch.clamp(tt, max=t_cap)))


@dataclass(frozen=True)
class SdeStep:
    """One SDE step ``x(t) -> x(t_next)``: the Gaussian ``N(mean, std^2 I)`` and a draw from it."""

    mean: Tensor  # [B, C, H, W] the deterministic part of the step (x's dtype and device)
    std: Tensor  # [] sigma_t sqrt(-dt), a scalar shared by the batch (x's dtype and device)
    x_next: Tensor  # [B, C, H, W] mean + std * noise, or mean when no noise was given


def sde_step(
    x: Tensor,
    v: Tensor,
    t: float,
    t_next: float,
    a: float,
    t_cap: float,
    noise: Tensor | None,
) -> SdeStep:
    """The Flow-GRPO SDE step from ``x`` at ``t`` to ``t_next`` (``0 <= t_next < t <= 1``).

    x, v: [B, C, H, W] the state and the (guided) velocity at (x, t); ``a``: the noise level;
    ``t_cap``: see :func:`sde_sigma`; ``noise``: standard normal like x, or None for
    ``x_next = mean``. Differentiable in ``v`` (recomputing ``mean`` under the current policy
    gives the log-probability of a stored transition). With ``a = 0`` the mean is exactly
    ``x + v dt`` and ``std`` is 0.
    """
    if not 0.0 <= t_next < t <= 1.0:
        raise ValueError(f"need 0 <= t_next < t <= 1, got t = {t}, t_next = {t_next}")
    dt = t_next - t
    sigma = float(sde_sigma(t, a, t_cap))
    drift = v + (sigma**2 / (2.0 * t)) * (x + (1.0 - t) * v)
    mean = x + dt * drift
    std = torch.tensor(sigma * math.sqrt(-dt), dtype=x.dtype, device=x.device)
    x_next = mean if noise is None else mean + std * noise.to(x.device, x.dtype)
    return SdeStep(mean=mean, std=std, x_next=x_next)


def _per_item(std: Tensor, like: Tensor) -> Tensor:
    """``std`` [] or [B] (one per item) made broadcastable against ``like`` [B, ...]."""
    if std.dim() == 1:
        return std.view(-1, *([1] * (like.dim() - 1)))
    return std


def _check_std(std: Tensor) -> None:
    if bool((std <= 0).any()):
        raise ValueError(
            "std must be > 0: a deterministic step (a = 0) has no log-probability or KL"
        )


def step_log_prob(x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """[B] the per-dimension log-probability of a transition: ``log N(x_next; mean, std^2)`` of
    each element, averaged (not summed) over the non-batch dimensions.

    x_next, mean: [B, C, H, W]; std: [] or [B] (or broadcastable to x_next), > 0 (ValueError
    otherwise). ``x_next`` is normally a stored sample without gradient; the gradient reaches
    the policy through ``mean``.
    """
    std = _per_item(std, x_next)
    _check_std(std)
    std = std.to(x_next.dtype)
    elem = -((x_next - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _HALF_LOG_2PI
    return elem.mean(dim=tuple(range(1, elem.dim())))


@dataclass
class Rollout:
    """A batch of SDE trajectories with the log-probabilities of their transitions."""

    xs: Tensor  # [T+1, B, C, H, W] float32 states: xs[0] the initial noise, xs[T] the samples
    ts: Tensor  # [T+1] float64 (CPU) the time grid, ts[0] = 1 ... ts[T] = 0
    log_probs: Tensor  # [T, B] float32 per-dimension log-prob of xs[k] -> xs[k+1] (0 if a = 0)


@torch.no_grad()
def rollout(
    velocity: Callable[[Tensor, float], Tensor],
    noise: Tensor,
    schedule: Tensor,
    a: float,
    generator: torch.Generator | None,
) -> Rollout:
    """Sample trajectories with the Flow-GRPO SDE on every step of ``schedule``.

    velocity: ``(x, t) -> v`` at the scalar time t, guidance applied (the policy);
    noise: [B, C, H, W] the initial state at ``schedule[0]`` (normally 1); schedule: [T+1] the
    decreasing grid, ``sampling_schedule(steps, shift)``; its second value is the ``t_cap`` of
    :func:`sde_sigma`. Each step's noise is drawn from ``generator`` on the CPU (float32, shaped
    like x) and moved to x's device, so the trajectories do not depend on the device, and the
    draws do not depend on ``a``.

    The last step (into t = 0) is an SDE step too, as in Flow-GRPO (its std is finite). With
    ``a = 0`` the trajectory is the Euler ODE solution (``trainers.sampling.sample`` with
    ``solver="euler"``) and ``log_probs`` is all zeros: a deterministic step has no density.
    """
    if schedule.dim() != 1 or schedule.numel() < 2:
        raise ValueError(f"schedule must be 1-D with at least 2 times, got {tuple(schedule.shape)}")
    ts = schedule.detach().to("cpu", torch.float64)
    grid = ts.tolist()
    t_cap = grid[1]
    x = noise.float()
    xs = [x]
    log_probs = []
    for t, t_next in itertools.pairwise(grid):
        eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        step = sde_step(x, velocity(x, t).float(), t, t_next, a, t_cap, eps)
        x = step.x_next
        xs.append(x)
        if a == 0.0:
            log_probs.append(torch.zeros(x.shape[0], device=x.device))
        else:
            log_probs.append(step_log_prob(x, step.mean, step.std))
    return Rollout(xs=torch.stack(xs), ts=ts, log_probs=torch.stack(log_probs))


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """[P*G] GRPO's group-relative advantages ``(r - mean_g) / (std_g + eps)``.

    rewards: [P*G] laid out group-major (prompt p's G samples are contiguous). ``std_g`` is the
    population standard deviation (``np.std``, as the paper's per-prompt stat tracker), so a
    group of equal rewards gets zero advantages. ValueError when the length is not a multiple of
    ``group_size``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [P*G], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float() if not rewards.is_floating_point() else rewards
    g = r.view(-1, group_size)
    adv = (g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, unbiased=False, keepdim=True) + eps)
    return adv.reshape(-1)


def grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float,
    kl: Tensor | None = None,
    kl_weight: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """The clipped GRPO surrogate (PPO-style) plus an optional KL penalty, and its statistics.

    ``ratio = exp(log_prob - old_log_prob)`` (per-dimension log-probs: :func:`step_log_prob`);
    ``loss = mean(max(-A ratio, -A clamp(ratio, 1 - c, 1 + c))) + kl_weight mean(kl)``.
    log_prob, old_log_prob: [B] (or [T, B]); advantages: broadcastable to them; kl: per item,
    e.g. :func:`gaussian_kl`. Stats (Python floats): ``policy_loss`` (the surrogate alone),
    ``ratio_mean``, ``clip_frac`` (fraction with ``|ratio - 1| > c``) and ``kl_mean`` (0 without
    ``kl``).
    """
    if clip_range < 0:
        raise ValueError(f"clip_range must be >= 0, got {clip_range}")
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped, clipped))
    loss = policy_loss
    if kl is not None:
        loss = loss + kl_weight * torch.mean(kl)
    with torch.no_grad():
        stats = {
            "policy_loss": float(policy_loss),
            "ratio_mean": float(ratio.mean()),
            "clip_frac": float(((ratio - 1.0).abs() > clip_range).float().mean()),
            "kl_mean": float(kl.mean()) if kl is not None else 0.0,
        }
    return loss, stats


def gaussian_kl(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """[B] per-dimension ``KL(N(mean, std^2) || N(ref_mean, std^2))``:
    ``(mean - ref_mean)^2 / (2 std^2)`` averaged over the non-batch dimensions, the same mean
    convention as :func:`step_log_prob`.

    mean, ref_mean: [B, C, H, W] the step means under the policy and the reference model;
    std: [] or [B] (or broadcastable), > 0 (ValueError otherwise).
    """
    std = _per_item(std, mean)
    _check_std(std)
    elem = (mean - ref_mean) ** 2 / (2.0 * std.to(mean.dtype) ** 2)
    return elem.mean(dim=tuple(range(1, elem.dim())))
