"""The study file format: parsing, include chains, validation messages, suggest / resolve."""

from __future__ import annotations

import ast
import copy
import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from harness.cli import app
from harness.spec import (
    PRUNERS,
    SAMPLERS,
    ChoiceSpace,
    FloatSpace,
    SpecError,
    StudySpec,
    load_study,
)
from trainers.config import FlowConfig, parse_config
from trainers.registry import FLOW_METRICS, KNOWN_METRICS, TRAINERS

REPO = Path(__file__).resolve().parents[2]
STUDIES = REPO / "studies"

optuna.logging.set_verbosity(optuna.logging.WARNING)

# A small valid study; each validation case below breaks one thing in a copy of it.
VALID: dict[str, Any] = {
    "name": "t",
    "trainer": "flow",
    "base": {"train": {"steps": 10}, "timesteps": {"sampler": "uniform"}},
    "search": {
        "timesteps.sampler": ["uniform", "logit_normal", "mode"],
        "timesteps.logit_mean": {
            "type": "float",
            "low": -1.0,
            "high": 1.0,
            "when": {"timesteps.sampler": "logit_normal"},
        },
        "timesteps.logit_std": {
            "type": "float",
            "low": 0.5,
            "high": 2.0,
            "when": {"timesteps.sampler": "logit_normal"},
        },
        "timesteps.shift": {"type": "choice", "values": [1.0, 2.0, 3.0]},
        "train.steps": {"type": "int", "low": 10, "high": 30, "step": 10},
    },
    "objective": {"metric": "domain_fid", "direction": "minimize"},
    "trials": 4,
    "optuna": {"sampler": "tpe", "seed": 0},
}


def write(path: Path, doc: dict[str, Any] | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def put(*keys: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets doc[k1][k2]... = value (creating mappings on the way)."""

    def apply(doc: dict[str, Any]) -> None:
        node = doc
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value

    return apply


def drop(*keys: str) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        node = doc
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]

    return apply


def problems_of(tmp_path: Path, *mutations: Callable[[dict[str, Any]], None]) -> str:
    doc = copy.deepcopy(VALID)
    for m in mutations:
        m(doc)
    with pytest.raises(SpecError) as info:
        load_study(write(tmp_path / "study.yaml", doc))
    return str(info.value)


S = "search"
LOGIT_STD = ("search", "timesteps.logit_std")
TWO_OBJECTIVES = [
    {"metric": "domain_fid", "direction": "minimize"},
    {"metric": "attr_acc_mean", "direction": "maximize"},
]

# (id, mutations, substrings the message must contain: the key path, the bad value, the hint)
CASES: list[tuple[str, list[Callable[[dict[str, Any]], None]], list[str]]] = [
    ("unknown top key", [put("trails", value=3)], ["trails: unknown key", "did you mean 'trials'"]),
    ("missing key", [drop("trials")], ["trials: required key is missing"]),
    ("missing objective", [drop("objective")], ["1 problem", "objective: required key is missing"]),
    ("missing search", [drop("search")], ["1 problem", "search: required key is missing"]),
    ("null search", [put("search", value=None)], ["search: expected a non-empty mapping", "null"]),
    ("bad name", [put("name", value="a b")], ['name: "a b" is not a valid study name']),
    (
        "unknown optuna key",
        [put("optuna", "sampelr", value="tpe")],
        ["optuna.sampelr", "'sampler'"],
    ),
    (
        "unknown space key",
        [put(*LOGIT_STD, "lwo", value=1)],
        [f"{S}.timesteps.logit_std.lwo", "'low'"],
    ),
    ("trials type", [put("trials", value="six")], ['trials: expected an integer >= 1, got "six"']),
    ("trials < 1", [put("trials", value=0)], ["trials: expected an integer >= 1, got 0"]),
    ("low type", [put(*LOGIT_STD, "low", value="a")], [f"{S}.timesteps.logit_std.low", '"a"']),
    ("log type", [put(*LOGIT_STD, "log", value="yes")], [f"{S}.timesteps.logit_std.log", '"yes"']),
    (
        "inverted range",
        [put(*LOGIT_STD, "low", value=2.5)],
        [f"{S}.timesteps.logit_std.low: 2.5 must be < high (2.0)"],
    ),
    (
        "empty int range",
        [put(S, "train.steps", "high", value=10)],
        [f"{S}.train.steps.low: 10 must be < high (10)"],
    ),
    (
        "log with low <= 0",
        [put(*LOGIT_STD, "low", value=0.0), put(*LOGIT_STD, "log", value=True)],
        [f"{S}.timesteps.logit_std.low: 0.0 must be > 0 with log: true"],
    ),
    (
        "log with step",
        [put(*LOGIT_STD, "log", value=True), put(*LOGIT_STD, "step", value=0.5)],
        [f"{S}.timesteps.logit_std.step: 0.5 cannot be combined with log"],
    ),
    (
        "step larger than range",
        [put(S, "train.steps", "step", value=50)],
        [f"{S}.train.steps.step: 50 is larger than the range"],
    ),
    (
        "empty choice",
        [put(S, "timesteps.shift", "values", value=[])],
        [f"{S}.timesteps.shift.values: a choice needs at least one value (got [])"],
    ),
    (
        "duplicate choice",
        [put(S, "timesteps.shift", value=[1.0, 2.0, 1.0])],
        [f"{S}.timesteps.shift.values: 1.0 is listed twice"],
    ),
    (
        "non-scalar choice",
        [put(S, "timesteps.shift", value=[1.0, {"a": 1}])],
        [f"{S}.timesteps.shift.values", 'values[1] is {"a": 1}'],
    ),
    (
        "unknown space type",
        [put(S, "timesteps.shift", value={"type": "flaot", "low": 1.0, "high": 2.0})],
        [f'{S}.timesteps.shift.type: "flaot" is not a space type', "did you mean 'float'"],
    ),
    (
        "space not a mapping",
        [put(S, "timesteps.shift", value=2.0)],
        [f"{S}.timesteps.shift: expected a space", "got 2.0"],
    ),
    (
        "unknown sampler",
        [put("optuna", "sampler", value="tpee")],
        ["optuna.sampler: not a sampler (did you mean 'tpe'?); one of tpe, random", '"tpee"'],
    ),
    (
        "unknown pruner",
        [put("optuna", "pruner", value="mediam")],
        ["optuna.pruner: not a pruner (did you mean 'median'?); one of none", '"mediam"'],
    ),
    (
        "unknown trainer",
        [put("trainer", value="flw")],
        ['trainer: "flw" is not a trainer', "did you mean 'flow'", "known: flow"],
    ),
    (
        "unknown metric",
        [put("objective", "metric", value="domain_fdi")],
        ['objective.metric: "domain_fdi" is not a metric', "did you mean 'domain_fid'"],
    ),
    (
        "unknown metric in a list",
        [put("objective", value=[TWO_OBJECTIVES[0], {"metric": "acc", "direction": "maximize"}])],
        ['objective[1].metric: "acc"', "known: attr_acc/background"],
    ),
    (
        "bad direction",
        [put("objective", "direction", value="minimise")],
        ["objective.direction", '"minimise"', "did you mean 'minimize'"],
    ),
    (
        "empty objective list",
        [put("objective", value=[])],
        ["objective: an empty list"],
    ),
    (
        "search path typo",
        [put(S, "timesteps.lgoit_std", value=[1.0])],
        [f"{S}.timesteps.lgoit_std: 'timesteps.lgoit_std' is not a field", "'timesteps.logit_std'"],
    ),
    (
        "search path unknown section",
        [put(S, "lora.rank", value=[4, 8])],
        [f"{S}.lora.rank: 'lora' is not a field of the flow trainer config"],
    ),
    (
        "search a section",
        [put(S, "timesteps", value=[1, 2])],
        [f"{S}.timesteps: 'timesteps' is a section", "timesteps.logit_std"],
    ),
    (
        "search below a value",
        [put(S, "train.steps.x", value=[1, 2])],
        [f"{S}.train.steps.x: 'train.steps' is a value"],
    ),
    (
        "float space on an int field",
        [put(S, "train.batch_size", value={"type": "float", "low": 8, "high": 16})],
        [f"{S}.train.batch_size: 'train.batch_size' takes int values, not floats"],
    ),
    (
        "when: unknown parameter",
        [put(*LOGIT_STD, "when", value={"timesteps.samplr": "logit_normal"})],
        [f"{S}.timesteps.logit_std.when.timesteps.samplr", "did you mean 'timesteps.sampler'"],
    ),
    (
        "when: value outside choices",
        [put(*LOGIT_STD, "when", value={"timesteps.sampler": ["mode", "lognormal"]})],
        [
            f'{S}.timesteps.logit_std.when.timesteps.sampler: "lognormal" is not one of',
            "'logit_normal'",
        ],
    ),
    (
        "when: a float parameter",
        [put(*LOGIT_STD, "when", value={"timesteps.logit_mean": 0.0})],
        [f"{S}.timesteps.logit_std.when.timesteps.logit_mean: when: can only refer to a choice"],
    ),
    (
        "when: itself",
        [put(S, "timesteps.shift", "when", value={"timesteps.shift": 1.0})],
        [f"{S}.timesteps.shift.when.timesteps.shift: a parameter cannot depend on itself"],
    ),
    (
        "when: cycle",
        [
            put(S, "timesteps.shift", "when", value={"timesteps.sampler": "mode"}),
            put(
                S, "timesteps.sampler", value={"type": "choice", "values": ["logit_normal", "mode"]}
            ),
            put(S, "timesteps.sampler", "when", value={"timesteps.shift": 1.0}),
        ],
        [
            "search: when: conditions form a cycle",
            "sampler -> timesteps.shift -> timesteps.sampler",
        ],
    ),
    (
        "grid with a float without step",
        [put("optuna", "sampler", value="grid")],
        [f"{S}.timesteps.logit_mean: the grid sampler needs enumerable spaces"],
    ),
    (
        "multi-objective with a pruner",
        [put("objective", value=TWO_OBJECTIVES), put("optuna", "pruner", value="median")],
        ["optuna.pruner: 'median' cannot be used with 2 objectives"],
    ),
    (
        "multi-objective with cmaes",
        [put("objective", value=TWO_OBJECTIVES), put("optuna", "sampler", value="cmaes")],
        ["optuna.sampler: 'cmaes' optimises one objective"],
    ),
    (
        "duplicate objective",
        [put("objective", value=[TWO_OBJECTIVES[0], TWO_OBJECTIVES[0]])],
        ['objective[1].metric: "domain_fid" is already an objective'],
    ),
    (
        "storage URL",
        [put("optuna", "storage", value="postgres://host/db")],
        ["optuna.storage: not a database URL", "did you mean 'postgresql'", '"postgres://host/db"'],
    ),
    (
        "seed type",
        [put("optuna", "seed", value=1.5)],
        ["optuna.seed", "(got 1.5)"],
    ),
    (
        "devices",
        [put("resources", "devices", value="gpu")],
        ["resources.devices: expected auto, cpu or a list", "did you mean 'cpu'", '"gpu"'],
    ),
    (
        "device indices",
        [put("resources", "devices", value=[0, 0])],
        ["resources.devices: GPU indices must be distinct", "[0, 0]"],
    ),
    (
        "gpus per trial",
        [put("resources", "devices", value=[0]), put("resources", "gpus_per_trial", value=2)],
        ["resources.gpus_per_trial: 2 but resources.devices lists only 1 GPU(s) [0]"],
    ),
    (
        "trials per device",
        [put("resources", "trials_per_device", value=0)],
        ["resources.trials_per_device: Input should be greater than or equal to 1 (got 0)"],
    ),
    (
        "trainer rejects a range end",
        [put(*LOGIT_STD, "low", value=0.0)],
        [f"{S}.timesteps.logit_std.low: 0.0 is rejected by the flow trainer config", "than 0"],
    ),
    (
        "trainer rejects a choice",
        [put(S, "timesteps.shift", value=[1.0, -2.0])],
        [f"{S}.timesteps.shift: -2.0 is rejected", "timesteps.shift must be > 0"],
    ),
    (
        "trainer rejects a choice of another type",
        [put(S, "timesteps.sampler", value=["uniform", "logit_normal", "lognorm"])],
        [f'{S}.timesteps.sampler: "lognorm" is rejected', "'logit_normal'", '(got "lognorm")'],
    ),
    (
        "trainer rejects a conditional value",
        [
            put(
                S,
                "timesteps.mode_scale",
                value={
                    "type": "float",
                    "low": 0.0,
                    "high": 3.0,
                    "when": {"timesteps.sampler": "mode"},
                },
            )
        ],
        [f"{S}.timesteps.mode_scale.high: 3.0 is rejected", "mode_scale must lie in"],
    ),
    (
        "trainer rejects the values together",
        [
            put(S, "timesteps.sampler", value=["mode", "uniform", "logit_normal"]),
            put(S, "timesteps.mode_scale", value=[2.0]),
        ],
        ['search: the trial {"timesteps.sampler": "mode"', '"timesteps.mode_scale": 2.0}'],
    ),
    (
        "base unknown key",
        [put("base", "train", "stpes", value=3)],
        ["base.train.stpes: unknown key (did you mean 'steps'?)"],
    ),
    (
        "base wrong type",
        [put("base", "timesteps", "shift", value="x")],
        ["base.timesteps.shift: Input should be a valid number", "'auto'", '(got "x")'],
    ),
    ("base not a mapping", [put("base", value=3)], ["base: expected the trainer config", "got 3"]),
    (
        "data path",
        [put("base", "data", value={"kind": "folder", "path": "no/such/folder"})],
        ["base.data.path: image folder 'no/such/folder' does not exist", "/no/such/folder"],
    ),
    (
        "shapes metric on folder data",
        [put("base", "data", value={"kind": "folder", "path": "."})],
        ["objective: 'domain_fid' is only written on the embedded shapes", "eval/flow_loss"],
    ),
    (
        "enqueue unknown parameter",
        [put("optuna", "enqueue", value=[{"timesteps.sampler": "mode"}, {"timestep.shift": 2.0}])],
        ["optuna.enqueue[1].timestep.shift: not a searched parameter", "'timesteps.shift'"],
    ),
    (
        "enqueue value outside its space",
        [
            put(
                "optuna",
                "enqueue",
                value=[{"timesteps.sampler": "cosmap", "train.steps": 40, "timesteps.shift": 1}],
            )
        ],
        [
            'optuna.enqueue[0].timesteps.sampler: "cosmap" is not in the space',
            "optuna.enqueue[0].train.steps: 40 is not in the space; allowed: int [10, 30] step 10",
        ],
    ),
    (
        "enqueue conditional parameter whose condition fails",
        [
            put(
                "optuna",
                "enqueue",
                value=[
                    {"timesteps.sampler": "mode", "timesteps.logit_mean": 0.5},
                    {"timesteps.logit_std": 1.0},
                ],
            )
        ],
        [
            "optuna.enqueue[0].timesteps.logit_mean: given, but it exists only when "
            'timesteps.sampler is logit_normal and this trial sets timesteps.sampler to "mode"',
            "optuna.enqueue[1].timesteps.logit_std: given without timesteps.sampler",
        ],
    ),
]


@pytest.mark.parametrize(
    ("mutations", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_validation_message(
    tmp_path: Path, mutations: list[Callable[[dict[str, Any]], None]], expected: list[str]
) -> None:
    message = problems_of(tmp_path, *mutations)
    for text in expected:
        assert text in message, f"{text!r} not in:\n{message}"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    message = problems_of(
        tmp_path,
        put("trails", value=3),
        put(*LOGIT_STD, "low", value=3.0),
        put("optuna", "sampler", value="tpee"),
        put("objective", "metric", value="fid"),
    )
    assert message.splitlines()[0].endswith("study.yaml: 4 problems")
    for path in ("trails", f"{S}.timesteps.logit_std.low", "optuna.sampler", "objective.metric"):
        assert f"\n  {path}: " in message


def test_spec_error_keeps_its_problems_through_pickle() -> None:
    err = SpecError("s.yaml", ["trials: required key is missing", "name: bad"])
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.problems == err.problems
    assert str(err).splitlines()[0] == "invalid study s.yaml: 2 problems"


def test_valid_study_loads(tmp_path: Path) -> None:
    spec = load_study(write(tmp_path / "study.yaml", VALID))
    assert isinstance(spec, StudySpec)
    assert spec.order()[0] == "timesteps.sampler"
    assert isinstance(spec.search["timesteps.sampler"], ChoiceSpace)  # the shorthand
    assert spec.search["timesteps.sampler"].values == ["uniform", "logit_normal", "mode"]
    assert isinstance(spec.search["timesteps.logit_mean"], FloatSpace)
    assert spec.optuna.pruner == "median" and spec.resources.devices == "auto"
    assert spec.directions == ["minimize"] and not spec.multi_objective
    with pytest.raises(ValueError):  # frozen
        spec.trials = 3  # type: ignore[misc]


def test_multi_objective_defaults_to_no_pruner(tmp_path: Path) -> None:
    doc = {**VALID, "objective": TWO_OBJECTIVES, "optuna": {"sampler": "nsga2"}}
    spec = load_study(write(tmp_path / "study.yaml", doc))
    assert spec.optuna.pruner == "none"
    assert spec.directions == ["minimize", "maximize"] and spec.multi_objective
    single = load_study(write(tmp_path / "one.yaml", {**VALID, "optuna": {"sampler": "nsga2"}}))
    assert single.optuna.sampler == "nsga2"  # nsga2 with one objective is allowed


# --------------------------------------------------------------------------------------------
# YAML details


def test_yaml_reads_exponent_floats_and_refuses_duplicate_keys(tmp_path: Path) -> None:
    text = yaml.safe_dump(VALID, sort_keys=False).replace("steps: 10", "steps: 10\n    lr: 1e-4")
    spec = load_study(write(tmp_path / "a.yaml", text))
    assert spec.base["train"]["lr"] == 1e-4
    dup = text + "trials: 5\n"
    with pytest.raises(SpecError, match=r"duplicate key 'trials'"):
        load_study(write(tmp_path / "b.yaml", dup))


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "name: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad\.yaml is not valid YAML/JSON"):
        load_study(path)


def test_missing_or_empty_study_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"\n  study file .*nope\.yaml does not exist"):
        load_study(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match=r"empty\.yaml must hold a mapping, got nothing"):
        load_study(write(tmp_path / "empty.yaml", ""))


# --------------------------------------------------------------------------------------------
# include: and base files


def test_include_merges_deeply(tmp_path: Path) -> None:
    write(tmp_path / "parent.yaml", VALID)
    variant = "include: parent.yaml\ntrials: 2\nbase: {train: {steps: 20}}\n"
    spec = load_study(write(tmp_path / "variant.yaml", variant))
    assert spec.trials == 2 and spec.name == "t"
    assert spec.base == {"train": {"steps": 20}, "timesteps": {"sampler": "uniform"}}
    assert list(spec.search) == list(VALID["search"])
    assert [p.name for p in spec.sources] == ["parent.yaml", "variant.yaml"]


def test_include_chain_in_other_folders(tmp_path: Path) -> None:
    write(tmp_path / "a" / "root.yaml", VALID)
    write(tmp_path / "b" / "mid.yaml", "include: ../a/root.yaml\ntrials: 2\n")
    leaf = "include: ../b/mid.yaml\nsearch: {timesteps.logit_std: {high: 3.0}}\n"
    spec = load_study(write(tmp_path / "c" / "leaf.yaml", leaf))
    assert spec.trials == 2
    std = spec.search["timesteps.logit_std"]
    assert (std.low, std.high, std.when) == (0.5, 3.0, {"timesteps.sampler": "logit_normal"})
    assert [p.name for p in spec.sources] == ["root.yaml", "mid.yaml", "leaf.yaml"]


def test_include_search_null_removes_and_new_type_replaces(tmp_path: Path) -> None:
    write(tmp_path / "parent.yaml", VALID)
    variant = (
        "include: parent.yaml\n"
        "search:\n"
        "  train.steps: null\n"
        "  timesteps.shift: {type: float, low: 1.0, high: 3.0}\n"
    )
    spec = load_study(write(tmp_path / "v.yaml", variant))
    assert "train.steps" not in spec.search
    assert isinstance(spec.search["timesteps.shift"], FloatSpace)


def test_include_cycle(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(SpecError, match=r"include: cycle a\.yaml -> b\.yaml -> a\.yaml"):
        load_study(tmp_path / "a.yaml")


def test_include_missing_names_the_resolved_path(tmp_path: Path) -> None:
    path = write(tmp_path / "v.yaml", "include: sub/nope.yaml\ntrials: 2\n")
    with pytest.raises(SpecError) as info:
        load_study(path)
    assert f"include: 'sub/nope.yaml' not found (resolved {tmp_path / 'sub' / 'nope.yaml'})" in str(
        info.value
    )


def test_base_file_relative_to_the_study_and_overridden_by_a_variant(tmp_path: Path) -> None:
    write(tmp_path / "configs" / "tiny.json", json.dumps({"train": {"steps": 7}, "seed": 3}))
    doc = {**VALID, "base": "configs/tiny.json"}
    write(tmp_path / "study.yaml", doc)
    spec = load_study(tmp_path / "study.yaml")
    assert spec.base == {"train": {"steps": 7}, "seed": 3}
    assert spec.sources[-1] == tmp_path / "configs" / "tiny.json"
    write(tmp_path / "v" / "variant.yaml", "include: ../study.yaml\nbase: {seed: 4}\n")
    assert load_study(tmp_path / "v" / "variant.yaml").base == {"train": {"steps": 7}, "seed": 4}


def test_base_file_missing(tmp_path: Path) -> None:
    path = write(tmp_path / "study.yaml", {**VALID, "base": "configs/none.json"})
    with pytest.raises(SpecError) as info:
        load_study(path)
    assert f"base: base file {tmp_path / 'configs' / 'none.json'} does not exist" in str(info.value)


# --------------------------------------------------------------------------------------------
# suggest, resolve, samplers


@pytest.fixture
def spec(tmp_path: Path) -> StudySpec:
    return load_study(write(tmp_path / "study.yaml", VALID))


def test_suggest_asks_conditional_params_only_when_their_condition_holds(spec: StudySpec) -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        params = spec.suggest(trial)
        sampler = params["timesteps.sampler"]
        seen.add(sampler)
        conditional = {"timesteps.logit_mean", "timesteps.logit_std"}
        assert (conditional <= set(params)) == (sampler == "logit_normal")
        assert not (conditional & set(params)) or sampler == "logit_normal"
        assert trial.params == params
        study.tell(trial, 0.0)
    assert seen == {"uniform", "logit_normal", "mode"}


def test_suggest_with_a_fixed_trial(spec: StudySpec) -> None:
    fixed = {"timesteps.sampler": "mode", "timesteps.shift": 2.0, "train.steps": 20}
    assert spec.suggest(optuna.trial.FixedTrial(fixed)) == fixed
    with pytest.raises(ValueError, match=r"timesteps\.logit_mean"):  # now it must be asked for
        spec.suggest(optuna.trial.FixedTrial({**fixed, "timesteps.sampler": "logit_normal"}))


def test_active_params(spec: StudySpec) -> None:
    assert spec.active_params({}) == ("timesteps.sampler", "timesteps.shift", "train.steps")
    assert spec.active_params({"timesteps.sampler": "logit_normal"}) == (
        "timesteps.logit_mean",
        "timesteps.logit_std",
        "timesteps.shift",
        "train.steps",
    )


def test_resolve_gives_a_config_the_trainer_accepts(spec: StudySpec) -> None:
    params = {
        "timesteps.sampler": "logit_normal",
        "timesteps.logit_mean": 0.5,
        "timesteps.logit_std": 1.5,
        "timesteps.shift": 3.0,
        "train.steps": 30,
    }
    config = spec.resolve(params)
    parsed = parse_config(config)
    assert isinstance(parsed, FlowConfig)
    assert parsed.timesteps.logit_std == 1.5 and parsed.train.steps == 30
    assert spec.base["train"]["steps"] == 10  # resolve does not touch the base
    with pytest.raises(SpecError, match=r"params\.timesteps\.shfit: .*did you mean"):
        spec.resolve({"timesteps.shfit": 1.0})


def test_samplers_and_pruners_build(tmp_path: Path) -> None:
    grid_doc = copy.deepcopy(VALID)
    for key in ("timesteps.logit_mean", "timesteps.logit_std"):
        grid_doc["search"][key]["step"] = 0.5
    grid_doc["optuna"] = {"sampler": "grid", "pruner": "hyperband"}
    grid = load_study(write(tmp_path / "grid.yaml", grid_doc))
    assert grid.grid_space()["timesteps.logit_std"] == [0.5, 1.0, 1.5, 2.0]
    assert grid.grid_space()["train.steps"] == [10, 20, 30]
    assert isinstance(grid.make_sampler(), optuna.samplers.GridSampler)
    assert isinstance(grid.make_pruner(), optuna.pruners.HyperbandPruner)
    classes = {"tpe": "TPESampler", "random": "RandomSampler", "grid": "GridSampler"}
    classes |= {"cmaes": "CmaEsSampler", "nsga2": "NSGAIISampler", "gp": "GPSampler"}
    assert set(classes) == set(SAMPLERS) and set(PRUNERS) == {"none", "median", "hyperband"}
    for name in ("tpe", "random", "cmaes", "nsga2", "gp"):
        doc = {**VALID, "optuna": {"sampler": name, "pruner": "none"}}
        built = load_study(write(tmp_path / f"{name}.yaml", doc))
        assert type(built.make_sampler()).__name__ == classes[name]
        assert isinstance(built.make_pruner(), optuna.pruners.NopPruner)


# --------------------------------------------------------------------------------------------
# Registry and the shipped study files


def test_known_metrics_match_the_shapes_attributes() -> None:
    # Read trainers/data/shapes.py without importing it (that would import torch: seconds).
    tree = ast.parse((REPO / "trainers" / "data" / "shapes.py").read_text())
    (attributes,) = [
        node.value
        for node in tree.body
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "ATTRIBUTES"
    ]
    assert isinstance(attributes, ast.Dict)
    names = [ast.literal_eval(k) for k in attributes.keys if k is not None]
    for prefix in ("", "heldout_"):
        assert {f"{prefix}attr_acc/{n}" for n in names} <= FLOW_METRICS
        assert {f"{prefix}attr_acc_mean", f"{prefix}attr_all_correct"} <= FLOW_METRICS
    assert {"train/loss", "train/images_per_s", "domain_fid"} <= FLOW_METRICS
    assert {"terse_attr_acc", "terse_all_named"} <= FLOW_METRICS
    assert len(FLOW_METRICS) == 5 + 1 + 2 * (len(names) + 2) + 2
    assert KNOWN_METRICS >= FLOW_METRICS and TRAINERS["flow"].config is FlowConfig


def test_timestep_study() -> None:
    spec = load_study(STUDIES / "timestep.yaml")
    assert spec.name == "timestep" and spec.trainer == "flow" and spec.trials == 4
    assert spec.metrics == ["domain_fid"] and spec.directions == ["minimize"]
    assert (spec.design, spec.repeats, spec.optuna.pruner) == ("grid", 3, "none")
    assert spec.search["timesteps.sampler"].values == ["uniform", "logit_normal", "mode", "cosmap"]
    base = parse_config(spec.base)
    assert base.train.steps == 240 and base.eval.every == 240 and base.eval.num_images == 128
    assert base.model.backbone == "unet"
    study = optuna.create_study(sampler=spec.make_sampler(), pruner=spec.make_pruner())
    for _ in range(8):
        trial = study.ask()
        parse_config(spec.resolve(spec.suggest(trial)))
        study.tell(trial, 1.0)


def test_quick_variant_overrides_trials_and_steps_only() -> None:
    full = load_study(STUDIES / "timestep.yaml")
    quick = load_study(STUDIES / "timestep-quick.yaml")
    assert quick.trials == 4 and quick.repeats == 2 and quick.base["train"]["steps"] == 100
    assert quick.name == "timestep-quick"  # its own runs/ folder and Optuna study
    assert quick.search == full.search and quick.objectives == full.objectives
    rest = copy.deepcopy(quick.base)
    rest["train"]["steps"] = full.base["train"]["steps"]
    rest["eval"]["every"] = full.base["eval"]["every"]
    assert rest == full.base


def test_gpu_example_scales_up_the_default(tmp_path: Path) -> None:
    gpu = load_study(STUDIES / "timestep-gpu.yaml")
    base = parse_config(
        gpu.resolve(
            gpu.suggest(
                optuna.trial.FixedTrial(
                    {
                        "timesteps.sampler": "uniform",
                        "timesteps.shift": 4.0,
                    }
                )
            )
        )
    )
    assert (base.model.backbone, base.model.preset) == ("sd3", "dit-s")
    assert (base.data.resolution, base.train.precision) == (64, "bf16")
    assert gpu.trials * gpu.repeats == 32 and gpu.metrics == ["domain_fid"]


def test_folder_example_needs_its_folder_and_uses_a_sampler_neutral_objective(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # data.path is relative to the working directory
    with pytest.raises(SpecError, match=re.escape("base.data.path: image folder 'data/my-images'")):
        load_study(STUDIES / "folder.yaml")
    (tmp_path / "data" / "my-images").mkdir(parents=True)
    spec = load_study(STUDIES / "folder.yaml")
    assert spec.metrics == ["eval/flow_loss"] and spec.base["data"]["kind"] == "folder"


# --------------------------------------------------------------------------------------------
# harness study check


def test_cli_check_valid() -> None:
    result = CliRunner().invoke(app, ["study", "check", str(STUDIES / "timestep.yaml")])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "study timestep: valid" in out and "minimize domain_fid" in out
    assert "design:    grid" in out and "4 configuration(s) x 3 seed(s) [0, 1, 2]" in out
    assert '1: timesteps.sampler="logit_normal"' in out


def test_cli_check_invalid(tmp_path: Path) -> None:
    doc = copy.deepcopy(VALID)
    doc["search"]["timesteps.logit_std"]["low"] = 3.0
    path = write(tmp_path / "broken.yaml", doc)
    result = CliRunner().invoke(app, ["study", "check", str(path)])
    assert result.exit_code == 2
    assert "search.timesteps.logit_std.low: 3.0 must be < high (2.0)" in result.stderr
    assert result.stdout == ""


def test_the_design_option_set_is_its_registry() -> None:
    from typing import get_args

    from harness.spec import DESIGNS, Design

    assert tuple(DESIGNS) == get_args(Design)


# -- named choices ---------------------------------------------------------------------------------
CURRICULA = {
    "none": [],
    "coarse": [{"start": 0, "resolution": 8}, {"start": 5}],
}


def _named_study(**extra: Any) -> dict[str, Any]:
    doc = copy.deepcopy(VALID)
    doc["base"]["data"] = {"resolution": 16}
    doc["search"] = {
        "curriculum": {"type": "choice", "values": copy.deepcopy(CURRICULA)},
        "timesteps.shift": {
            "type": "choice",
            "values": [1.0, 2.0],
            "when": {"curriculum": "coarse"},
        },
    }
    doc.update(design="grid", baseline={"curriculum": "none"}, **extra)
    doc.pop("trials", None)
    return doc


def test_named_choices_give_optuna_the_names_and_the_trainer_the_values(tmp_path: Path) -> None:
    spec = load_study(write(tmp_path / "study.yaml", _named_study()))
    space = spec.search["curriculum"]
    assert isinstance(space, ChoiceSpace) and space.values == ["none", "coarse"]
    configs = spec.configurations()
    assert configs == [
        {"curriculum": "none"},
        {"curriculum": "coarse", "timesteps.shift": 1.0},
        {"curriculum": "coarse", "timesteps.shift": 2.0},
    ]
    assert spec.resolve(configs[0])["curriculum"] == []
    resolved = spec.seed_config(configs[1], 0)
    assert resolved["curriculum"] == CURRICULA["coarse"]
    assert parse_config(resolved).curriculum[0].resolution == 8
    # The names are what Optuna stores: a plain categorical distribution.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    params = spec.suggest(trial)
    assert params["curriculum"] in ("none", "coarse") and trial.params == params
    # Resolving twice never shares the list between configs.
    spec.resolve(configs[1])["curriculum"].append({"start": 9})
    assert spec.resolve(configs[1])["curriculum"] == CURRICULA["coarse"]


def test_named_choices_are_validated_by_the_trainer_config(tmp_path: Path) -> None:
    doc = _named_study()
    doc["search"]["curriculum"]["values"]["bad"] = [{"start": 3, "resolution": 8}]
    text = problems_of_doc(tmp_path, doc)
    assert 'search.curriculum: "bad" is rejected by the flow trainer config' in text
    assert "curriculum.0.start must be 0" in text


def test_list_choices_without_names_say_how_to_name_them(tmp_path: Path) -> None:
    doc = _named_study()
    doc["search"]["curriculum"] = [[], [{"start": 0}]]
    text = problems_of_doc(tmp_path, doc)
    assert "values: {NAME: VALUE" in text


def problems_of_doc(tmp_path: Path, doc: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as err:
        load_study(write(tmp_path / "bad.yaml", doc))
    return str(err.value)
