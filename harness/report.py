"""The ablation report of a study, as Markdown.

It answers "which choice is better, and how sure are we?" (:mod:`harness.effects` computes it):
the verdicts (each configuration's paired effect against the baseline or the best, over seeds,
with its interval, probability of improvement and the seeds a "not resolved" difference would
need), an SD3 Table 1 style rank table, each configuration's mean over seeds with its 95%
t-interval and the evaluation-only noise apart. A study whose configurations a sampler chose
(TPE, random, ...) confounds its factors: the report says so and shows no per-value tables as
effects. Then the steps to reach the baseline (with a baseline), Optuna's parameter
importances, the best configuration and every trial with its state.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from harness import stats as harness_stats
from harness.effects import SECONDARY, Analysis, Configuration, analyse, seed_dirs
from harness.workpaths import trial_run_dir

__all__ = ["SECONDARY", "ablation_markdown", "mean_ci", "steps_to_reach"]


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None]:
    """Mean and the half-width of its Student-t confidence interval (None for n < 2)."""
    iv = harness_stats.mean_ci(values, level)
    return iv.estimate, None if iv.n < 2 else (iv.high - iv.low) / 2


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _num(v: float | None, digits: int = 4) -> str:
    return (
        "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}g}"
    )


def _interval(lo: float | None, hi: float | None) -> str:
    return "no interval" if lo is None or hi is None else f"[{_num(lo)}, {_num(hi)}]"


def ablation_markdown(
    study: optuna.Study,
    metrics: Sequence[str],
    directions: Sequence[str],
    baseline: Mapping[str, Any] | None = None,
    *,
    design: str = "search",
    sampler: str = "tpe",
    analysis: Analysis | None = None,
    workdir: Path | None = None,
) -> str:
    """The study report in Markdown. ``baseline``: parameters that pick the baseline
    configuration (the study file's ``baseline:``); effects are against it, else against the
    best configuration. ``design`` / ``sampler``: how the configurations were chosen.
    ``workdir``: the work directory the trials' run directories are recorded relative to."""
    a = analysis or analyse(study, metrics, directions, baseline, design, sampler, workdir=workdir)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE and "repeat_of" not in t.user_attrs]
    objective = metrics[0]
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    seeds = sorted({s.seed for c in a.configurations for s in c.seeds if s.seed is not None})
    lines = [
        f"# Study {study.study_name}",
        "",
        f"{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
        f"{counts[TrialState.FAIL]} failed, {counts[TrialState.RUNNING]} running. "
        f"Design: {design}; {len(a.configurations)} configuration(s) x {a.repeats} training "
        f"seed(s) {seeds}. Objective: {objective} ({directions[0]}).",
    ]
    lines += _design_note(a)
    lines += _verdicts(a)
    lines += _ranks(a)
    lines += _summaries(a)
    if baseline and a.baseline is not None and _evaluations(a.baseline, objective) > 1:
        lines += _speedup(done, objective, directions[0], baseline, workdir)
    lines += _importances(study, done, objective, directions, a.confounded)
    lines += _best(study, done, metrics, workdir)
    lines += _all_trials(trials, metrics)
    return "\n".join(lines) + "\n"


def _design_note(a: Analysis) -> list[str]:
    out = [""]
    if a.confounded:
        out.append(
            f"**Factors are confounded.** The {a.sampler} sampler chose which values go "
            "together, so a value's average over the trials that happened to use it is not its "
            "effect; this report compares whole configurations only. Use `design: grid` or "
            "`design: ofat` with a `baseline:` to measure effects."
        )
    if a.repeats < 2:
        out.append(
            "**One training seed per configuration**: every difference below is an anecdote "
            "with no interval. Set `repeats: 3` (or more) to measure effects."
        )
    return out if len(out) > 1 else []


def _verdicts(a: Analysis) -> list[str]:
    if a.baseline is None:
        return ["", "No baseline configuration has completed yet: no effects."]
    against = "baseline" if a.baseline_kind == "baseline" else "best configuration"
    out = [
        "",
        f"## Effects against the {against}: {a.baseline.label}",
        "",
        "Effect = choice - baseline, paired by training seed (same initial weights, batches and "
        "noise) and evaluation image (same prompts and sampling seeds). 95% interval: Student t "
        "over the per-seed differences, each measured on all evaluation images, so it holds both "
        "seed and evaluation noise (a hierarchical bootstrap over seeds then images counts the "
        "evaluation noise twice: 100% coverage of a nominal 95% in simulation). P(better): the "
        "probability that the choice beats the baseline in the metric's direction. Resolved: "
        "the interval excludes 0.",
        "",
        "| choice | metric | effect | 95% interval | P(better) | seeds | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in a.effects:
        arrow = "↑" if e["higher_is_better"] else "↓"
        out.append(
            f"| {e['configuration']} | {e['metric']} {arrow} | {_num(e['estimate'])} | "
            f"{_interval(e['ci_low'], e['ci_high'])} | {_num(e['p_improve'], 2)} | "
            f"{e['n_seeds']} | {e['verdict']} |"
        )
    return out


def _ranks(a: Analysis) -> list[str]:
    if not a.ranks:
        return []
    metrics = list(a.ranks[0].ranks)
    out = [
        "",
        "## Rank table",
        "",
        "Rank of each configuration's mean over seeds per metric (1 = best), and the average "
        "rank with its 95% interval (bootstrap over seeds). The best row is in bold.",
        "",
        "| configuration | " + " | ".join(metrics) + " | average rank | 95% interval |",
        "|" + "---|" * (len(metrics) + 3),
    ]
    for i, r in enumerate(a.ranks):
        cells = [r.config, *(f"{r.ranks[m]:g}" for m in metrics), f"{r.mean_rank:.2f}"]
        cells.append(_interval(_f(r.mean_rank_low), _f(r.mean_rank_high)))
        if i == 0:
            cells = [f"**{c}**" for c in cells]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _f(x: float) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _summaries(a: Analysis) -> list[str]:
    if not a.summaries:
        return []
    out = [
        "",
        "## Configurations: mean over training seeds",
        "",
        "Each cell: mean over seeds [95% t-interval over seeds]. Evaluation-only noise (sd of "
        "the metric when the evaluation images alone are resampled, seeds fixed) is shown "
        "apart: it is part of, not in addition to, the seed-level interval.",
        "",
        "| configuration | trial | seeds | " + " | ".join(a.metrics) + " |",
        "|" + "---|" * (len(a.metrics) + 3),
    ]
    for s in a.summaries:
        cells = [s["label"], str(s["trial"]), str(len(s["seeds"]))]
        for m in a.metrics:
            v = s["metrics"].get(m)
            cells.append(
                "-" if v is None else f"{_num(v['mean'])} {_interval(v['ci_low'], v['ci_high'])}"
            )
        out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "Evaluation-only noise (image bootstrap sd, averaged over seeds):",
        "",
        "| configuration | " + " | ".join(a.metrics) + " |",
        "|" + "---|" * (len(a.metrics) + 1),
    ]
    for s in a.summaries:
        cells = [s["label"]]
        cells += [_num((s["metrics"].get(m) or {}).get("eval_sd"), 3) for m in a.metrics]
        out.append("| " + " | ".join(cells) + " |")
    return out


def steps_to_reach(curve: Mapping[int, float], target: float, direction: str) -> int | None:
    """The first step at which ``curve`` (step -> objective, as reported to Optuna during
    training) is at least as good as ``target``; None if it never is."""
    for step in sorted(curve):
        v = curve[step]
        if v <= target if direction == "minimize" else v >= target:
            return step
    return None


def _evaluations(c: Configuration, objective: str) -> int:
    """How many values of the objective the configuration's first seed logged (steps to reach
    a target need a curve, not one final evaluation)."""
    from trainers.rundir import RunDir

    rows = RunDir(c.seeds[0].run_dir).read_metrics() if c.seeds else []
    return sum(r["name"] == objective for r in rows)


def _seed_curves(
    t: optuna.trial.FrozenTrial, objective: str, workdir: Path | None = None
) -> list[dict[int, float]]:
    """The objective against step of each of the trial's seed runs (from ``metrics.jsonl``)."""
    from trainers.rundir import RunDir

    curves = []
    for path in seed_dirs(t.user_attrs, workdir):
        rows = RunDir(path).read_metrics()
        curves.append({r["step"]: r["value"] for r in rows if r["name"] == objective})
    return [c for c in curves if c]


def _speedup(
    done: list[optuna.trial.FrozenTrial],
    objective: str,
    direction: str,
    baseline: Mapping[str, Any],
    workdir: Path | None = None,
) -> list[str]:
    """Steps each configuration needs to reach the baseline's final objective, and the
    speed-up (the baseline's steps over the configuration's), seed k against seed k; the mean
    speed-up over seeds with its 95% t-interval. With several baseline trials the first is it."""
    base = [t for t in done if all(t.params.get(k) == v for k, v in baseline.items())]
    spec = ", ".join(f"{k}={_fmt(v)}" for k, v in baseline.items())
    lines = ["", f"## Steps to reach the baseline ({spec})", ""]
    ref_curves = _seed_curves(base[0], objective, workdir) if base else []
    if not ref_curves:
        return [*lines, "No complete baseline trial with intermediate values yet."]
    # Each seed's target is the baseline's own final value at that seed, and the baseline's
    # steps are its *own* first step at that value, the same rule as every other trial's: a
    # noisy baseline curve that dipped below its final value earlier would otherwise credit
    # every setting (and the baseline itself) with a speed-up.
    targets = [c[max(c)] for c in ref_curves]
    ref_steps = [
        steps_to_reach(c, v, direction) or max(c) for c, v in zip(ref_curves, targets, strict=True)
    ]
    lines.append(
        f"Target of seed k: baseline trial {base[0].number}'s final {objective} at seed k "
        f"({', '.join(_fmt(v) for v in targets)}). Steps are evaluation steps, so they resolve "
        "no finer than `eval.every`. Speed-up: mean over seeds [95% t-interval]; resolved when "
        "the interval excludes 1."
    )
    lines += [
        "",
        "| trial | parameters | steps to reach (per seed) | speed-up | 95% interval | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for t in done:
        curves = _seed_curves(t, objective, workdir)[: len(targets)]
        steps = [steps_to_reach(c, v, direction) for c, v in zip(curves, targets, strict=False)]
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        shown = ", ".join("-" if s is None else str(s) for s in steps)
        speeds = [r / s for r, s in zip(ref_steps, steps, strict=False) if s]
        if not speeds or len(speeds) < len(steps):
            reached = sum(s is not None for s in steps)
            lines.append(
                f"| {t.number} | {params} | {shown} | - | - | {reached} of {len(steps)} seeds "
                "reached the target |"
            )
            continue
        mean, half = mean_ci(speeds)
        if half is None:
            interval, verdict = "no interval", "one seed: an anecdote"
        else:
            interval = f"[{mean - half:.2f}, {mean + half:.2f}]"
            verdict = "resolved" if mean - half > 1 or mean + half < 1 else "not resolved"
        lines.append(f"| {t.number} | {params} | {shown} | {mean:.2f}x | {interval} | {verdict} |")
    return lines


def importance_target(
    directions: Sequence[str],
) -> Callable[[optuna.trial.FrozenTrial], float]:
    """The first objective as a target for Optuna's importance evaluators, which (PED-ANOVA,
    Optuna's default) rank what makes the target *low*: a maximised objective is negated."""
    sign = -1.0 if directions[0] == "maximize" else 1.0
    return lambda t: sign * t.values[0]


@contextlib.contextmanager
def quiet_importance_warning() -> Iterator[None]:
    """PED-ANOVA warns on every explicit target that it ranks low values; importance_target
    already flips maximised objectives, so the warning says nothing actionable."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")
        # "Some regimes ... have less than 2 trials": small studies always; the report says n.
        warnings.filterwarnings("ignore", message="Some regimes for parameter")
        yield


def _importances(
    study: optuna.Study, done: list, objective: str, directions: Sequence[str], confounded: bool
) -> list[str]:
    if len(done) < 3:
        return ["", "Parameter importances need at least 3 complete trials."]
    multi = len(directions) > 1
    try:
        with quiet_importance_warning():
            imp = optuna.importance.get_param_importances(
                study, target=importance_target(directions) if multi else None
            )
    except (RuntimeError, ValueError) as err:
        return ["", f"Parameter importances unavailable: {err}"]
    out = ["", f"## Parameter importances ({objective})", ""]
    if confounded:
        out += ["Descriptive only: the sampler's choices confound the parameters.", ""]
    out.append("| parameter | importance |")
    out.append("|---|---|")
    out += [f"| {k} | {v:.3f} |" for k, v in imp.items()]
    return out


def _best(
    study: optuna.Study, done: list, metrics: Sequence[str], workdir: Path | None = None
) -> list[str]:
    if not done:
        return ["", "No trial has completed yet."]
    if len(metrics) > 1:
        best = study.best_trials
        return ["", "## Pareto front", ""] + [
            f"- trial {t.number}: {t.values} {t.params}" for t in best
        ]
    t = study.best_trial
    n = len(t.user_attrs.get("seeds") or [None])
    over = f"mean of {n} seeds" if n > 1 else "one seed"
    out = [
        "",
        f"## Best configuration: trial {t.number} ({metrics[0]} = {_fmt(t.values[0])}, {over})",
        "",
        "Best by its mean; whether it is better than the others is what the effects table says.",
        "",
    ]
    out += [f"- `{k}`: {_fmt(v)}" for k, v in t.params.items()]
    if "run_dir" in t.user_attrs:
        run_dir = trial_run_dir(t.user_attrs, workdir)
        out.append(f"- run directories: `{run_dir}/s<k>/` (samples in `samples/final/`)")
        config = run_dir / "s0" / "config.json"
        if config.exists():
            out += [
                "",
                "Its trainer config (seed 0; seed k adds k to `seed`):",
                "",
                "```json",
                config.read_text().strip(),
                "```",
            ]
    return out


def _all_trials(trials: list, metrics: Sequence[str]) -> list[str]:
    out = [
        "",
        "## Trials",
        "",
        "Values are means over the trial's seeds (per-seed values in brackets).",
        "",
        "| trial | state | " + " | ".join(metrics) + " | parameters | note |",
    ]
    out.append("|" + "---|" * (4 + len(metrics)))
    for t in trials:
        per_seed = t.user_attrs.get("seed_values") or {}
        vals = [
            _fmt(v)
            + (
                f" ({', '.join(_fmt(x) for x in per_seed[m])})"
                if len(per_seed.get(m) or []) > 1
                else ""
            )
            for v, m in zip(t.values or [], metrics, strict=False)
        ] or ["-"] * len(metrics)
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        note = str(t.user_attrs.get("error", "")).replace("|", "/").replace("\n", " ")[:120]
        if "repeat_of" in t.user_attrs:
            note = f"same config as trial {t.user_attrs['repeat_of']}: result reused"
        state = {"fail": "failed"}.get(t.state.name.lower(), t.state.name.lower())
        out.append(f"| {t.number} | {state} | " + " | ".join(vals) + f" | {params} | {note} |")
    return out
