"""Each timestep density against its closed-form CDF and against diffusers' sampler
(Kolmogorov-Smirnov on 1e5 draws), and the quantile coupling of the samplers (one u each)."""

import numpy as np
import pytest
import torch
from scipy import optimize, special, stats

from trainers.config import TimestepConfig
from trainers.timesteps import (
    SAMPLERS,
    flux_mu,
    image_seq_len,
    resolve_shift,
    resolve_shift_value,
    sample_timesteps,
    sampling_schedule,
    shift_timesteps,
    timesteps_from_uniform,
)

N = 100_000


def _draws(cfg: TimestepConfig, shift: float = 1.0) -> np.ndarray:
    return sample_timesteps(cfg, N, shift, torch.Generator().manual_seed(1234)).double().numpy()


def _mode_cdf(scale: float):
    # SD3 eq. 21: t = f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u), decreasing in u, so
    # P(t <= x) = P(u >= f^-1(x)) = 1 - f^-1(x). f^-1 by interpolation on a 2e6-point grid
    # (error ~1e-6, far below the KS resolution of 1e5 draws), checked against brentq.
    def f(u):
        return 1 - u - scale * (np.cos(np.pi * u / 2) ** 2 - 1 + u)

    u = np.linspace(0.0, 1.0, 2_000_001)
    fu = f(u)[::-1]  # increasing

    def cdf(x: np.ndarray) -> np.ndarray:
        return 1 - np.interp(x, fu, u[::-1])

    x = 0.3
    assert abs(cdf(np.array([x]))[0] - (1 - optimize.brentq(lambda v: f(v) - x, 0.0, 1.0))) < 1e-5
    return cdf


CASES = {
    "uniform": (TimestepConfig(sampler="uniform"), lambda x: np.clip(x, 0, 1)),
    "logit_normal(0,1)": (
        TimestepConfig(sampler="logit_normal"),
        lambda x: stats.norm.cdf(special.logit(x)),
    ),
    "logit_normal(-0.5,0.6)": (
        TimestepConfig(sampler="logit_normal", logit_mean=-0.5, logit_std=0.6),
        lambda x: stats.norm.cdf(special.logit(x), loc=-0.5, scale=0.6),
    ),
    "mode(1.29)": (TimestepConfig(sampler="mode", mode_scale=1.29), _mode_cdf(1.29)),
    "mode(-0.5)": (TimestepConfig(sampler="mode", mode_scale=-0.5), _mode_cdf(-0.5)),
    # SD3 eq. 20: t = 1 - 1 / (tan(pi u / 2) + 1)  =>  P(t <= x) = (2 / pi) atan(x / (1 - x)).
    "cosmap": (TimestepConfig(sampler="cosmap"), lambda x: 2 / np.pi * np.arctan(x / (1 - x))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sampler_matches_closed_form(name: str) -> None:
    cfg, cdf = CASES[name]
    draws = _draws(cfg)
    assert draws.min() > 0 and draws.max() < 1
    result = stats.kstest(draws, cdf)
    assert result.pvalue > 1e-3, (
        f"{name}: KS statistic {result.statistic:.4f}, p={result.pvalue:.2e}"
    )


def test_ks_detects_a_wrong_density() -> None:
    # The test above must be able to fail: logit-normal draws are not uniform.
    draws = _draws(TimestepConfig(sampler="logit_normal"))
    assert stats.kstest(draws, lambda x: np.clip(x, 0, 1)).pvalue < 1e-6


@pytest.mark.parametrize("shift", [0.5, 3.0])
def test_shifted_density(shift: float) -> None:
    # t' = s t / (1 + (s - 1) t) is increasing with inverse t = t' / (s - (s - 1) t'), so
    # P(t' <= x) = F(x / (s - (s - 1) x)).
    cfg = TimestepConfig(sampler="logit_normal")
    draws = _draws(cfg, shift)

    def cdf(x: np.ndarray) -> np.ndarray:
        return stats.norm.cdf(special.logit(x / (shift - (shift - 1) * x)))

    assert stats.kstest(draws, cdf).pvalue > 1e-3
    assert (np.median(draws) > 0.5) == (shift > 1)


def test_shift_fixes_endpoints_and_is_monotone() -> None:
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.3, 1.0, 3.0):
        out = shift_timesteps(t, s)
        assert out[0] == 0 and out[-1].item() == pytest.approx(1.0, abs=1e-12)
        assert torch.all(out[1:] > out[:-1])
    assert torch.allclose(shift_timesteps(torch.tensor([0.5]), 3.0), torch.tensor([0.75]))


def test_auto_shift_is_sd3_sqrt_ratio() -> None:
    cfg = TimestepConfig(shift="auto", base_resolution=256)
    assert resolve_shift(cfg, 1024) == pytest.approx(4.0)
    assert resolve_shift(cfg, 256) == pytest.approx(1.0)
    assert resolve_shift(TimestepConfig(shift=2.5), 1024) == 2.5


def test_sampling_schedule() -> None:
    ts = sampling_schedule(4, 3.0)
    assert ts[0] == 1 and ts[-1] == 0 and len(ts) == 5
    assert torch.allclose(ts, shift_timesteps(torch.linspace(1, 0, 5, dtype=torch.float64), 3.0))


def test_same_generator_same_draws() -> None:
    cfg = TimestepConfig(sampler="cosmap")
    a = sample_timesteps(cfg, 64, 2.0, torch.Generator().manual_seed(5))
    b = sample_timesteps(cfg, 64, 2.0, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_invalid_mode_scale_rejected() -> None:
    with pytest.raises(ValueError, match="mode_scale"):
        TimestepConfig(sampler="mode", mode_scale=3.0)


# diffusers' name and keyword arguments for the samplers it has.
DIFFUSERS_CASES = {
    "uniform": (TimestepConfig(sampler="uniform"), "none", {}),
    "logit_normal(0,1)": (TimestepConfig(sampler="logit_normal"), "logit_normal", {}),
    "logit_normal(-0.5,0.6)": (
        TimestepConfig(sampler="logit_normal", logit_mean=-0.5, logit_std=0.6),
        "logit_normal",
        {"logit_mean": -0.5, "logit_std": 0.6},
    ),
    "mode(1.29)": (TimestepConfig(sampler="mode", mode_scale=1.29), "mode", {"mode_scale": 1.29}),
    "mode(-0.5)": (TimestepConfig(sampler="mode", mode_scale=-0.5), "mode", {"mode_scale": -0.5}),
}


@pytest.mark.parametrize("name", list(DIFFUSERS_CASES))
def test_sampler_matches_diffusers_density(name: str) -> None:
    """Two-sample KS against diffusers' compute_density_for_timestep_sampling: the quantile
    transforms have the reference densities (they are not drawn by calling it, see the module
    docstring)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    cfg, scheme, kwargs = DIFFUSERS_CASES[name]
    kwargs = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29} | kwargs
    ref = compute_density_for_timestep_sampling(
        scheme, N, generator=torch.Generator().manual_seed(99), **kwargs
    )
    ref = ref.double().clamp(1e-5, 1 - 1e-5).numpy()
    result = stats.ks_2samp(_draws(cfg), ref)
    assert result.pvalue > 1e-3, (
        f"{name}: KS statistic {result.statistic:.4f}, p={result.pvalue:.2e}"
    )


def test_two_sample_ks_detects_a_wrong_density() -> None:
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ref = compute_density_for_timestep_sampling(
        "logit_normal", N, logit_mean=0.0, logit_std=1.0, generator=torch.Generator().manual_seed(9)
    )
    wrong = _draws(TimestepConfig(sampler="logit_normal", logit_std=1.1))
    assert stats.ks_2samp(wrong, ref.double().numpy()).pvalue < 1e-6


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 0.6), (1.0, 2.0)])
def test_logit_of_logit_normal_is_normal(mean: float, std: float) -> None:
    draws = _draws(TimestepConfig(sampler="logit_normal", logit_mean=mean, logit_std=std))
    inside = draws[(draws > 1e-5) & (draws < 1 - 1e-5)]  # the clamp's atoms carry no logit
    assert len(inside) > N - 50
    result = stats.kstest(special.logit(inside), stats.norm(loc=mean, scale=std).cdf)
    assert result.pvalue > 1e-3, f"KS statistic {result.statistic:.4f}, p={result.pvalue:.2e}"


def test_every_sampler_is_a_monotone_transform_of_one_uniform() -> None:
    """Quantile coupling: t depends on u alone and increases with it, so two configurations
    fed the same u put each image at the same quantile of their densities."""
    u = torch.linspace(0.0, 1.0, 1001)[:-1]
    for name in SAMPLERS:
        for shift in (1.0, 3.0):
            cfg = TimestepConfig(sampler=name)
            t = timesteps_from_uniform(cfg, u, shift).double()
            assert t.min() > 0 and t.max() < 1
            d = torch.diff(t)
            assert (d >= 0).all(), name
            # element i depends on u[i] only (no cross-element draws)
            assert torch.equal(timesteps_from_uniform(cfg, u[::7], shift).double(), t[::7])
    assert torch.equal(timesteps_from_uniform(TimestepConfig(sampler="uniform"), u, 1.0)[1:], u[1:])
    expected = torch.sigmoid(0.3 + 0.7 * torch.special.ndtri(u[1:].double())).float()
    cfg = TimestepConfig(sampler="logit_normal", logit_mean=0.3, logit_std=0.7)
    torch.testing.assert_close(timesteps_from_uniform(cfg, u[1:], 1.0), expected.clamp(1e-5, 1))


def test_sample_timesteps_draws_one_uniform_per_image() -> None:
    """Every sampler draws exactly ``n`` uniforms: the generator ends in the same state."""
    states = []
    for name in SAMPLERS:
        g = torch.Generator().manual_seed(3)
        sample_timesteps(TimestepConfig(sampler=name), 50, 2.0, g)
        states.append(g.get_state())
    g = torch.Generator().manual_seed(3)
    torch.rand(50, generator=g)
    assert all(torch.equal(s, g.get_state()) for s in states)


@pytest.mark.parametrize("case", list(CASES))
def test_timesteps_are_the_quantiles_of_the_shared_uniform(case: str) -> None:
    """F(t(u)) = u: the transform is the sampler's inverse CDF, so with the same u every
    sampler puts image i at the same quantile of its own density (common random numbers)."""
    cfg, cdf = CASES[case]
    u = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    t = timesteps_from_uniform(cfg, u, 1.0).double().numpy()
    np.testing.assert_allclose(cdf(t), u.numpy(), atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Flux's dynamic shift against diffusers (FluxPipeline's calculate_shift and the scheduler's
# exponential time shift), an independent implementation.

FLUX_CFGS = {
    "defaults": TimestepConfig(shift="flux"),
    "custom": TimestepConfig(
        shift="flux",
        flux_base_seq_len=16,
        flux_max_seq_len=1024,
        flux_base_shift=0.3,
        flux_max_shift=1.6,
    ),
}
SEQ_LENS = [4, 16, 64, 256, 1024, 4096, 8192]


def _flux_scheduler(cfg: TimestepConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        time_shift_type="exponential",
        base_shift=cfg.flux_base_shift,
        max_shift=cfg.flux_max_shift,
        base_image_seq_len=cfg.flux_base_seq_len,
        max_image_seq_len=cfg.flux_max_seq_len,
    )


@pytest.mark.parametrize("which", list(FLUX_CFGS))
@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_flux_mu_is_diffusers_calculate_shift(which: str, seq_len: int) -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = FLUX_CFGS[which]
    expected = calculate_shift(
        seq_len,
        cfg.flux_base_seq_len,
        cfg.flux_max_seq_len,
        cfg.flux_base_shift,
        cfg.flux_max_shift,
    )
    assert flux_mu(cfg, seq_len) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert resolve_shift(cfg, 32, seq_len) == pytest.approx(np.exp(expected), rel=1e-12)


@pytest.mark.parametrize("which", list(FLUX_CFGS))
@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_flux_sampling_schedule_is_diffusers_dynamic_shift(which: str, seq_len: int) -> None:
    cfg = FLUX_CFGS[which]
    mu, n = flux_mu(cfg, seq_len), 12
    shift = resolve_shift(cfg, 32, seq_len)
    ours = sampling_schedule(n, shift)
    # FluxPipeline passes sigmas = linspace(1, 1 / n, n), our grid without its final 0; the
    # scheduler shifts them and appends 0.
    sched = _flux_scheduler(cfg)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), mu=mu)
    assert len(sched.sigmas) == n + 1 and sched.sigmas[-1] == 0
    torch.testing.assert_close(sched.sigmas.double(), ours, rtol=1e-6, atol=1e-6)
    # Its own default grid, linspace(1, sigma_min, n) with sigma_min = 1 / 1000 here: shifting
    # those same points with our shift gives its sigmas.
    sched.set_timesteps(num_inference_steps=n, mu=mu)
    grid = torch.linspace(1.0, sched.sigma_min, n, dtype=torch.float64)
    torch.testing.assert_close(
        sched.sigmas[:-1].double(), shift_timesteps(grid, shift), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("seq_len", [16, 256, 4096])
def test_flux_training_timesteps_are_diffusers_time_shift(seq_len: int) -> None:
    cfg = FLUX_CFGS["custom"]
    mu = flux_mu(cfg, seq_len)
    shift = resolve_shift(cfg, 32, seq_len)
    assert shift != pytest.approx(1.0)  # the comparison below is not of two identities
    unshifted = sample_timesteps(cfg, 4096, 1.0, torch.Generator().manual_seed(3)).double()
    shifted = sample_timesteps(cfg, 4096, shift, torch.Generator().manual_seed(3)).double()
    expected = _flux_scheduler(cfg).time_shift(mu, 1.0, unshifted)
    # Both are float32 draws clamped to (1e-5, 1 - 1e-5): compare at float32 precision.
    torch.testing.assert_close(shifted, expected.clamp(1e-5, 1 - 1e-5), rtol=1e-6, atol=1e-6)


def test_flux_shift_grows_with_the_token_count() -> None:
    cfg = FLUX_CFGS["defaults"]
    shifts = [resolve_shift(cfg, 32, n) for n in SEQ_LENS]
    assert shifts == sorted(shifts) and shifts[0] < shifts[-1]
    assert resolve_shift(cfg, 32, 256) == pytest.approx(np.exp(0.5))
    assert resolve_shift(cfg, 32, 4096) == pytest.approx(np.exp(1.15))


def test_flux_shift_needs_the_token_count() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        resolve_shift(TimestepConfig(shift="flux"), 32)


def test_image_seq_len_counts_patches_or_latent_cells() -> None:
    assert image_seq_len(32, 32, 2) == 256
    assert image_seq_len(16, 8, 4) == 8
    assert image_seq_len(16, 16, None) == 256  # the UNet: every latent cell
    with pytest.raises(ValueError, match="patch size 4"):
        image_seq_len(10, 10, 4)


def test_resolve_shift_value() -> None:
    cfg = TimestepConfig(shift=1.0, base_resolution=16)
    assert resolve_shift_value(cfg, 2.5, 32) == 2.5
    assert resolve_shift_value(cfg, "auto", 32) == pytest.approx(2.0)
    assert resolve_shift_value(cfg, "flux", 32, 256) == pytest.approx(np.exp(0.5))
    with pytest.raises(ValueError, match="'auto' or 'flux'"):
        resolve_shift_value(cfg, "sd3", 32)
    with pytest.raises(ValueError, match="> 0"):
        resolve_shift_value(cfg, 0.0, 32)


def test_flux_config_refuses_an_empty_range() -> None:
    with pytest.raises(ValueError, match="flux_max_seq_len"):
        TimestepConfig(shift="flux", flux_base_seq_len=512, flux_max_seq_len=256)
