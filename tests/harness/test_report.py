"""The ablation report's speed-up section: steps each trial needs to reach the baseline's final
objective, from the intermediate values the runner reports to Optuna."""

from __future__ import annotations

import optuna
import pytest

from harness.report import ablation_markdown, steps_to_reach


def test_steps_to_reach_is_the_first_step_at_least_as_good() -> None:
    curve = {100: 9.0, 200: 6.0, 300: 4.0, 400: 5.0}
    assert steps_to_reach(curve, 6.0, "minimize") == 200
    assert steps_to_reach(curve, 4.5, "minimize") == 300
    assert steps_to_reach(curve, 3.0, "minimize") is None
    assert steps_to_reach(curve, 8.0, "maximize") == 100
    assert steps_to_reach({}, 1.0, "minimize") is None


def _study(curves: dict[float, dict[int, float]]) -> optuna.Study:
    study = optuna.create_study(study_name="repa", direction="minimize")
    for weight, curve in curves.items():
        study.enqueue_trial({"repa.weight": weight})
        trial = study.ask()
        trial.suggest_float("repa.weight", 0.0, 1.0)
        for step, value in curve.items():
            trial.report(value, step)
        study.tell(trial, curve[max(curve)])
    return study


def test_report_shows_steps_to_reach_the_baseline_and_the_speed_up() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _study(
        {
            0.0: {100: 300.0, 200: 250.0, 300: 220.0, 400: 200.0},  # the baseline
            0.5: {100: 280.0, 200: 199.0, 300: 150.0, 400: 140.0},  # reaches 200 at step 200
            1.0: {100: 310.0, 200: 260.0, 300: 240.0, 400: 230.0},  # never reaches it
        }
    )
    md = ablation_markdown(study, ["domain_fid"], ["minimize"], {"repa.weight": 0.0})
    assert "## Steps to reach the baseline (repa.weight=0)" in md
    assert "Target: trial 0's final domain_fid = 200 at step 400" in md
    assert "| 0 | repa.weight=0 | 400 | 1.00x |" in md
    assert "| 1 | repa.weight=0.5 | 200 | 2.00x |" in md
    assert "| 2 | repa.weight=1 | not within 400 | - |" in md
    assert "Steps to reach" not in ablation_markdown(study, ["domain_fid"], ["minimize"])


def test_speed_up_uses_the_baselines_own_first_step_at_its_final_value() -> None:
    """A noisy baseline (below its final value at step 200) is not its own 2x speed-up."""
    study = _study(
        {
            0.0: {100: 300.0, 200: 190.0, 300: 220.0, 400: 200.0},
            0.5: {100: 199.0, 200: 150.0, 300: 150.0, 400: 140.0},
        }
    )
    md = ablation_markdown(study, ["domain_fid"], ["minimize"], {"repa.weight": 0.0})
    assert "first reached that value at step 200" in md
    assert "| 0 | repa.weight=0 | 200 | 1.00x |" in md
    assert "| 1 | repa.weight=0.5 | 100 | 2.00x |" in md


def test_report_without_a_finished_baseline_says_so() -> None:
    study = _study({0.5: {100: 1.0}})
    md = ablation_markdown(study, ["domain_fid"], ["minimize"], {"repa.weight": 0.0})
    assert "No complete baseline trial with intermediate values yet." in md


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
