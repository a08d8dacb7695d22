"""Pairwise human rating: which pair to show next, recording a vote exactly once, undo, gold
pairs and rater reliability. Plain Python over the store (no Streamlit), so that the app's
rating page, the ``harness raters`` commands, the tests and the concurrency test all cast votes
through the same functions.

Pairs. A pair is two contestants' renders for the same prompt and seed (``renders``), so the
same initial noise. Which two contestants and which prompt and seed: :func:`choose_pairs`,
shared with the judges: :func:`evaluators.ratings.next_pairs` over the human votes stored so far
(the pairs whose order is most uncertain and least measured come first), but never a (pair,
prompt, seed) this rater already judged while an unjudged one exists anywhere, and a contestant
left far behind in battles gets the next pair (coverage). The side each contestant is shown on
is random (``next_pairs`` draws it), which spreads position bias evenly. A planned pair
becomes an :class:`IssuedPair` when it is shown: it gets a random nonce and its issue time.

Exactly once. ``comparison_id`` is a hash of (prompt, seed, left, right, rater, time) and
:meth:`Store.add_comparisons` stores a vote with a known id once. The vote's ``time`` is the
pair's *issue* time, fixed before the rater clicks, so a double click, a script rerun, a
resubmission or a retry after a lock timeout all produce the same id and count once; the nonce
goes into ``extra`` and the session keeps the nonces it already voted on. The click time is
``extra.voted_at`` and the decision time ``extra.latency_s``.

Gold pairs (attention checks). A contestant whose ``extra`` has ``"gold": "bad"`` is a known
loser: ``harness raters gold`` registers ``gold:noise``, pure Gaussian noise images rendered
for every prompt and seed of the arena. A gold pair puts a gold-bad render against a render of a
contestant flagged ``"gold": "good"`` (e.g. the data set's real images registered as an image
set) or, when none is flagged, of any regular contestant, for the same prompt and seed. About
one pair in :data:`GOLD_RATE` is gold. A gold vote is stored with ``extra.gold = true`` and
``extra.gold_expected`` (the side that should win); the leaderboard and the pair sampler leave
gold votes out (:data:`harness.arena.NOT_GOLD`), and :func:`reliability` reports per rater the
share of gold pairs answered with the expected side.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import secrets
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import duckdb
import numpy as np

from harness.arena import NOT_GOLD
from harness.store import OUTCOMES, Store, StoreError, comparison_hash, decode_json

GOLD_RATE = 0.1
"""Share of issued pairs that are gold (attention checks)."""
GOLD_NOISE_ID = "gold:noise"
Side = Literal["left", "right"]


@dataclass(frozen=True)
class PlannedPair:
    """A pair to show: two contestants and the prompt and seed both rendered."""

    prompt_id: int
    prompt: str
    seed: int
    category: str | None
    left_id: str
    right_id: str
    gold_expected: Side | None = None  # the side that should win, for a gold pair

    @property
    def sides(self) -> tuple[str, str]:
        """(left, right) contestant ids."""
        return self.left_id, self.right_id


@dataclass(frozen=True)
class IssuedPair(PlannedPair):
    """A pair as shown to a rater: with its nonce and issue time (the vote's ``time``)."""

    nonce: str = ""
    issued_at: float = 0.0


@dataclass(frozen=True)
class VoteResult:
    """What :func:`record_vote` did: the vote's id and whether it was new."""

    comparison_id: str
    stored: bool


@dataclass(frozen=True)
class _Pool:
    """The arena's renders: (prompt_id, seed) -> (prompt, category), per contestant."""

    keys: dict[str, set[tuple[int, int]]]
    prompts: dict[tuple[int, int], tuple[str, str | None]]
    gold: dict[str, str]  # contestant -> "good" / "bad", flagged ones only

    @property
    def regular(self) -> list[str]:
        return sorted(c for c in self.keys if self.gold.get(c) != "bad")


def _pool(con: duckdb.DuckDBPyConnection) -> _Pool:
    renders = con.execute(
        "SELECT contestant_id, prompt_id, seed, prompt, category FROM renders"
    ).fetchall()
    flags = con.execute(
        "SELECT contestant_id, extra->>'$.gold' FROM contestants "
        "WHERE extra->>'$.gold' IN ('good', 'bad')"
    ).fetchall()
    keys: dict[str, set[tuple[int, int]]] = {}
    prompts: dict[tuple[int, int], tuple[str, str | None]] = {}
    for cid, pid, seed, prompt, category in renders:
        keys.setdefault(cid, set()).add((pid, seed))
        prompts[(pid, seed)] = (prompt, category)
    return _Pool(keys, prompts, dict(flags))


def plan_pairs(
    store: Store, rater_id: str, k: int = 5, *, rng: random.Random | None = None
) -> list[PlannedPair]:
    """The next ``k`` pairs for ``rater_id``, about :data:`GOLD_RATE` of them gold.

    Regular pairs come from :func:`choose_pairs` over the human votes so far (information
    from everyone's votes, coverage of every contestant) and this rater's own votes (never a
    (pair, prompt, seed) this rater already judged while an unjudged one exists; once all are
    judged, the least-judged ones come back rather than nothing). Empty when fewer than two
    regular contestants have renders for a common prompt and seed.
    """
    from evaluators.ratings import PairCounts, aggregate

    rng = rng or random.Random()
    # One read for everything: each store operation attaches the file anew.
    with store.read() as con:
        pool = _pool(con)
        names = pool.regular
        if len(names) < 2:
            return []
        battles = con.execute(
            "SELECT left_id, right_id, outcome FROM comparisons "
            f"WHERE rater_kind = 'human' AND {NOT_GOLD} "
            "AND left_id IN (SELECT unnest(?)) AND right_id IN (SELECT unnest(?))",
            [names, names],
        ).fetchall()
        seen = con.execute(
            "SELECT left_id, right_id, prompt, seed FROM comparisons WHERE rater_id = ?",
            [rater_id],
        ).fetchall()
    if battles:
        counts = aggregate(battles, names=names)
    else:  # next_pairs draws uniformly from empty counts; aggregate refuses an empty list
        counts = PairCounts(tuple(names), np.zeros((0, 2)), np.zeros((0, 4)))
    judged = Counter(item_key(a, b, p, s) for a, b, p, s in seen)
    items = {c: {key: pool.prompts[key][0] for key in pool.keys[c]} for c in names}
    gold_slots = [rng.random() < GOLD_RATE for _ in range(k)]
    picks, _ = choose_pairs(names, items, judged, counts, k, seed=rng.randrange(2**31), rng=rng)
    out: list[PlannedPair] = []
    for is_gold in gold_slots:
        if is_gold and (gold := _gold_pair(pool, rng)) is not None:
            out.append(gold)
        elif picks:
            pick = picks.pop(0)
            prompt, category = pool.prompts[pick.key]
            out.append(PlannedPair(pick.key[0], prompt, pick.key[1], category, *pick.sides))
    return out


ItemKey = tuple[frozenset[str], str, int]
"""What a rater must not judge twice while anything else is left: (unordered pair, prompt
text, seed). The prompt text, not its id, because stored comparisons carry the text."""

COVERAGE_FLOOR = 0.8
"""A contestant with fewer battles than this share of the mean gets the next pair."""


def item_key(a: str, b: str, prompt: str, seed: int) -> ItemKey:
    """The no-repeat key of a comparison of ``a`` and ``b`` on ``prompt`` and ``seed``."""
    return frozenset((a, b)), prompt, int(seed)


@dataclass(frozen=True)
class Pick:
    """One pair chosen by :func:`choose_pairs`: the sides as drawn, the (prompt_id, seed)
    item, and whether this rater had judged that (pair, item) before (``fresh`` False only
    once every combination was judged)."""

    sides: tuple[str, str]
    key: tuple[int, int]
    fresh: bool


def choose_pairs(
    names: Sequence[str],
    items: Mapping[str, Mapping[tuple[int, int], str]],
    judged: Mapping[ItemKey, int],
    counts: Any,
    k: int,
    *,
    seed: int,
    rng: random.Random,
    coverage: float = COVERAGE_FLOOR,
) -> tuple[list[Pick], list[tuple[str, str, str]]]:
    """Up to ``k`` (pair, item) picks for one rater, and the pairs left out ``(a, b, why)``.

    ``items``: per contestant, its rendered (prompt_id, seed) -> prompt text; ``judged``: how
    often this rater judged each :func:`item_key`; ``counts``: the battles that drive the
    choice (a :class:`evaluators.ratings.PairCounts` over ``names``). Each slot takes, in this
    order of preference:

    1. the next pair in :func:`evaluators.ratings.next_pairs` order (information first) that
       has an item this rater never judged and that is not already in this batch; while the
       least-battled contestant (battles so far plus this batch) is below ``coverage`` times
       the mean, only a pair that includes it (coverage: nobody is left out because the
       information score prefers the others);
    2. any pair with such a fresh item (the needy contestant's first, then any), so that a
       fresh combination anywhere wins over a repeat;
    3. when this rater judged every combination: the least-judged item not in this batch
       (a repeat, never nothing);
    and is left out (in the second list) only when every item is already in this batch.
    Within a pair the item is drawn at random among its least-judged ones.
    """
    from evaluators.ratings import next_pairs

    ordered = sorted(names)
    pairs = [frozenset(p) for p in itertools.combinations(ordered, 2)]
    common = {p: sorted(set(items[min(p)]) & set(items[max(p)])) for p in pairs}
    skipped = [(min(p), max(p), "no prompt/seed rendered by both") for p in pairs if not common[p]]
    usable = [p for p in pairs if common[p]]
    if not usable or k < 1:
        return [], skipped
    appear = Counter({c: 0 for c in ordered})
    if len(counts.pairs):
        played = counts.cells.sum(axis=1)
        for (i, j), n in zip(counts.pairs, played, strict=True):
            appear[counts.names[i]] += int(n)
            appear[counts.names[j]] += int(n)
    queue = [
        (a, b)
        for a, b in next_pairs(counts, k=2 * k + len(usable), seed=seed)
        if common.get(frozenset((a, b)))
    ]
    used: set[ItemKey] = set()

    def times(p: frozenset[str], key: tuple[int, int]) -> int | None:
        """How often judged; None when already in this batch."""
        ik = (p, items[min(p)][key], key[1])
        return None if ik in used else judged.get(ik, 0)

    def fresh(p: frozenset[str]) -> bool:
        return any(times(p, key) == 0 for key in common[p])

    def fewest(p: frozenset[str]) -> int | None:
        counts_ = [n for key in common[p] if (n := times(p, key)) is not None]
        return min(counts_) if counts_ else None

    picks: list[Pick] = []
    for _ in range(k):
        mean = sum(appear.values()) / len(appear)
        low = min(appear.values())
        needy = {c for c, n in appear.items() if n == low} if low < coverage * mean else set()
        chosen: tuple[str, str] | None = None
        least: list[int | None] = []  # computed only once no fresh item is left (a full scan)

        def least_judged(p: frozenset[str], least: list[int | None] = least) -> bool:
            if not least:
                least.append(min((n for q in usable if (n := fewest(q)) is not None), default=None))
            return least[0] is not None and fewest(p) == least[0]

        for ok in (
            lambda p, needy=needy: fresh(p) and (not needy or bool(needy & p)),
            fresh,
            least_judged,
        ):
            hit = next((ab for ab in queue if ok(frozenset(ab))), None)
            if hit is not None:
                queue.remove(hit)
                chosen = hit
                break
            rest = [p for p in usable if ok(p)]
            if rest:
                # Outside next_pairs' list: the needy contestant's pairs first, then at random.
                best = [p for p in rest if needy & p] or rest
                a, b = sorted(rng.choice(best))
                chosen = (a, b) if rng.random() < 0.5 else (b, a)
                break
        if chosen is None:
            a, b = queue[0] if queue else sorted(usable[0])
            skipped.append((a, b, "all its items are already in this round"))
            continue
        p = frozenset(chosen)
        n_min = fewest(p)
        key = rng.choice([key for key in common[p] if times(p, key) == n_min])
        used.add((p, items[chosen[0]][key], key[1]))
        appear.update(chosen)
        picks.append(Pick(chosen, key, n_min == 0))
    return picks, skipped


def _gold_pair(pool: _Pool, rng: random.Random) -> PlannedPair | None:
    bad = sorted(c for c, g in pool.gold.items() if g == "bad" and c in pool.keys)
    good = sorted(c for c, g in pool.gold.items() if g == "good" and c in pool.keys)
    good = good or [c for c in pool.regular]
    options = [(g, b) for g in good for b in bad if pool.keys[g] & pool.keys[b]]
    if not options:
        return None
    g, b = rng.choice(options)
    pid, seed = rng.choice(sorted(pool.keys[g] & pool.keys[b]))
    prompt, category = pool.prompts[(pid, seed)]
    if rng.random() < 0.5:
        return PlannedPair(pid, prompt, seed, category, g, b, gold_expected="left")
    return PlannedPair(pid, prompt, seed, category, b, g, gold_expected="right")


def issue(planned: PlannedPair, *, now: float | None = None) -> IssuedPair:
    """Show a planned pair: give it a nonce and fix its issue time (the vote's identity)."""
    return IssuedPair(
        **asdict(planned),
        nonce=secrets.token_hex(8),
        issued_at=time.time() if now is None else now,
    )


def render_image(store: Store, contestant_id: str, prompt_id: int, seed: int) -> bytes:
    """The PNG bytes of a registered render, looked up by id (never by a path from input).
    Raises :class:`FileNotFoundError` naming the render when it is missing."""
    rows = store.query(
        "SELECT path, sha256 FROM renders WHERE contestant_id = ? AND prompt_id = ? AND seed = ?",
        [contestant_id, prompt_id, seed],
    )
    if not rows:
        raise FileNotFoundError(
            f"no render of contestant {contestant_id!r} for prompt {prompt_id}, seed {seed}"
        )
    return Path(rows[0]["path"]).read_bytes()


def enhanced_prompts(
    store: Store, contestant_ids: Sequence[str], prompt_id: int, seed: int
) -> dict[str, str]:
    """``{contestant: the text its model was given}`` for the renders of (prompt, seed) that a
    prompt enhancer rewrote (renders of contestants without one are left out)."""
    rows = store.query(
        "SELECT contestant_id, extra->>'enhanced_prompt' AS enhanced FROM renders "
        "WHERE prompt_id = ? AND seed = ? AND contestant_id IN (SELECT unnest(?))",
        [prompt_id, seed, list(contestant_ids)],
    )
    return {r["contestant_id"]: r["enhanced"] for r in rows if r["enhanced"] is not None}


def _render_hashes(store: Store, pair: PlannedPair) -> tuple[str | None, str | None]:
    rows = store.query(
        "SELECT contestant_id, sha256 FROM renders WHERE prompt_id = ? AND seed = ? "
        "AND contestant_id IN (?, ?)",
        [pair.prompt_id, pair.seed, pair.left_id, pair.right_id],
    )
    found = {r["contestant_id"]: r["sha256"] for r in rows}
    return found.get(pair.left_id), found.get(pair.right_id)


def vote_row(
    pair: IssuedPair,
    outcome: str,
    rater_id: str,
    session: str,
    *,
    voted_at: float,
    images: tuple[str | None, str | None] = (None, None),
) -> dict[str, Any]:
    """The ``comparisons`` row for a vote on ``pair`` (see the module docstring)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
    extra: dict[str, Any] = {
        "nonce": pair.nonce,
        "prompt_id": pair.prompt_id,
        "category": pair.category,
        "voted_at": voted_at,
        "latency_s": round(max(voted_at - pair.issued_at, 0.0), 3),
        "source": "app",
    }
    if pair.gold_expected is not None:
        extra.update(gold=True, gold_expected=pair.gold_expected)
    return {
        "prompt": pair.prompt,
        "seed": pair.seed,
        "left_id": pair.left_id,
        "right_id": pair.right_id,
        "left_image": images[0],
        "right_image": images[1],
        "outcome": outcome,
        "rater_id": rater_id,
        "rater_kind": "human",
        "time": pair.issued_at,
        "session": session,
        "extra": extra,
    }


def record_vote(
    store: Store,
    pair: IssuedPair,
    outcome: str,
    rater_id: str,
    session: str,
    *,
    voted_at: float | None = None,
) -> VoteResult:
    """Store a vote on an issued pair, exactly once however often it is submitted.

    The same pair voted again with the same outcome stores nothing new (``stored`` False);
    with another outcome it raises :class:`StoreError` (undo first, then vote again).
    """
    images = _render_hashes(store, pair)
    row = vote_row(
        pair,
        outcome,
        rater_id,
        session,
        voted_at=time.time() if voted_at is None else voted_at,
        images=images,
    )
    added = store.add_comparisons([row])
    return VoteResult(comparison_id(pair, rater_id), added.inserted == 1)


def comparison_id(pair: IssuedPair, rater_id: str) -> str:
    """The stored id of a vote by ``rater_id`` on ``pair``: the store's own content hash
    (called, not copied, so that the two cannot drift apart)."""
    return comparison_hash(
        {
            "prompt": pair.prompt,
            "seed": pair.seed,
            "left_id": pair.left_id,
            "right_id": pair.right_id,
            "rater_id": rater_id,
            "time": pair.issued_at,
        }
    )


def undo_vote(store: Store, comparison_id_: str, rater_id: str, session: str) -> bool:
    """Delete a vote of this rater in this session; False if there was none. A rater can only
    undo their own votes of the current session."""
    return store.delete_comparison(comparison_id_, rater_id=rater_id, session=session)


def session_summary(store: Store, rater_id: str, session: str) -> dict[str, Any]:
    """Votes of this rater in this session: count per outcome, gold pairs answered and right,
    median decision time, and the rater's total stored votes."""
    rows = decode_json(
        store.query(
            "SELECT outcome, extra FROM comparisons WHERE rater_id = ? AND session = ?",
            [rater_id, session],
        )
    )
    total = store.query("SELECT count(*) AS n FROM comparisons WHERE rater_id = ?", [rater_id])
    outcomes = Counter(r["outcome"] for r in rows)
    gold = [r for r in rows if (r["extra"] or {}).get("gold")]
    latencies = [r["extra"]["latency_s"] for r in rows if "latency_s" in (r["extra"] or {})]
    return {
        "votes": len(rows),
        "outcomes": {o: outcomes.get(o, 0) for o in OUTCOMES},
        "gold": len(gold),
        "gold_correct": sum(r["outcome"] == r["extra"].get("gold_expected") for r in gold),
        "median_latency_s": statistics.median(latencies) if latencies else None,
        "all_time_votes": int(total[0]["n"]),
    }


def reliability(store: Store) -> list[dict[str, Any]]:
    """Per human rater: votes (gold excluded), gold pairs answered, answered right, and the
    accuracy on gold pairs (None before the first); a low accuracy flags a careless rater."""
    rows = store.query(
        """
        SELECT r.rater_id, r.name,
               count(c.comparison_id) FILTER (WHERE c.comparison_id IS NOT NULL
                   AND coalesce(c.extra->>'$.gold', 'false') <> 'true') AS votes,
               count(*) FILTER (WHERE c.extra->>'$.gold' = 'true') AS gold,
               count(*) FILTER (WHERE c.extra->>'$.gold' = 'true'
                   AND c.outcome = c.extra->>'$.gold_expected') AS gold_correct,
               median((c.extra->>'$.latency_s')::DOUBLE) AS median_latency_s
        FROM raters r LEFT JOIN comparisons c USING (rater_id)
        WHERE r.kind = 'human'
        GROUP BY r.rater_id, r.name
        ORDER BY r.rater_id
        """
    )
    for r in rows:
        r["gold_accuracy"] = r["gold_correct"] / r["gold"] if r["gold"] else None
    return rows


def add_gold_noise(store: Store, out_dir: str | Path, *, size: int | None = None) -> int:
    """Register the ``gold:noise`` contestant (``extra.gold = "bad"``): a pure Gaussian noise
    PNG for every (prompt, seed) that regular contestants rendered, written under ``out_dir``.
    Idempotent; returns how many renders it added. The image size follows the existing renders
    (``size`` overrides). Raises :class:`StoreError` when there are no renders yet."""
    from PIL import Image

    rows = store.query(
        "SELECT DISTINCT ON (prompt_id, seed) prompt_id, seed, prompt, category, path "
        "FROM renders WHERE contestant_id <> ? ORDER BY prompt_id, seed",
        [GOLD_NOISE_ID],
    )
    if not rows:
        raise StoreError(
            f"no renders in {store.path} to make gold pairs for: render contestants first "
            "(harness arena render)"
        )
    if size is None:
        with Image.open(rows[0]["path"]) as im:
            size = max(im.size)
    store.add_contestant(
        GOLD_NOISE_ID,
        label="pure noise (gold pairs)",
        extra={"gold": "bad", "what": "N(0.5, 0.25) RGB noise, clipped"},
    )
    done = {
        (r["prompt_id"], r["seed"])
        for r in store.query(
            "SELECT prompt_id, seed FROM renders WHERE contestant_id = ?", [GOLD_NOISE_ID]
        )
    }
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    new = []
    for r in rows:
        if (r["prompt_id"], r["seed"]) in done:
            continue
        noise = np.random.default_rng([r["prompt_id"], r["seed"]]).normal(
            0.5, 0.25, (size, size, 3)
        )
        path = out / f"p{r['prompt_id']:05d}_s{r['seed']}.png"
        Image.fromarray((noise.clip(0, 1) * 255).round().astype(np.uint8)).save(path)
        new.append(
            {
                "contestant_id": GOLD_NOISE_ID,
                "prompt_id": r["prompt_id"],
                "prompt": r["prompt"],
                "category": r["category"],
                "seed": r["seed"],
                "path": str(path),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            }
        )
    store.add_renders(new)
    return len(new)
