"""The ablation report over seeds: effects with paired intervals and verdicts, the rank table,
the confounding warning, the JSON document and the seeded speed-up. Studies are built in memory
with run directories written the way the runner and trainer write them (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
from typer.testing import CliRunner

from harness.effects import analyse
from harness.report import ablation_markdown, steps_to_reach
from trainers.rundir import RunDir

optuna.logging.set_verbosity(optuna.logging.WARNING)
ATTRS = np.array(["shape", "colour", "size", "position", "background"])
N_IMAGES = 64


def write_eval(
    run: RunDir, step: int, accuracy: float, rng: np.random.Generator, log: bool = True
) -> None:
    """An ``evals/step_*.npz`` as the trainer writes it: per-image correctness and features."""
    correct = rng.random((N_IMAGES, len(ATTRS))) < accuracy
    features = rng.normal(0.0, 1.0, (N_IMAGES, 4)) + (1.0 - accuracy) * 3
    (run.root / "evals").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        run.root / "evals" / f"step_{step:07d}.npz",
        attributes=ATTRS,
        seen_labels=np.zeros((N_IMAGES, len(ATTRS)), np.int64),
        seen_correct=correct,
        seen_features=features,
        seen_seeds=np.arange(N_IMAGES),
        heldout_labels=np.zeros((N_IMAGES // 2, len(ATTRS)), np.int64),
        heldout_correct=correct[: N_IMAGES // 2],
        heldout_seeds=np.arange(N_IMAGES // 2),
        reference_mean=np.zeros(4),
        reference_cov=np.eye(4),
        step=np.int64(step),
    )
    from trainers.domain import frechet_distance

    fid = frechet_distance(features.mean(0), np.cov(features, rowvar=False), np.zeros(4), np.eye(4))
    if not log:  # the caller wrote the curve
        return
    run.log_metrics(
        step,
        {
            "domain_fid": fid,
            "attr_acc_mean": float(correct.mean()),
            "heldout_attr_acc_mean": float(correct[: N_IMAGES // 2].mean()),
            "eval/flow_loss": 1.0 - accuracy,
        },
    )


def seeded_study(
    tmp_path: Path,
    accuracies: dict[str, list[float]],
    curves: dict[str, list[dict[int, float]]] | None = None,
) -> optuna.Study:
    """One complete trial per sampler value; seed k of each has final accuracy
    ``accuracies[value][k]`` (the objective is attr_acc_mean, maximised)."""
    study = optuna.create_study(study_name="s", direction="maximize")
    rng = np.random.default_rng(0)
    for i, (value, accs) in enumerate(accuracies.items()):
        study.enqueue_trial({"timesteps.sampler": value})
        trial = study.ask()
        trial.suggest_categorical("timesteps.sampler", list(accuracies))
        root = tmp_path / "runs" / f"{i:04d}"
        for k, acc in enumerate(accs):
            run = RunDir(root / f"s{k}")
            run.create()
            curve = ((curves or {}).get(value) or [{}] * len(accs))[k]
            for step, v in sorted(curve.items()):
                run.log_metrics(step, {"attr_acc_mean": v})
            write_eval(run, max(curve, default=1000), acc, rng, log=not curve)
        trial.set_user_attr("run_dir", str(root))
        trial.set_user_attr("seeds", list(range(len(accs))))
        finals = [RunDir(root / f"s{k}").read_metrics() for k in range(len(accs))]
        values = [[r["value"] for r in f if r["name"] == "attr_acc_mean"][-1] for f in finals]
        trial.set_user_attr("seed_values", {"attr_acc_mean": values})
        study.tell(trial, float(np.mean(values)))
    return study


def test_a_large_paired_effect_is_resolved_and_a_null_one_is_not(tmp_path: Path) -> None:
    study = seeded_study(
        tmp_path,
        {
            "uniform": [0.50, 0.60, 0.55],
            "mode": [0.80, 0.90, 0.85],  # +0.30 at every seed
            "cosmap": [0.52, 0.58, 0.56],  # about the same as uniform
        },
    )
    a = analyse(study, ["attr_acc_mean"], ["maximize"], {"timesteps.sampler": "uniform"}, "grid")
    doc = a.to_json()
    assert doc["baseline"]["label"] == "sampler=uniform" and not doc["confounded"]
    effects = {(e["value"], e["metric"]): e for e in doc["effects"]}
    for e in doc["effects"]:
        for key in ("parameter", "value", "baseline", "metric", "estimate", "ci_low", "ci_high"):
            assert key in e
        assert e["parameter"] == "timesteps.sampler" and e["baseline"] == "uniform"
        assert e["n_seeds"] == 3 and "resolved" in e and "seeds_needed" in e
    mode = effects[("mode", "attr_acc_mean")]
    finals = {s["label"]: s["metrics"]["attr_acc_mean"]["per_seed"] for s in doc["configurations"]}
    diffs = np.subtract(finals["sampler=mode"], finals["sampler=uniform"])
    assert mode["estimate"] == pytest.approx(diffs.mean())  # the paired mean difference
    assert mode["resolved"] and mode["ci_low"] > 0 and mode["p_improve"] > 0.95
    assert mode["verdict"] == "resolved: better than the baseline"
    cosmap = effects[("cosmap", "attr_acc_mean")]
    assert not cosmap["resolved"] and cosmap["ci_low"] < 0 < cosmap["ci_high"]
    assert cosmap["verdict"].startswith("not resolved") and "seeds" in cosmap["verdict"]
    # FID is a lower-is-better metric of the per-image features: mode is better there too.
    fid = effects[("mode", "domain_fid")]
    assert fid["higher_is_better"] is False and fid["estimate"] < 0
    # Rank table: mode first on every metric.
    assert a.ranks[0].config == "sampler=mode" and a.ranks[0].mean_rank == 1.0
    md = ablation_markdown(
        study, ["attr_acc_mean"], ["maximize"], {"timesteps.sampler": "uniform"}, design="grid"
    )
    assert "## Effects against the baseline: sampler=uniform" in md
    assert "| **sampler=mode** |" in md  # the best row of the rank table is bold
    assert "confounded" not in md
    assert "| sampler=cosmap | attr_acc_mean ↑ |" in md and "not resolved" in md


def test_one_seed_is_reported_as_an_anecdote_and_a_sampler_design_as_confounded(
    tmp_path: Path,
) -> None:
    study = seeded_study(tmp_path, {"uniform": [0.5], "mode": [0.9]})
    md = ablation_markdown(study, ["attr_acc_mean"], ["maximize"], design="search", sampler="tpe")
    assert "**Factors are confounded.**" in md and "**One training seed" in md
    assert "Effects against the best configuration: sampler=mode" in md
    assert "one seed: no interval (an anecdote, not an effect)" in md
    assert "resolved: better" not in md
    doc = analyse(study, ["attr_acc_mean"], ["maximize"]).to_json()
    assert all(e["ci_low"] is None and e["resolved"] is False for e in doc["effects"])


def test_steps_to_reach_is_the_first_step_at_least_as_good() -> None:
    curve = {100: 9.0, 200: 6.0, 300: 4.0, 400: 5.0}
    assert steps_to_reach(curve, 6.0, "minimize") == 200
    assert steps_to_reach(curve, 4.5, "minimize") == 300
    assert steps_to_reach(curve, 3.0, "minimize") is None
    assert steps_to_reach(curve, 8.0, "maximize") == 100
    assert steps_to_reach({}, 1.0, "minimize") is None


def test_speed_up_is_paired_by_seed_with_an_interval(tmp_path: Path) -> None:
    base = [{100: 0.3, 200: 0.5, 300: 0.6, 400: 0.7}, {100: 0.3, 200: 0.4, 300: 0.6, 400: 0.8}]
    fast = [{100: 0.5, 200: 0.7, 300: 0.8, 400: 0.8}, {100: 0.6, 200: 0.8, 300: 0.9, 400: 0.9}]
    slow = [{100: 0.1, 200: 0.2, 300: 0.3, 400: 0.4}, {100: 0.1, 200: 0.2, 300: 0.3, 400: 0.9}]
    study = seeded_study(
        tmp_path,
        {"uniform": [0.7, 0.8], "mode": [0.8, 0.9], "cosmap": [0.4, 0.9]},
        {"uniform": base, "mode": fast, "cosmap": slow},
    )
    md = ablation_markdown(study, ["attr_acc_mean"], ["maximize"], {"timesteps.sampler": "uniform"})
    assert "## Steps to reach the baseline (timesteps.sampler=uniform)" in md
    assert "| 0 | timesteps.sampler=uniform | 400, 400 | 1.00x |" in md
    # mode reaches each seed's baseline final (0.7 / 0.8) at steps 200 and 200: 2x each
    assert "| 1 | timesteps.sampler=mode | 200, 200 | 2.00x | [2.00, 2.00] | resolved |" in md
    assert "| 2 | timesteps.sampler=cosmap | -, 400 | - | - | 1 of 2 seeds reached" in md
    no_base = ablation_markdown(study, ["attr_acc_mean"], ["maximize"])
    assert "Steps to reach" not in no_base


def test_study_report_json_from_the_cli(tmp_path: Path) -> None:
    from harness.cli import app

    work = tmp_path / "work"
    work.mkdir()
    storage = f"sqlite:///{(work / 'optuna.db').resolve()}"
    mem = seeded_study(tmp_path, {"uniform": [0.5, 0.6], "mode": [0.8, 0.9]})
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.add_trials(mem.get_trials())
    from harness.store import Store

    Store(work / "harness.duckdb").create_study(
        "s", {"design": "search", "repeats": 2}, ["maximize"], ["attr_acc_mean"]
    )
    res = CliRunner().invoke(app, ["study", "report", "s", "--workdir", str(work), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["baseline"]["kind"] == "best" and doc["effects"]
    assert {e["metric"] for e in doc["effects"]} >= {"domain_fid", "attr_acc_mean"}
    assert (work / "reports" / "s.html").exists()


@pytest.mark.parametrize(
    ("baseline", "message"),
    [
        ({"timesteps.shiftt": 1.0}, "baseline.timesteps.shiftt: not a searched parameter"),
        ({"timesteps.shift": 9.0}, "baseline.timesteps.shift: 9.0 is not in the space"),
        ([1, 2], "baseline: expected a mapping of searched parameters to values"),
    ],
)
def test_bad_baseline_is_a_spec_error(tmp_path, baseline, message) -> None:
    import yaml

    from harness.spec import SpecError, load_study
    from tests.harness.test_spec import VALID

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**VALID, "baseline": baseline}, sort_keys=False))
    with pytest.raises(SpecError) as err:
        load_study(path)
    assert message in str(err.value)
    path.write_text(yaml.safe_dump({**VALID, "baseline": {"timesteps.shift": 1.0}}))
    assert load_study(path).baseline == {"timesteps.shift": 1.0}
