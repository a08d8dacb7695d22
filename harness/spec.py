"""The study file: a YAML search space over a trainer's config, parsed and validated once.

A study names a trainer, its base config, the parameters to search (dotted paths into that
trainer's config), the metric(s) to optimise and how Optuna searches. :func:`load_study` reads
the file (following ``include:`` chains), checks everything it can before a single trial runs,
and returns a frozen :class:`StudySpec`; every problem found is listed in one :class:`SpecError`
whose lines each name the key path, the bad value and what is allowed.

    spec = load_study("studies/timestep.yaml")
    params = spec.suggest(trial)          # trial.suggest_* in dependency order, honouring when:
    config = spec.resolve(params)         # base config deep-merged with the dotted parameters

``studies/timestep.yaml`` documents the format with comments.
"""

from __future__ import annotations

import copy
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from harness.store import Direction  # defined once, with the store's schema
from trainers.names import did_you_mean
from trainers.registry import KNOWN_METRICS, SHAPES_ONLY_METRICS, TRAINERS, Trainer

if TYPE_CHECKING:
    import optuna

# --------------------------------------------------------------------------------------------
# Trainer registry (defined with the trainers): the names a study's `trainer:` may take


def _samplers() -> Any:
    import optuna.samplers  # lazily: `harness --help` and `study check` stay fast

    return optuna.samplers


def _pruners() -> Any:
    import optuna.pruners

    return optuna.pruners


# `optuna.sampler` / `optuna.pruner` names -> constructors (given the spec; seeded by optuna.seed).
SAMPLERS: dict[str, Callable[[StudySpec], optuna.samplers.BaseSampler]] = {
    "tpe": lambda s: _samplers().TPESampler(seed=s.optuna.seed),
    "random": lambda s: _samplers().RandomSampler(seed=s.optuna.seed),
    "grid": lambda s: _samplers().GridSampler(s.grid_space(), seed=s.optuna.seed),
    "cmaes": lambda s: _samplers().CmaEsSampler(seed=s.optuna.seed),
    "nsga2": lambda s: _samplers().NSGAIISampler(seed=s.optuna.seed),
    "gp": lambda s: _samplers().GPSampler(seed=s.optuna.seed),
}
PRUNERS: dict[str, Callable[[StudySpec], optuna.pruners.BasePruner]] = {
    "none": lambda s: _pruners().NopPruner(),
    "median": lambda s: _pruners().MedianPruner(),
    "hyperband": lambda s: _pruners().HyperbandPruner(),
}
DeviceKind = Literal["auto", "cpu"]
Design = Literal["search", "grid", "ofat"]
DESIGNS: dict[str, str] = {
    "search": "the sampler proposes `trials` configurations (tuning; factors may be confounded)",
    "grid": "every combination of the searched values (a full factorial)",
    "ofat": "the baseline, and each searched value changed alone from it (one factor at a time)",
}
"""``design:`` names -> what they run. grid and ofat are ablation designs: every configuration is
fixed before the study starts, so effects are not confounded by what a sampler chose."""

_STORAGE_DIALECTS = ("sqlite", "postgresql", "mysql")

# --------------------------------------------------------------------------------------------
# Errors and message helpers


class SpecError(ValueError):
    """An unusable study file. ``str()`` lists every problem, one ``key.path: message`` a line."""

    def __init__(self, source: str | Path, problems: Sequence[str]):
        self.source = str(source)
        self.problems = tuple(problems)
        n = len(self.problems)
        head = f"invalid study {self.source}: {n} problem{'s' if n != 1 else ''}"
        super().__init__("\n".join([head, *(f"  {p}" for p in self.problems)]))

    def __reduce__(self) -> tuple[type[SpecError], tuple[str, tuple[str, ...]]]:
        return SpecError, (self.source, self.problems)  # picklable across processes


def _show(value: Any) -> str:
    """A value as it would appear in the YAML/JSON (short)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_did_you_mean = did_you_mean


def _registered(name: str, registry: Mapping[str, Any], what: str) -> str:
    """``name`` if it is a key of ``registry``, else a ValueError with "did you mean"."""
    if name not in registry:
        raise ValueError(f"not a {what}{_did_you_mean(name, registry)}; one of {_one_of(registry)}")
    return name


def _one_of(options: Iterable[Any]) -> str:
    return ", ".join(str(o) for o in options)


def _join(prefix: str, loc: Iterable[str | int]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


# --------------------------------------------------------------------------------------------
# Walking pydantic models: search paths, error locations


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _union_args(ann: Any) -> list[Any]:
    """Non-None members of a union annotation, [] if ``ann`` is not a union."""
    if typing.get_origin(ann) in (Union, types.UnionType):
        return [a for a in typing.get_args(ann) if a is not type(None)]
    return []


def _unwrap(ann: Any) -> Any:
    """``X | None`` -> ``X`` and ``Annotated[X, ...]`` -> ``X``; anything else unchanged."""
    if typing.get_origin(ann) is Annotated:
        return _unwrap(typing.get_args(ann)[0])
    args = _union_args(ann)
    return _unwrap(args[0]) if len(args) == 1 else ann


def _model_in(ann: Any) -> type[BaseModel] | None:
    """The config section model a field holds (``Section`` or ``Section | None``), if any."""
    ann = _unwrap(ann)
    return ann if _is_model(ann) else None


def _is_mapping(ann: Any) -> bool:
    ann = _unwrap(ann)
    return ann is dict or typing.get_origin(ann) in (dict, Mapping)


def _accepts_float(ann: Any) -> bool:
    ann = _unwrap(ann)
    if ann in (float, Any):
        return True
    return any(_accepts_float(a) for a in _union_args(ann))


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        sub = _model_in(field.annotation)
        out += _leaf_paths(sub, f"{prefix}{name}.") if sub else [prefix + name]
    return out


def _field_problem(model: type[BaseModel], dotted: str, trainer: str) -> str | None:
    """Why ``dotted`` is not a searchable field of ``model`` (None if it is one)."""
    parts = dotted.split(".")
    cls = model
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        field = cls.model_fields.get(part)
        if field is None:
            hint = _did_you_mean(dotted, _leaf_paths(model))
            return (
                f"{here!r} is not a field of the {trainer} trainer config{hint}; "
                f"fields here: {_one_of(cls.model_fields)}"
            )
        sub = _model_in(field.annotation)
        last = i == len(parts) - 1
        if sub is not None and last:
            return (
                f"{here!r} is a section of the {trainer} trainer config, not a value; "
                f"search one of its fields: {_one_of(f'{here}.{f}' for f in sub.model_fields)}"
            )
        if sub is not None:
            cls = sub
        elif last or _is_mapping(field.annotation):  # keys inside a dict field are free-form
            return None
        else:
            return f"{here!r} is a value of the {trainer} trainer config, not a section"
    return None


def _leaf_annotation(model: type[BaseModel], dotted: str) -> Any:
    cls: Any = model
    for part in dotted.split("."):
        if not _is_model(cls):
            return Any
        cls = _model_in(cls.model_fields[part].annotation) or cls.model_fields[part].annotation
    return cls


def _clean_loc(model: type[BaseModel], loc: Sequence[str | int]) -> list[str | int]:
    """A pydantic error location without the union-member tags pydantic inserts
    (``timesteps.shift.float`` -> ``timesteps.shift``)."""
    out: list[str | int] = []
    ann: Any = model
    for part in loc:
        ann = _unwrap(ann)
        members = _union_args(ann)
        if members and isinstance(part, str):  # the tag of the union member pydantic tried
            ann = next((m for m in members if getattr(m, "__name__", None) == part), None)
            continue
        out.append(part)
        if _is_model(ann) and isinstance(part, str) and part in ann.model_fields:
            ann = ann.model_fields[part].annotation
        else:
            args = typing.get_args(ann)
            ann = args[-1] if args and not _is_model(ann) else None
    return out


def _model_at(model: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    cls: type[BaseModel] | None = model
    for part in loc:
        if cls is None or not isinstance(part, str) or part not in cls.model_fields:
            return None
        cls = _model_in(cls.model_fields[part].annotation)
    return cls


def _pydantic_problems(err: ValidationError, prefix: str, model: type[BaseModel]) -> list[str]:
    """One line per key path, e.g. ``base.train.stpes: unknown key (did you mean 'steps'?)``."""
    grouped: dict[str, list[str]] = {}
    inputs: dict[str, Any] = {}
    for e in err.errors():
        loc = _clean_loc(model, e["loc"])
        path = _join(prefix, loc)
        kind, value = e["type"], e.get("input")
        if kind == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            allowed = list(parent.model_fields) if parent else []
            msg = f"unknown key{_did_you_mean(loc[-1], allowed)}; allowed: {_one_of(allowed)}"
            grouped.setdefault(path, []).append(msg)
            continue
        if kind == "missing":
            grouped.setdefault(path, []).append("required key is missing")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if kind == "literal_error" and isinstance(value, str):
            msg += _did_you_mean(value, re.findall(r"'([^']*)'", e["ctx"]["expected"]))
        grouped.setdefault(path, []).append(msg)
        inputs.setdefault(path, value)
    got = {p: f" (got {_show(v)})" for p, v in inputs.items()}
    return [f"{p}: {'; or '.join(msgs)}{got.get(p, '')}" for p, msgs in grouped.items()]


# --------------------------------------------------------------------------------------------
# Spaces


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


Scalar = str | int | float | bool | None
"""What an Optuna categorical value may be."""


class _Space(_Strict):
    when: dict[str, Scalar | list[Scalar]] = Field(default_factory=dict)
    """``{PARAM: VALUE or [VALUES]}``: this parameter exists only when every named parameter
    (a searched choice) has one of those values."""

    def conditions(self) -> dict[str, tuple[Scalar, ...]]:
        """``when:`` with every value as a tuple of allowed values."""
        return {k: tuple(v) if isinstance(v, list) else (v,) for k, v in self.when.items()}

    def probe_values(self) -> list[tuple[str, Any]]:
        """(key, value) pairs checked against the trainer config before anything runs."""
        raise NotImplementedError

    def representative(self) -> Any:
        """The value validation resolves this parameter to (low, or the first choice)."""
        return self.probe_values()[0][1]

    def _when_text(self) -> str:
        parts = [
            f"{k} = {v[0]}" if len(v) == 1 else f"{k} in [{_one_of(v)}]"
            for k, v in self.conditions().items()
        ]
        return f"  (when {' and '.join(parts)})" if parts else ""


def _describe_range(space: FloatSpace | IntSpace) -> str:
    s = f"{space.type} [{space.low}, {space.high}]"
    s += " log" if space.log else ""
    s += f" step {space.step}" if space.step not in (None, 1) else ""
    return s + space._when_text()


class FloatSpace(_Space):
    """``{type: float, low, high, log: false, step: null}`` -> ``trial.suggest_float``."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = None

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> float:
        """Ask Optuna for this parameter."""
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list[float] | None:
        """The values a grid search visits; None if the space is continuous (no step)."""
        if self.step is None:
            return None
        n = math.floor((self.high - self.low) / self.step + 1e-9)
        return [round(self.low + k * self.step, 12) for k in range(n + 1)]

    def probe_values(self) -> list[tuple[str, Any]]:
        return [("low", self.low), ("high", self.high)]

    def describe(self) -> str:
        """``float [0.5, 2.0] log`` and the like."""
        return _describe_range(self)


class IntSpace(_Space):
    """``{type: int, low, high, log: false, step: 1}`` -> ``trial.suggest_int``."""

    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = 1

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> int:
        """Ask Optuna for this parameter."""
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list[int]:
        """The values a grid search visits."""
        return list(range(self.low, self.high + 1, max(self.step, 1)))

    def probe_values(self) -> list[tuple[str, Any]]:
        return [("low", self.low), ("high", self.high)]

    def describe(self) -> str:
        """``int [100, 600] step 100`` and the like."""
        return _describe_range(self)


class ChoiceSpace(_Space):
    """``{type: choice, values: [...]}`` (or the shorthand ``[...]``) -> ``suggest_categorical``.

    Named choices, ``{type: choice, values: {NAME: VALUE, ...}}``, let a parameter take values
    Optuna cannot store (lists, mappings: a whole ``curriculum:``): Optuna, ``when:``, the
    baseline, ``enqueue`` and the reports see the names; only the trainer config gets the
    values (:meth:`config_value`)."""

    type: Literal["choice"]
    values: list[Scalar]
    named: dict[str, Any] = Field(default_factory=dict)
    """Name -> the config value it stands for (empty: the values are the config values)."""

    @model_validator(mode="before")
    @classmethod
    def _named_values(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("values"), dict):
            if "named" in data:
                raise ValueError("give named choices as values: {NAME: VALUE}, not named:")
            names = data["values"]
            bad = [k for k in names if not isinstance(k, str) or not k]
            if bad:
                raise ValueError(f"named choice {_show(bad[0])} must be a non-empty string")
            return {**data, "values": list(names), "named": dict(names)}
        return data

    @field_validator("values", mode="before")
    @classmethod
    def _scalars(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, x in enumerate(v):
                if not isinstance(x, str | int | float | bool | type(None)):
                    raise ValueError(
                        f"values[{i}] is {_show(x)}; choices must be strings, numbers, "
                        "booleans or null (Optuna categorical values); name a list or "
                        "mapping value: values: {NAME: VALUE, ...}"
                    )
        return v

    def config_value(self, value: Any) -> Any:
        """The trainer-config value of the choice ``value`` (a name's value when named)."""
        return copy.deepcopy(self.named[value]) if self.named and value in self.named else value

    def suggest(self, trial: optuna.trial.BaseTrial, name: str) -> Scalar:
        """Ask Optuna for this parameter."""
        return trial.suggest_categorical(name, self.values)

    def grid(self) -> list[Scalar]:
        """The values a grid search visits."""
        return list(self.values)

    def probe_values(self) -> list[tuple[str, Any]]:
        return [("values", v) for v in self.values]

    def describe(self) -> str:
        """``choice [a, b, c]``."""
        return f"choice [{_one_of(self.values)}]" + self._when_text()


Space = Annotated[FloatSpace | IntSpace | ChoiceSpace, Field(discriminator="type")]
_SPACES: dict[str, type[FloatSpace | IntSpace | ChoiceSpace]] = {
    "float": FloatSpace,
    "int": IntSpace,
    "choice": ChoiceSpace,
}

# --------------------------------------------------------------------------------------------
# Other sections


class Objective(_Strict):
    """One optimised metric: its last value in the trial's ``metrics.jsonl``."""

    metric: str
    direction: Direction


class OptunaSettings(_Strict):
    """``optuna:`` section."""

    sampler: str = "tpe"
    """A name in :data:`SAMPLERS`."""
    pruner: str | None = None
    """None in the file: ``median`` for one objective, ``none`` for several (Optuna cannot
    prune multi-objective studies). A loaded spec always holds the effective pruner."""
    seed: int | None = None
    enqueue: list[dict[str, Scalar]] = Field(default_factory=list)
    """Trials to run first, before the sampler proposes any: each a mapping from searched
    parameters to values; parameters left out are proposed by the sampler. Enqueued once when
    the study is created (rerunning or adding workers does not enqueue them again)."""
    storage: str | None = None
    """None: the runner's local default file; else an SQLAlchemy URL (sqlite:///x.db,
    postgresql://user@host/db, mysql://...) that several workers can share."""

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v: str) -> str:
        return _registered(v, SAMPLERS, "sampler")

    @field_validator("pruner")
    @classmethod
    def _pruner(cls, v: str | None) -> str | None:
        return v if v is None else _registered(v, PRUNERS, "pruner")

    @field_validator("storage")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = re.match(r"([A-Za-z][A-Za-z0-9]*)(\+[A-Za-z0-9_]+)?://", v)
        dialect = m.group(1) if m else v.split(":", 1)[0]
        if not m or dialect not in _STORAGE_DIALECTS:
            hint = _did_you_mean(dialect, _STORAGE_DIALECTS)
            raise ValueError(
                "not a database URL Optuna can open; expected sqlite:///PATH, "
                f"postgresql://USER@HOST/DB or mysql://...{hint}"
            )
        return v


class Resources(_Strict):
    """``resources:`` section: the device slots trials run on."""

    devices: DeviceKind | tuple[int, ...] = "auto"
    """``auto``: every visible GPU, else the CPU; ``cpu``; or a list of GPU indices."""
    trials_per_device: int = Field(1, ge=1)
    gpus_per_trial: int = Field(1, ge=1)
    """More than one: the trainer runs under torchrun (DDP)."""

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ("auto", "cpu"):
            hint = _did_you_mean(v, typing.get_args(DeviceKind))
            raise ValueError(f"expected auto, cpu or a list of GPU indices{hint}")
        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("expected auto, cpu or a non-empty list of GPU indices")
        if not all(type(i) is int and i >= 0 for i in v) or len(set(v)) != len(v):
            raise ValueError("GPU indices must be distinct integers >= 0")
        return tuple(v)


_TOP_KEYS = (
    "name",
    "trainer",
    "base",
    "search",
    "objective",
    "trials",
    "optuna",
    "resources",
    "baseline",
    "repeats",
    "retries",
    "design",
)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# --------------------------------------------------------------------------------------------
# The spec


class StudySpec(BaseModel):
    """A validated study. ``search`` is in file order; :meth:`order` is the dependency order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    trainer: str
    base: dict[str, Any]
    """The trainer config every trial starts from (inline, or loaded from the base file)."""
    search: dict[str, Space]
    objectives: tuple[Objective, ...]
    trials: int
    optuna: OptunaSettings
    resources: Resources
    baseline: dict[str, Scalar] | None = None
    """Parameters that identify the baseline trial(s) (e.g. ``{repa.weight: 0.0}``): the report
    gives every other configuration's effect against it (paired over seeds) and the steps every
    other trial needs to reach the baseline's final objective."""
    repeats: int = 1
    """Training seeds per configuration: seed k (0-based) trains with ``base.seed + k``."""
    retries: int = 1
    """Times a seed run's trainer that died without a status (killed from outside: the OOM
    killer, preemption; or crashed) is relaunched from its checkpoint before the trial fails.
    A failure the trainer reports itself (bad config, non-finite loss) is never retried."""
    design: Design = "search"
    """How configurations are chosen (:data:`DESIGNS`)."""
    path: Path
    """The study file, resolved."""
    sources: tuple[Path, ...]
    """Every file read: the include chain (innermost first), then base files."""

    @property
    def trainer_info(self) -> Trainer:
        """The registry entry of this study's trainer."""
        return TRAINERS[self.trainer]

    @property
    def directions(self) -> list[str]:
        """Optuna ``directions`` (one per objective)."""
        return [o.direction for o in self.objectives]

    @property
    def metrics(self) -> list[str]:
        """The objective metric names, in order."""
        return [o.metric for o in self.objectives]

    @property
    def multi_objective(self) -> bool:
        """True when the study optimises more than one metric."""
        return len(self.objectives) > 1

    def order(self) -> tuple[str, ...]:
        """Parameter names with every ``when:`` parameter before the ones that depend on it."""
        return _dependency_order(self.search)[0]

    def is_active(self, name: str, params: Mapping[str, Any]) -> bool:
        """Whether ``name`` exists given the values chosen so far (its ``when:`` holds)."""
        return all(
            ref in params and params[ref] in allowed
            for ref, allowed in self.search[name].conditions().items()
        )

    def active_params(self, params_so_far: Mapping[str, Any]) -> tuple[str, ...]:
        """Parameters not yet chosen whose ``when:`` holds, in dependency order."""
        return tuple(
            n for n in self.order() if n not in params_so_far and self.is_active(n, params_so_far)
        )

    def suggest(self, trial: optuna.trial.BaseTrial) -> dict[str, Any]:
        """Ask ``trial`` for every active parameter, in dependency order.

        A conditional parameter is suggested only when its ``when:`` holds, so Optuna never
        records (or models) a value that the trainer would ignore.
        """
        params: dict[str, Any] = {}
        for name in self.order():
            if self.is_active(name, params):
                params[name] = self.search[name].suggest(trial, name)
        return params

    def resolve(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The full trainer config for one trial: ``base`` deep-merged with the dotted params."""
        unknown = [k for k in params if k not in self.search]
        if unknown:
            raise SpecError(
                self.path,
                [
                    f"params.{k}: not a parameter of this study{_did_you_mean(k, self.search)}; "
                    f"searched: {_one_of(self.search)}"
                    for k in unknown
                ],
            )
        return _apply(self.base, _config_values(self.search, params))

    def seeds(self) -> list[int]:
        """The training seeds of every configuration: ``base.seed + 0 .. base.seed + repeats-1``."""
        first = int(self.base.get("seed", 0))
        return [first + k for k in range(self.repeats)]

    def seed_config(self, params: Mapping[str, Any], k: int) -> dict[str, Any]:
        """The trainer config of seed run ``k`` of the configuration ``params``."""
        return {**self.resolve(params), "seed": self.seeds()[k]}

    def configurations(self) -> list[dict[str, Any]]:
        """The fixed configurations of a ``grid`` or ``ofat`` design, in run order (the
        baseline first); empty for ``search`` (the sampler proposes them)."""
        if self.design == "grid":
            return _grid_configs(self)
        if self.design == "ofat":
            return _ofat_configs(self)
        return []

    def grid_space(self) -> dict[str, list[Any]]:
        """``search_space`` for ``optuna.samplers.GridSampler`` (needs enumerable spaces)."""
        out = {}
        for name, space in self.search.items():
            values = space.grid()
            if values is None:
                raise SpecError(self.path, [f"search.{name}: float without step has no grid"])
            out[name] = values
        return out

    def make_sampler(self) -> optuna.samplers.BaseSampler:
        """The Optuna sampler named by ``optuna.sampler``, seeded with ``optuna.seed``."""
        return SAMPLERS[self.optuna.sampler](self)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        """The Optuna pruner named by ``optuna.pruner`` (``none``: never prune)."""
        return PRUNERS[self.optuna.pruner or "none"](self)

    def summary(self) -> str:
        """A few lines for ``harness study check``."""
        from evaluators.redact import redact_url

        o, r = self.optuna, self.resources
        devices = r.devices if isinstance(r.devices, str) else f"GPUs {list(r.devices)}"
        width = max(len(n) for n in self.search)
        lines = [
            f"study {self.name}: valid ({self.path})",
            f"  files:     {', '.join(str(p) for p in self.sources)}",
            f"  trainer:   {self.trainer} (python -m {self.trainer_info.module})",
            f"  objective: {', '.join(f'{x.direction} {x.metric}' for x in self.objectives)}",
            f"  design:    {self.design} ({DESIGNS[self.design]})",
            f"  trials:    {self.trials} configuration(s) x {self.repeats} seed(s) {self.seeds()}",
            f"  optuna:    sampler {o.sampler}, pruner {o.pruner}, seed {o.seed}, "
            f"storage {redact_url(o.storage) if o.storage else 'default (local file)'}",
            f"  resources: devices {devices}, {r.trials_per_device} trial(s) per device, "
            f"{r.gpus_per_trial} GPU(s) per trial",
            f"  search:    {len(self.search)} parameter(s)",
        ]
        lines += [f"    {n:<{width}}  {self.search[n].describe()}" for n in self.order()]
        configs = self.configurations()
        if configs:
            lines.append(f"  configurations ({self.design}, the baseline first):")
            lines += [
                f"    {i}: " + (", ".join(f"{k}={_show(v)}" for k, v in c.items()) or "base")
                for i, c in enumerate(configs)
            ]
        return "\n".join(lines)


def _grid_configs(spec: StudySpec) -> list[dict[str, Any]]:
    """Every combination of the searched values, honouring ``when:`` (a parameter exists only
    where its condition holds), the baseline's combination first."""
    out: list[dict[str, Any]] = [{}]
    for name in spec.order():
        grown = []
        for params in out:
            if spec.is_active(name, params):
                grown += [{**params, name: v} for v in spec.search[name].grid() or []]
            else:
                grown.append(params)
        out = grown
    base = spec.baseline or {}
    return sorted(out, key=lambda p: not all(p.get(k) == v for k, v in base.items()))


def _ofat_configs(spec: StudySpec) -> list[dict[str, Any]]:
    """The baseline, then for each searched parameter each of its other values with every
    other parameter at the baseline's. A parameter that the change makes exist (``when:``)
    takes its first value; one it makes vanish is dropped."""
    base = dict(spec.baseline or {})
    out = [base]
    for name in spec.order():
        if name not in base:
            continue
        for value in spec.search[name].grid() or []:
            if value == base[name]:
                continue
            params = {**base, name: value}
            for other in spec.order():
                if other in params and not spec.is_active(other, params):
                    del params[other]
                elif other not in params and spec.is_active(other, params):
                    params[other] = (spec.search[other].grid() or [None])[0]
            if params not in out:
                out.append(params)
    return out


def _set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _config_values(search: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with every named choice replaced by the value it names."""
    return {
        k: search[k].config_value(v) if isinstance(search.get(k), ChoiceSpace) else v
        for k, v in params.items()
    }


def _apply(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in params.items():
        _set_dotted(out, k, v)
    return out


def _dependency_order(search: Mapping[str, Any]) -> tuple[tuple[str, ...], list[str]]:
    """(order, names left in a cycle) over ``when:`` references; file order where free."""
    deps = {n: {r for r in s.conditions() if r in search and r != n} for n, s in search.items()}
    order: list[str] = []
    while len(order) < len(deps):
        ready = [n for n in deps if n not in order and deps[n] <= set(order)]
        if not ready:
            return tuple(order), [n for n in deps if n not in order]
        order.append(ready[0])
    return tuple(order), []


# --------------------------------------------------------------------------------------------
# Reading files: YAML, includes, base files


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.2) and refuses duplicate keys."""


# Copy before adding: PyYAML's add_implicit_resolver would otherwise append to SafeLoader's lists.
_Loader.yaml_implicit_resolvers = {
    k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, typing.Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        if isinstance(key, typing.Hashable):
            seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_mapping(path: Path, what: str, key: str, source: Path) -> dict[str, Any]:
    """A YAML/JSON file that must hold a mapping; errors name ``key`` and the resolved path."""
    where = f"{key}: {what} {path}" if key else f"{what} {path}"
    if not path.is_file():
        raise SpecError(source, [f"{where} does not exist"])
    try:
        with path.open() as f:
            data = json.load(f) if path.suffix == ".json" else yaml.load(f, Loader=_Loader)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise SpecError(source, [f"{where} is not valid YAML/JSON: {err}"]) from None
    if not isinstance(data, dict):
        got = "nothing (empty file)" if data is None else type(data).__name__
        raise SpecError(source, [f"{where} must hold a mapping, got {got}"])
    return data


@dataclass(frozen=True)
class _BaseFile:
    """A ``base: PATH`` seen while reading the include chain (replaces, never merges)."""

    path: Path
    data: dict[str, Any]


def _deep_merge(under: Any, over: Any) -> Any:
    if isinstance(under, dict) and isinstance(over, dict):
        out = dict(under)
        for k, v in over.items():
            out[k] = _deep_merge(under[k], v) if k in under else v
        return out
    return over


def _merge_search(under: Any, over: Any) -> Any:
    """Search entries merge key by key, but a changed ``type`` replaces the space and ``null``
    removes the parameter (so a variant can drop what it fixes in ``base``)."""
    if not (isinstance(under, dict) and isinstance(over, dict)):
        return over
    out = dict(under)
    for k, v in over.items():
        old = out.get(k)
        if v is None:
            out.pop(k, None)
        elif (
            isinstance(old, dict)
            and isinstance(v, dict)
            and v.get("type", old.get("type")) == old.get("type")
        ):
            out[k] = _deep_merge(old, v)
        else:
            out[k] = v
    return out


def _merge_study(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(under)
    for k, v in over.items():
        if k not in under:
            out[k] = v
        elif k == "search":
            out[k] = _merge_search(under[k], v)
        elif k == "base" and isinstance(under[k], _BaseFile) and isinstance(v, dict):
            out[k] = _deep_merge(under[k].data, v)
        elif k == "base" and isinstance(v, _BaseFile):
            out[k] = v
        else:
            out[k] = _deep_merge(under[k], v)
    return out


def _read_study(path: Path, chain: tuple[Path, ...], top: Path) -> tuple[dict[str, Any], list]:
    """The merged document of ``path`` and its includes, and the files read (innermost first)."""
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise SpecError(top, [f"include: cycle {cycle} ({path})"])
    doc = _read_mapping(
        path, "included file" if chain else "study file", "include" * bool(chain), top
    )
    if isinstance(doc.get("base"), str):
        base_path = (path.parent / doc["base"]).resolve()
        doc["base"] = _BaseFile(base_path, _read_mapping(base_path, "base file", "base", top))
        doc["base"].data.pop("config_hash", None)  # a harness-written config.json carries one
    include = doc.pop("include", None)
    if include is None:
        return doc, [path]
    if not isinstance(include, str):
        raise SpecError(top, [f"include: expected a path string, got {_show(include)}"])
    inc_path = (path.parent / include).resolve()
    if not inc_path.is_file() and inc_path not in chain:
        raise SpecError(
            top, [f"include: {include!r} not found (resolved {inc_path}), included from {path}"]
        )
    under, files = _read_study(inc_path, (*chain, path), top)
    return _merge_study(under, doc), [*files, path]


# --------------------------------------------------------------------------------------------
# Validation


def _validate(model: type[BaseModel], data: Any, prefix: str, problems: list[str]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems.extend(_pydantic_problems(err, prefix, model))
        return None


def _parse_space(name: str, raw: Any, problems: list[str]) -> Any:
    path = f"search.{name}"
    if isinstance(raw, list):  # shorthand: PATH: [a, b, c]
        raw = {"type": "choice", "values": raw}
    if not isinstance(raw, dict):
        problems.append(
            f"{path}: expected a space {{type: float|int|choice, ...}} or a list of choices, "
            f"got {_show(raw)}"
        )
        return None
    kind = raw.get("type")
    if kind not in _SPACES:
        what = "required key is missing" if kind is None else f"{_show(kind)} is not a space type"
        problems.append(
            f"{path}.type: {what}{_did_you_mean(kind, _SPACES) if kind else ''}; "
            f"one of {_one_of(_SPACES)}"
        )
        return None
    space = _validate(_SPACES[kind], raw, path, problems)
    bad_range = _range_problems(path, space) if space is not None else []
    problems += bad_range
    return None if bad_range else space


def _range_problems(path: str, space: Any) -> list[str]:
    if isinstance(space, ChoiceSpace):
        if not space.values:
            return [f"{path}.values: a choice needs at least one value (got [])"]
        dupes = [v for i, v in enumerate(space.values) if v in space.values[:i]]
        return [f"{path}.values: {_show(v)} is listed twice" for v in dupes]
    out = []
    lo, hi, step = space.low, space.high, space.step
    if lo >= hi:
        out.append(f"{path}.low: {_show(lo)} must be < high ({_show(hi)}): the range is empty")
    if space.log and lo <= 0:
        out.append(f"{path}.low: {_show(lo)} must be > 0 with log: true")
    if step is not None and step <= 0:
        out.append(f"{path}.step: {_show(step)} must be > 0")
    elif space.log and step not in (None, 1):
        out.append(f"{path}.step: {_show(step)} cannot be combined with log: true (Optuna)")
    elif step is not None and lo < hi and step > hi - lo:
        out.append(f"{path}.step: {_show(step)} is larger than the range high - low ({hi - lo})")
    return out


def _parse_search(raw: Any, problems: list[str]) -> dict[str, Any]:
    if not isinstance(raw, dict) or not raw:
        problems.append(
            "search: expected a non-empty mapping of dotted parameter paths to spaces "
            f"(e.g. timesteps.shift: [1.0, 2.0]), got {_show(raw)}"
        )
        return {}
    out = {}
    for name, space_raw in raw.items():
        if not isinstance(name, str):
            problems.append(f"search: parameter names are dotted paths, got {_show(name)}")
            continue
        space = _parse_space(name, space_raw, problems)
        if space is not None:
            out[name] = space
    return out


def _condition_problems(search: dict[str, Any], names: Iterable[str]) -> list[str]:
    out = []
    names = list(names)
    for name, space in search.items():
        for ref, allowed in space.conditions().items():
            path = f"search.{name}.when.{ref}"
            target = search.get(ref)
            if ref == name:
                out.append(f"{path}: a parameter cannot depend on itself")
            elif ref not in names:
                out.append(
                    f"{path}: {ref!r} is not a parameter in search{_did_you_mean(ref, names)}; "
                    f"searched: {_one_of(names)}"
                )
            elif target is not None and not isinstance(target, ChoiceSpace):
                out.append(f"{path}: when: can only refer to a choice; {ref} is {target.type}")
            elif target is not None:
                out += [
                    f"{path}: {_show(v)} is not one of {ref}'s values "
                    f"[{_one_of(target.values)}]{_did_you_mean(v, target.values)}"
                    for v in allowed
                    if v not in target.values
                ]
    left = _dependency_order(search)[1]
    if left:
        out.append(f"search: when: conditions form a cycle {_find_cycle(search, left)}")
    return out


def _find_cycle(search: dict[str, Any], left: list[str]) -> str:
    """``a -> b -> a``: follow unresolved ``when:`` references until one repeats."""
    path = [left[0]]
    while True:
        nxt = next(r for r in search[path[-1]].conditions() if r in left and r != path[-1])
        if nxt in path:
            return " -> ".join([*path[path.index(nxt) :], nxt])
        path.append(nxt)


def _objective_problems(raw: Any, trainer: str | None, problems: list[str]) -> list[Objective]:
    items = raw if isinstance(raw, list) else [raw]
    if isinstance(raw, list) and not raw:
        problems.append("objective: an empty list; give {metric: NAME, direction: ...}")
    out = []
    for i, item in enumerate(items):
        path = f"objective[{i}]" if isinstance(raw, list) else "objective"
        obj = _validate(Objective, item, path, problems)
        if obj is None:
            continue
        known = TRAINERS[trainer].metrics if trainer else KNOWN_METRICS
        if obj.metric not in known:
            problems.append(
                f"{path}.metric: {_show(obj.metric)} is not a metric the {trainer} trainer "
                f"writes{_did_you_mean(obj.metric, known)}; known: {_one_of(sorted(known))}"
            )
        elif obj.metric in [o.metric for o in out]:
            problems.append(f"{path}.metric: {_show(obj.metric)} is already an objective")
        out.append(obj)
    return out


def _optuna_problems(opt: OptunaSettings, search: dict[str, Any], n_obj: int) -> list[str]:
    out = []
    if opt.sampler == "grid":
        out += [
            f"search.{n}: the grid sampler needs enumerable spaces; this float has no step "
            "(add step: or use type: choice)"
            for n, s in search.items()
            if s.grid() is None
        ]
    if n_obj > 1 and opt.sampler == "cmaes":
        out.append(
            f"optuna.sampler: 'cmaes' optimises one objective, this study has {n_obj}; "
            "use nsga2, tpe, gp, random or grid"
        )
    for i, params in enumerate(opt.enqueue):
        out += _enqueue_problems(f"optuna.enqueue[{i}]", params, search)
    if n_obj > 1 and opt.pruner not in (None, "none"):
        out.append(
            f"optuna.pruner: {opt.pruner!r} cannot be used with {n_obj} objectives "
            "(Optuna cannot prune multi-objective studies); set pruner: none"
        )
    return out


def _enqueue_problems(where: str, params: dict[str, Any], search: dict[str, Any]) -> list[str]:
    """An enqueued trial names searched parameters with values in their spaces, and gives a
    conditional parameter only where its ``when:`` holds for the values it gives."""
    out = []
    for name, value in params.items():
        if name not in search:
            out.append(
                f"{where}.{name}: not a searched parameter{_did_you_mean(name, search)}; "
                f"searched: {_one_of(search)}"
            )
            continue
        space = search[name]
        if isinstance(space, ChoiceSpace):
            ok = value in space.values and not (
                isinstance(value, bool) and not any(v is value for v in space.values)
            )
            allowed = f"one of {_one_of(space.values)}"
        else:
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if isinstance(space, IntSpace):
                number = number and float(value).is_integer()
            ok = number and space.low <= value <= space.high
            allowed = space.describe()
        if not ok:
            out.append(f"{where}.{name}: {_show(value)} is not in the space; allowed: {allowed}")
            continue
        for ref, values in space.conditions().items():
            if ref not in params:
                out.append(
                    f"{where}.{name}: given without {ref}, which decides whether it exists "
                    f"(when: {ref} is {_one_of(values)}); give {ref} too"
                )
            elif params[ref] not in values:
                out.append(
                    f"{where}.{name}: given, but it exists only when {ref} is "
                    f"{_one_of(values)} and this trial sets {ref} to {_show(params[ref])}"
                )
    return out


def _resources_problems(res: Resources) -> list[str]:
    if res.devices == "cpu" and res.gpus_per_trial > 1:
        return [f"resources.gpus_per_trial: {res.gpus_per_trial} with devices: cpu; use 1"]
    if isinstance(res.devices, tuple) and res.gpus_per_trial > len(res.devices):
        return [
            f"resources.gpus_per_trial: {res.gpus_per_trial} but resources.devices lists only "
            f"{len(res.devices)} GPU(s) {list(res.devices)}"
        ]
    return []


MODEL_REF_KEYS: tuple[str, ...] = ("teacher", "init")
"""``base`` keys that name a starting model (distillation's teacher, a fine-tune's init): a
finished run directory, an export, or ``best:STUDY``."""


def _base_problems(base: dict[str, Any]) -> list[str]:
    for key in MODEL_REF_KEYS:
        ref = base.get(key)
        if (
            isinstance(ref, str)
            and not ref.startswith("best:")
            and not Path(ref).expanduser().resolve().is_dir()
        ):
            return [
                f"base.{key}: {ref!r} does not exist (resolved "
                f"{Path(ref).expanduser().resolve()}, relative to the working directory); "
                "give a finished flow run directory, or best:STUDY for the best trial of a "
                "study run in the same work directory"
            ]
    data = base.get("data")
    if not isinstance(data, dict) or data.get("kind") != "folder":
        return []
    path = data.get("path")
    if isinstance(path, str) and not Path(path).expanduser().resolve().is_dir():
        return [
            f"base.data.path: image folder {path!r} does not exist (resolved "
            f"{Path(path).expanduser().resolve()}, relative to the working directory)"
        ]
    return []


def _trainer_problems(
    base: dict[str, Any], search: dict[str, Any], trainer: str, problems: list[str]
) -> None:
    """Resolve the base with each parameter's extreme values and every choice, and let the
    trainer's config model reject what the trainer would reject, before anything runs."""
    model = TRAINERS[trainer].config
    failed = False
    for name, space in search.items():
        witness = _witness(name, search, {})
        for key, value in space.probe_values():
            trial = _config_values(search, {**witness, name: value})
            rejected = _rejection(model, _apply(base, trial))
            if rejected:
                where = f"search.{name}" + (f".{key}" if key != "values" else "")
                problems.append(
                    f"{where}: {_show(value)} is rejected by the {trainer} trainer config: "
                    f"{rejected}"
                )
                failed = True
    if not failed:  # every parameter at its representative value, together
        params: dict[str, Any] = {}
        for name in _dependency_order(search)[0]:
            if all(r in params and params[r] in v for r, v in search[name].conditions().items()):
                params[name] = search[name].representative()
        rejected = _rejection(model, _apply(base, _config_values(search, params)))
        if rejected:
            problems.append(
                f"search: the trial {json.dumps(params)} is rejected by the {trainer} trainer "
                f"config: {rejected}"
            )


def _witness(name: str, search: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """Values for the parameters ``name``'s ``when:`` needs (recursively), so it is active."""
    for ref, allowed in search[name].conditions().items():
        if ref in search and ref not in out and ref != name:
            out[ref] = allowed[0]
            _witness(ref, search, out)
    return out


def _rejection(model: type[BaseModel], config: dict[str, Any]) -> str | None:
    try:
        model.model_validate(config)
    except ValidationError as err:
        return "; ".join(_pydantic_problems(err, "", model))
    return None


def _top_level_problems(doc: dict[str, Any], problems: list[str]) -> tuple[Any, str | None]:
    """Unknown and missing top-level keys, ``name``, ``trainer`` and ``trials``."""
    allowed = (*_TOP_KEYS, "include")
    problems += [
        f"{k}: unknown key{_did_you_mean(k, allowed)}; allowed: {_one_of(allowed)}"
        for k in doc
        if k not in _TOP_KEYS
    ]
    fixed = doc.get("design", "search") in ("grid", "ofat")  # these count their own trials
    required = ("name", "search", "objective") + (() if fixed else ("trials",))
    problems += [f"{k}: required key is missing" for k in required if k not in doc]
    name = doc.get("name")
    if "name" in doc and not (isinstance(name, str) and _NAME_RE.fullmatch(name)):
        problems.append(
            f"name: {_show(name)} is not a valid study name; use letters, digits, '.', '_', '-' "
            "(it names runs/<study>/ and the Optuna study)"
        )
    trials = doc.get("trials")
    if "trials" in doc and not (type(trials) is int and trials >= 1):
        problems.append(f"trials: expected an integer >= 1, got {_show(trials)}")
    trainer = doc.get("trainer", "flow")
    if trainer in TRAINERS:
        return name, trainer
    problems.append(
        f"trainer: {_show(trainer)} is not a trainer{_did_you_mean(trainer, TRAINERS)}; "
        f"known: {_one_of(TRAINERS)}"
    )
    return name, None


def _path_problems(search: dict[str, Any], trainer: str) -> dict[str, str]:
    """Search paths that are not value fields of the trainer's config (or not float ones)."""
    model = TRAINERS[trainer].config
    out = {}
    for n, space in search.items():
        why = _field_problem(model, n, trainer)
        if why is None and space.type == "float":
            ann = _leaf_annotation(model, n)
            if not _accepts_float(ann):
                kind = getattr(ann, "__name__", str(ann))
                why = f"{n!r} takes {kind} values, not floats; use type: int or choice"
        if why:
            out[n] = f"search.{n}: {why}"
    return out


def _parse_base(doc: dict[str, Any], problems: list[str]) -> dict[str, Any] | None:
    base = doc.get("base", {})
    base = base.data if isinstance(base, _BaseFile) else base
    if isinstance(base, dict):
        problems += _base_problems(base)
        return base
    problems.append(
        "base: expected the trainer config (a mapping) or a path to a JSON/YAML file, "
        f"got {_show(base)}"
    )
    return None


def _parse_document(doc: dict[str, Any], path: Path, files: list[Path]) -> StudySpec:
    problems: list[str] = []
    name, trainer = _top_level_problems(doc, problems)
    objectives = (
        _objective_problems(doc["objective"], trainer, problems) if "objective" in doc else []
    )
    opt = _validate(OptunaSettings, doc.get("optuna") or {}, "optuna", problems)
    res = _validate(Resources, doc.get("resources") or {}, "resources", problems)
    raw_search = doc.get("search")
    search = _parse_search(raw_search, problems) if "search" in doc else {}
    base = _parse_base(doc, problems)
    if base is not None and (base.get("data") or {}).get("kind") == "folder":
        problems += [
            f"objective: {o.metric!r} is only written on the embedded shapes data, and "
            "base.data.kind is folder; use eval/flow_loss (or train/loss)"
            for o in objectives
            if o.metric in SHAPES_ONLY_METRICS
        ]
    bad_paths = _path_problems(search, trainer) if trainer else {}
    problems += bad_paths.values()
    cond = _condition_problems(search, raw_search if isinstance(raw_search, dict) else {})
    problems += cond
    if opt is not None:
        problems += _optuna_problems(opt, search, max(len(objectives), 1))
        pruner = opt.pruner or ("none" if len(objectives) > 1 else "median")
        opt = opt.model_copy(update={"pruner": pruner})
    if res is not None:
        problems += _resources_problems(res)
    baseline = doc.get("baseline")
    if baseline is not None and not (isinstance(baseline, dict) and baseline):
        problems.append(
            f"baseline: expected a mapping of searched parameters to values, e.g. "
            f"{{repa.weight: 0.0}}, got {_show(baseline)}"
        )
    elif baseline is not None:
        problems += _enqueue_problems("baseline", baseline, search)
    if base is not None and trainer:
        base_ok = _validate(TRAINERS[trainer].config, base, "base", problems) is not None
        if base_ok and not cond:
            valid = {n: s for n, s in search.items() if n not in bad_paths}
            _trainer_problems(base, valid, trainer, problems)
    design, repeats = doc.get("design", "search"), doc.get("repeats", 1)
    retries = doc.get("retries", 1)
    if not (type(retries) is int and 0 <= retries <= 100):
        problems.append(
            "retries: expected an integer from 0 to 100 (relaunches of a trainer killed from "
            f"outside, e.g. by the OOM killer, before its trial fails), got {_show(retries)}"
        )
    problems += _design_problems(design, repeats, search, baseline, opt)
    if problems:
        raise SpecError(path, problems)
    spec = StudySpec(
        name=name,
        trainer=trainer,
        base=base,
        search=search,
        objectives=tuple(objectives),
        trials=doc.get("trials") or 1,
        optuna=opt,
        resources=res,
        baseline=baseline,
        repeats=repeats,
        retries=retries,
        design=design,
        path=path.resolve(),
        sources=tuple(files),
    )
    return _fix_design_trials(spec, doc.get("trials"))


def _design_problems(
    design: Any,
    repeats: Any,
    search: dict[str, Any],
    baseline: dict[str, Any] | None,
    opt: OptunaSettings | None,
) -> list[str]:
    """``design:`` and ``repeats:``: a known design whose configurations can be listed."""
    out = []
    if not (type(repeats) is int and 1 <= repeats <= 1000):
        out.append(
            f"repeats: expected an integer from 1 to 1000 (training seeds per configuration), "
            f"got {_show(repeats)}"
        )
    if design not in DESIGNS:
        hint = _did_you_mean(str(design), DESIGNS)
        return [*out, f"design: {_show(design)} is not a design{hint}; known: {_one_of(DESIGNS)}"]
    if design == "search":
        return out
    out += [
        f"search.{n}: design {design} lists every value, and this float has no step "
        "(add step: or use type: choice)"
        for n, s in search.items()
        if s.grid() is None
    ]
    if opt is not None and opt.enqueue:
        out.append(
            f"optuna.enqueue: design {design} fixes every configuration itself; remove enqueue "
            "(or use design: search)"
        )
    if design == "ofat" and not baseline:
        out.append(
            "baseline: design ofat changes one factor at a time from a baseline; give it, e.g. "
            "baseline: {timesteps.sampler: uniform}"
        )
    return out


def _fix_design_trials(spec: StudySpec, trials: Any) -> StudySpec:
    """A grid or ofat study runs exactly its configurations: ``trials`` is their number (a
    different number in the file is an error, not a silent truncation)."""
    if spec.design == "search":
        return spec
    configs = spec.configurations()
    problems = []
    if spec.design == "ofat":
        base = spec.baseline or {}
        problems += [
            f"baseline: gives no value for {n}, which exists for this baseline; design ofat "
            "needs the baseline's value of every searched parameter"
            for n in spec.order()
            if n not in base and spec.is_active(n, base)
        ]
    elif spec.baseline and not any(
        all(c.get(k) == v for k, v in spec.baseline.items()) for c in configs
    ):
        problems.append(f"baseline: {_show(spec.baseline)} matches no configuration of the grid")
    if trials is not None and trials != len(configs):
        problems.append(
            f"trials: {trials}, but design {spec.design} has {len(configs)} configuration(s); "
            "leave trials out (it is their number) or change the search"
        )
    if problems:
        raise SpecError(spec.path, problems)
    return spec.model_copy(update={"trials": len(configs)})


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> StudySpec:
    """Read, merge (``include:``) and validate a study file.

    ``overrides``: ``KEY=VALUE`` strings (``harness study run --set``) applied to the merged
    document before validation (:func:`apply_overrides`), so they are validated like the file.
    Raises :class:`SpecError` listing every problem found, each naming its key path.
    """
    given = Path(path)
    resolved = given.resolve()
    doc, files = _read_study(resolved, (), given)
    base_files = [doc["base"].path] if isinstance(doc.get("base"), _BaseFile) else []
    if not overrides:
        return _parse_document(doc, given, [*files, *base_files])
    set_keys = apply_overrides(doc, overrides, given)
    try:
        return _parse_document(doc, given, [*files, *base_files])
    except SpecError as err:  # say which problems the overrides caused
        raise SpecError(err.source, [_blame(p, set_keys) for p in err.problems]) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (dotted key, value parsed as a YAML scalar or flow list/mapping:
    ``100`` is an int, ``1e-3`` a float, ``true`` a bool, ``null`` None, ``[a, b]`` a list,
    anything else a string). Raises ValueError naming the problem."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. --set base.train.steps=100")
    if any(not part for part in key.split(".")):
        raise ValueError(f"--set {text!r}: {key!r} has an empty part; use a dotted path")
    try:
        # YAML 1.1 reads 1e-3 as a string; the study files' loader reads it as a float.
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise ValueError(f"--set {text!r}: the value is not valid YAML ({problem})") from None
    return key, value


def apply_overrides(doc: dict[str, Any], overrides: Sequence[str], source: Path) -> list[str]:
    """Set each ``KEY=VALUE`` of ``overrides`` in the merged study document ``doc`` (in place)
    and return the keys set. A dotted key follows the file's structure; keys that contain dots
    themselves (parameter names under ``search:``, ``baseline:``) are matched whole, e.g.
    ``search.timesteps.shift.high=3`` or ``baseline.timesteps.sampler=uniform``. Raises
    :class:`SpecError` for a malformed override or a path through a non-mapping value."""
    problems: list[str] = []
    keys: list[str] = []
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ValueError as err:
            problems.append(str(err))
            continue
        problem = _set_override(doc, key, value)
        if problem:
            problems.append(f"--set {text!r}: {problem}")
        keys.append(key)
    if problems:
        raise SpecError(source, problems)
    return keys


def _set_override(doc: dict[str, Any], key: str, value: Any) -> str | None:
    parts = key.split(".")
    node: Any = doc
    i, walked = 0, []
    while True:
        if isinstance(node, _BaseFile):  # base: PATH; an override edits the loaded config
            node = node.data
        if not isinstance(node, dict):
            where = ".".join(walked)
            return f"{where} is {_show(node)}, not a mapping, so it has no key {parts[i]!r}"
        # The longest run of parts that is an existing key: search parameters are dotted.
        n = next((n for n in range(len(parts) - i, 1, -1) if ".".join(parts[i : i + n]) in node), 1)
        part = ".".join(parts[i : i + n])
        if i + n == len(parts):
            node[part] = value
            return None
        walked.append(part)
        if node.get(part) is None:
            node[part] = {}
        node, i = node[part], i + n


def _blame(problem: str, keys: Sequence[str]) -> str:
    """A validation problem, marked when an override set its key (or a key under it)."""
    path = problem.split(":", 1)[0]
    hits = [k for k in keys if path == k or path.startswith(k + ".") or k.startswith(path + ".")]
    return f"{problem} (set by --set {hits[0]})" if hits else problem
