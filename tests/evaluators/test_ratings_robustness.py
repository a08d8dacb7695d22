"""Robustness of the leaderboard: top_flip (greedy, checked against brute force) and the
Laplace intervals that keep small-n intervals from collapsing to a point."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from evaluators import ratings


def brute_force_flip(battles: list[tuple[str, str, str]], names: list[str]) -> int | None:
    """Smallest k such that removing some k of the votes leaves the leader not strictly ahead."""
    full = ratings.fit_log_strengths(ratings.aggregate(battles, names).wins)
    leader = int(np.argmax(full))
    for k in range(len(battles) + 1):
        for drop in itertools.combinations(range(len(battles)), k):
            kept = [b for pos, b in enumerate(battles) if pos not in drop]
            if not kept:
                return k  # nothing left: everyone at 0, a tie at the top
            theta = ratings.fit_log_strengths(ratings.aggregate(kept, names).wins)
            if ratings._leader_margin(theta, leader) <= 1e-9:
                return k
    return None


def test_simple_case_greedy_is_the_minimum():
    battles = [("a", "b", "left")] * 3 + [("b", "a", "left")]
    flip = ratings.top_flip(ratings.aggregate(battles))
    assert flip.leader == "a" and flip.votes == 2 == brute_force_flip(battles, ["a", "b"])
    assert flip.removed == (("a", "b", "left"),) * 2


def test_ties_count_half_in_the_flip():
    # a: one win and one tie over b; removing the win leaves a tie at the top.
    battles = [("a", "b", "left"), ("a", "b", "tie")]
    assert (
        ratings.top_flip(ratings.aggregate(battles)).votes
        == 1
        == brute_force_flip(battles, ["a", "b"])
    )


@pytest.mark.parametrize("seed", range(8))
def test_greedy_is_an_upper_bound_of_the_brute_force_minimum(seed: int):
    rng = np.random.default_rng(seed)
    names = ["a", "b", "c"]
    strength = {"a": 1.0, "b": 0.3, "c": 0.0}
    battles = []
    for _ in range(8):
        i, j = rng.choice(3, 2, replace=False)
        p = 1 / (1 + np.exp(strength[names[j]] - strength[names[i]]))
        outcome = "tie" if rng.random() < 0.15 else ("left" if rng.random() < p else "right")
        battles.append((names[i], names[j], outcome))
    truth = brute_force_flip(battles, names)
    flip = ratings.top_flip(ratings.aggregate(battles, names))
    assert truth is not None and flip.votes is not None
    assert flip.votes >= truth
    assert len(flip.removed) == flip.votes


def test_cap_says_not_reached():
    battles = [("a", "b", "left")] * 30
    flip = ratings.top_flip(ratings.aggregate(battles), cap=5)
    assert flip.votes is None and flip.cap == 5 and len(flip.removed) == 5
    assert ratings.top_flip(ratings.aggregate(battles)).votes == 30


def test_one_vote_bootstrap_is_a_point_but_laplace_is_not():
    counts = ratings.aggregate([("a", "b", "left")])
    boot = ratings.bootstrap_ratings(counts, rounds=50)
    assert np.all(boot.upper - boot.lower < 1e-6)  # the problem: every resample is that vote
    lower, upper = ratings.laplace_intervals(counts)
    assert np.all(upper - lower > 100)
    # Mean at 1000 with two contestants: 1000 inside both means a zero difference is inside.
    assert np.all((lower < 1000) & (upper > 1000))


def test_laplace_intervals_match_the_bootstrap_at_large_n():
    rng = np.random.default_rng(0)
    battles = []
    for _ in range(3000):
        i, j = rng.choice(4, 2, replace=False)
        p = 1 / (1 + np.exp(0.5 * (j - i)))
        battles.append((f"c{i}", f"c{j}", "left" if rng.random() < p else "right"))
    counts = ratings.aggregate(battles)
    boot = ratings.bootstrap_ratings(counts, rounds=400)
    lower, upper = ratings.laplace_intervals(counts)
    np.testing.assert_allclose(upper - lower, boot.upper - boot.lower, rtol=0.2)
    lo_a, hi_a = ratings.laplace_intervals(counts, anchor="c0")
    assert hi_a[0] - lo_a[0] == pytest.approx(0.0, abs=1e-6)  # the anchor is a point
