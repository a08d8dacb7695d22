"""The effect of a training choice on win odds in the arena: ``harness leaderboard --by PARAM``.

Where the leaderboard rates each contestant, this asks what a *choice* does: every contestant
made from a run gets its run's value of ``PARAM`` (a dotted path such as
``timesteps.sampler``, looked up in the trial's searched params first, then in the run's
resolved config), and a contextual Bradley-Terry model (:mod:`evaluators.contextual`) fits the
votes with the choice as a categorical covariate (one-hot minus a baseline level, the most
common one unless given). Seed replicas of one configuration (runs ``STUDY/TRIAL/sK``) share
their value, so their votes are pooled; per-contestant residual strengths with a ridge
(``residual_sd``: N(0, residual_sd²) nats) keep one lucky seed from passing for the effect of
its level, and widen the intervals when a level rests on few contestants.

Style control (``style=("brightness", "saturation")``), as LMArena does for answer length and
markdown: each vote gets, per style measure, the left image's value minus the right image's,
both in [0, 1] and scaled by 10 (so a coefficient is the effect of the left image being 10 %
of the full scale brighter/more saturated). The choice's effect is then the one left once
raters' taste for that style is accounted for. The measures are computed from the PNGs:

* ``brightness``: mean luminance (PIL's ``L`` conversion, ITU-R 601) / 255;
* ``saturation``: mean of the HSV saturation channel / 255.

The images of a vote are the ones it records (``left_image``/``right_image``: a path, or
``sha256:<digest>`` of a render), else the contestant's render of the vote's prompt and seed;
votes without both images are left out (counted) when style is asked for.

Left out, and counted in :attr:`ChoiceEffects.left_out`: contestants with no run (imported
votes), contestants whose run has no value for ``PARAM``, and the votes that involve them.
Gold votes (the app's attention checks) never count. Ties and both_bad count as half a win
to each side, as on the leaderboard.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from harness.arena import NOT_GOLD
from harness.store import RaterKind, Store, check_rater_kind
from harness.workpaths import store_work_root

STYLE_MEASURES: tuple[str, ...] = ("brightness", "saturation")
STYLE_SCALE = 10.0
"""Style differences are multiplied by this: a coefficient is per 0.1 of the [0, 1] scale."""
DEFAULT_RESIDUAL_SD = 0.5
"""Prior sd (nats, ≈ 87 Arena points) of a contestant's strength around its level's effect."""
DEFAULT_L2 = 0.01
"""Ridge on the effects themselves: as on the leaderboard, it only matters where data say
nothing (a level that never lost gets a large but finite effect)."""


@dataclass(frozen=True)
class ChoiceEffects:
    """What :func:`choice_effects` found.

    ``rows``: one per level (the baseline first, with effect 0) and one per style measure,
    each a dict: ``kind`` ("level", "baseline" or "style"), ``name`` (the level's value or the
    measure), ``log_odds``, ``se``, ``lower``, ``upper`` (95 % Wald interval of the log-odds),
    ``odds_ratio``, ``odds_ratio_lower``, ``odds_ratio_upper``, ``votes`` (votes with this
    level on exactly one side: those that inform its contrast; for style, all votes used),
    ``contestants`` and ``verdict`` ("better", "worse" or "not resolved": whether the odds
    ratio's interval excludes 1; "baseline" for the baseline).
    """

    param: str
    baseline: str
    rows: list[dict[str, Any]]
    votes: int
    contestants: int
    left_out: dict[str, int] = field(default_factory=dict)
    residual_sd: float | None = DEFAULT_RESIDUAL_SD
    confidence: float = 0.95

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict of everything above."""
        return {
            "param": self.param,
            "baseline": self.baseline,
            "votes": self.votes,
            "contestants": self.contestants,
            "left_out": dict(self.left_out),
            "residual_sd": self.residual_sd,
            "confidence": self.confidence,
            "rows": self.rows,
        }


def lookup_param(params: Mapping[str, Any] | None, config: Any, param: str) -> Any:
    """``param``'s value: ``params[param]`` (a trial's dotted keys) if present, else the dotted
    path walked through the nested ``config``, else a literal dotted key of ``config``;
    None when absent."""
    if params and param in params:
        return params[param]
    node = config
    for part in param.split("."):
        if not isinstance(node, Mapping) or part not in node:
            node = None
            break
        node = node[part]
    if node is None and isinstance(config, Mapping):
        node = config.get(param)
    return node


def _json(text: str | None) -> Any:
    """A JSON column's value (DuckDB returns JSON columns as text)."""
    return None if text is None else json.loads(text)


def _level_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


@lru_cache(maxsize=65536)
def image_style(path: str) -> tuple[float, float]:
    """``(brightness, saturation)`` of a PNG, both in [0, 1] (see the module docstring)."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = im.convert("RGB")
        luminance = np.asarray(rgb.convert("L"), dtype=float).mean() / 255.0
        saturation = np.asarray(rgb.convert("HSV"), dtype=float)[..., 1].mean() / 255.0
    return float(luminance), float(saturation)


def _contestant_levels(store: Store, param: str) -> tuple[dict[str, str], dict[str, int]]:
    rows = store.query(
        "SELECT c.contestant_id, c.run_id, r.config, t.params, r.run_id IS NOT NULL AS has_run "
        "FROM contestants c LEFT JOIN runs r ON r.run_id = c.run_id "
        "LEFT JOIN trials t ON t.study = r.study AND t.number = r.trial"
    )
    levels: dict[str, str] = {}
    left_out = {"contestants_without_run": 0, "contestants_without_param": 0}
    for r in rows:
        if not r["has_run"]:
            left_out["contestants_without_run"] += 1
            continue
        value = lookup_param(_json(r["params"]), _json(r["config"]), param)
        if value is None:
            left_out["contestants_without_param"] += 1
            continue
        levels[r["contestant_id"]] = _level_text(value)
    return levels, left_out


def _image_paths(store: Store) -> tuple[dict[tuple[str, str, int], str], dict[str, str]]:
    renders = store.query("SELECT contestant_id, prompt, seed, path, sha256 FROM renders")
    by_key = {(r["contestant_id"], r["prompt"], int(r["seed"])): r["path"] for r in renders}
    by_sha = {r["sha256"]: r["path"] for r in renders}
    return by_key, by_sha


def _resolve_image(
    recorded: str | None, key: tuple[str, str, int], renders: tuple[dict, dict], root: Path | None
) -> Path | None:
    by_key, by_sha = renders
    path: str | None = None
    if recorded and recorded.startswith("sha256:"):
        path = by_sha.get(recorded.removeprefix("sha256:"))
    elif recorded:
        path = recorded
    if path is None:
        path = by_key.get(key)
    if path is None:
        return None
    p = Path(path)
    if not p.is_absolute() and root is not None:
        p = root / p
    return p if p.is_file() else None


def choice_effects(
    store: Store,
    param: str,
    rater_kind: RaterKind | None = None,
    style: Sequence[str] = (),
    *,
    baseline: str | None = None,
    residual_sd: float | None = DEFAULT_RESIDUAL_SD,
    confidence: float = 0.95,
) -> ChoiceEffects:
    """Each level of ``param``'s effect on win odds against the baseline level.

    Args:
        store: the work directory's store.
        param: a dotted training parameter, e.g. ``timesteps.sampler``.
        rater_kind: only votes by this kind of rater (None: all).
        style: style measures to control for, from :data:`STYLE_MEASURES`.
        baseline: the reference level (its text as shown; default: the level with the most
            contestants).
        residual_sd: prior sd in nats of a contestant around its level (None: no residual
            strengths, every contestant exactly its level's effect).
        confidence: coverage of the intervals.

    Raises:
        ValueError: an unknown style measure, fewer than two levels among the contestants
            with votes, no usable votes; the message says which and why.
    """
    from evaluators.contextual import categorical_design, fit_contextual_bt, outcome_scores
    from trainers.names import did_you_mean

    for measure in style:
        if measure not in STYLE_MEASURES:
            raise ValueError(
                f"unknown style measure {measure!r}{did_you_mean(measure, STYLE_MEASURES)}; "
                f"available: {', '.join(STYLE_MEASURES)}"
            )
    levels, left_out = _contestant_levels(store, param)
    sql = (
        "SELECT left_id, right_id, outcome, prompt, seed, left_image, right_image "
        f"FROM comparisons WHERE {NOT_GOLD}"
    )
    args: list[Any] = []
    if rater_kind is not None:
        sql += " AND rater_kind = ?"
        args.append(check_rater_kind(rater_kind))
    votes = store.query(sql + " ORDER BY time, comparison_id", args)
    used = [v for v in votes if v["left_id"] in levels and v["right_id"] in levels]
    left_out["votes_without_param"] = len(votes) - len(used)
    z = None
    if style:
        renders, root = _image_paths(store), store_work_root(store)
        kept, diffs = [], []
        for v in used:
            sides = [
                _resolve_image(v[f"{s}_image"], (v[f"{s}_id"], v["prompt"], int(v["seed"])),
                               renders, root)
                for s in ("left", "right")
            ]  # fmt: skip
            if None in sides:
                continue
            a, b = (np.array(image_style(str(p))) for p in sides)
            picked = [STYLE_MEASURES.index(m) for m in style]
            diffs.append(STYLE_SCALE * (a - b)[picked])
            kept.append(v)
        left_out["votes_without_images"] = len(used) - len(kept)
        used = kept
        z = np.array(diffs).reshape(len(kept), len(style))
    if not used:
        raise ValueError(
            f"no votes between contestants with a value for {param!r}"
            + (" and images for the style measures" if style else "")
            + f" (left out: {left_out}); check the name (a dotted parameter of the runs' "
            "config or the trials' params) and that the contestants come from runs"
        )
    names = sorted({v["left_id"] for v in used} | {v["right_id"] for v in used})
    index = {name: k for k, name in enumerate(names)}
    values = [levels[name] for name in names]
    x, level_names, base = categorical_design(values, baseline)
    left = np.array([index[v["left_id"]] for v in used])
    right = np.array([index[v["right_id"]] for v in used])
    fit = fit_contextual_bt(
        left,
        right,
        outcome_scores([v["outcome"] for v in used]),
        x,
        [*map(str, level_names), *style],
        vote_z=z,
        l2=DEFAULT_L2,
        residual_l2=None if residual_sd is None else 1.0 / residual_sd**2,
        confidence=confidence,
    )
    level_of = np.array(values, dtype=object)

    def informing(level: str) -> int:
        on_left, on_right = level_of[left] == level, level_of[right] == level
        return int(np.sum(on_left != on_right))

    rows: list[dict[str, Any]] = [
        {
            "kind": "baseline",
            "name": str(base),
            "log_odds": 0.0,
            "se": 0.0,
            "lower": 0.0,
            "upper": 0.0,
            "odds_ratio": 1.0,
            "odds_ratio_lower": 1.0,
            "odds_ratio_upper": 1.0,
            "votes": informing(str(base)),
            "contestants": values.count(str(base)),
            "verdict": "baseline",
        }
    ]
    or_lower, or_upper = fit.odds_ratio_interval
    for k, name in enumerate(fit.names):
        is_style = k >= len(level_names)
        lo, hi = float(fit.lower[k]), float(fit.upper[k])
        rows.append(
            {
                "kind": "style" if is_style else "level",
                "name": name,
                "log_odds": float(fit.coef[k]),
                "se": float(fit.se[k]),
                "lower": lo,
                "upper": hi,
                "odds_ratio": float(fit.odds_ratio[k]),
                "odds_ratio_lower": float(or_lower[k]),
                "odds_ratio_upper": float(or_upper[k]),
                "votes": len(used) if is_style else informing(name),
                "contestants": len(names) if is_style else values.count(name),
                "verdict": "better" if lo > 0 else "worse" if hi < 0 else "not resolved",
            }
        )
    return ChoiceEffects(
        param=param,
        baseline=str(base),
        rows=rows,
        votes=len(used),
        contestants=len(names),
        left_out=left_out,
        residual_sd=residual_sd,
        confidence=confidence,
    )
