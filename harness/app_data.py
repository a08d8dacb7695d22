"""What the app's pages read, as plain functions of a :class:`harness.store.Store` (no
Streamlit here: the pages cache these with ``st.cache_data`` and a short ttl, the tests call
them directly).

Every function opens the DuckDB file for one short read and closes it (the store's contract:
studies, judges and voters write the same file, so nobody may hold it). Images are looked up
by id in ``renders`` / ``samples`` and read from the path the store recorded; no path that
came from a URL or a widget is ever opened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.arena import NOT_GOLD, rate_battles
from harness.store import RATER_KINDS, Store, decode_json

LEADERBOARD_ROUNDS = 1000


@dataclass(frozen=True)
class Filters:
    """Leaderboard filters; None (or an empty tuple) means no filter."""

    rater_kind: str | None = None
    raters: tuple[str, ...] = ()
    category: str | None = None
    study: str | None = None

    def __post_init__(self) -> None:
        if self.rater_kind is not None and self.rater_kind not in RATER_KINDS:
            raise ValueError(
                f"rater kind {self.rater_kind!r} is not one of {', '.join(RATER_KINDS)} "
                "(or None for all)"
            )


def battles(store: Store, filters: Filters) -> list[tuple[str, str, str]]:
    """``(left, right, outcome)`` of the non-gold votes that pass ``filters``, in time order.

    Category: the prompt category of the render the vote is about (``renders.category`` for the
    left contestant, prompt and seed). Study: both contestants come from runs of that study.
    """
    where, params = [NOT_GOLD], []
    if filters.rater_kind is not None:
        where.append("rater_kind = ?")
        params.append(filters.rater_kind)
    if filters.raters:
        where.append("rater_id IN (SELECT unnest(?))")
        params.append(list(filters.raters))
    if filters.category is not None:
        where.append(
            "EXISTS (SELECT 1 FROM renders r WHERE r.contestant_id = c.left_id "
            "AND r.prompt = c.prompt AND r.seed = c.seed AND r.category = ?)"
        )
        params.append(filters.category)
    if filters.study is not None:
        in_study = (
            "(SELECT k.contestant_id FROM contestants k JOIN runs u ON u.run_id = k.run_id "
            "WHERE u.study = ?)"
        )
        where.append(f"left_id IN {in_study} AND right_id IN {in_study}")
        params += [filters.study, filters.study]
    sql = (
        "SELECT left_id, right_id, outcome FROM comparisons c WHERE "
        + " AND ".join(where)
        + " ORDER BY time, comparison_id"
    )
    return [tuple(r) for r in _rows(store, sql, params)]  # type: ignore[misc]


def _rows(store: Store, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    with store.read() as con:
        return con.execute(sql, params).fetchall()


def leaderboard(
    store: Store, filters: Filters, rounds: int = LEADERBOARD_ROUNDS
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Leaderboard rows (``harness.arena.rate_battles``: rating, interval, rank, battles, Elo)
    with ``win_rate`` added, and the win-rate matrix ``{"names", "rate", "battles"}`` where
    ``rate[i][j]`` is i's share of wins over j (ties and both_bad count half; NaN if never
    compared)."""
    from evaluators.ratings import aggregate

    votes = battles(store, filters)
    labels = {
        r["contestant_id"]: r["label"]
        for r in store.query("SELECT contestant_id, label FROM contestants")
    }
    rows = rate_battles(votes, labels, rounds=rounds)
    if not rows:
        return [], {"names": [], "rate": [], "battles": []}
    counts = aggregate(votes)
    wins, played = counts.wins, counts.battles
    for r in rows:
        i = counts.index(r["contestant"])
        r["win_rate"] = float(wins[i].sum() / played[i].sum())
    order = [counts.index(r["contestant"]) for r in rows]  # best first
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(played > 0, wins / played, np.nan)[np.ix_(order, order)]
    matrix = {
        "names": [rows[k]["contestant"] for k in range(len(rows))],
        "rate": rate.tolist(),
        "battles": played[np.ix_(order, order)].tolist(),
    }
    return rows, matrix


def choice_params(store: Store) -> list[str]:
    """The training parameters searched by the trials whose runs are contestants: what the
    leaderboard's effect view offers (``harness.arena_effects.choice_effects``)."""
    rows = store.query(
        "SELECT DISTINCT t.params FROM contestants c JOIN runs r USING (run_id) "
        "JOIN trials t ON t.study = r.study AND t.number = r.trial WHERE t.params IS NOT NULL"
    )
    names: set[str] = set()
    for r in decode_json(rows, "params"):
        if isinstance(r["params"], dict):
            names.update(r["params"])
    return sorted(names)


def choice_effects(
    store: Store, param: str, rater_kind: str | None, style: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``harness leaderboard --by PARAM`` as a dict (``ChoiceEffects.to_json``), or
    ``{"error": message}`` when the votes cannot answer (no votes with the parameter, a level
    that never lost): the page shows the message."""
    from harness.arena_effects import choice_effects as compute

    try:
        return compute(store, param, rater_kind, style).to_json()  # type: ignore[arg-type]
    except ValueError as err:
        return {"error": str(err)}


def filter_options(store: Store) -> dict[str, list[str]]:
    """Values the leaderboard filters offer: raters per kind, prompt categories, studies."""
    raters = store.query("SELECT rater_id, kind FROM raters ORDER BY rater_id")
    cats = store.query(
        "SELECT DISTINCT category FROM renders WHERE category IS NOT NULL ORDER BY category"
    )
    studies = store.query("SELECT name FROM studies ORDER BY name")
    out: dict[str, list[str]] = {k: [] for k in RATER_KINDS}
    for r in raters:
        out[r["kind"]].append(r["rater_id"])
    out["categories"] = [c["category"] for c in cats]
    out["studies"] = [s["name"] for s in studies]
    return out


def contestant(store: Store, contestant_id: str) -> dict[str, Any] | None:
    """A contestant's provenance: its row, its run (study, trial, config hash, run dir) and its
    renders (prompt_id, seed, prompt, category), or None if unknown."""
    rows = store.query(
        "SELECT k.*, u.study, u.trial, u.config_hash, u.run_dir FROM contestants k "
        "LEFT JOIN runs u ON u.run_id = k.run_id WHERE k.contestant_id = ?",
        [contestant_id],
    )
    if not rows:
        return None
    out = decode_json(rows)[0]
    if out.get("run_dir"):  # recorded relative to the work directory: where it is now
        out["run_dir"] = str(store.run_dir_path(out["run_dir"]))
    out["renders"] = store.query(
        "SELECT prompt_id, seed, prompt, category FROM renders WHERE contestant_id = ? "
        "ORDER BY prompt_id, seed",
        [contestant_id],
    )
    return out


# -- studies and runs ----------------------------------------------------------------------------
def studies(store: Store) -> list[dict[str, Any]]:
    """Every study with its objectives, directions and trial counts per state."""
    return store.query(
        """
        SELECT s.name, s.objectives, s.directions, s.created_at,
               count(t.number) AS trials,
               count(*) FILTER (WHERE t.state = 'complete') AS complete,
               count(*) FILTER (WHERE t.state = 'running') AS running,
               count(*) FILTER (WHERE t.state = 'failed') AS failed,
               count(*) FILTER (WHERE t.state = 'pruned') AS pruned
        FROM studies s LEFT JOIN trials t ON t.study = s.name
        GROUP BY ALL ORDER BY s.name
        """
    )


def study_row(store: Store, name: str) -> dict[str, Any] | None:
    """The ``studies`` row of ``name`` with ``spec`` decoded, or None."""
    rows = store.query("SELECT * FROM studies WHERE name = ?", [name])
    return decode_json(rows, "spec")[0] if rows else None


def optuna_storage(workdir: Path, spec: dict[str, Any] | None) -> str:
    """The study's Optuna storage: the URL its study file named, else WORKDIR/optuna.db."""
    url = ((spec or {}).get("optuna") or {}).get("storage")
    return url or f"sqlite:///{(workdir / 'optuna.db').resolve()}"


def runs(store: Store, study: str | None = None) -> list[dict[str, Any]]:
    """Runs (optionally of one study) with their trial state, newest first."""
    sql = (
        "SELECT u.run_id, u.study, u.trial, u.config_hash, u.registered_at, t.state, t.values "
        "FROM runs u LEFT JOIN trials t ON t.study = u.study AND t.number = u.trial"
    )
    params: list[Any] = []
    if study is not None:
        sql += " WHERE u.study = ?"
        params.append(study)
    return store.query(sql + " ORDER BY u.registered_at DESC, u.run_id", params)


def run(store: Store, run_id: str) -> dict[str, Any] | None:
    """A run's row (config decoded) with its trial's state, error and stderr tail, and the
    trainer's ``status.json`` when the run directory has one; None if unknown."""
    rows = store.query(
        "SELECT u.*, t.state, t.error, t.stderr_tail, t.values, t.params FROM runs u "
        "LEFT JOIN trials t ON t.study = u.study AND t.number = u.trial WHERE u.run_id = ?",
        [run_id],
    )
    if not rows:
        return None
    out = decode_json(decode_json(rows, "config"), "params")[0]
    out["run_dir"] = str(store.run_dir_path(out["run_dir"]))  # recorded relative to the work dir
    status = Path(out["run_dir"]) / "status.json"
    try:
        out["status"] = json.loads(status.read_text())
    except (OSError, ValueError):
        out["status"] = None
    return out


def metric_names(store: Store, run_id: str) -> list[str]:
    """Metric names the run logged."""
    rows = store.query("SELECT DISTINCT name FROM metrics WHERE run_id = ? ORDER BY name", [run_id])
    return [r["name"] for r in rows]


def sample_sets(store: Store, run_id: str) -> list[dict[str, Any]]:
    """The run's samples (``path`` relative to the run's samples/), ordered by step and
    prompt; the ``final`` set sorts last. ``enhanced_prompt``: what a prompt enhancer made of
    ``prompt`` (None without one)."""
    return store.query(
        "SELECT path, tag, step, prompt_id, prompt, seed, nfe, cfg, solver, "
        "extra->>'enhanced_prompt' AS enhanced_prompt FROM samples "
        "WHERE run_id = ? ORDER BY (tag = 'final'), step, prompt_id, seed, path",
        [run_id],
    )


def sample_image(store: Store, run_id: str, path: str) -> bytes:
    """The bytes of a registered sample of a run, found by (run_id, path) in ``samples``.

    The file must lie inside the run's ``samples/`` directory; anything else (a path not in
    the store, a link or ``..`` that leaves the directory) raises :class:`FileNotFoundError`.
    """
    rows = store.query(
        "SELECT u.run_dir, s.path FROM samples s JOIN runs u USING (run_id) "
        "WHERE s.run_id = ? AND s.path = ?",
        [run_id, path],
    )
    if not rows:
        raise FileNotFoundError(f"run {run_id!r} has no registered sample {path!r}")
    root = (store.run_dir_path(rows[0]["run_dir"]) / "samples").resolve()
    file = (root / rows[0]["path"]).resolve()
    if not file.is_relative_to(root):
        raise FileNotFoundError(f"sample {path!r} of run {run_id!r} lies outside {root}")
    return file.read_bytes()
