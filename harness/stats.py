"""Seed-aware statistics for comparing training choices: "which is better, and how sure are we".

A study trains every configuration with the same K training seeds (common random numbers: seed k
of config A and seed k of config B share initialisation, data order and noise), so per-seed
differences are *paired*. Every run is evaluated on the same N generated images (same prompts and
sampling seeds), so image rows are paired too. A metric is a :data:`Statistic` of one run's rows:
attribute accuracy is the mean of a 0/1 column, FID is :func:`frechet_statistic` of feature rows.

Two noise sources make a difference uncertain: *seed noise* (another training seed gives another
model) and *evaluation noise* (another N images give another metric value for the same model).
Evaluating more images only shrinks the second; only more seeds shrink the first. The functions
here keep both visible: :func:`paired_effect` reports the interval of a difference together with
``seed_sd`` (the spread of per-seed differences, which already contains the evaluation noise),
``eval_sd`` (the evaluation-only part) and ``seeds_needed`` (how many seeds would resolve the
observed difference).

Pure numpy + scipy (no torch), so reports and tests can import it cheaply.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

Statistic = Callable[[np.ndarray], float]
"""Rows ``[n, ...]`` of ONE run (one row per evaluation image) -> that run's metric value."""

RngLike = np.random.Generator | int


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval; ``low``/``high`` are nan when ``n < 2``."""

    estimate: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class PairedTest:
    """Paired Student-t test of ``a - b``: mean difference, its interval, t statistic, p-value."""

    estimate: float
    low: float
    high: float
    t: float
    p_value: float
    n: int


@dataclass(frozen=True)
class Effect:
    """How config A differs from the baseline B in one metric, over K paired training seeds.

    ``estimate`` is ``mean_k (stat(a[k]) - stat(b[k]))`` (positive means A has the larger
    value, whatever the metric's direction). ``ci_low``/``ci_high``: Student-t interval over
    seeds (see :func:`paired_effect` for why). ``se``: its standard error. ``seed_sd``: sd over
    seeds of the per-seed differences (seed + evaluation noise). ``eval_sd``: evaluation-only sd of
    ONE seed's difference (image rows resampled, model fixed), on the same per-seed scale as
    ``seed_sd``, so ``seed_sd**2 - eval_sd**2`` roughly estimates the pure seed variance.
    ``p_improve``: probability that A is better than B in the metric's direction.
    ``resolved``: the interval excludes 0 (never with one seed). ``seeds_needed``: seeds for 80%
    power to detect the observed difference given ``seed_sd`` (None: unknown or > 10 000).
    ``p_value``: paired t-test p-value (the same t distribution as the interval).
    ``boot_se``: standard error from the two-level (seeds, then images) paired bootstrap,
    rescaled by ``sqrt(K / (K - 1))``; a diagnostic only, biased upwards (it counts evaluation
    noise twice), not used for the interval. ``per_seed``: the K per-seed differences.
    """

    estimate: float
    ci_low: float
    ci_high: float
    n_seeds: int
    se: float
    seed_sd: float
    p_improve: float
    resolved: bool
    seeds_needed: int | None
    eval_sd: float
    p_value: float
    boot_se: float
    higher_is_better: bool
    level: float
    per_seed: tuple[float, ...]


@dataclass(frozen=True)
class RankRow:
    """One configuration's row of a rank table (1 = best; ties share the average rank).

    ``mean_rank_low``/``mean_rank_high``: percentile interval of the mean rank under resampling
    the seed indices (nan with one seed).
    """

    config: str
    ranks: dict[str, float]
    mean_rank: float
    mean_rank_low: float
    mean_rank_high: float


# ---------------------------------------------------------------------------------------------
# Seed-level tests


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _as_1d(values: Sequence[float], name: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {x.shape}")
    return x


def _t_interval(mean: float, sd: float, n: int, level: float) -> tuple[float, float]:
    """Student-t interval of a mean from n values with sample sd; nan when n < 2.

    Written out rather than ``scipy.stats.t.interval(..., scale=0)``, which returns nan for
    zero spread: identical values give the degenerate interval ``[mean, mean]`` here.
    """
    if n < 2:
        return math.nan, math.nan
    half = float(stats.t.ppf((1.0 + level) / 2.0, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean over seeds with its Student-t interval (seeds are few, so z would be too narrow)."""
    _check_level(level)
    x = _as_1d(values, "values")
    n = x.size
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if n > 1 else math.nan
    low, high = _t_interval(mean, sd, n, level)
    return Interval(mean, low, high, n)


def paired_t(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> PairedTest:
    """Paired t-test of ``a - b`` (seed k of A against seed k of B).

    Pairing removes the variance the two configs share through common seeds. Degenerate
    differences: all equal and nonzero -> p = 0 and interval ``[d, d]``; all zero -> p = 1 (no
    evidence of any difference; scipy returns nan). One pair: t, p and the interval are nan.
    """
    _check_level(level)
    xa, xb = _as_1d(a, "a"), _as_1d(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"a and b must have the same length, got {xa.size} and {xb.size}")
    d = xa - xb
    n = d.size
    mean = float(d.mean())
    if n < 2:
        return PairedTest(mean, math.nan, math.nan, math.nan, math.nan, n)
    sd = float(d.std(ddof=1))
    low, high = _t_interval(mean, sd, n, level)
    if sd == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        p = 1.0 if mean == 0.0 else 0.0
    else:
        t = mean / (sd / math.sqrt(n))
        p = float(2.0 * stats.t.sf(abs(t), n - 1))
    return PairedTest(mean, low, high, t, p, n)


def wilcoxon_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of ``a - b``: a cross-check free of normality.

    None when it is undefined (fewer than 2 pairs, or every difference is 0). Note that with
    fewer than 6 pairs the exact test cannot reach p < 0.05: it is a sanity check, not a verdict.
    """
    xa, xb = _as_1d(a, "a"), _as_1d(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"a and b must have the same length, got {xa.size} and {xb.size}")
    if xa.size < 2 or np.all(xa == xb):
        return None
    return float(stats.wilcoxon(xa, xb).pvalue)


def _paired_t_power(d: float, n: int, alpha: float) -> float:
    """Exact power of the two-sided paired t-test on n differences of standardized mean d."""
    df = n - 1
    tcrit = float(stats.t.ppf(1.0 - alpha / 2.0, df))
    ncp = d * math.sqrt(n)
    return float(stats.nct.sf(tcrit, df, ncp) + stats.nct.cdf(-tcrit, df, ncp))


def seeds_for_power(
    diff: float, sd: float, power: float = 0.8, alpha: float = 0.05, max_n: int = 10_000
) -> int | None:
    """Smallest number of seeds n >= 2 for which a two-sided paired t-test at ``alpha`` detects
    a true mean difference ``diff`` with per-seed sd ``sd`` with probability >= ``power``.

    Exact noncentral t (df = n - 1, ncp = diff / (sd / sqrt n)); the normal approximation
    undercounts by 2-3 seeds in the small-n range studies live in. None when there is nothing to
    detect or no estimate (diff == 0, nan inputs) or when n would exceed ``max_n``; sd == 0 with
    diff != 0 gives 2 (the smallest n a t-test accepts).
    """
    if not 0.0 < power < 1.0 or not 0.0 < alpha < 1.0:
        raise ValueError(f"power and alpha must be in (0, 1), got {power} and {alpha}")
    if max_n < 2:
        raise ValueError(f"max_n must be >= 2, got {max_n}")
    if math.isnan(diff) or math.isnan(sd) or diff == 0.0:
        return None
    if sd < 0.0:
        raise ValueError(f"sd must be >= 0, got {sd}")
    if sd == 0.0:
        return 2
    d = abs(diff) / sd
    if d == 0.0:  # sd == inf
        return None
    # Start at the known-variance (z-test) answer, which the t-test can only need more seeds
    # than, and walk: a few exact power evaluations instead of a bisection over [2, max_n].
    z = stats.norm.ppf(1.0 - alpha / 2.0) + stats.norm.ppf(power)
    n_z = (z / d) ** 2
    if n_z > max_n:
        return None
    n = max(2, math.ceil(n_z))
    while n > 2 and _paired_t_power(d, n - 1, alpha) >= power:
        n -= 1
    while _paired_t_power(d, n, alpha) < power:
        n += 1
        if n > max_n:
            return None
    return n


# ---------------------------------------------------------------------------------------------
# Image-level bootstrap


def _as_rows(rows: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(rows)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must have at least one row, got shape {x.shape}")
    return x


def _image_boot(
    a_rows: np.ndarray,
    b_rows: np.ndarray | None,
    statistic: Statistic,
    n_boot: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """``n_boot`` values of ``stat(a*) - stat(b*)`` (or ``stat(a*)`` when b is None), where a*
    and b* take the SAME resampled row indices: row i is the same prompt and sampling seed in
    both runs, so its difficulty cancels in the difference."""
    idx = rng.integers(0, a_rows.shape[0], size=(n_boot, a_rows.shape[0]))
    if b_rows is None:
        return np.array([statistic(a_rows[i]) for i in idx], dtype=np.float64)
    return np.array([statistic(a_rows[i]) - statistic(b_rows[i]) for i in idx], dtype=np.float64)


@functools.cache
def _blas_controller() -> object | None:
    """threadpoolctl's view of the loaded BLAS libraries, scanned once (a scan takes ~5 ms)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return ThreadpoolController()


def _one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """Limit BLAS/LAPACK to one thread while a bootstrap calls a statistic thousands of times.

    Multi-threaded OpenBLAS on small matrices loses badly when the cores are busy: with other
    processes on the 2-core machine, one 128-d FID call took 0.8 ms with one thread and 17 ms
    with the default two, and ``paired_effect`` (3 seeds x 128 rows, n_boot 1000) 4 s against
    80-100 s. threadpoolctl is optional (it comes with scikit-learn); without it, nothing changes.
    """
    controller = _blas_controller()
    if controller is None:  # pragma: no cover - depends on the environment
        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")  # type: ignore[attr-defined]


def _hierarchical_boot(per_seed_boot: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Two-level paired bootstrap of the mean difference from per-seed image replicates.

    ``per_seed_boot[k, j]`` is seed k's difference under the j-th paired row resample. A
    replicate draws K seed indices with replacement (the same for A and B, as the rows of
    ``per_seed_boot`` are already differences) and, for each drawn seed, one of its row
    resamples at random: a draw from the within-seed bootstrap distribution, which is what a
    fresh row resample would give, without computing the statistic again (the image-level
    replicates are needed for ``eval_sd`` anyway, so this level costs no statistic calls).
    """
    k, n_boot = per_seed_boot.shape
    seeds = rng.integers(0, k, size=(n_boot, k))
    cols = rng.integers(0, n_boot, size=(n_boot, k))
    return per_seed_boot[seeds, cols].mean(axis=1)


def eval_noise(
    runs: Sequence[np.ndarray], statistic: Statistic, n_boot: int = 200, rng: RngLike = 0
) -> float:
    """Evaluation-only noise of ONE configuration's metric: the sd of ``statistic`` under
    resampling a run's image rows (the trained model fixed), as an rms over the runs.

    It says how much of the metric's spread comes from evaluating only N images; callers should
    label it as evaluation noise, never as seed variance.
    """
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    if len(runs) == 0:
        raise ValueError("runs must not be empty")
    gen = np.random.default_rng(rng)
    with _one_blas_thread():
        variances = [
            _image_boot(_as_rows(r, f"runs[{k}]"), None, statistic, n_boot, gen).var(ddof=1)
            for k, r in enumerate(runs)
        ]
    return float(math.sqrt(np.mean(variances)))


# ---------------------------------------------------------------------------------------------
# Paired effect of a configuration against a baseline

# Why the interval is a Student-t interval over the K per-seed differences (and not a bootstrap
# interval). Each per-seed difference d_k = stat(a[k]) - stat(b[k]) is one i.i.d. draw that
# already contains BOTH noise sources (this seed's model and these N images), so its sample
# variance s^2 estimates Var(d_k) without bias and estimate +- t_{K-1} * s / sqrt(K) is exact
# for normal d_k at any K. The two-level bootstrap cannot do better at K = 3: resampling 3 seeds
# shrinks the variance by (K-1)/K and has no t tail, and resampling images inside the resampled
# seeds counts the evaluation noise a second time (it is already in the spread of the d_k), so
# its variance is ~ [(K-1)/K * Var(d) + eval_var] / K. The plain percentile interval undercovers
# at small K (worst when seed noise dominates), and the t quantile with the bootstrap sd rescaled
# by sqrt(K/(K-1)) overcovers when evaluation noise matters (up to ~1.6x too wide at K = 3).
#
# Measured coverage of the nominal 95% interval (truth known; n_boot = 200; 2000 simulated
# studies per cell, 1000 for fid; the cells are the generators of tests/harness/test_stats.py).
# "bin": mean of a 0/1 column over 64 images, evaluation noise dominates. "cont": mean of a
# continuous column over 64 images, config-by-seed noise dominates. "fid": frechet_statistic of
# 16-d features of 64 images against N(0, I), evaluation noise dominates.
#
#                       K=3 bin  K=3 cont  K=5 bin  K=5 cont  K=10 bin  K=10 cont  K=3 fid  K=5 fid
#   t over seeds (used)   0.952    0.951     0.948    0.946     0.943     0.945     0.943    0.949
#   boot sd rescaled + t  1.000    0.997     1.000    0.973     1.000     0.961     1.000    0.998
#   plain percentile      0.970    0.806     0.981    0.871     0.987     0.908     0.894    0.941
#
# (The rescaled bootstrap overcovers so much because its evaluation-noise term is estimated from
# many images: it puts a floor under the SE, while the t quantile still pays for K - 1 df.)
#
# The two-level bootstrap still runs: it gives ``eval_sd`` (per seed, the image-only part of the
# noise) and ``boot_se`` for comparison.


def _per_seed_stats(
    a: Sequence[np.ndarray], b: Sequence[np.ndarray], statistic: Statistic
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray]:
    if len(a) != len(b):
        raise ValueError(f"a and b must have one run per seed, got {len(a)} and {len(b)} runs")
    if len(a) == 0:
        raise ValueError("need at least one seed")
    rows_a = [_as_rows(x, f"a[{k}]") for k, x in enumerate(a)]
    rows_b = [_as_rows(x, f"b[{k}]") for k, x in enumerate(b)]
    for k, (ra, rb) in enumerate(zip(rows_a, rows_b, strict=True)):
        if ra.shape[0] != rb.shape[0]:
            raise ValueError(
                f"seed {k}: a has {ra.shape[0]} rows but b has {rb.shape[0]}; rows must be "
                "paired (row i = the same prompt and sampling seed in both runs)"
            )
    stat_a = np.array([statistic(r) for r in rows_a], dtype=np.float64)
    stat_b = np.array([statistic(r) for r in rows_b], dtype=np.float64)
    return rows_a, rows_b, stat_a, stat_b


def _p_improve(estimate: float, se: float, df: int, higher_is_better: bool) -> float:
    """P(true difference is in the better direction), from the interval's t distribution."""
    z = estimate if higher_is_better else -estimate
    if se == 0.0:
        return 1.0 if z > 0 else 0.0 if z < 0 else 0.5
    return float(stats.t.cdf(z / se, df))


def paired_effect(
    a: Sequence[np.ndarray],
    b: Sequence[np.ndarray],
    statistic: Statistic,
    higher_is_better: bool,
    level: float = 0.95,
    n_boot: int = 1000,
    rng: RngLike = 0,
) -> Effect:
    """Difference between config A and baseline B in one metric, with seed-honest uncertainty.

    ``a[k]``/``b[k]``: the per-image rows of A's and B's runs for training seed k, with the same
    number of rows (row i is the same prompt and sampling seed). The interval is the Student-t
    interval over the K per-seed differences (identical to :func:`paired_t` on the per-seed
    metric values), which holds its coverage at K = 3 where bootstrap intervals do not (see the
    comment above this function). ``n_boot`` paired row resamples per seed give ``eval_sd`` and,
    through the two-level bootstrap, ``boot_se``. With one seed there is no interval (nan),
    ``resolved`` is False and ``seeds_needed`` None; ``eval_sd`` is still computed.
    """
    _check_level(level)
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    gen = np.random.default_rng(rng)
    with _one_blas_thread():
        rows_a, rows_b, stat_a, stat_b = _per_seed_stats(a, b, statistic)
        per_seed_boot = np.stack(
            [
                _image_boot(ra, rb, statistic, n_boot, gen)
                for ra, rb in zip(rows_a, rows_b, strict=True)
            ]
        )
    k = len(rows_a)
    test = paired_t(stat_a, stat_b, level)
    d = stat_a - stat_b
    seed_sd = float(d.std(ddof=1)) if k > 1 else math.nan
    se = seed_sd / math.sqrt(k)

    eval_sd = float(math.sqrt(per_seed_boot.var(axis=1, ddof=1).mean()))
    hier = _hierarchical_boot(per_seed_boot, gen)
    boot_se = float(hier.std(ddof=1) * math.sqrt(k / (k - 1))) if k > 1 else math.nan

    if k > 1:
        p_improve = _p_improve(test.estimate, se, k - 1, higher_is_better)
        resolved = bool(test.low > 0.0 or test.high < 0.0)
        seeds_needed = seeds_for_power(test.estimate, seed_sd)
    else:
        p_improve, resolved, seeds_needed = math.nan, False, None
    return Effect(
        estimate=test.estimate,
        ci_low=test.low,
        ci_high=test.high,
        n_seeds=k,
        se=se,
        seed_sd=seed_sd,
        p_improve=p_improve,
        resolved=resolved,
        seeds_needed=seeds_needed,
        eval_sd=eval_sd,
        p_value=test.p_value,
        boot_se=boot_se,
        higher_is_better=higher_is_better,
        level=level,
        per_seed=tuple(float(x) for x in d),
    )


# ---------------------------------------------------------------------------------------------
# FID as a statistic of feature rows


def _psd_sqrt(sym: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sym)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # clip rounding negatives of a PSD matrix


def frechet_statistic(ref_mean: np.ndarray, ref_cov: np.ndarray) -> Statistic:
    """FID of feature rows ``[n, F]`` (mean, ddof=1 covariance) against a fixed reference
    Gaussian, fast enough to be called thousands of times in a bootstrap.

    ``R = sqrt(ref_cov)`` is computed once. For centred rows X (covariance C = X'X / (n-1)),
    ``tr sqrt(C ref_cov) = sum sqrt(eig(R C R))`` and ``R C R = Y'Y / (n-1)`` with ``Y = X R``,
    whose nonzero eigenvalues are those of the smaller Gram matrix (``YY'`` when n < F): one
    symmetric eigensolve of size min(n, F) per call, no matrix square root, real by construction.
    """
    mu_r = np.asarray(ref_mean, dtype=np.float64)
    cov_r = np.asarray(ref_cov, dtype=np.float64)
    f = mu_r.shape[0] if mu_r.ndim == 1 else -1
    if f < 1 or cov_r.shape != (f, f):
        raise ValueError(f"need ref_mean [F] and ref_cov [F, F], got {mu_r.shape}, {cov_r.shape}")
    cov_r = (cov_r + cov_r.T) / 2.0
    root = _psd_sqrt(cov_r)
    tr_ref = float(np.trace(cov_r))

    def fid(rows: np.ndarray) -> float:
        x = np.asarray(rows, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != f or x.shape[0] < 2:
            raise ValueError(f"need feature rows [n >= 2, {f}], got shape {x.shape}")
        n = x.shape[0]
        mu = x.mean(axis=0)
        xc = x - mu
        y = xc @ root
        gram = y @ y.T if n < f else y.T @ y
        eig = np.clip(np.linalg.eigvalsh(gram), 0.0, None) / (n - 1)
        diff = mu - mu_r
        value = diff @ diff + np.einsum("ij,ij->", xc, xc) / (n - 1) + tr_ref
        return max(float(value - 2.0 * np.sqrt(eig).sum()), 0.0)  # >= 0; clamp rounding only

    return fid


# ---------------------------------------------------------------------------------------------
# Rank table (SD3 Table 1 style)


def _rank_matrix(
    per_seed: Mapping[str, Mapping[str, Sequence[float]]],
) -> tuple[list[str], list[str], np.ndarray]:
    """``values[metric, config, seed]`` after checking every config has every metric for the
    same seeds (the bootstrap draws the same seed indices for all of them)."""
    configs = list(per_seed)
    if not configs:
        raise ValueError("per_seed must name at least one config")
    metrics = list(per_seed[configs[0]])
    if not metrics:
        raise ValueError(f"config {configs[0]!r} has no metrics")
    for c in configs:
        if set(per_seed[c]) != set(metrics):
            raise ValueError(f"config {c!r} has metrics {sorted(per_seed[c])}, want {metrics}")
    n_seeds = {len(per_seed[c][m]) for c in configs for m in metrics}
    if len(n_seeds) != 1 or 0 in n_seeds:
        raise ValueError(f"every config and metric needs the same K >= 1 seeds, got {n_seeds}")
    values = np.array([[per_seed[c][m] for c in configs] for m in metrics], dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("per-seed metric values must be finite")
    return configs, metrics, values


def _ranks(means: np.ndarray, higher: np.ndarray) -> np.ndarray:
    """Ranks (1 = best, ties averaged) along axis 1 of ``means[metric, config, ...]``."""
    signed = np.where(higher.reshape((-1,) + (1,) * (means.ndim - 1)), -means, means)
    return stats.rankdata(signed, method="average", axis=1)


def rank_table(
    per_seed: Mapping[str, Mapping[str, Sequence[float]]],
    higher_is_better: Mapping[str, bool],
    level: float = 0.95,
    n_boot: int = 1000,
    rng: RngLike = 0,
) -> list[RankRow]:
    """Rank configs per metric by their mean over seeds and average the ranks over metrics.

    ``per_seed[config][metric]``: the metric's value for seed 0..K-1 (seed k shared by all
    configs). The mean-rank interval resamples seed indices, the same for every config and
    metric, so it shows how much the ordering depends on which seeds were drawn. It is a plain
    percentile interval: with K = 3 it is descriptive, not a calibrated 95% (nan when K == 1).
    Rows are sorted by mean rank (then name).
    """
    _check_level(level)
    configs, metrics, values = _rank_matrix(per_seed)
    missing = [m for m in metrics if m not in higher_is_better]
    if missing:
        raise ValueError(f"higher_is_better lacks metrics {missing}")
    higher = np.array([bool(higher_is_better[m]) for m in metrics])
    ranks = _ranks(values.mean(axis=2), higher)  # [metric, config]
    mean_rank = ranks.mean(axis=0)
    k = values.shape[2]
    low = high = np.full(len(configs), math.nan)
    if k > 1:
        if n_boot < 2:
            raise ValueError(f"n_boot must be >= 2, got {n_boot}")
        idx = np.random.default_rng(rng).integers(0, k, size=(n_boot, k))
        boot_means = values[:, :, idx].mean(axis=3)  # [metric, config, boot]
        boot_mean_rank = _ranks(boot_means, higher).mean(axis=0)  # [config, boot]
        alpha = 1.0 - level
        low, high = np.quantile(boot_mean_rank, [alpha / 2.0, 1.0 - alpha / 2.0], axis=1)
    rows = [
        RankRow(
            config=c,
            ranks={m: float(ranks[i, j]) for i, m in enumerate(metrics)},
            mean_rank=float(mean_rank[j]),
            mean_rank_low=float(low[j]),
            mean_rank_high=float(high[j]),
        )
        for j, c in enumerate(configs)
    ]
    return sorted(rows, key=lambda r: (r.mean_rank, r.config))
