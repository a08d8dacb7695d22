"""Effects of training choices over seeds: what a study's report says, and how sure it is.

A study trains every configuration (an Optuna trial) with seeds ``base.seed + 0 .. K-1``; seed k
uses the same initial weights, data order, timestep and noise draws in every configuration
(common random numbers), and every run is evaluated on the same prompts with the same sampling
seeds. So a configuration and the baseline are compared *paired*: seed k against seed k, image i
against image i. :func:`analyse` gathers each configuration's per-seed final metrics and
per-image evaluation results from its run directories and computes, per reported metric:

- the mean over seeds with a 95% t-interval (:func:`harness.stats.mean_ci`);
- the effect against the baseline (or, without one, the best configuration): the mean of the
  per-seed paired differences with its Student-t interval (each difference is measured on all
  evaluation images, so it holds seed and evaluation noise alike), the probability of
  improvement, a verdict (resolved: the interval excludes 0) and, when not resolved, the seeds
  that would resolve the observed difference at 80% power; a hierarchical bootstrap (seeds,
  then images) gives the evaluation-only part (:func:`harness.stats.paired_effect` says why
  its own interval is not the reported one);
- evaluation-only noise (the image bootstrap alone, seeds fixed), shown apart and labelled;
- an SD3 Table 1 style rank table with the average rank's interval.

A metric without per-image results (``eval/flow_loss``: a fixed grid with fixed noise) is
compared on its per-seed values alone (its evaluation noise is zero by construction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from harness import stats
from harness.workpaths import trial_run_dir
from trainers.rundir import RunDir

# Reported beside the objective. eval/flow_loss rather than train/loss: the training loss is
# weighted by the trial's own timestep sampler, so it is not comparable across samplers.
# A fine-tune's subject metrics and the prior's drift (trainers/finetune), and a preference
# run's rewards on training and held-out prompts (trainers/preference: the trained reward beside
# the second one shows reward hacking) are shown when its trials wrote them.
SECONDARY = (
    "attr_acc_mean",
    "heldout_attr_acc_mean",
    "terse_attr_acc",
    "domain_fid",
    "eval/flow_loss",
    "subject/fidelity",
    "subject/prompt_fidelity",
    "prior_drift/domain_fid",
    "prior_drift/attr_acc_mean",
    "reward/attribute/train",
    "reward/attribute/heldout",
    "reward/realism/heldout",
)

_LOWER_IS_BETTER = ("domain_fid", "eval/flow_loss", "train/loss")
N_BOOT = 1000
N_BOOT_FID = 400  # each FID replicate is an eigendecomposition: 400 keep a report in seconds
LEVEL = 0.95


def higher_is_better(metric: str, objective: str, direction: str) -> bool:
    """The objective's direction is the study's; the others follow their names."""
    if metric == objective:
        return direction == "maximize"
    return not any(metric == m or metric.endswith(m) for m in _LOWER_IS_BETTER)


@dataclass
class SeedResult:
    """One seed run of a configuration: its final metrics and last evaluation's images."""

    k: int
    seed: int | None
    final: dict[str, float]
    images: Any = None  # trainers.evaluate.EvalImages of the final evaluation, or None
    run_dir: Path | None = None


def seed_dirs(user_attrs: Mapping[str, Any], workdir: Path | None = None) -> list[Path]:
    """The run directories of a trial's seed runs, ``run_dir/s<k>``. A trial recorded before
    studies had seeds trained in ``run_dir`` itself, and is read from there. ``run_dir`` is
    recorded relative to the work directory ``workdir`` (harness/workpaths.py)."""
    root = trial_run_dir(user_attrs, workdir)
    if root is None:
        return []
    seeds = user_attrs.get("seeds")
    if seeds is None and (Path(root) / "metrics.jsonl").exists():
        return [Path(root)]
    return [Path(root) / f"s{k}" for k in range(len(seeds or [None]))]


@dataclass
class Configuration:
    """One configuration (a complete trial) and its seed runs."""

    trial: int
    params: dict[str, Any]
    seeds: list[SeedResult]
    label: str = ""

    def values(self, metric: str) -> list[float]:
        return [s.final[metric] for s in self.seeds if metric in s.final]


@dataclass
class Analysis:
    """Everything the report shows about effects; ``to_json`` is ``study report --json``."""

    study: str
    design: str
    sampler: str
    confounded: bool
    repeats: int
    objective: str
    direction: str
    metrics: list[str]
    configurations: list[Configuration]
    baseline: Configuration | None
    baseline_kind: str  # "baseline" (the study file's) or "best" (by mean objective)
    summaries: list[dict[str, Any]] = field(default_factory=list)
    effects: list[dict[str, Any]] = field(default_factory=list)
    ranks: list[stats.RankRow] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "design": self.design,
            "sampler": self.sampler,
            "confounded": self.confounded,
            "repeats": self.repeats,
            "objective": {"metric": self.objective, "direction": self.direction},
            "metrics": self.metrics,
            "level": LEVEL,
            "baseline": None
            if self.baseline is None
            else {"kind": self.baseline_kind, "trial": self.baseline.trial, **_params(self)},
            "configurations": self.summaries,
            "effects": self.effects,
            "ranks": [
                {
                    "configuration": r.config,
                    "ranks": r.ranks,
                    "mean_rank": r.mean_rank,
                    "mean_rank_low": _finite(r.mean_rank_low),
                    "mean_rank_high": _finite(r.mean_rank_high),
                }
                for r in self.ranks
            ],
        }


def _params(a: Analysis) -> dict[str, Any]:
    assert a.baseline is not None
    return {"params": a.baseline.params, "label": a.baseline.label}


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


# --------------------------------------------------------------------------------------------
# Gathering


def _seed_results(trial: optuna.trial.FrozenTrial, workdir: Path | None = None) -> list[SeedResult]:
    from trainers.evaluate import eval_image_files, read_eval_images

    seeds = trial.user_attrs.get("seeds") or [None]
    out = []
    for k, path in enumerate(seed_dirs(trial.user_attrs, workdir)):
        run = RunDir(path)
        final = {m["name"]: m["value"] for m in run.read_metrics() if m["value"] is not None}
        if not final:
            continue
        files = eval_image_files(run.root)
        images = read_eval_images(files[max(files)]) if files else None
        out.append(SeedResult(k, seeds[k] if k < len(seeds) else None, final, images, path))
    return out


def _label(params: Mapping[str, Any], varying: Sequence[str]) -> str:
    """``sampler=mode, shift=1.5``: the values of the parameters that vary in the study, by the
    last part of their name (legends name parameter values, not trial numbers)."""
    shown = [k for k in params if k in varying] or list(params)
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(params[k])}" for k in shown) or "base"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def gather(study: optuna.Study, workdir: Path | None = None) -> list[Configuration]:
    """The complete configurations (a repeat of an earlier one is left out: counting it twice
    would fake a tighter interval) with their seed runs, labelled by parameter values."""
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "repeat_of" not in t.user_attrs
    ]
    names = sorted({k for t in trials for k in t.params})
    varying = [n for n in names if len({repr(t.params.get(n)) for t in trials}) > 1]
    configs = []
    for t in trials:
        seeds = _seed_results(t, workdir)
        if seeds:
            configs.append(
                Configuration(t.number, dict(t.params), seeds, _label(t.params, varying))
            )
    return configs


# --------------------------------------------------------------------------------------------
# Per-image rows of a metric


def metric_rows(metric: str, seed: SeedResult) -> tuple[np.ndarray, Any]:
    """(rows, reference) to compute ``metric`` of one run from its per-image results:
    ``reference`` is the evaluation file whose real-image statistics an FID is measured
    against, None for a mean of the rows. A metric without per-image results is its final
    value as a single row."""
    im = seed.images
    if im is not None:
        names = list(im.attributes)
        if metric == "domain_fid":
            return im.seen_features, im
        if metric in ("attr_acc_mean", "heldout_attr_acc_mean"):
            correct = im.heldout_correct if metric.startswith("heldout_") else im.seen_correct
            return correct.astype(np.float64), None
        if metric in ("attr_all_correct", "heldout_attr_all_correct"):
            correct = im.heldout_correct if metric.startswith("heldout_") else im.seen_correct
            return correct.all(1).astype(np.float64)[:, None], None
        for prefix, correct in (("attr_acc/", im.seen_correct), ("heldout_attr_acc/", None)):
            if metric.startswith(prefix) and metric[len(prefix) :] in names:
                correct = im.heldout_correct if correct is None else correct
                j = names.index(metric[len(prefix) :])
                return correct[:, j].astype(np.float64)[:, None], None
    return np.array([[seed.final[metric]]], dtype=np.float64), None


def _statistic(reference: Any) -> Callable[[np.ndarray], float]:
    """FID against ``reference``'s real-image statistics, or the mean of the rows (None)."""
    if reference is not None:
        return stats.frechet_statistic(reference.reference_mean, reference.reference_cov)
    return lambda rows: float(rows.mean())


def _paired_rows(
    metric: str, a: Configuration, b: Configuration
) -> tuple[list[np.ndarray], list[np.ndarray], Callable[[np.ndarray], float]] | None:
    """Rows of A's and B's runs on the seeds both have (seed k with seed k)."""
    b_by_k = {s.k: s for s in b.seeds}
    pairs = [(s, b_by_k[s.k]) for s in a.seeds if s.k in b_by_k and metric in s.final]
    pairs = [(x, y) for x, y in pairs if metric in y.final]
    if not pairs:
        return None
    ra = [metric_rows(metric, x) for x, _ in pairs]
    rb = [metric_rows(metric, y) for _, y in pairs]
    fid = {ref is not None for _, ref in ra + rb}
    shapes_agree = all(x.shape == y.shape for (x, _), (y, _) in zip(ra, rb, strict=True))
    if not shapes_agree or len(fid) > 1:  # e.g. one side lacks per-image files
        ra = [(np.array([[x.final[metric]]]), None) for x, _ in pairs]
        rb = [(np.array([[y.final[metric]]]), None) for _, y in pairs]
    return [r for r, _ in ra], [r for r, _ in rb], _statistic(ra[0][1])


# --------------------------------------------------------------------------------------------
# The analysis


def analyse(
    study: optuna.Study,
    metrics: Sequence[str],
    directions: Sequence[str],
    baseline: Mapping[str, Any] | None = None,
    design: str = "search",
    sampler: str = "tpe",
    repeats: int | None = None,
    n_boot: int = N_BOOT,
    workdir: Path | None = None,
) -> Analysis:
    """Gather the study's configurations and compute summaries, effects and ranks; run
    directories are resolved against the work directory ``workdir``."""
    configs = gather(study, workdir)
    objective, direction = metrics[0], directions[0]
    shown = list(dict.fromkeys([objective, *metrics[1:], *SECONDARY]))
    shown = [m for m in shown if any(c.values(m) for c in configs)]
    hib = {m: higher_is_better(m, objective, direction) for m in shown}
    base, kind = _pick_baseline(configs, baseline, objective, hib.get(objective, False))
    a = Analysis(
        study=study.study_name,
        design=design,
        sampler=sampler,
        confounded=design == "search" and sampler != "grid",
        repeats=repeats or max((len(c.seeds) for c in configs), default=0),
        objective=objective,
        direction=direction,
        metrics=shown,
        configurations=configs,
        baseline=base,
        baseline_kind=kind,
    )
    a.summaries = [_summary(c, shown, hib) for c in configs]
    if base is not None:
        for c in configs:
            if c is not base:
                a.effects += [_effect(c, base, m, hib[m], n_boot) for m in shown]
    if len(configs) >= 2 and shown:
        per_seed = {c.label: {m: c.values(m) for m in shown} for c in configs}
        common = min(len(v) for d in per_seed.values() for v in d.values())
        per_seed = {c: {m: v[:common] for m, v in d.items()} for c, d in per_seed.items()}
        if common:
            a.ranks = stats.rank_table(per_seed, hib, level=LEVEL, n_boot=n_boot)
    return a


def _pick_baseline(
    configs: list[Configuration],
    baseline: Mapping[str, Any] | None,
    objective: str,
    objective_hib: bool,
) -> tuple[Configuration | None, str]:
    if baseline:
        match = [c for c in configs if all(c.params.get(k) == v for k, v in baseline.items())]
        return (match[0], "baseline") if match else (None, "baseline")
    scored = [c for c in configs if c.values(objective)]
    if len(scored) < 2:
        return None, "best"
    sign = -1.0 if objective_hib else 1.0
    return min(scored, key=lambda c: sign * float(np.mean(c.values(objective)))), "best"


def _summary(c: Configuration, metrics: Sequence[str], hib: Mapping[str, bool]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "trial": c.trial,
        "label": c.label,
        "params": c.params,
        "seeds": [s.seed for s in c.seeds],
        "metrics": {},
    }
    for m in metrics:
        values = c.values(m)
        if not values:
            continue
        iv = stats.mean_ci(values, LEVEL)
        runs = [metric_rows(m, s) for s in c.seeds if m in s.final]
        noise = (
            stats.eval_noise([r for r, _ in runs], _statistic(runs[0][1]), n_boot=200)
            if runs and runs[0][0].shape[0] > 1
            else None
        )
        out["metrics"][m] = {
            "mean": iv.estimate,
            "ci_low": _finite(iv.low),
            "ci_high": _finite(iv.high),
            "per_seed": values,
            "eval_sd": noise,
            "higher_is_better": hib[m],
        }
    return out


def _effect(
    c: Configuration, base: Configuration, metric: str, hib: bool, n_boot: int
) -> dict[str, Any]:
    changed = [k for k in {**base.params, **c.params} if c.params.get(k) != base.params.get(k)]
    row: dict[str, Any] = {
        "configuration": c.label,
        "trial": c.trial,
        "parameter": ", ".join(changed),
        "value": ", ".join(_fmt(c.params.get(k)) for k in changed),
        "baseline": ", ".join(_fmt(base.params.get(k)) for k in changed),
        "baseline_label": base.label,
        "metric": metric,
        "higher_is_better": hib,
    }
    paired = _paired_rows(metric, c, base)
    if paired is None:
        return row | {
            "estimate": None,
            "ci_low": None,
            "ci_high": None,
            "n_seeds": 0,
            "resolved": False,
            "seeds_needed": None,
            "p_improve": None,
            "eval_sd": None,
            "seed_sd": None,
            "verdict": "no paired seeds",
        }
    ra, rb, statistic = paired
    boots = N_BOOT_FID if metric == "domain_fid" else n_boot
    e = stats.paired_effect(ra, rb, statistic, hib, level=LEVEL, n_boot=boots, rng=0)
    return row | {
        "estimate": e.estimate,
        "ci_low": _finite(e.ci_low),
        "ci_high": _finite(e.ci_high),
        "n_seeds": e.n_seeds,
        "resolved": bool(e.resolved),
        "seeds_needed": e.seeds_needed,
        "p_improve": _finite(e.p_improve),
        "seed_sd": _finite(e.seed_sd),
        "eval_sd": _finite(e.eval_sd),
        "p_paired_t": _finite(getattr(e, "p_value", float("nan"))),
        "verdict": verdict(e.n_seeds, bool(e.resolved), e.estimate, hib, e.seeds_needed),
    }


def verdict(n: int, resolved: bool, estimate: float, hib: bool, needed: int | None) -> str:
    """One line a reader deciding on a recipe can act on."""
    if n < 2:
        return "one seed: no interval (an anecdote, not an effect)"
    if resolved:
        better = (estimate > 0) == hib
        return f"resolved: {'better' if better else 'worse'} than the baseline"
    if needed is None:
        return "not resolved (no difference observed)"
    return f"not resolved: ~{needed} seeds would resolve this difference at 80% power"
