"""trainers/preference/grpo.py: the Flow-GRPO SDE against the Euler ODE and a closed-form toy
distribution, its log-probabilities against scipy, advantages and the clipped loss by hand."""

import math

import pytest
import torch
from scipy.stats import norm

from trainers.preference.grpo import (
    gaussian_kl,
    group_advantages,
    grpo_loss,
    rollout,
    sde_sigma,
    sde_step,
    step_log_prob,
)
from trainers.sampling import sample
from trainers.text import TextEmbeddings
from trainers.timesteps import sampling_schedule

B = 3
TEXT = TextEmbeddings(
    tokens=torch.zeros(B, 1, 2), pooled=torch.zeros(B, 2), mask=torch.ones(B, 1, dtype=torch.bool)
)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv2d(2, 2, 3, padding=1)


def _denoiser(conv: torch.nn.Module):
    def net(x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings) -> torch.Tensor:
        return conv(x) * (1.0 + t.view(-1, 1, 1, 1)) - 0.5 * x

    return net


def _velocity(conv: torch.nn.Module):
    net = _denoiser(conv)

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        return net(x, torch.full((x.shape[0],), t), TEXT)

    return velocity


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 2, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_a_zero_is_the_euler_ode() -> None:
    conv, noise = _net(), _noise()
    schedule = sampling_schedule(6, 3.0)
    with torch.no_grad():
        ode = sample(_denoiser(conv), noise, TEXT, None, steps=6, shift=3.0, solver="euler")
        ro = rollout(_velocity(conv), noise, schedule, 0.0, torch.Generator().manual_seed(1))
        x, v = noise, _velocity(conv)(noise, 1.0)
        step = sde_step(x, v, 1.0, 0.8, 0.0, 0.8, torch.randn_like(x))
    torch.testing.assert_close(ro.xs[-1], ode, rtol=0, atol=1e-6)
    assert ro.xs.shape == (7, B, 2, 4, 4) and torch.equal(ro.xs[0], noise)
    assert torch.equal(ro.log_probs, torch.zeros(6, B))
    assert torch.equal(step.x_next, x + v * (0.8 - 1.0)) and float(step.std) == 0.0
    with pytest.raises(ValueError, match="std must be > 0"):
        step_log_prob(step.x_next, step.mean, step.std)


def test_sigma_is_capped_at_t_one_only() -> None:
    assert float(sde_sigma(1.0, 0.7, 0.9)) == pytest.approx(0.7 * math.sqrt(1.0 / 0.1))
    t = torch.tensor([0.9, 0.5, 0.0])
    expected = 0.7 * torch.sqrt(t.double() / (1 - t.double()))
    torch.testing.assert_close(sde_sigma(t, 0.7, 0.9), expected)
    with pytest.raises(ValueError, match="t_cap"):
        sde_sigma(1.0, 0.7, 1.0)


def test_on_policy_ratio_is_exactly_one_and_the_loss_is_minus_the_mean_advantage() -> None:
    conv, noise = _net(), _noise()
    velocity = _velocity(conv)
    schedule = sampling_schedule(5, 2.0)
    ro = rollout(velocity, noise, schedule, 0.7, torch.Generator().manual_seed(3))
    grid = ro.ts.tolist()
    adv = torch.tensor([1.0, -2.0, 0.5])
    for k in range(5):
        x = ro.xs[k]
        step = sde_step(x, velocity(x, grid[k]), grid[k], grid[k + 1], 0.7, grid[1], None)
        log_prob = step_log_prob(ro.xs[k + 1], step.mean, step.std)
        assert torch.equal(log_prob, ro.log_probs[k])
        lp = log_prob.detach().requires_grad_()
        loss, stats = grpo_loss(lp, ro.log_probs[k], adv, 0.2)
        assert stats["ratio_mean"] == 1.0 and stats["clip_frac"] == 0.0
        assert loss.item() == pytest.approx(-adv.mean().item())
        (grad,) = torch.autograd.grad(loss, lp)
        torch.testing.assert_close(grad, -adv / 3)
    # The policy's gradient reaches the network through the mean.
    x = ro.xs[2]
    step = sde_step(x, velocity(x, grid[2]), grid[2], grid[3], 0.7, grid[1], None)
    step_log_prob(ro.xs[3], step.mean, step.std).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_rollout_is_a_function_of_the_generator_and_its_log_probs_of_its_noise() -> None:
    conv, noise = _net(), _noise()
    schedule = sampling_schedule(4, 1.0)
    one = rollout(_velocity(conv), noise, schedule, 0.7, torch.Generator().manual_seed(5))
    two = rollout(_velocity(conv), noise, schedule, 0.7, torch.Generator().manual_seed(5))
    other = rollout(_velocity(conv), noise, schedule, 0.7, torch.Generator().manual_seed(6))
    assert torch.equal(one.xs, two.xs) and torch.equal(one.log_probs, two.log_probs)
    assert not torch.equal(one.xs[-1], other.xs[-1])
    # The first transition's log-prob is that of the standard normal draw it used, less log std.
    g = torch.Generator().manual_seed(5)
    eps = torch.randn(noise.shape, generator=g)
    std = float(sde_sigma(1.0, 0.7, 0.75)) * math.sqrt(0.25)
    expected = (-0.5 * eps**2 - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(one.log_probs[0], expected)


def test_step_log_prob_matches_scipy() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    mean = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=torch.float64)
    ref = norm.logpdf(x.numpy(), mean.numpy(), std.numpy().reshape(-1, 1, 1, 1))
    torch.testing.assert_close(
        step_log_prob(x, mean, std), torch.from_numpy(ref.mean(axis=(1, 2, 3)))
    )
    scalar = step_log_prob(x, mean, torch.tensor(0.5, dtype=torch.float64))
    ref = norm.logpdf(x.numpy(), mean.numpy(), 0.5).mean(axis=(1, 2, 3))
    torch.testing.assert_close(scalar, torch.from_numpy(ref))


@pytest.mark.parametrize("a", [0.0, 0.7])
def test_the_sde_keeps_the_ode_marginals(a: float) -> None:
    # x0 ~ N(mu, s^2), eps ~ N(0, 1): x_t = (1 - t) x0 + t eps ~ N((1 - t) mu, var_t) with
    # var_t = (1 - t)^2 s^2 + t^2, and v = E[eps - x0 | x_t] is linear in x:
    # v = -mu + Cov(eps - x0, x_t) / var_t (x - (1 - t) mu), Cov = t - (1 - t) s^2.
    mu, s = 1.5, 0.5

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        var = (1 - t) ** 2 * s**2 + t**2
        return -mu + (t - (1 - t) * s**2) / var * (x - (1 - t) * mu)

    n = 20000
    noise = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    ro = rollout(velocity, noise, sampling_schedule(200, 1.0), a, torch.Generator().manual_seed(1))
    x0 = ro.xs[-1].flatten().double()
    assert x0.mean().item() == pytest.approx(mu, rel=0.02)
    assert x0.std().item() == pytest.approx(s, rel=0.03)
    assert torch.isfinite(ro.log_probs).all()


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0, 2.0, 2.0])
    adv = group_advantages(rewards, 2, eps=0.0 + 1e-12)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0, 0.0]))
    adv = group_advantages(torch.tensor([0.0, 1.0, 2.0, 7.0, 7.0, 7.0]), 3)
    pop_std = math.sqrt(2 / 3)
    expected = torch.tensor([-1 / (pop_std + 1e-4), 0.0, 1 / (pop_std + 1e-4), 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, 4)


def test_grpo_loss_clips_by_hand() -> None:
    c = 0.2
    old = torch.zeros(4)
    # ratios 1.5 (A > 0: clipped, no gradient), 1.5 (A < 0: unclipped), 0.5 (A < 0: clipped),
    # 1.1 (inside the range).
    log_prob = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.1])).requires_grad_()
    adv = torch.tensor([2.0, -1.0, -1.0, 1.0])
    loss, stats = grpo_loss(log_prob, old, adv, c)
    expected = (-2.0 * 1.2 + 1.0 * 1.5 + 1.0 * 0.8 - 1.0 * 1.1) / 4
    assert loss.item() == pytest.approx(expected)
    assert stats["clip_frac"] == pytest.approx(0.75)
    assert stats["ratio_mean"] == pytest.approx(4.6 / 4)
    assert stats["policy_loss"] == pytest.approx(expected) and stats["kl_mean"] == 0.0
    (grad,) = torch.autograd.grad(loss, log_prob)
    # d(-A ratio)/d log_prob = -A ratio where unclipped, 0 where clipped.
    torch.testing.assert_close(grad, torch.tensor([0.0, 1.5, 0.0, -1.1]) / 4)
    kl = torch.tensor([0.5, 1.0, 0.0, 2.5])
    with_kl, stats = grpo_loss(log_prob, old, adv, c, kl=kl, kl_weight=0.1)
    assert with_kl.item() == pytest.approx(expected + 0.1 * 1.0)
    assert stats["kl_mean"] == pytest.approx(1.0)
    assert stats["policy_loss"] == pytest.approx(expected)


def test_gaussian_kl() -> None:
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(2, 1, 2, 2, generator=g)
    assert torch.equal(gaussian_kl(mean, mean, torch.tensor(0.3)), torch.zeros(2))
    ref = mean + torch.tensor([0.1, 0.4]).view(2, 1, 1, 1)
    std = torch.tensor([0.5, 2.0])
    expected = torch.tensor([0.1**2 / (2 * 0.25), 0.4**2 / (2 * 4.0)])
    torch.testing.assert_close(gaussian_kl(mean, ref, std), expected)
    with pytest.raises(ValueError, match="std must be > 0"):
        gaussian_kl(mean, ref, torch.tensor(0.0))
