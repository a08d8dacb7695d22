"""The rating engine: aggregation, Bradley-Terry fit, bootstrap, rank, Elo, pair sampling.

The fit is checked against closed forms, against scipy.optimize on the expanded battles, and on
simulated battles from known strengths; the bootstrap against its nominal coverage. All fast.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import log_expit

from evaluators import ratings as R
from evaluators.ratings import (
    DEFAULT_L2,
    POINTS_PER_NAT,
    PairCounts,
    aggregate,
    bootstrap_ratings,
    fit_bradley_terry,
    fit_log_strengths,
    next_pairs,
    online_elo,
    pair_power,
    pair_scores,
    rank_with_intervals,
)


def simulate(
    theta: np.ndarray, m: int, rng: np.random.Generator, tie_rate: float = 0.0
) -> list[R.Battle]:
    """``m`` battles between uniformly random pairs; left wins with prob σ(θ_l - θ_r).

    With ``tie_rate`` > 0, that share of battles is a tie or both_bad (half each) regardless of
    strength; this is not a Bradley-Terry process, so use it only where the truth is not compared.
    """
    n = len(theta)
    left = rng.integers(0, n, m)
    right = rng.integers(0, n - 1, m)
    right[right >= left] += 1
    p = 1.0 / (1.0 + np.exp(-(theta[left] - theta[right])))
    u = rng.random(m)
    outcome = np.where(rng.random(m) < p, 0, 1)
    tie = u < tie_rate
    outcome[tie] = np.where(u[tie] < tie_rate / 2, 2, 3)
    names = [f"c{k}" for k in range(n)]
    return [
        (names[a], names[b], R.OUTCOMES[o])
        for a, b, o in zip(left.tolist(), right.tolist(), outcome.tolist(), strict=True)
    ]


def counts_from(spec: dict[tuple[str, str], tuple[int, int]]) -> PairCounts:
    """Counts from ``{(a, b): (a's wins, b's wins)}``."""
    battles: list[R.Battle] = []
    for (a, b), (wa, wb) in spec.items():
        battles += [(a, b, "left")] * wa + [(a, b, "right")] * wb
    return aggregate(battles)


# ------------------------------------------------------------------------------- aggregation


def test_aggregate_orients_pairs_and_counts_ties_half() -> None:
    battles = [
        ("b", "a", "left"),  # b beats a, shown with b on the left
        ("a", "b", "left"),
        ("a", "b", "tie"),
        ("b", "a", "both_bad"),
        ("a", "c", "right"),
    ]
    counts = aggregate(battles)
    assert counts.names == ("a", "b", "c")
    assert counts.total == 5
    assert counts.pairs.tolist() == [[0, 1], [0, 2]]
    assert counts.cells.tolist() == [[1, 1, 1, 1], [0, 1, 0, 0]]
    np.testing.assert_array_equal(counts.wins, [[0, 2, 0], [2, 0, 0], [1, 0, 0]])
    np.testing.assert_array_equal(counts.battles, [[0, 4, 1], [4, 0, 0], [1, 0, 0]])


def test_aggregate_accepts_lists_iterators_and_a_fixed_name_order() -> None:
    battles = [["x", "y", "left"], ["y", "x", "left"]]  # as read back from JSON
    counts = aggregate(iter(battles), names=["y", "x", "z"])
    assert counts.names == ("y", "x", "z")
    assert counts.cells.tolist() == [[1, 1, 0, 0]]
    assert counts.mle_problems() == ["never compared: z"]


def test_pair_counts_from_stored_cells_round_trip() -> None:
    counts = aggregate([("a", "b", "left"), ("c", "b", "tie"), ("a", "c", "both_bad")])
    again = PairCounts(counts.names, counts.pairs, counts.cells)
    np.testing.assert_array_equal(again.wins, counts.wins)
    assert not again.cells.flags.writeable


@pytest.mark.parametrize(
    ("battles", "kwargs", "message"),
    [
        ([], {}, "no battles"),
        ([("a", "b", "left"), ("a", "b", "draw")], {}, "#1 ('a', 'b', 'draw'): unknown outcome"),
        ([("a", "b", "draw")], {}, "allowed: 'left', 'right', 'tie', 'both_bad'"),
        ([("b", "a", "tie"), ("a", "a", "tie")], {}, "#1 ('a', 'a', 'tie'): contestant 'a' is"),
        ([("a", "a", "left")], {}, "contestant 'a' is compared with itself"),
        (
            [("a", "b", "left")],
            {"names": ["a", "bb"]},
            "unknown contestant 'b' (did you mean 'bb'?)",
        ),
        ([("a", "b")], {}, "must be a (left, right, outcome) triple"),
        ([("a", "", "left")], {}, "non-empty strings"),
        ([["a", "b", {"x": 1}]], {}, "battle #0"),
        ([("a", "b", "left")], {"names": ["a", "b", "a"]}, "repeated: ['a']"),
    ],
)
def test_aggregate_rejects_bad_input_with_a_clear_message(
    battles: list, kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError) as e:
        aggregate(battles, **kwargs)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("pairs", "cells", "message"),
    [
        ([[1, 0]], [[1, 0, 0, 0]], "i < j"),
        ([[0, 1], [0, 1]], [[1, 0, 0, 0], [0, 1, 0, 0]], "appears twice"),
        ([[0, 5]], [[1, 0, 0, 0]], "must lie in [0, 2)"),
        ([[0, 1]], [[-1, 0, 0, 0]], "non-negative"),
    ],
)
def test_pair_counts_validates_stored_cells(pairs: list, cells: list, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        PairCounts(("a", "b"), np.array(pairs), np.array(cells))


# ------------------------------------------------------------------------------------- fit


@pytest.mark.parametrize("tie", ["tie", "both_bad"])
def test_ties_count_half_closed_form(tie: str) -> None:
    # a beats b 3 times and 2 are ties: a has 4 of 5 "wins", so p = 4/5 and the odds are 4.
    counts = aggregate([("a", "b", "left")] * 3 + [("b", "a", tie)] * 2)
    r = fit_bradley_terry(counts, l2=0.0)
    assert r[0] - r[1] == pytest.approx(400 * math.log10(4), abs=1e-6)
    assert r.mean() == pytest.approx(1000.0)
    anchored = fit_bradley_terry(counts, l2=0.0, anchor="b")
    assert anchored.tolist() == pytest.approx([1000 + 400 * math.log10(4), 1000.0], abs=1e-6)


def test_recovers_known_strengths_from_simulated_battles() -> None:
    rng = np.random.default_rng(1)
    true = np.array([-500.0, -300.0, -150.0, -40.0, 0.0, 60.0, 200.0, 450.0]) / POINTS_PER_NAT
    counts = aggregate(simulate(true, 40_000, rng))
    r = fit_bradley_terry(counts)
    truth = POINTS_PER_NAT * (true - true.mean()) + 1000.0
    assert np.corrcoef(r, truth)[0, 1] > 0.99
    # ~10,000 battles per contestant: standard errors of ~4 points.
    np.testing.assert_allclose(r, truth, atol=20.0)


def reference_fit(battles: list[R.Battle], names: tuple[str, ...], l2: float) -> np.ndarray:
    """Independent fit: L-BFGS on the per-battle log-likelihood (ties as outcome ½)."""
    index = {x: k for k, x in enumerate(names)}
    left = np.array([index[b[0]] for b in battles])
    right = np.array([index[b[1]] for b in battles])
    y = np.array([{"left": 1.0, "right": 0.0}.get(b[2], 0.5) for b in battles])

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        d = theta[left] - theta[right]
        value = -(y * log_expit(d) + (1 - y) * log_expit(-d)).sum() + 0.5 * l2 * theta @ theta
        resid = y - 1.0 / (1.0 + np.exp(-d))
        grad = -np.bincount(left, resid, len(names)) + np.bincount(right, resid, len(names))
        return value, grad + l2 * theta

    x0 = np.zeros(len(names))
    res = minimize(nll, x0, jac=True, method="L-BFGS-B", options={"gtol": 1e-11, "ftol": 1e-15})
    assert res.success, res.message
    theta = res.x - res.x.mean()
    return POINTS_PER_NAT * theta + 1000.0


@pytest.mark.parametrize("l2", [0.0, DEFAULT_L2, 1.0])
def test_matches_scipy_reference_on_expanded_battles(l2: float) -> None:
    rng = np.random.default_rng(2)
    true = rng.normal(0.0, 1.0, 6)
    battles = simulate(true, 600, rng, tie_rate=0.2)
    counts = aggregate(battles)
    assert counts.mle_problems() == []
    ours = fit_bradley_terry(counts, l2=l2)
    np.testing.assert_allclose(ours, reference_fit(battles, counts.names, l2), atol=1e-3)


def test_batched_fit_equals_one_at_a_time() -> None:
    rng = np.random.default_rng(3)
    wins = rng.integers(0, 20, (5, 7, 7)).astype(float)
    batched = fit_log_strengths(wins)
    for b in range(5):
        np.testing.assert_allclose(batched[b], fit_log_strengths(wins[b]), atol=1e-10)
    assert fit_log_strengths(wins[None]).shape == (1, 5, 7)


def test_plain_mle_refuses_when_it_does_not_exist_and_the_prior_copes() -> None:
    counts = counts_from({("a", "b"): (5, 0), ("b", "c"): (3, 2)})  # a never lost
    with pytest.raises(ValueError, match=r"never lost: a.*use l2 > 0"):
        fit_bradley_terry(counts, l2=0.0)
    r = fit_bradley_terry(counts)
    assert np.all(np.isfinite(r)) and r.argmax() == 0
    # Two groups never compared: the prior centres each group; the plain MLE refuses.
    apart = counts_from({("a", "b"): (3, 1), ("c", "d"): (1, 3)})
    assert len(set(apart.components().tolist())) == 2
    assert "2 groups never compared" in "; ".join(apart.mle_problems())
    r = fit_bradley_terry(apart)
    assert r[0] - r[1] == pytest.approx(r[3] - r[2], abs=1e-9)


def test_fit_rejects_bad_arguments() -> None:
    counts = counts_from({("a", "b"): (2, 1)})
    with pytest.raises(ValueError, match=re.escape("unknown contestant 'bb' (did you mean 'b'?)")):
        fit_bradley_terry(counts, anchor="bb")
    with pytest.raises(ValueError, match="l2 must be >= 0"):
        fit_bradley_terry(counts, l2=-1.0)
    with pytest.raises(ValueError, match="no battles"):
        fit_bradley_terry(PairCounts(("a", "b"), np.zeros((0, 2)), np.zeros((0, 4))))
    with pytest.raises(ValueError, match="bootstrap needs l2 > 0"):
        bootstrap_ratings(counts, l2=0.0)


# ------------------------------------------------------------------------- bootstrap, rank


def test_bootstrap_is_seeded_batch_independent_and_anchored() -> None:
    rng = np.random.default_rng(4)
    counts = aggregate(simulate(np.array([0.0, 0.3, 0.6, 1.5]), 800, rng, tie_rate=0.1))
    a = bootstrap_ratings(counts, rounds=300, seed=7, anchor="c0")
    b = bootstrap_ratings(counts, rounds=300, seed=7, anchor="c0", batch_rounds=17)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert a.samples.shape == (300, 4)
    assert not np.array_equal(a.samples, bootstrap_ratings(counts, rounds=300, seed=8).samples)
    np.testing.assert_allclose(a.rating, fit_bradley_terry(counts, anchor="c0"))
    assert a.rating[0] == a.lower[0] == a.upper[0] == 1000.0  # the anchor is a fixed point
    assert np.all(a.lower[1:] < a.rating[1:]) and np.all(a.rating[1:] < a.upper[1:])
    diff, lo, hi = a.difference("c3", "c1")
    assert lo < diff < hi and diff == pytest.approx(a.rating[3] - a.rating[1])
    rows = a.table()
    assert [row["name"] for row in rows] == ["c3", "c2", "c1", "c0"]
    assert rows[0]["rank"] == 1


def test_bootstrap_intervals_cover_the_truth_at_about_the_nominal_rate() -> None:
    rng = np.random.default_rng(5)
    true = np.array([-0.6, -0.1, 0.2, 0.5])
    truth = POINTS_PER_NAT * (true - true.mean()) + 1000.0
    hits = []
    for rep in range(100):
        counts = aggregate(simulate(true, 400, rng))
        fit = bootstrap_ratings(counts, rounds=200, seed=rep)
        hits.append((fit.lower <= truth) & (truth <= fit.upper))
    coverage = float(np.mean(hits))  # 400 interval checks, nominal 0.95 (sd ~0.011)
    assert 0.85 <= coverage <= 1.0, coverage


def test_rank_with_intervals_hand_made() -> None:
    lower = np.array([10.0, 5.0, 0.0, -20.0])
    upper = np.array([20.0, 15.0, 8.0, -10.0])
    # 0 and 1 overlap: both first. 2 is beaten beyond doubt by 0 only. 3 by all three.
    assert rank_with_intervals(lower, upper).tolist() == [1, 1, 2, 4]


# ------------------------------------------------------------------------------------ Elo


def test_online_elo_hand_computed_sequence() -> None:
    battles = [("a", "b", "left"), ("b", "a", "tie"), ("c", "a", "right")]
    r = online_elo(battles, k=32)
    # 1: E = 0.5, a = 1000 + 32·0.5 = 1016, b = 984.
    # 2: E_a = 1/(1 + 10^(-32/400)) = 0.545922, a = 1016 + 32·(0.5 - 0.545922) = 1014.530498.
    # 3: E_c = 1/(1 + 10^(14.530498/400)) = 0.479101, c = 1000 - 32·0.479101 = 984.668764,
    #    a = 1014.530498 + 15.331236 = 1029.861734.
    assert list(r) == ["a", "b", "c"]
    assert r["a"] == pytest.approx(1029.861734, abs=1e-5)
    assert r["b"] == pytest.approx(985.469502, abs=1e-5)
    assert r["c"] == pytest.approx(984.668764, abs=1e-5)
    assert sum(r.values()) == pytest.approx(3000.0)
    with pytest.raises(ValueError, match=r"battle #1 .*unknown outcome 'win'"):
        online_elo([("a", "b", "left"), ("a", "b", "win")])
    with pytest.raises(ValueError, match="no battles"):
        online_elo([])


# ------------------------------------------------------------------ steering a session


@pytest.fixture(scope="module")
def session() -> tuple[PairCounts, R.Ratings]:
    # a, b, c equal and measured to death; d equal to c but seen 4 times; e far weaker.
    counts = counts_from(
        {
            ("a", "b"): (500, 500),
            ("a", "c"): (500, 500),
            ("b", "c"): (500, 500),
            ("c", "d"): (2, 2),
            ("a", "e"): (29, 1),
        }
    )
    return counts, bootstrap_ratings(counts, rounds=400, seed=0)


def test_sampler_prefers_an_uncertain_close_pair_over_a_well_measured_one(
    session: tuple[PairCounts, R.Ratings],
) -> None:
    counts, ratings = session
    s = pair_scores(counts, ratings)
    a, b, c, d = (counts.index(x) for x in "abcd")
    assert s[c, d] > 100 * s[a, b]
    assert np.allclose(s, s.T) and np.all(np.diag(s) == 0)
    first = next_pairs(counts, ratings, k=3, seed=0)
    assert all("d" in pair for pair in first), first
    assert next_pairs(counts, ratings, k=3, seed=0) == first  # deterministic under a seed
    assert len(next_pairs(counts, ratings, k=10, seed=1)) == 10


def test_sampler_connects_separate_groups_first_and_copes_with_no_battles() -> None:
    counts = aggregate(
        [("a", "b", "left")] * 30 + [("c", "d", "right")] * 30 + [("a", "c", "tie")],
        names=["a", "b", "c", "d", "z"],
    )
    pair = next_pairs(counts, k=1, seed=0)[0]
    assert "z" in pair  # z was never shown: any pair with z beats the rest
    empty = PairCounts(("a", "b", "c"), np.zeros((0, 2)), np.zeros((0, 4)))
    drawn = next_pairs(empty, k=4, seed=3)
    assert len(drawn) == 4 and all(x != y for x, y in drawn)


def test_pair_power_reports_why(session: tuple[PairCounts, R.Ratings]) -> None:
    counts, ratings = session
    close = pair_power(counts, ratings, "a", "b")
    assert close.underpowered and close.battles == 1000
    assert "interval of rating(a) - rating(b)" in close.reason and "includes 0" in close.reason
    few = pair_power(counts, ratings, "c", "d")
    assert few.underpowered and "only 4 direct battles between c and d (fewer than 20)" in (
        few.reason
    )
    clear = pair_power(counts, ratings, "e", "a")
    assert not clear.underpowered and clear.difference < 0 and clear.upper < 0
    assert clear.reason.startswith("a is ahead of e by")
    indirect = pair_power(counts, ratings, "a", "d", min_battles=0)
    assert indirect.underpowered and "includes 0" in indirect.reason
    assert "no direct battles between a and d" in pair_power(counts, ratings, "a", "d").reason
    with pytest.raises(ValueError, match="compared with itself"):
        pair_power(counts, ratings, "a", "a")
    apart = aggregate([("a", "b", "left"), ("b", "a", "left"), ("c", "d", "tie")])
    far = pair_power(apart, bootstrap_ratings(apart, rounds=50), "a", "c", min_battles=0)
    assert far.underpowered and "no chain of battles connects a and c" in far.reason
