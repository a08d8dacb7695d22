"""Contextual Bradley-Terry: the effect of covariates (training choices, image style) on win odds.

Pure numpy/scipy, no I/O. Where :mod:`evaluators.ratings` gives every contestant a free
strength, here a contestant's strength is explained by its covariates::

    P(left beats right) = σ((x_left - x_right)·β + z_vote·γ + u_left - u_right)

* ``x``: per-contestant covariates, e.g. a training choice encoded by :func:`categorical_design`
  as one-hot minus a baseline level (the baseline's column is dropped: a constant shared by
  everyone cancels in the difference, so only contrasts against the baseline are identified).
  Seed replicas of one configuration share their ``x``, so their votes are pooled.
* ``z``: per-vote covariates, already differenced (left image's value minus right image's,
  e.g. brightness), as in LMArena's style control: γ says whether raters prefer the style,
  β is then the effect of the choice with style held fixed.
* ``u``: optional per-contestant residual strengths with a ridge (``residual_l2``), i.e.
  random effects ``u ~ N(0, 1/residual_l2)``. Without them, one odd contestant (a lucky seed)
  is read as the effect of its level; with them, a level's effect is what its contestants
  share, and the standard errors widen to say that few contestants inform it.

Conventions are those of :mod:`evaluators.ratings`: a ``tie`` and a ``both_bad`` vote each count
as half a win to each side (:func:`outcome_scores`: outcome 0.5 in the logistic likelihood,
exactly what :func:`evaluators.ratings.aggregate` does with them), left/right position carries
no term. The fit maximises the (penalised) log-likelihood by Newton's method; standard errors
come from the inverse of the penalised observed information (the Hessian; the Fisher
information too, since the logit link is canonical), so they are the MLE's when ``l2 = 0``
and no residuals are fitted, and the Laplace approximation of the posterior otherwise.
Intervals are Wald intervals ``β ± z·SE``; odds ratios are ``exp`` of those.

Why by hand: ``statsmodels`` is not a dependency here, and neither it nor ``scipy`` fits a
logistic regression with fractional (tie) outcomes, a ridge on only some coefficients and
per-contestant random effects on a difference design; the Newton solve is a few lines. It is
tested against ``scipy.optimize.minimize`` on the same likelihood.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import expit, log_expit
from scipy.stats import norm

from evaluators.judging import OUTCOMES

_SCORE = {"left": 1.0, "right": 0.0, "tie": 0.5, "both_bad": 0.5}


def outcome_scores(outcomes: Sequence[str]) -> np.ndarray:
    """Outcomes -> the left side's score: 1 (left), 0 (right), ½ (tie and both_bad)."""
    bad = [o for o in outcomes if o not in _SCORE]
    if bad:
        raise ValueError(f"unknown outcome {bad[0]!r}; allowed: {', '.join(map(repr, OUTCOMES))}")
    return np.array([_SCORE[o] for o in outcomes], dtype=float)


def categorical_design(
    values: Sequence[Hashable], baseline: Hashable | None = None
) -> tuple[np.ndarray, list[Hashable], Hashable]:
    """One-hot minus a baseline: ``values[k]`` (contestant k's level) -> ``X [n, L-1]``.

    Returns ``(X, levels, baseline)``: ``levels`` are the non-baseline levels in column order
    (sorted by their text), ``baseline`` the dropped one. Default baseline: the most frequent
    level (ties: the first in sorted order), whose contrasts are then the best measured.
    """
    if not values:
        raise ValueError("no contestants: need at least one value to encode")
    distinct = sorted(set(values), key=str)
    if baseline is None:
        baseline = max(distinct, key=lambda v: (list(values).count(v), -distinct.index(v)))
    elif baseline not in distinct:
        raise ValueError(f"baseline {baseline!r} is not one of the levels {distinct}")
    if len(distinct) < 2:
        raise ValueError(
            f"only one level ({distinct[0]!r}) among the contestants: an effect needs at least "
            "two levels to compare"
        )
    levels = [v for v in distinct if v != baseline]
    x = np.array([[float(v == level) for level in levels] for v in values])
    return x, levels, baseline


@dataclass(frozen=True, eq=False)
class ContextualFit:
    """A fitted contextual Bradley-Terry model.

    ``names``: the covariates (contestant columns first, then vote columns); ``coef``, ``se``:
    log-odds effects and their standard errors; ``lower``, ``upper``: the ``confidence`` Wald
    interval; ``cov``: their covariance; ``residual``: fitted per-contestant residual
    strengths (None without them); ``loglik``: the unpenalised log-likelihood at the fit;
    ``iterations``: Newton steps taken.
    """

    names: tuple[str, ...]
    coef: np.ndarray
    se: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    cov: np.ndarray
    residual: np.ndarray | None
    loglik: float
    confidence: float
    l2: float
    residual_l2: float | None
    iterations: int

    @property
    def odds_ratio(self) -> np.ndarray:
        """``exp(coef)``: the factor on the odds of winning."""
        return np.exp(self.coef)

    @property
    def odds_ratio_interval(self) -> tuple[np.ndarray, np.ndarray]:
        """``exp`` of the interval bounds."""
        return np.exp(self.lower), np.exp(self.upper)


def _loglik(eta: np.ndarray, y: np.ndarray) -> float:
    return float((y * log_expit(eta) + (1.0 - y) * log_expit(-eta)).sum())


def difference_design(
    left: np.ndarray, right: np.ndarray, contestant_x: np.ndarray, vote_z: np.ndarray | None
) -> np.ndarray:
    """``[V, p + q]``: per vote ``x_left - x_right`` then the vote's own covariates."""
    d = contestant_x[left] - contestant_x[right]
    if vote_z is not None:
        d = np.concatenate([d, vote_z], axis=1)
    return d


def fit_contextual_bt(
    left: Sequence[int] | np.ndarray,
    right: Sequence[int] | np.ndarray,
    score: Sequence[float] | np.ndarray,
    contestant_x: np.ndarray,
    names: Sequence[str],
    *,
    vote_z: np.ndarray | None = None,
    l2: float = 0.0,
    residual_l2: float | None = None,
    confidence: float = 0.95,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> ContextualFit:
    """Fit ``P(left wins) = σ((x_l - x_r)·β + z·γ + u_l - u_r)`` by penalised Newton.

    Args:
        left, right: per vote, the contestants' row indices into ``contestant_x``.
        score: per vote, the left side's score (:func:`outcome_scores`: 1, 0 or ½).
        contestant_x: ``[n, p]`` per-contestant covariates (e.g. :func:`categorical_design`).
        names: ``p + q`` covariate names.
        vote_z: ``[V, q]`` per-vote covariates, already left minus right (None: none).
        l2: ridge on β and γ (0: the plain MLE, which is infinite when a level never lost or
            never won; the error then says so).
        residual_l2: ridge on per-contestant residual strengths ``u`` (None: no residuals).
        confidence: coverage of the Wald intervals.

    Raises:
        ValueError: mismatched shapes, bad scores, a design that does not identify the
            covariates (collinear columns), or a fit that diverges without a ridge.
    """
    left, right = np.asarray(left, dtype=np.int64), np.asarray(right, dtype=np.int64)
    y = np.asarray(score, dtype=float)
    x = np.asarray(contestant_x, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"contestant_x must be [contestants, covariates], got shape {x.shape}")
    if not (len(left) == len(right) == len(y)) or len(y) == 0:
        raise ValueError(
            f"left, right and score must have one entry per vote and at least one vote; "
            f"got {len(left)}, {len(right)}, {len(y)}"
        )
    if np.any((y < 0) | (y > 1)):
        raise ValueError("scores must lie in [0, 1] (1: left won, 0: right won, 0.5: tie)")
    n = len(x)
    if left.min() < 0 or right.min() < 0 or max(left.max(), right.max()) >= n:
        raise ValueError(f"contestant indices must lie in [0, {n})")
    if vote_z is not None:
        vote_z = np.asarray(vote_z, dtype=float).reshape(len(y), -1)
    d = difference_design(left, right, x, vote_z)
    k = d.shape[1]
    if len(names) != k:
        raise ValueError(f"{len(names)} names for {k} covariates")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if l2 < 0 or (residual_l2 is not None and residual_l2 <= 0):
        raise ValueError("l2 must be >= 0 and residual_l2 > 0 (or None for no residuals)")
    if l2 == 0 and k and np.linalg.matrix_rank(d) < k:
        raise ValueError(
            f"the covariates {list(names)} are not identified by these votes (their columns of "
            "left-minus-right are collinear, e.g. a level never compared with another level): "
            "drop a covariate or pass l2 > 0"
        )
    full = d
    penalty = np.full(k, float(l2))
    if residual_l2 is not None:
        e = np.zeros((len(y), n))
        np.add.at(e, (np.arange(len(y)), left), 1.0)
        np.add.at(e, (np.arange(len(y)), right), -1.0)
        full = np.concatenate([d, e], axis=1)
        penalty = np.concatenate([penalty, np.full(n, float(residual_l2))])

    def objective(t: np.ndarray) -> float:
        return _loglik(full @ t, y) - 0.5 * float((penalty * t * t).sum())

    theta = np.zeros(full.shape[1])
    current = objective(theta)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        p = expit(full @ theta)
        grad = full.T @ (y - p) - penalty * theta
        hess = (full * (p * (1 - p))[:, None]).T @ full + np.diag(penalty)
        step = np.linalg.lstsq(hess, grad, rcond=None)[0]
        size = 1.0
        while True:  # backtracking: a Newton step on a concave objective, halved if it overshoots
            trial = theta + size * step
            value = objective(trial)
            if value >= current - 1e-12 or size < 1e-8:
                break
            size *= 0.5
        theta, gain, current = trial, value - current, value
        if abs(gain) < tol and np.max(np.abs(size * step)) < 1e-7:
            break
    # Without a ridge, separated data (a level that never lost) send the MLE to infinity: Newton
    # then creeps outwards until the gain underflows. 20 nats is odds of 5e8, no real effect.
    if np.max(np.abs(theta), initial=0.0) > 20:
        raise ValueError(
            "the fit diverges (a coefficient passed 20 nats): some level never lost or never "
            "won against the others, so its maximum likelihood effect is infinite; pass "
            "l2 > 0 (a ridge) or collect votes where it loses and wins"
        )
    p = expit(full @ theta)
    hess = (full * (p * (1 - p))[:, None]).T @ full + np.diag(penalty)
    cov_full = np.linalg.pinv(hess)
    cov = cov_full[:k, :k]
    coef = theta[:k]
    se = np.sqrt(np.maximum(np.diag(cov), 0.0))
    zq = float(norm.ppf(0.5 + confidence / 2))
    return ContextualFit(
        names=tuple(names),
        coef=coef,
        se=se,
        lower=coef - zq * se,
        upper=coef + zq * se,
        cov=cov,
        residual=theta[k:] if residual_l2 is not None else None,
        loglik=_loglik(full @ theta, y),
        confidence=confidence,
        l2=l2,
        residual_l2=residual_l2,
        iterations=iterations,
    )
