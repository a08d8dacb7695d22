"""The flow objective's conventions and the ODE solvers, against closed forms and diffusers."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from trainers.config import TimestepConfig
from trainers.flow import FlowGenerators, flow_matching_loss, grid_flow_loss
from trainers.sampling import initial_noise, sample, solver_nfe
from trainers.text import TextEmbeddings
from trainers.timesteps import sampling_schedule

TEXT = TextEmbeddings(
    tokens=torch.zeros(4, 1, 2), pooled=torch.zeros(4, 2), mask=torch.ones(4, 1, dtype=torch.bool)
)


def _oracle(x_star: torch.Tensor):
    """Exact velocity when all data sits at x_star: x_t = (1 - t) x* + t eps, v = eps - x*
    = (x_t - x*) / t. It is exact only under the SD3 convention (t = 0 data, t = 1 noise)."""

    def v(x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings) -> torch.Tensor:
        return (x - x_star) / t.view(-1, 1, 1, 1)

    return v


def test_loss_is_zero_for_the_exact_velocity() -> None:
    x_star = torch.randn(1, 3, 4, 4).expand(4, -1, -1, -1)
    oracle = _oracle(x_star)
    gens = FlowGenerators(torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    out = flow_matching_loss(lambda x, t: oracle(x, t, TEXT), x_star, TimestepConfig(), 1.0, gens)
    assert out.loss.item() < 1e-9


def test_loss_sees_x_t_and_velocity_target() -> None:
    x0 = torch.randn(4, 3, 4, 4)
    seen = {}

    def model(x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings) -> torch.Tensor:
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)

    gens = FlowGenerators(torch.Generator().manual_seed(3), torch.Generator().manual_seed(4))
    predict = lambda x, t: model(x, t, TEXT)  # noqa: E731
    out = flow_matching_loss(predict, x0, TimestepConfig(sampler="uniform"), 1.0, gens)
    # Replay the draws: u from the timestep generator (uniform sampler: t = u), eps from the
    # noise generator.
    t = torch.rand(4, generator=torch.Generator().manual_seed(3)).clamp(1e-5, 1 - 1e-5)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4))
    tb = t.view(4, 1, 1, 1)
    assert torch.allclose(seen["t"], t) and torch.equal(out.t, seen["t"])
    assert torch.equal(out.eps, eps) and torch.equal(out.u.clamp(1e-5, 1 - 1e-5), t)
    assert torch.allclose(seen["x"], (1 - tb) * x0 + tb * eps)
    assert out.loss.item() == pytest.approx(torch.mean((eps - x0) ** 2).item(), rel=1e-6)


def test_noise_and_uniforms_do_not_depend_on_the_timestep_config() -> None:
    """Common random numbers: the sampler and the shift change t, never u or eps."""
    x0 = torch.randn(6, 3, 4, 4)
    outs = []
    for cfg, shift in [
        (TimestepConfig(sampler="uniform"), 1.0),
        (TimestepConfig(sampler="logit_normal", logit_mean=0.5), 1.0),
        (TimestepConfig(sampler="mode"), 3.0),
        (TimestepConfig(sampler="cosmap"), 0.5),
    ]:
        gens = FlowGenerators(torch.Generator().manual_seed(7), torch.Generator().manual_seed(8))
        outs.append(flow_matching_loss(lambda x, t: x, x0, cfg, shift, gens))
    for out in outs[1:]:
        assert torch.equal(out.u, outs[0].u) and torch.equal(out.eps, outs[0].eps)
        assert not torch.equal(out.t, outs[0].t)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_solvers_land_on_the_data_point_of_straight_paths(solver: str) -> None:
    x_star = torch.randn(1, 3, 4, 4).expand(4, -1, -1, -1)
    noise = torch.randn(4, 3, 4, 4)
    for steps in (1, 3):
        out = sample(_oracle(x_star), noise, TEXT, None, steps=steps, shift=3.0, solver=solver)
        assert torch.allclose(out, x_star, atol=1e-5)


def test_heun_is_second_order_and_euler_first() -> None:
    # dx/dt = a x from t = 1 to 0 has x(0) = x(1) exp(-a). Halving the step should divide the
    # error by ~2 for Euler and ~4 for Heun.
    a = 1.5

    def linear(x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings) -> torch.Tensor:
        return a * x

    x1 = torch.ones(1, 1, 1, 1)
    exact = math.exp(-a)

    def err(solver: str, n: int) -> float:
        return abs(sample(linear, x1, TEXT, None, steps=n, shift=1.0, solver=solver).item() - exact)

    assert err("euler", 20) / err("euler", 40) == pytest.approx(2.0, rel=0.1)
    assert err("heun", 20) / err("heun", 40) == pytest.approx(4.0, rel=0.2)
    assert solver_nfe("euler", 10) == 10 and solver_nfe("heun", 10) == 19


def test_euler_matches_diffusers_flow_match_scheduler() -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 3)

    def model(x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings) -> torch.Tensor:
        return torch.einsum("ij,bjhw->bihw", w, x) * (1 + t.view(-1, 1, 1, 1))

    noise = torch.randn(2, 3, 4, 4)
    steps, shift = 6, 2.0
    ours = sample(model, noise, TEXT, None, steps=steps, shift=shift)
    sigmas = sampling_schedule(steps, shift)[:-1].float().numpy()
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)  # our sigmas are already shifted
    sched.set_timesteps(sigmas=sigmas)
    x = noise.clone()
    for i, ts in enumerate(sched.timesteps):
        x = sched.step(model(x, torch.full((2,), float(sched.sigmas[i])), TEXT), ts, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-5)


def test_guidance_combines_cond_and_uncond() -> None:
    cond = TextEmbeddings(
        tokens=torch.ones(2, 1, 1), pooled=torch.ones(2, 1), mask=torch.ones(2, 1, dtype=torch.bool)
    )
    uncond = TextEmbeddings(
        tokens=torch.zeros(1, 1, 1),
        pooled=torch.zeros(1, 1),
        mask=torch.ones(1, 1, dtype=torch.bool),
    )

    def model(x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings) -> torch.Tensor:
        return torch.ones_like(x) * (1 + 2 * text.pooled.view(-1, 1, 1, 1))  # uncond 1, cond 3

    noise = torch.zeros(2, 1, 2, 2)
    for w, v in ((0.0, 1.0), (1.0, 3.0), (4.0, 9.0)):
        out = sample(model, noise, cond, uncond, steps=1, shift=1.0, guidance=w)
        assert torch.allclose(out, torch.full_like(out, -v))  # one Euler step of dt = -1


def test_initial_noise_depends_only_on_seed() -> None:
    a = initial_noise([1, 2, 3], (3, 8, 8))
    b = initial_noise([3, 2], (3, 8, 8))
    assert torch.equal(a[2], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], a[1])


def test_grid_loss_matches_the_closed_form_of_a_linear_predictor() -> None:
    # x0 = 0: x_t = t eps and the target is eps, so v = a x_t errs by (a t - 1) eps and the
    # loss at level t is (a t - 1)^2 E[eps^2] = (a t - 1)^2.
    a, levels = 1.7, 5
    x0 = torch.zeros(4000, 3, 4, 4)
    got = grid_flow_loss(lambda x_t, t, rows: a * x_t, x0, levels, seed=3)
    t = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    assert torch.allclose(got, (a * t - 1) ** 2, rtol=0.02)


def test_grid_loss_is_independent_of_chunking_and_passes_each_chunks_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(37, 2, 3, 3, generator=gen)
    scale = torch.rand(37, 1, 1, 1, generator=gen)  # a per-image "caption"

    def predict(x_t: torch.Tensor, t: torch.Tensor, rows: slice) -> torch.Tensor:
        return scale[rows] * x_t + t.view(-1, 1, 1, 1)

    whole = grid_flow_loss(predict, x0, 4, seed=1, batch_size=1000)
    chunked = grid_flow_loss(predict, x0, 4, seed=1, batch_size=5)
    assert torch.allclose(whole, chunked, rtol=1e-6)
    assert not torch.allclose(whole, grid_flow_loss(predict, x0, 4, seed=2))  # noise is seeded
