"""Contextual Bradley-Terry: checked against an independent fit (scipy.optimize on the same
likelihood, numerical Hessian for the standard errors) and on simulations with known effects."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit, log_expit

from evaluators import ratings
from evaluators.contextual import (
    categorical_design,
    fit_contextual_bt,
    outcome_scores,
)


def simulate(
    beta: float = 0.7, votes: int = 3000, seed: int = 0, residual_sd: float = 0.0, ties=True
):
    """12 contestants in 3 levels (a: baseline, b: +beta, c: -0.4), one style covariate
    (gamma 0.3); with ``ties``, 10 % of the votes become ties and 5 % both_bad whatever the
    strengths (which shrinks the effects the model sees, so the recovery test has none)."""
    rng = np.random.default_rng(seed)
    level = np.array(list("aaaabbbbcccc"))
    effect = {"a": 0.0, "b": beta, "c": -0.4}
    strength = np.array([effect[v] for v in level]) + residual_sd * rng.standard_normal(12)
    left = rng.integers(0, 12, votes)
    right = (left + rng.integers(1, 12, votes)) % 12
    z = rng.standard_normal((votes, 1))
    p = expit(strength[left] - strength[right] + 0.3 * z[:, 0])
    u = rng.random(votes)
    outcome = np.where(u < p, "left", "right").astype(object)
    tie = rng.random(votes) if ties else np.ones(votes)
    outcome[tie < 0.10] = "tie"
    outcome[(tie >= 0.10) & (tie < 0.15)] = "both_bad"
    return level, left, right, list(outcome), z


def scipy_fit(d: np.ndarray, y: np.ndarray, penalty: np.ndarray):
    """Independent fit: BFGS on the negative penalised log-likelihood; SEs from a central
    finite-difference Hessian of its analytic gradient."""

    def f(t):
        eta = d @ t
        return -float((y * log_expit(eta) + (1 - y) * log_expit(-eta)).sum()) + 0.5 * float(
            (penalty * t * t).sum()
        )

    def g(t):
        return -(d.T @ (y - expit(d @ t))) + penalty * t

    res = minimize(f, np.zeros(d.shape[1]), jac=g, method="BFGS", options={"gtol": 1e-11})
    h = np.empty((d.shape[1],) * 2)
    eps = 1e-5
    for k in range(d.shape[1]):
        e = np.zeros(d.shape[1])
        e[k] = eps
        h[:, k] = (g(res.x + e) - g(res.x - e)) / (2 * eps)
    return res.x, np.linalg.inv(h)


def test_outcome_scores_follow_the_rating_convention():
    assert outcome_scores(["left", "right", "tie", "both_bad"]).tolist() == [1, 0, 0.5, 0.5]
    with pytest.raises(ValueError, match="unknown outcome 'draw'"):
        outcome_scores(["draw"])


def test_categorical_design_drops_the_baseline():
    x, levels, base = categorical_design(["b", "a", "a", "c"])
    assert base == "a" and levels == ["b", "c"]
    assert x.tolist() == [[1, 0], [0, 0], [0, 0], [0, 1]]
    _, levels, base = categorical_design(["b", "a", "c"], baseline="c")
    assert base == "c" and levels == ["a", "b"]
    with pytest.raises(ValueError, match="only one level"):
        categorical_design(["a", "a"])
    with pytest.raises(ValueError, match="baseline 'z' is not one of"):
        categorical_design(["a", "b"], baseline="z")


def test_matches_scipy_without_ridge():
    level, left, right, outcome, z = simulate()
    x, levels, _ = categorical_design(list(level))
    y = outcome_scores(outcome)
    fit = fit_contextual_bt(left, right, y, x, ["b", "c", "style"], vote_z=z)
    d = np.concatenate([x[left] - x[right], z], axis=1)
    coef, cov = scipy_fit(d, y, np.zeros(3))
    np.testing.assert_allclose(fit.coef, coef, atol=1e-6)
    np.testing.assert_allclose(fit.se, np.sqrt(np.diag(cov)), atol=1e-6)
    assert levels == ["b", "c"]
    assert np.all(fit.lower < fit.coef) and np.all(fit.coef < fit.upper)
    lo, hi = fit.odds_ratio_interval
    np.testing.assert_allclose(lo, np.exp(fit.lower))
    assert np.all((lo < fit.odds_ratio) & (fit.odds_ratio < hi))


def test_matches_scipy_with_residual_strengths():
    level, left, right, outcome, _z = simulate(votes=800, seed=1, residual_sd=0.3)
    x, _, _ = categorical_design(list(level))
    y = outcome_scores(outcome)
    fit = fit_contextual_bt(left, right, y, x, ["b", "c"], l2=0.01, residual_l2=2.0)
    e = np.zeros((len(y), 12))
    e[np.arange(len(y)), left] += 1
    e[np.arange(len(y)), right] -= 1
    d = np.concatenate([x[left] - x[right], e], axis=1)
    coef, cov = scipy_fit(d, y, np.array([0.01, 0.01] + [2.0] * 12))
    np.testing.assert_allclose(fit.coef, coef[:2], atol=1e-6)
    np.testing.assert_allclose(fit.residual, coef[2:], atol=1e-6)
    np.testing.assert_allclose(fit.se, np.sqrt(np.diag(cov))[:2], atol=1e-6)
    # Residuals widen the intervals: a level's effect is now what four contestants share.
    plain = fit_contextual_bt(left, right, y, x, ["b", "c"], l2=0.01)
    assert np.all(fit.se > plain.se)


def test_one_level_per_contestant_is_the_bradley_terry_fit():
    """With every contestant its own level, the model is plain BT: same ties treatment."""
    _level, left, right, outcome, _ = simulate(votes=600, seed=2)
    names = [f"k{i:02d}" for i in range(12)]
    x, levels, _base = categorical_design(names, baseline="k00")
    fit = fit_contextual_bt(left, right, outcome_scores(outcome), x, levels)
    counts = ratings.aggregate(
        [(names[a], names[b], o) for a, b, o in zip(left, right, outcome, strict=True)]
    )
    theta = ratings.fit_log_strengths(counts.wins, l2=0.0)
    np.testing.assert_allclose(fit.coef, theta[1:] - theta[0], atol=1e-6)


def test_known_effect_is_recovered_inside_its_interval():
    covered = 0
    for seed in range(10):
        level, left, right, outcome, z = simulate(beta=0.7, votes=1500, seed=10 + seed, ties=False)
        x, _, _ = categorical_design(list(level))
        fit = fit_contextual_bt(left, right, outcome_scores(outcome), x, ["b", "c", "s"], vote_z=z)
        covered += fit.lower[0] <= 0.7 <= fit.upper[0]
        assert fit.lower[0] > 0  # the effect is resolved at 1500 votes
    # 95 % intervals: 9.5 of 10 expected; P(fewer than 8 | 95 % coverage) is about 1 %.
    assert covered >= 8


def test_errors_name_the_problem():
    x = np.array([[0.0], [1.0]])
    with pytest.raises(ValueError, match="never lost or never won"):
        fit_contextual_bt([1, 1], [0, 0], [1.0, 1.0], x, ["b"])
    fit = fit_contextual_bt([1, 1], [0, 0], [1.0, 1.0], x, ["b"], l2=0.1)
    assert np.isfinite(fit.coef).all() and fit.se[0] > 0
    with pytest.raises(ValueError, match="not identified"):
        fit_contextual_bt([0, 0], [0, 0], [1.0, 0.0], x, ["b"])
    with pytest.raises(ValueError, match="2 names for 1 covariates"):
        fit_contextual_bt([1, 0], [0, 1], [1.0, 0.0], x, ["b", "c"])
    with pytest.raises(ValueError, match="scores must lie in"):
        fit_contextual_bt([1, 0], [0, 1], [2.0, 0.0], x, ["b"])
