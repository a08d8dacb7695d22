"""Study designs and seeds: ``design: grid | ofat`` list their configurations, ``repeats: K``
trains each with seeds ``base.seed + 0 .. K-1``; bad values are errors that name the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.spec import SpecError, load_study

SPACE: dict[str, Any] = {
    "timesteps.sampler": ["uniform", "logit_normal", "mode"],
    "timesteps.logit_std": {
        "type": "choice",
        "values": [0.5, 1.0],
        "when": {"timesteps.sampler": "logit_normal"},
    },
    "timesteps.shift": [1.0, 2.0],
}


def study(tmp_path: Path, **keys: Any) -> Path:
    doc = {
        "name": "d",
        "base": {"seed": 5, "train": {"steps": 10}},
        "search": SPACE,
        "objective": {"metric": "domain_fid", "direction": "minimize"},
        **keys,
    }
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_grid_lists_every_combination_honouring_when_with_the_baseline_first(tmp_path) -> None:
    spec = load_study(
        study(
            tmp_path,
            design="grid",
            repeats=3,
            baseline={"timesteps.sampler": "mode", "timesteps.shift": 2.0},
        )
    )
    configs = spec.configurations()
    # uniform x 2 shifts + logit_normal x 2 std x 2 shifts + mode x 2 shifts
    assert len(configs) == 2 + 4 + 2 == spec.trials
    assert configs[0] == {"timesteps.sampler": "mode", "timesteps.shift": 2.0}
    assert all(
        ("timesteps.logit_std" in c) == (c["timesteps.sampler"] == "logit_normal") for c in configs
    )
    assert len({tuple(sorted(c.items())) for c in configs}) == len(configs)
    assert spec.seeds() == [5, 6, 7]
    cfg = spec.seed_config(configs[1], 2)
    assert cfg["seed"] == 7 and cfg["timesteps"]["sampler"] == configs[1]["timesteps.sampler"]


def test_ofat_changes_one_factor_at_a_time_from_the_baseline(tmp_path) -> None:
    base = {"timesteps.sampler": "uniform", "timesteps.shift": 1.0}
    spec = load_study(study(tmp_path, design="ofat", baseline=base))
    assert spec.configurations() == [
        base,
        # logit_std appears with the change that makes it exist, at its first value
        {"timesteps.sampler": "logit_normal", "timesteps.shift": 1.0, "timesteps.logit_std": 0.5},
        {"timesteps.sampler": "mode", "timesteps.shift": 1.0},
        {"timesteps.sampler": "uniform", "timesteps.shift": 2.0},
    ]
    assert spec.trials == 4 and spec.repeats == 1


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"design": "grdi", "trials": 2},
            "design: \"grdi\" is not a design (did you mean 'grid'?)",
        ),
        ({"design": "grid", "trials": 3}, "trials: 3, but design grid has 8 configuration(s)"),
        ({"design": "ofat"}, "baseline: design ofat changes one factor at a time"),
        (
            {"design": "ofat", "baseline": {"timesteps.sampler": "uniform"}},
            "baseline: gives no value for timesteps.shift",
        ),
        ({"design": "grid", "repeats": 0}, "repeats: expected an integer from 1 to 1000"),
        ({"design": "grid", "repeats": "3"}, "repeats: expected an integer from 1 to 1000"),
        ({"trials": 2, "repeats": 2.5}, "repeats: expected an integer"),
        ({"repeats": 2}, "trials: required key is missing"),
        (
            {"design": "grid", "optuna": {"enqueue": [{"timesteps.shift": 1.0}]}},
            "optuna.enqueue: design grid fixes every configuration itself",
        ),
        (
            {
                "design": "grid",
                "search": {"timesteps.logit_mean": {"type": "float", "low": 0, "high": 1}},
            },
            "search.timesteps.logit_mean: design grid lists every value",
        ),
    ],
)
def test_bad_design_or_repeats_is_an_error_naming_the_fix(tmp_path, keys, message) -> None:
    with pytest.raises(SpecError) as err:
        load_study(study(tmp_path, **keys))
    assert message in str(err.value)


def test_search_design_keeps_its_trials_and_one_seed_by_default(tmp_path) -> None:
    spec = load_study(study(tmp_path, trials=6))
    assert spec.design == "search" and spec.trials == 6 and spec.configurations() == []
    assert spec.seeds() == [5]


def test_the_shipped_default_study_is_a_seeded_grid_against_uniform() -> None:
    spec = load_study(Path(__file__).resolve().parents[2] / "studies" / "timestep.yaml")
    assert spec.design == "grid" and spec.repeats >= 3
    assert [c["timesteps.sampler"] for c in spec.configurations()] == [
        "uniform",
        "logit_normal",
        "mode",
        "cosmap",
    ]
    assert spec.base["timesteps"]["shift"] == 1.0 and "timesteps.shift" not in spec.search
