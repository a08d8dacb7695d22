"""What the runner records on Optuna studies and trials so that optuna-dashboard (and any other
Optuna tool) reads them well: the objectives' names on the study instead of "Objective 0", and
per trial a handful of headline metrics as separate user attributes instead of one blob of
every metric the trainer logged (which made the dashboard's trial page thousands of pixels
wide). Every metric stays in the run's ``metrics.jsonl`` and the DuckDB store.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

MAX_HEADLINE = 5
"""Headline metrics recorded per trial besides the objectives."""

HEADLINE: tuple[str, ...] = (
    "domain_fid",
    "attr_acc_mean",
    "heldout_attr_acc_mean",
    "eval/flow_loss",
    "subject/fidelity",
    "subject/prompt_fidelity",
    "reward/trained",
    "reward/second",
    "train/loss",
)
"""Candidates, in order of preference: the first ``MAX_HEADLINE`` a run logged are recorded."""

COPIED = ("run_dir", "workdir", "config_hash", "seeds", "seed_values")
"""User attributes a repeat of a trial (the same config asked again) takes over from it, with
its metric attributes; the others (its runner, retries, error) are the original's own."""


def set_metric_names_once(study: optuna.Study, objectives: Sequence[str]) -> None:
    """Name the study's objectives (``study.set_metric_names``) unless already named: the
    dashboard then shows ``domain_fid`` where it showed "Objective 0"."""
    if study.metric_names is None:
        study.set_metric_names(list(objectives))


def headline_attrs(final: Mapping[str, float], objectives: Sequence[str]) -> dict[str, float]:
    """The user attributes of a finished trial's metrics: its objectives' and at most
    :data:`MAX_HEADLINE` headline metrics' final values (mean over seeds), one attribute each,
    keyed by the metric name; non-finite values are left out (JSON has none)."""
    chosen = [m for m in objectives if m in final]
    extra = [m for m in HEADLINE if m in final and m not in chosen][:MAX_HEADLINE]
    return {m: float(final[m]) for m in chosen + extra if math.isfinite(float(final[m]))}


def copied_attrs(original: Mapping[str, Any], objectives: Sequence[str]) -> dict[str, Any]:
    """The user attributes a repeat of a trial takes over from it: its run and its results."""
    keys = (*COPIED, *objectives, *HEADLINE)
    return {k: original[k] for k in keys if k in original}
