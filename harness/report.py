"""The ablation report of a study, as Markdown.

For each swept choice: the finished trials with that value, the objective's mean with a 95%
confidence interval (Student t over the trials with that value; a single trial has none), its
best value, and the secondary metrics beside it. Then Optuna's parameter importances, the best
trial and its parameters, and every trial with its state (failures with their reason).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from scipy import stats

# Reported beside the objective. eval/flow_loss rather than train/loss: the training loss is
# weighted by the trial's own timestep sampler, so it is not comparable across samplers.
SECONDARY = ("attr_acc_mean", "heldout_attr_acc_mean", "domain_fid", "eval/flow_loss")


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None]:
    """Mean and the half-width of its Student-t confidence interval (None for n < 2)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    mean, half = mean_ci(values)
    return f"{mean:.4g}" + (f" ± {half:.2g}" if half is not None else "")


def ablation_markdown(
    study: optuna.Study,
    metrics: Sequence[str],
    directions: Sequence[str],
    baseline: Mapping[str, Any] | None = None,
) -> str:
    """The study report in Markdown. ``baseline``: parameters that pick the baseline trial(s)
    (the study file's ``baseline:``); adds the steps every trial needs to reach it."""
    trials = study.get_trials(deepcopy=False)
    # A repeat reuses an earlier trial's result: counting it twice would fake a tighter interval.
    done = [t for t in trials if t.state == TrialState.COMPLETE and "repeat_of" not in t.user_attrs]
    objective = metrics[0]
    lines = [f"# Study {study.study_name}", ""]
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    lines.append(
        f"{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
        f"{counts[TrialState.FAIL]} failed, {counts[TrialState.RUNNING]} running. "
        f"Objective: {objective} ({directions[0]}); ± is a 95% t-interval over trials."
    )
    secondary = [m for m in SECONDARY if m != objective]
    # Per-value tables for the categorical choices; continuous parameters are in the importances
    # and the trials table (a table of unique floats would be one row per trial).
    params = sorted(
        {
            p
            for t in done
            for p, d in t.distributions.items()
            if isinstance(d, CategoricalDistribution)
        }
    )
    for p in params:
        values = sorted(
            {t.params[p] for t in done if p in t.params}, key=lambda v: (str(type(v)), v)
        )
        lines += ["", f"## {p}", ""]
        header = ["value", "trials", objective, "best", *secondary]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for v in values:
            group = [t for t in done if t.params.get(p) == v]
            obj = [t.values[0] for t in group]
            best = min(obj) if directions[0] == "minimize" else max(obj)
            sec = [
                _cell(
                    [
                        t.user_attrs["final_metrics"][m]
                        for t in group
                        if m in t.user_attrs.get("final_metrics", {})
                    ]
                )
                for m in secondary
            ]
            lines.append(
                "| " + " | ".join([_fmt(v), str(len(group)), _cell(obj), _fmt(best), *sec]) + " |"
            )
    if baseline:
        lines += _speedup(done, objective, directions[0], baseline)
    lines += _importances(study, done, objective, directions)
    lines += _best(study, done, metrics)
    lines += _all_trials(trials, metrics)
    return "\n".join(lines) + "\n"


def steps_to_reach(curve: Mapping[int, float], target: float, direction: str) -> int | None:
    """The first step at which ``curve`` (step -> objective, as reported to Optuna during
    training) is at least as good as ``target``; None if it never is."""
    for step in sorted(curve):
        v = curve[step]
        if v <= target if direction == "minimize" else v >= target:
            return step
    return None


def _speedup(
    done: list[optuna.trial.FrozenTrial],
    objective: str,
    direction: str,
    baseline: Mapping[str, Any],
) -> list[str]:
    """Steps each trial needs to reach the baseline's final objective, and the speed-up (the
    baseline's steps over the trial's). With several baseline trials the first is the target."""
    base = [t for t in done if all(t.params.get(k) == v for k, v in baseline.items())]
    spec = ", ".join(f"{k}={_fmt(v)}" for k, v in baseline.items())
    lines = ["", f"## Steps to reach the baseline ({spec})", ""]
    if not base or not base[0].intermediate_values:
        return [*lines, "No complete baseline trial with intermediate values yet."]
    ref = base[0]
    last = max(ref.intermediate_values)
    target = ref.intermediate_values[last]
    # The speed-up divides by the baseline's *own* first step at that value, the same rule as
    # every other trial's: a noisy baseline curve that dipped below its final value earlier
    # would otherwise credit every setting (and the baseline itself) with a speed-up.
    ref_steps = steps_to_reach(ref.intermediate_values, target, direction) or last
    lines.append(
        f"Target: trial {ref.number}'s final {objective} = {_fmt(target)} at step {last}. "
        "Steps are the evaluation steps the trainer reported, so they resolve no finer than "
        "`eval.every`."
    )
    if ref_steps != last:
        lines.append(
            f"The baseline's curve is not monotone: it first reached that value at step "
            f"{ref_steps}, which is the baseline's step count the speed-ups divide."
        )
    lines += ["", "| trial | parameters | steps to reach | speed-up |", "|---|---|---|---|"]
    for t in done:
        step = steps_to_reach(t.intermediate_values, target, direction)
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        if step is None:
            reached, speed = f"not within {max(t.intermediate_values, default=0)}", "-"
        else:
            reached, speed = str(step), f"{ref_steps / step:.2f}x" if step else "-"
        lines.append(f"| {t.number} | {params} | {reached} | {speed} |")
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
    study: optuna.Study, done: list, objective: str, directions: Sequence[str]
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
    out = ["", f"## Parameter importances ({objective})", "", "| parameter | importance |"]
    out.append("|---|---|")
    out += [f"| {k} | {v:.3f} |" for k, v in imp.items()]
    return out


def _best(study: optuna.Study, done: list, metrics: Sequence[str]) -> list[str]:
    if not done:
        return ["", "No trial has completed yet."]
    if len(metrics) > 1:
        best = study.best_trials
        return ["", "## Pareto front", ""] + [
            f"- trial {t.number}: {t.values} {t.params}" for t in best
        ]
    t = study.best_trial
    out = ["", f"## Best trial: {t.number} ({metrics[0]} = {_fmt(t.values[0])})", ""]
    out += [f"- `{k}`: {_fmt(v)}" for k, v in t.params.items()]
    if "run_dir" in t.user_attrs:
        run_dir = Path(t.user_attrs["run_dir"])
        out.append(f"- run directory: `{run_dir}` (samples in `samples/final/`)")
        config = run_dir / "config.json"
        if config.exists():
            out += ["", "Its trainer config:", "", "```json", config.read_text().strip(), "```"]
    return out


def _all_trials(trials: list, metrics: Sequence[str]) -> list[str]:
    out = [
        "",
        "## Trials",
        "",
        "| trial | state | " + " | ".join(metrics) + " | parameters | note |",
    ]
    out.append("|" + "---|" * (4 + len(metrics)))
    for t in trials:
        vals = [_fmt(v) for v in (t.values or [])] or ["-"] * len(metrics)
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        note = str(t.user_attrs.get("error", "")).replace("|", "/").replace("\n", " ")[:120]
        if "repeat_of" in t.user_attrs:
            note = f"same config as trial {t.user_attrs['repeat_of']}: result reused"
        state = {"fail": "failed"}.get(t.state.name.lower(), t.state.name.lower())
        out.append(f"| {t.number} | {state} | " + " | ".join(vals) + f" | {params} | {note} |")
    return out
