"""The arena's rating engine: pairwise battles to Bradley-Terry ratings with bootstrap intervals.

Pure numpy/scipy, no I/O. The pipeline, as in Chatbot Arena (Chiang et al., 2024, §5):

1. :func:`aggregate` turns battles ``(left, right, outcome)`` into :class:`PairCounts`, the
   sufficient statistics: for every unordered pair of contestants, how often each outcome
   happened. Everything below works on these counts, never on the battles again.
2. :func:`fit_bradley_terry` is the maximum likelihood fit of ``P(i beats j) = σ(θ_i - θ_j)``
   (Bradley & Terry, 1952) with a weak ridge prior, reported on the Arena scale.
3. :func:`bootstrap_ratings` resamples the counts (multinomial over the observed
   (pair, outcome) cells) and refits all rounds at once, batched, giving percentile intervals
   and :func:`rank_with_intervals` (Arena's "rank (UB)").
4. :func:`online_elo` is the order-dependent secondary view.
5. :func:`next_pairs` and :func:`pair_power` steer a rating session: which pairs to show next,
   and whether a comparison already says something.

Conventions
-----------
* **Outcomes** are ``"left"`` (left won), ``"right"``, ``"tie"`` and ``"both_bad"``. For the
  rating, ``both_bad`` *is* a tie: each counts as half a win to each side (the usual
  "ties count half" treatment, which is what fitting a logistic regression on outcome 0.5 does;
  Chatbot Arena, by contrast, drops ties from its BT fit). The two stay separate in
  :class:`PairCounts` so that a report can still tell them apart.
* **Left/right position is ignored** by the model: battles are aggregated over unordered pairs.
* **Scale**: ``rating = 1000 + 400 · log10-odds``, i.e. 400 / ln 10 ≈ 173.7 points per nat of
  θ; a 400-point gap means 10:1 odds. The anchor contestant (or, without one, the mean over all
  contestants) sits at 1000.
* **Ridge prior** (``l2``, default :data:`DEFAULT_L2` = 0.01): the fit maximises
  ``Σ_ij W_ij log σ(θ_i - θ_j) - l2/2 · Σ_i θ_i²``, a N(0, 1/l2) prior on each log-strength
  (sd 10 nats ≈ 1700 points: it only matters where the data say nothing). With it, every
  comparison graph has a unique finite fit: a contestant who never lost gets a high but finite
  rating, and groups of contestants never compared with each other are each centred at the
  mean (their relative placement is the prior's, not the data's: :func:`pair_power` says so,
  and :func:`next_pairs` asks for those pairs first). ``l2=0`` is the plain MLE, which exists
  only if the "beat or tied" graph is strongly connected (Ford, 1957; Hunter, 2004, Assumption
  1); the fit then refuses with a :class:`ValueError` listing what is wrong (who never won,
  never lost, or was never compared). Chatbot Arena fits an (almost) unpenalised logistic
  regression; with the thousands of votes per contestant it has, the two agree.

Why this is written by hand
---------------------------
Checked on PyPI: ``choix`` (0.4.1) fits Bradley-Terry/Luce models from (winner, loser) pairs
but has no ties and no bootstrap; ``arena-rank`` (0.1.1, LMArena's own methodology) needs JAX,
optax, pandas and ``datasets``, and bootstraps by refitting each resample separately in a
process pool; ``trueskill`` / ``openskill`` / ``elote`` are online rating systems, not a BT
likelihood. None fits all bootstrap rounds of a BT model with ties as one batched computation
on aggregated counts, which is what makes 1,000 rounds over a million votes take under a
second on two cores here. The whole engine is a few hundred lines of numpy, tested against
``scipy.optimize`` on the expanded battles.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from scipy.special import expit, log_expit
from scipy.stats import norm

from evaluators.judging import OUTCOMES, Outcome
from trainers.names import did_you_mean

Battle = tuple[str, str, Outcome]
"""One judgement: ``(left contestant, right contestant, outcome)``."""

SCALE = 400.0
"""Arena points per log10 of the odds."""
BASE = 10.0
INITIAL_RATING = 1000.0
"""Where the anchor (or the mean) sits; also where :func:`online_elo` starts everyone."""
DEFAULT_L2 = 0.01
"""Ridge on the log-strengths θ (nats): a N(0, 1/l2) prior, see the module docstring."""
POINTS_PER_NAT = SCALE / math.log(BASE)  # ≈ 173.72

# Columns of PairCounts.cells, for the pair (i, j) with i < j.
I_WINS, J_WINS, TIE, BOTH_BAD = 0, 1, 2, 3
CELL_COLUMNS: tuple[str, ...] = ("i_wins", "j_wins", "tie", "both_bad")

# Bootstrap rounds are fitted in batches of arrays [batch, n, n]; this bounds one such array
# (float64: 2 MiB), which keeps memory flat and the working set in the CPU caches.
_BATCH_ELEMENTS = 1 << 18


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PairCounts:
    """Sufficient statistics of a set of battles: outcome counts per unordered pair.

    Attributes:
        names: the contestants, in index order.
        pairs: int64 ``[P, 2]``, each row ``(i, j)`` with ``i < j``, no pair twice. Pairs never
            compared are simply absent.
        cells: int64 ``[P, 4]``, per pair the counts of ``(i won, j won, tie, both_bad)``
            (:data:`CELL_COLUMNS`), whichever side of the screen each was shown on.

    Construct with :func:`aggregate` from battles, or directly from stored cell counts (the
    constructor validates and copies; the arrays are read-only afterwards).
    """

    names: tuple[str, ...]
    pairs: np.ndarray
    cells: np.ndarray

    def __post_init__(self) -> None:
        names = tuple(self.names)
        bad = [x for x in names if not isinstance(x, str) or not x]
        if bad:
            raise ValueError(f"contestant names must be non-empty strings, got {bad[0]!r}")
        dupes = sorted(name for name, c in Counter(names).items() if c > 1)
        if dupes:
            raise ValueError(f"contestant names must be unique; repeated: {dupes}")
        pairs = np.array(self.pairs, dtype=np.int64).reshape(-1, 2)
        cells = np.array(self.cells, dtype=np.int64).reshape(-1, 4)
        if len(pairs) != len(cells):
            raise ValueError(f"pairs has {len(pairs)} rows but cells has {len(cells)}")
        n = len(names)
        if pairs.size and (pairs.min() < 0 or pairs.max() >= n):
            raise ValueError(f"pair indices must lie in [0, {n}) for {n} contestants")
        if np.any(pairs[:, 0] >= pairs[:, 1]):
            row = int(np.flatnonzero(pairs[:, 0] >= pairs[:, 1])[0])
            raise ValueError(f"pairs must be (i, j) with i < j; row {row} is {pairs[row].tolist()}")
        if len(np.unique(pairs[:, 0] * n + pairs[:, 1])) != len(pairs):
            raise ValueError("a pair appears twice in pairs; sum its cells into one row")
        if np.any(cells < 0):
            raise ValueError("cell counts must be non-negative")
        pairs.flags.writeable = False
        cells.flags.writeable = False
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "pairs", pairs)
        object.__setattr__(self, "cells", cells)

    @property
    def n(self) -> int:
        """Number of contestants."""
        return len(self.names)

    @property
    def total(self) -> int:
        """Number of battles."""
        return int(self.cells.sum())

    def index(self, name: str) -> int:
        """Index of a contestant; unknown names get a "did you mean" error."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(
                f"unknown contestant {name!r}{did_you_mean(name, self.names)}"
            ) from None

    @property
    def wins(self) -> np.ndarray:
        """float64 ``[n, n]``: ``W[i, j]`` = wins of i over j, ties and both_bad counting ½."""
        i, j = self.pairs.T
        half = 0.5 * (self.cells[:, TIE] + self.cells[:, BOTH_BAD])
        w = np.zeros((self.n, self.n))
        w[i, j] = self.cells[:, I_WINS] + half
        w[j, i] = self.cells[:, J_WINS] + half
        return w

    @property
    def battles(self) -> np.ndarray:
        """int64 ``[n, n]``, symmetric: number of battles between i and j."""
        i, j = self.pairs.T
        m = np.zeros((self.n, self.n), dtype=np.int64)
        m[i, j] = m[j, i] = self.cells.sum(axis=1)
        return m

    def components(self) -> np.ndarray:
        """int ``[n]``: label of each contestant's connected group in the comparison graph."""
        graph = csr_matrix(self.battles > 0)
        return connected_components(graph, directed=False)[1]

    def mle_problems(self) -> list[str]:
        """Why the unpenalised (``l2=0``) MLE does not exist; empty when it does.

        The MLE exists iff the directed graph with an edge i -> j whenever i beat or tied j is
        strongly connected (Hunter, 2004, Assumption 1).
        """
        w = self.wins
        out: list[str] = []
        played = self.battles.sum(axis=1) > 0
        never = [x for x, p in zip(self.names, played, strict=True) if not p]
        if never:
            out.append(f"never compared: {', '.join(never)}")
        won, lost = w.sum(axis=1) > 0, w.sum(axis=0) > 0
        for label, mask in (("never won", ~won & played), ("never lost", ~lost & played)):
            if mask.any():
                out.append(f"{label}: {', '.join(np.array(self.names)[mask])}")
        n_weak, _ = connected_components(csr_matrix(w > 0), directed=False)
        if n_weak > 1 and not never:
            out.append(f"the comparison graph falls into {n_weak} groups never compared")
        n_strong, _ = connected_components(csr_matrix(w > 0), directed=True, connection="strong")
        if n_strong > 1 and not out:
            out.append("some group of contestants never lost to (nor tied) the others")
        return out


def _check_battle(item: object, names: set[str] | None) -> tuple[str, str, str]:
    """Validate one distinct battle; raise ValueError describing what is wrong."""
    if not isinstance(item, tuple | list) or len(item) != 3:
        raise ValueError("a battle must be a (left, right, outcome) triple")
    left, right, outcome = item
    if outcome not in OUTCOMES:
        allowed = ", ".join(map(repr, OUTCOMES))
        raise ValueError(f"unknown outcome {outcome!r}; allowed: {allowed}")
    for side in (left, right):
        if not isinstance(side, str) or not side:
            raise ValueError(f"contestant names must be non-empty strings, got {side!r}")
        if names is not None and side not in names:
            raise ValueError(f"unknown contestant {side!r}{did_you_mean(side, names)}")
    if left == right:
        raise ValueError(f"contestant {left!r} is compared with itself")
    return left, right, outcome


def _key(item: object) -> object:
    return tuple(item) if isinstance(item, list) else item


def _tally(items: list) -> Counter:
    """Count identical battles (lists, e.g. from JSON, count as tuples)."""
    try:
        return Counter(items)
    except TypeError:
        keys = [_key(b) for b in items]
        for pos, key in enumerate(keys):
            try:
                hash(key)
            except TypeError:
                raise ValueError(
                    f"battle #{pos} {key!r}: must be a (left, right, outcome) triple of strings"
                ) from None
        return Counter(keys)


def _validate(items: list, tally: Counter, names: set[str] | None) -> None:
    """Check each distinct battle once; name the first offending one by position."""
    for key in tally:
        try:
            _check_battle(key, names)
        except ValueError as e:
            pos = next(k for k, b in enumerate(items) if _key(b) == key)
            raise ValueError(f"battle #{pos} {items[pos]!r}: {e}") from None


def aggregate(battles: Iterable[Sequence[str]], names: Sequence[str] | None = None) -> PairCounts:
    """Count battles per unordered pair and outcome.

    Args:
        battles: ``(left, right, outcome)`` triples, outcome one of :data:`OUTCOMES`.
        names: the contestants and their order. Contestants without battles may be listed (they
            get the prior's rating); a battle naming anyone else is an error. Default: every
            name in the battles, sorted, so the result does not depend on battle order.

    Raises:
        ValueError: no battles; an unknown outcome; a contestant compared with itself; a name
            not in ``names``; a malformed triple. The message names the offending battle.
    """
    items = battles if isinstance(battles, list) else list(battles)
    if not items:
        raise ValueError("no battles to aggregate: need at least one (left, right, outcome)")
    # Counting identical triples first makes everything after it O(distinct triples), at most
    # 4·n² however many battles there are.
    tally = _tally(items)
    known = set(names) if names is not None else None
    _validate(items, tally, known)
    if names is None:
        names = sorted({s for key in tally for s in key[:2]})
    counts = PairCounts(tuple(names), np.zeros((0, 2)), np.zeros((0, 4)))  # validates names
    index = {name: k for k, name in enumerate(counts.names)}

    left = np.array([index[key[0]] for key in tally])
    right = np.array([index[key[1]] for key in tally])
    outcome = np.array([OUTCOMES.index(key[2]) for key in tally])
    num = np.fromiter(tally.values(), dtype=np.int64, count=len(tally))
    i, j = np.minimum(left, right), np.maximum(left, right)
    # "left" is a win for i when left is the smaller index, else for j; ties stay ties.
    col = outcome.copy()
    swapped = left > right
    col[swapped & (outcome == 0)] = J_WINS
    col[swapped & (outcome == 1)] = I_WINS
    n = counts.n
    dense = np.zeros((n * n, 4), dtype=np.int64)
    np.add.at(dense, (i * n + j, col), num)
    rows = np.flatnonzero(dense.sum(axis=1))
    return PairCounts(counts.names, np.stack([rows // n, rows % n], axis=1), dense[rows])


# --------------------------------------------------------------------------------------------
# Bradley-Terry fit (batched Newton)
# --------------------------------------------------------------------------------------------


def _objective(wins: np.ndarray, theta: np.ndarray, l2: float) -> np.ndarray:
    """Penalised log-likelihood ``Σ W_ij log σ(θ_i - θ_j) - l2/2 |θ|²``; shapes [B,n,n],[B,n]."""
    diff = theta[:, :, None] - theta[:, None, :]
    return (wins * log_expit(diff)).sum(axis=(1, 2)) - 0.5 * l2 * (theta**2).sum(axis=1)


def _newton_direction(wins: np.ndarray, theta: np.ndarray, l2: float) -> tuple[np.ndarray, ...]:
    """Newton step and gradient for a batch: wins [B, n, n], theta [B, n] -> ([B, n], [B, n])."""
    n = theta.shape[1]
    games = wins + wins.transpose(0, 2, 1)
    p = expit(theta[:, :, None] - theta[:, None, :])  # p[b, i, j] = P(i beats j)
    grad = (wins - games * p).sum(axis=2) - l2 * theta
    # The negative Hessian is a weighted graph Laplacian L (weights N_ij p_ij (1 - p_ij)) plus
    # l2·I. L is singular along the all-ones vector; θ is kept centred and the optimum is
    # centred, so adding c·11ᵀ/n changes no step but makes the matrix invertible even for l2=0.
    info = games * p * (1.0 - p)
    hess = -info
    diag = np.arange(n)
    hess[:, diag, diag] += info.sum(axis=2) + l2
    hess += hess[:, diag, diag].mean(axis=1)[:, None, None] / n
    step = np.linalg.solve(hess, grad[:, :, None])[:, :, 0]
    return step - step.mean(axis=1, keepdims=True), grad


def _line_search(
    wins: np.ndarray,
    theta: np.ndarray,
    value: np.ndarray,
    rows: np.ndarray,
    step: np.ndarray,
    grad: np.ndarray,
    l2: float,
) -> None:
    """Backtracking (Armijo) along Newton steps; updates ``theta[rows]``, ``value[rows]``.

    Each problem halves its own step length until the penalised log-likelihood rises by at
    least 1e-4 of the linear prediction. Shapes: wins [m, n, n], step and grad [m, n].
    """
    slope = (grad * step).sum(axis=1)
    t = np.ones(len(rows))
    pending = np.arange(len(rows))
    for _ in range(40):
        cand = theta[rows[pending]] + t[pending, None] * step[pending]
        new = _objective(wins[pending], cand, l2)
        ok = new >= value[rows[pending]] + 1e-4 * t[pending] * slope[pending]
        theta[rows[pending[ok]]] = cand[ok]
        value[rows[pending[ok]]] = new[ok]
        pending = pending[~ok]
        if not pending.size:
            return
        t[pending] *= 0.5


def fit_log_strengths(
    wins: np.ndarray,
    *,
    l2: float = DEFAULT_L2,
    init: np.ndarray | None = None,
    tol: float = 1e-9,
    max_iter: int = 100,
) -> np.ndarray:
    """Batched Bradley-Terry MLE in natural units: ``wins [..., n, n]`` -> ``θ [..., n]``.

    Damped Newton's method with a per-problem backtracking (Armijo) line search; each problem
    in the batch stops on its own once its Newton step is below ``tol`` nats. The log-likelihood
    is concave, so this converges from any start, quadratically near the optimum (3-4 steps
    from a warm start, which is what makes the bootstrap cheap).

    Args:
        wins: ``W[..., i, j]`` = (possibly fractional) wins of i over j; the diagonal is ignored.
        l2: ridge on θ (see the module docstring). With ``l2=0`` the caller must make sure the
            MLE exists (:meth:`PairCounts.mle_problems`), else this raises RuntimeError.
        init: starting θ ``[..., n]`` (default zeros); it is centred first.
        tol: convergence threshold on the Newton step, in nats.
        max_iter: Newton iterations per problem.

    Returns:
        θ with mean 0 over contestants (the optimum's mean is 0 for any ``l2 > 0``, and 0 is
        the chosen gauge for ``l2 = 0``).
    """
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    wins = np.asarray(wins, dtype=np.float64)
    shape = wins.shape[:-2]
    n = wins.shape[-1]
    w = wins.reshape(-1, n, n).copy()
    w[:, np.arange(n), np.arange(n)] = 0.0
    theta = np.zeros((len(w), n)) if init is None else np.array(init, dtype=np.float64)
    theta = np.broadcast_to(theta.reshape(-1, n), (len(w), n)).copy()
    theta -= theta.mean(axis=1, keepdims=True)
    value = _objective(w, theta, l2)
    todo = np.arange(len(w))  # problems still iterating
    for _ in range(max_iter):
        if not todo.size:
            break
        step, grad = _newton_direction(w if todo.size == len(w) else w[todo], theta[todo], l2)
        size = np.abs(step).max(axis=1)
        # Steps under 1e-3 nats are deep in Newton's quadratic region: take them unchecked (a
        # line search there would only measure rounding). Under tol, the problem is done.
        local = size < 1e-3
        theta[todo[local]] += step[local]
        value[todo[local]] = _objective(w[todo[local]], theta[todo[local]], l2)
        far = todo[~local]
        _line_search(w[far], theta, value, far, step[~local], grad[~local], l2)
        todo = todo[size >= tol]
    else:
        if todo.size:
            raise RuntimeError(
                f"Bradley-Terry fit did not converge in {max_iter} Newton steps for "
                f"{todo.size} of {len(w)} problems (l2={l2}); with l2=0, check mle_problems()"
            )
    return theta.reshape(*shape, n)


def _to_arena(theta: np.ndarray, anchor: int | None) -> np.ndarray:
    """Nats ``[..., n]`` -> Arena points with the anchor (or the mean) at 1000."""
    points = POINTS_PER_NAT * theta
    ref = points.mean(axis=-1, keepdims=True) if anchor is None else points[..., anchor, None]
    return points - ref + INITIAL_RATING


def _check_fit_args(counts: PairCounts, l2: float, anchor: str | None) -> int | None:
    if counts.total == 0:
        raise ValueError("no battles: cannot fit ratings to empty counts")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    if l2 == 0 and (problems := counts.mle_problems()):
        raise ValueError(
            "the unpenalised Bradley-Terry MLE does not exist for these battles ("
            + "; ".join(problems)
            + "); use l2 > 0 (a weak prior) or collect the missing comparisons"
        )
    return None if anchor is None else counts.index(anchor)


def fit_bradley_terry(
    counts: PairCounts, *, l2: float = DEFAULT_L2, anchor: str | None = None
) -> np.ndarray:
    """Bradley-Terry ratings on the Arena scale, float64 ``[n]`` aligned with ``counts.names``.

    Ties and both_bad count half a win to each side. ``anchor`` sits at 1000 (default: the
    mean rating is 1000). ``l2=0`` raises ValueError when the MLE does not exist.
    """
    anchor_idx = _check_fit_args(counts, l2, anchor)
    return _to_arena(fit_log_strengths(counts.wins, l2=l2), anchor_idx)


# --------------------------------------------------------------------------------------------
# Bootstrap, intervals, rank
# --------------------------------------------------------------------------------------------


def rank_with_intervals(lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Chatbot Arena's rank: ``1 + #{j : lower_j > upper_i}``, int ``[n]``.

    A contestant is outranked only by those that are ahead of it beyond doubt, so contestants
    whose intervals overlap share ranks.
    """
    lower, upper = np.asarray(lower, dtype=float), np.asarray(upper, dtype=float)
    return 1 + (lower[None, :] > upper[:, None]).sum(axis=1)


@dataclass(frozen=True, eq=False)
class Ratings:
    """Bradley-Terry ratings with bootstrap percentile intervals, on the Arena scale.

    Attributes:
        names: contestants, aligned with every array.
        rating: ``[n]`` the maximum (penalised) likelihood fit on all battles.
        lower, upper: ``[n]`` percentile interval bounds from the bootstrap.
        samples: ``[rounds, n]`` the bootstrap fits, anchored like ``rating`` (so the anchor's
            own interval is a point); intervals of differences come from these.
        confidence, l2, anchor, seed: how it was computed (store them with the numbers).
    """

    names: tuple[str, ...]
    rating: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    samples: np.ndarray
    confidence: float
    l2: float
    anchor: str | None
    seed: int

    @property
    def rank(self) -> np.ndarray:
        """int ``[n]``: :func:`rank_with_intervals` of these intervals."""
        return rank_with_intervals(self.lower, self.upper)

    def index(self, name: str) -> int:
        """Index of a contestant; unknown names get a "did you mean" error."""
        if name not in self.names:
            raise ValueError(f"unknown contestant {name!r}{did_you_mean(name, self.names)}")
        return self.names.index(name)

    def difference(self, a: str, b: str) -> tuple[float, float, float]:
        """``rating(a) - rating(b)`` and its paired bootstrap percentile interval."""
        ia, ib = self.index(a), self.index(b)
        lo, hi = _percentiles(self.samples[:, ia] - self.samples[:, ib], self.confidence)
        return float(self.rating[ia] - self.rating[ib]), float(lo), float(hi)

    def table(self) -> list[dict[str, object]]:
        """Leaderboard rows, best first: name, rating, lower, upper, rank."""
        rank = self.rank
        order = np.argsort(-self.rating, kind="stable")
        return [
            {
                "name": self.names[k],
                "rating": float(self.rating[k]),
                "lower": float(self.lower[k]),
                "upper": float(self.upper[k]),
                "rank": int(rank[k]),
            }
            for k in order
        ]


def _percentiles(x: np.ndarray, confidence: float) -> np.ndarray:
    tail = 50.0 * (1.0 - confidence)
    return np.percentile(x, [tail, 100.0 - tail], axis=0)


def _resampling_cells(counts: PairCounts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The non-empty (pair, outcome) cells, with tie and both_bad merged.

    Merging is exact for the bootstrap: summing two cells of a multinomial gives the multinomial
    of the merged cell, and the fit only sees their sum. Returns ``counts [K]``, ``pair [K]``
    (row of ``counts.pairs``) and ``kind [K]`` (0: i won, 1: j won, 2: tie).
    """
    c = counts.cells
    merged = np.stack([c[:, I_WINS], c[:, J_WINS], c[:, TIE] + c[:, BOTH_BAD]], axis=1)
    pair, kind = np.nonzero(merged)
    return merged[pair, kind], pair, kind


def _resampled_wins(
    draws: np.ndarray, pair: np.ndarray, kind: np.ndarray, pairs: np.ndarray, n: int
) -> np.ndarray:
    """Multinomial draws ``[B, K]`` -> win matrices ``[B, n, n]`` (ties ½ each way)."""
    per_pair = np.zeros((len(draws), len(pairs), 3))
    per_pair[:, pair, kind] = draws
    half = 0.5 * per_pair[:, :, 2]
    w = np.zeros((len(draws), n, n))
    w[:, pairs[:, 0], pairs[:, 1]] = per_pair[:, :, 0] + half
    w[:, pairs[:, 1], pairs[:, 0]] = per_pair[:, :, 1] + half
    return w


def bootstrap_ratings(
    counts: PairCounts,
    *,
    rounds: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    l2: float = DEFAULT_L2,
    anchor: str | None = None,
    batch_rounds: int | None = None,
) -> Ratings:
    """Bradley-Terry ratings with bootstrap percentile intervals.

    Each round draws ``counts.total`` battles with replacement from the observed ones — a
    multinomial over the non-empty (pair, outcome) cells — and refits; rounds are fitted
    ``batch_rounds`` at a time as one batched Newton solve, warm-started from the full-data
    fit. Every round is anchored like the point estimate before taking percentiles.

    A contestant's interval includes the uncertainty of the reference: with the mean as
    reference (no ``anchor``), one poorly measured contestant widens everyone's interval. To
    compare two contestants, use :meth:`Ratings.difference` (paired over rounds, so the
    reference cancels) or :func:`pair_power`.

    Args:
        counts: the aggregated battles.
        rounds: bootstrap rounds (Chatbot Arena uses 100-1000; 1000 makes 2.5 % tails stable).
        confidence: central coverage of the intervals (0.95: 2.5th and 97.5th percentiles).
        seed: the only source of randomness; same seed, same intervals.
        l2: ridge on θ; must be > 0 here, because a resample can drop a contestant's only
            win or loss and the unpenalised fit of that round would be infinite.
        anchor: contestant placed at 1000 in every round (default: the mean is 1000).
        batch_rounds: rounds per batch (default: as many as fit in a 2 MiB ``[B, n, n]``
            array). Results do not depend on it.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if l2 <= 0:
        raise ValueError(
            f"the bootstrap needs l2 > 0 (got {l2}): a resample can lose a contestant's only "
            "win or loss, and its unpenalised fit is then infinite"
        )
    anchor_idx = _check_fit_args(counts, l2, anchor)
    n = counts.n
    theta_hat = fit_log_strengths(counts.wins, l2=l2)
    cell_counts, pair, kind = _resampling_cells(counts)
    total = int(cell_counts.sum())
    pvals = cell_counts / total
    batch = batch_rounds or max(1, _BATCH_ELEMENTS // (n * n))
    rng = np.random.default_rng(seed)
    thetas = np.empty((rounds, n))
    for start in range(0, rounds, batch):
        size = min(batch, rounds - start)
        # Rows are drawn one after another from the same stream, so batching does not change
        # the draws.
        draws = rng.multinomial(total, pvals, size=size)
        w = _resampled_wins(draws, pair, kind, counts.pairs, n)
        thetas[start : start + size] = fit_log_strengths(w, l2=l2, init=theta_hat)
    samples = _to_arena(thetas, anchor_idx)
    lower, upper = _percentiles(samples, confidence)
    return Ratings(
        names=counts.names,
        rating=_to_arena(theta_hat, anchor_idx),
        lower=lower,
        upper=upper,
        samples=samples,
        confidence=confidence,
        l2=l2,
        anchor=anchor,
        seed=seed,
    )


# --------------------------------------------------------------------------------------------
# Online Elo
# --------------------------------------------------------------------------------------------


def online_elo(
    battles: Iterable[Sequence[str]],
    *,
    k: float = 32.0,
    initial: float = INITIAL_RATING,
    scale: float = SCALE,
    base: float = BASE,
) -> dict[str, float]:
    """Online Elo over battles in the given order; ties and both_bad score ½.

    ``E_left = 1 / (1 + base^((R_right - R_left) / scale))``; then
    ``R_left += k (S_left - E_left)`` and ``R_right -= k (S_left - E_left)``. Unlike the
    Bradley-Terry fit, the result depends on battle order and on ``k`` (32 is the chess
    default; Chatbot Arena used 4 over millions of votes): it is the secondary view.

    Returns:
        name -> rating, in order of first appearance.
    """
    score = {"left": 1.0, "right": 0.0, "tie": 0.5, "both_bad": 0.5}
    ratings: dict[str, float] = {}
    seen = False
    for pos, item in enumerate(battles):
        seen = True
        try:
            left, right, outcome = _check_battle(item, None)
        except ValueError as e:
            raise ValueError(f"battle #{pos} {item!r}: {e}") from None
        ra = ratings.setdefault(left, initial)
        rb = ratings.setdefault(right, initial)
        expected = 1.0 / (1.0 + base ** ((rb - ra) / scale))
        delta = k * (score[outcome] - expected)
        ratings[left] = ra + delta
        ratings[right] = rb - delta
    if not seen:
        raise ValueError("no battles: need at least one (left, right, outcome)")
    return ratings


# --------------------------------------------------------------------------------------------
# Steering a rating session
# --------------------------------------------------------------------------------------------


def _difference_stats(counts: PairCounts, ratings: Ratings) -> tuple[np.ndarray, ...]:
    """Per pair: point difference d, its bootstrap variance v (nats), and p(1-p)."""
    if ratings.names != counts.names:
        raise ValueError("ratings and counts describe different contestants")
    theta = ratings.rating / POINTS_PER_NAT
    d = theta[:, None] - theta[None, :]
    s = ratings.samples / POINTS_PER_NAT  # [R, n]
    centred = s - s.mean(axis=0)
    cov = centred.T @ centred / max(len(s) - 1, 1)
    v = np.diag(cov)[:, None] + np.diag(cov)[None, :] - 2.0 * cov
    # Groups never compared with each other: the data say nothing about their difference, so
    # use the prior's variance of a difference (2 / l2); the bootstrap cannot see this.
    comp = counts.components()
    apart = comp[:, None] != comp[None, :]
    v = np.where(apart, 2.0 / ratings.l2, np.maximum(v, 1e-12))
    d = np.where(apart, 0.0, d)
    p = expit(d)
    return d, v, p * (1.0 - p)


def _score(d: np.ndarray, v: np.ndarray, q: np.ndarray) -> np.ndarray:
    # P(order undecided) x (variance removed by one more battle of this pair).
    return 2.0 * norm.sf(np.abs(d) / np.sqrt(v)) * v * v * q / (1.0 + v * q)


def pair_scores(counts: PairCounts, ratings: Ratings) -> np.ndarray:
    """How much one more battle of each pair would help the ranking; float ``[n, n]``.

    For the pair (i, j), with ``d`` the fitted difference θ_i - θ_j in nats, ``v`` its
    bootstrap variance and ``q = p(1-p)`` the Fisher information of one battle at
    ``p = σ(d)``::

        score = 2·Φ(-|d| / √v) · (v - 1 / (1/v + q))

    The first factor is ~1 for pairs whose order is undecided (overlapping intervals) and ~0
    for pairs already told apart; the second is how much one more direct battle shrinks the
    variance of the difference, large when the pair is poorly measured (few battles, directly
    or through others) and when the outcome is uncertain (p near ½). Pairs in different
    connected groups of the comparison graph get the prior variance ``2 / l2`` and ``d = 0``,
    which puts them first. The diagonal is 0.
    """
    score = _score(*_difference_stats(counts, ratings))
    np.fill_diagonal(score, 0.0)
    return score


def next_pairs(
    counts: PairCounts,
    ratings: Ratings | None = None,
    k: int = 1,
    *,
    seed: int = 0,
) -> list[tuple[str, str]]:
    """The next ``k`` pairs to show, as ``(left, right)``, most useful first.

    Greedy on :func:`pair_scores`: take the best pair, update that pair's variance as if the
    battle had happened (``v <- 1 / (1/v + q)``), rescore it, repeat. A pair can come back
    when it is still the most useful after that. Ties in the score are broken, and each pair's
    left/right order is chosen, at random under ``seed`` (random sides spread position bias
    evenly); the same inputs and seed give the same list.

    Args:
        counts: battles so far. With no battles at all, pairs are drawn uniformly.
        ratings: a :func:`bootstrap_ratings` result for ``counts``; computed with 200 rounds
            (seeded by ``seed``) if omitted.
        k: number of pairs.
        seed: seed for tie-breaking and sides.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n = counts.n
    if n < 2:
        raise ValueError("need at least two contestants to form a pair")
    rng = np.random.default_rng(seed)
    iu, ju = np.triu_indices(n, 1)
    if counts.total == 0:
        d, v, q = np.zeros(len(iu)), np.ones(len(iu)), np.full(len(iu), 0.25)
    else:
        if ratings is None:
            ratings = bootstrap_ratings(counts, rounds=200, seed=seed)
        d, v, q = (x[iu, ju] for x in _difference_stats(counts, ratings))
    tiebreak = rng.random(len(iu))
    out: list[tuple[str, str]] = []
    score = _score(d, v, q)
    for _ in range(k):
        best = int(np.lexsort((tiebreak, score))[-1])
        a, b = counts.names[iu[best]], counts.names[ju[best]]
        out.append((a, b) if rng.random() < 0.5 else (b, a))
        v[best] = 1.0 / (1.0 / v[best] + q[best])
        score[best] = _score(d[best], v[best], q[best])
    return out


@dataclass(frozen=True)
class PairPower:
    """Whether the comparison of ``a`` and ``b`` is underpowered, and why (``reason``).

    ``difference``, ``lower``, ``upper``: rating(a) - rating(b) and its bootstrap interval,
    in Arena points; ``battles``: direct battles between the two.
    """

    a: str
    b: str
    underpowered: bool
    reason: str
    battles: int
    difference: float
    lower: float
    upper: float


def pair_power(
    counts: PairCounts, ratings: Ratings, a: str, b: str, *, min_battles: int = 20
) -> PairPower:
    """Is the comparison of ``a`` and ``b`` underpowered? With a reason a person can read.

    Underpowered when any of: no chain of battles connects them; fewer than ``min_battles``
    direct battles between them; the bootstrap interval of rating(a) - rating(b) contains 0.
    """
    ia, ib = counts.index(a), counts.index(b)
    if ia == ib:
        raise ValueError(f"contestant {a!r} is compared with itself")
    if ratings.names != counts.names:
        raise ValueError("ratings and counts describe different contestants")
    diff, lo, hi = ratings.difference(a, b)
    n_ab = int(counts.battles[ia, ib])
    pct = f"{100 * ratings.confidence:g}%"
    reasons = []
    comp = counts.components()
    if comp[ia] != comp[ib]:
        reasons.append(
            f"no chain of battles connects {a} and {b}: their difference is set by the prior"
        )
    if n_ab < min_battles:
        few = f"only {n_ab}" if n_ab else "no"
        reasons.append(f"{few} direct battles between {a} and {b} (fewer than {min_battles})")
    if lo <= 0.0 <= hi and comp[ia] == comp[ib]:
        reasons.append(
            f"the {pct} interval of rating({a}) - rating({b}), [{lo:.1f}, {hi:.1f}], includes 0"
        )
    if reasons:
        reason = "; ".join(reasons)
    else:
        ahead, behind = (a, b) if diff > 0 else (b, a)
        reason = (
            f"{ahead} is ahead of {behind} by {abs(diff):.1f} points ({pct} interval of "
            f"rating({a}) - rating({b}): [{lo:.1f}, {hi:.1f}]) over {n_ab} direct battles"
        )
    return PairPower(a, b, bool(reasons), reason, n_ab, diff, float(lo), float(hi))


# --------------------------------------------------------------------------------------------
# Robustness of a leaderboard
# --------------------------------------------------------------------------------------------

PROVISIONAL_BATTLES = 20
"""Contestants with fewer battles than this are marked provisional on the leaderboard."""
TOP_FLIP_CAP = 200
"""Most removals :func:`top_flip` tries before answering "more than this"."""


def laplace_intervals(
    counts: PairCounts,
    *,
    l2: float = DEFAULT_L2,
    confidence: float = 0.95,
    anchor: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Normal-approximation intervals of the ridge fit, in Arena points: ``(lower, upper)``.

    The covariance of θ is the inverse of the penalised information ``Σ_pairs m_ij q_ij
    (e_i - e_j)(e_i - e_j)ᵀ + l2·I`` (``q = p(1-p)`` at the fit), i.e. the Laplace
    approximation of the posterior under the ridge's N(0, 1/l2) prior; it is then referred to
    the anchor (or the mean) like the ratings. Unlike the bootstrap it never has zero width:
    with one vote the resamples all repeat that vote, but the prior still says how little one
    vote pins down.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    anchor_idx = _check_fit_args(counts, l2, anchor)
    if l2 <= 0:
        raise ValueError(f"laplace_intervals needs l2 > 0 (got {l2}) for a finite variance")
    theta = fit_log_strengths(counts.wins, l2=l2)
    p = expit(theta[:, None] - theta[None, :])
    info = counts.battles * p * (1.0 - p)
    hess = np.diag(info.sum(axis=1)) - info + l2 * np.eye(counts.n)
    cov = np.linalg.inv(hess)
    eye = np.eye(counts.n)
    ref = eye - (1.0 / counts.n if anchor_idx is None else eye[anchor_idx][None, :])
    sd = np.sqrt(np.maximum(np.diag(ref @ cov @ ref.T), 0.0)) * POINTS_PER_NAT
    rating = _to_arena(theta, anchor_idx)
    z = float(norm.ppf(0.5 + confidence / 2))
    return rating - z * sd, rating + z * sd


@dataclass(frozen=True)
class TopFlip:
    """How many votes must go before the leader is no longer alone at the top.

    ``votes``: the number found by :func:`top_flip` (None: not within ``cap`` removals);
    ``removed``: those votes as ``(a, b, outcome)`` with the pair in index order (``"left"``:
    ``a`` won); ``leader``: the contestant on top with all votes.
    """

    votes: int | None
    removed: tuple[tuple[str, str, str], ...]
    leader: str
    cap: int


def _leader_margin(theta: np.ndarray, leader: int) -> np.ndarray:
    """``θ_leader - max_{c≠leader} θ_c`` for θ ``[..., n]``."""
    others = np.delete(theta, leader, axis=-1)
    return theta[..., leader] - others.max(axis=-1)


def _wins_of(cells: np.ndarray, pairs: np.ndarray, n: int) -> np.ndarray:
    """Cell counts ``[B, P, 4]`` -> win matrices ``[B, n, n]`` (ties and both_bad ½ each way)."""
    half = 0.5 * (cells[..., TIE] + cells[..., BOTH_BAD])
    w = np.zeros((len(cells), n, n))
    w[:, pairs[:, 0], pairs[:, 1]] = cells[..., I_WINS] + half
    w[:, pairs[:, 1], pairs[:, 0]] = cells[..., J_WINS] + half
    return w


def top_flip(counts: PairCounts, *, l2: float = DEFAULT_L2, cap: int = TOP_FLIP_CAP) -> TopFlip:
    """The smallest number of votes whose removal changes the top of the leaderboard, greedily.

    "Changes the top" means the leader of the point fit (:func:`fit_bradley_terry`) is no
    longer strictly ahead of everyone else (a tie at the top counts as a change). Greedy: at
    each step try removing one vote of each kind that can hurt the leader's margin over the
    runner-up — a win or tie of the leader over anyone, a loss or tie of the current runner-up
    — refit each candidate (one batched Newton solve), keep the removal that leaves the
    smallest margin, and repeat until the top changes or ``cap`` removals. The greedy set is
    one set that works, so the count is an **upper bound**: the true minimum is ≤ it (a
    cleverer set can be smaller; exact search is combinatorial). Identical votes are
    interchangeable, so candidates are the non-empty (pair, outcome) cells, not single votes.
    """
    if cap < 0:
        raise ValueError(f"cap must be >= 0, got {cap}")
    n = counts.n
    if n < 2 or counts.total == 0:
        raise ValueError("top_flip needs at least two contestants with votes")
    cells = counts.cells.astype(float).copy()
    theta = fit_log_strengths(counts.wins, l2=l2)
    leader = int(np.argmax(theta))
    removed: list[tuple[str, str, str]] = []
    names = counts.names
    outcome_name = ("left", "right", "tie", "both_bad")
    pairs = counts.pairs
    if _leader_margin(theta, leader) <= 1e-9:
        return TopFlip(0, (), names[leader], cap)
    for step in range(1, cap + 1):
        runner = int(np.argmax(np.where(np.arange(n) == leader, -np.inf, theta)))
        i, j = pairs[:, 0], pairs[:, 1]
        hurts = np.zeros_like(cells, dtype=bool)
        hurts[:, I_WINS] = (i == leader) | (j == runner)  # i won: leader's win or runner's loss
        hurts[:, J_WINS] = (j == leader) | (i == runner)
        hurts[:, TIE] = hurts[:, BOTH_BAD] = np.isin(i, (leader, runner)) | np.isin(
            j, (leader, runner)
        )
        rows, cols = np.nonzero(hurts & (cells > 0))
        if not len(rows):
            return TopFlip(None, tuple(removed), names[leader], cap)
        batch = np.repeat(cells[None], len(rows), axis=0)
        batch[np.arange(len(rows)), rows, cols] -= 1.0
        fits = fit_log_strengths(_wins_of(batch, pairs, n), l2=l2, init=theta)
        margins = _leader_margin(fits, leader)
        best = int(np.argmin(margins))
        r, c = int(rows[best]), int(cols[best])
        cells[r, c] -= 1.0
        removed.append((names[pairs[r, 0]], names[pairs[r, 1]], outcome_name[c]))
        theta = fits[best]
        if margins[best] <= 1e-9:
            return TopFlip(step, tuple(removed), names[leader], cap)
    return TopFlip(None, tuple(removed), names[leader], cap)
