"""``harness prompts measure``: does a prompt enhancer make trained models follow prompts better?

A prompt enhancer (``trainers/enhance.py``) rewrites a terse prompt ("red ball, top left") into
the kind of caption the model was trained on before the text encoder sees it. Whether that helps
is a property of (model, enhancer, prompts), so it is measured on trained models' exports:

- two prompt sets of the embedded shapes data: ``terse`` (the shipped terse set,
  ``trainers/data/terse_prompts.jsonl``: one to three attributes named, in wordings the shapes
  enhancer was not trained on) and ``full`` (canonical captions naming all five attributes, half
  of them held-out compositions);
- each prompt rendered with and without the enhancer at the same sampling seeds (the same
  initial noise), so every image row is paired;
- prompt following of one image = the fraction of the attributes the *original* prompt names
  that the attribute network sees in it (what the user asked for, not what the enhancer added);
- the comparison is over training seeds: one model per seed run of a study trial, and the
  per-seed differences (enhanced - as written) give a Student-t interval and a verdict
  (:func:`harness.stats.paired_effect`). One seed is reported as an anecdote, without interval.

Every measured value is stored in the ``scores`` table (metrics ``prompt_following/<set>`` and
``prompt_following_all/<set>``), with the enhancer's provenance (backend and version, or
``null`` for the prompts as written), the prompt set's hash, the sampler settings and seeds, and
the attribute network's recipe in its provenance.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.store import Store
from trainers.config import ConfigError, EnhancerConfig
from trainers.names import did_you_mean, lookup

PROMPT_SETS: tuple[str, ...] = ("terse", "full")
CONDITIONS: tuple[str, ...] = ("as_written", "enhanced")
# Full captions start here in each split's stream: apart from the trainer's evaluation prompts
# (100 000) and the arena's (200 000), so none of them doubles as another's prompt.
_FULL_INDEX_OFFSET = 300_000


class PromptMeasureError(ConfigError):
    """Bad input to ``harness prompts``; the message names the problem and the fix."""


@dataclass(frozen=True)
class PromptItem:
    """One prompt and the attribute labels it names (-1: not named)."""

    prompt: str
    labels: tuple[int, ...]
    category: str


def parse_enhancer(spec: str) -> EnhancerConfig:
    """``shapes``, ``openai``, ``openai:MODEL`` or ``transformers:PATH`` -> the enhancer config
    (the CLI's ``--enhancer``)."""
    from pydantic import ValidationError

    from trainers.config import format_validation_error

    backend, _, arg = spec.partition(":")
    backends = ("shapes", "openai", "transformers")
    if backend not in backends:
        raise PromptMeasureError(
            f"--enhancer {spec!r}: the backend must be one of shapes, openai[:MODEL], "
            f"transformers:PATH{did_you_mean(backend, backends)}"
        )
    data: dict[str, Any] = {"backend": backend}
    if arg:
        if backend == "shapes":
            raise PromptMeasureError(f"--enhancer {spec!r}: the shapes enhancer takes no argument")
        data["path" if backend == "transformers" else "model"] = arg
    try:
        return EnhancerConfig.model_validate(data)
    except ValidationError as err:
        raise PromptMeasureError(
            format_validation_error(err, f"--enhancer {spec!r}").replace("\n", " ")
        ) from None


def prompt_set(name: str, *, data_seed: int = 0, num_full: int = 96) -> list[PromptItem]:
    """The ``terse`` or ``full`` prompt set with the labels each prompt names."""
    from trainers.data.shapes import sample_attrs

    _check_set(name)
    if name == "terse":
        from trainers.data.terse import named_labels, terse_prompts

        prompts = terse_prompts()
        labels = named_labels(prompts)
        return [
            PromptItem(p.prompt, tuple(int(x) for x in row), p.category)
            for p, row in zip(prompts, labels, strict=True)
        ]
    out = []
    for i in range(num_full):
        split = "val" if i % 2 == 0 else "heldout"
        attrs = sample_attrs(data_seed, split, _FULL_INDEX_OFFSET + i // 2)
        out.append(PromptItem(attrs.caption, attrs.labels, "seen" if split == "val" else split))
    return out


def _check_set(name: str) -> None:
    try:
        lookup(dict.fromkeys(PROMPT_SETS), name, "prompt set")
    except KeyError as err:
        raise PromptMeasureError(err.args[0]) from None


def set_hash(items: Sequence[PromptItem]) -> str:
    """16 hex digits identifying a prompt set's prompts and labels (score provenance)."""
    blob = json.dumps([[p.prompt, list(p.labels)] for p in items])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def expand_runs(store: Store, specs: Sequence[str]) -> list[str]:
    """Run ids from ids or trial prefixes: ``STUDY/TRIAL`` stands for its seed runs
    ``STUDY/TRIAL/s0``, ``s1``, ... (in seed order)."""
    known = [r["run_id"] for r in store.query("SELECT run_id FROM runs ORDER BY run_id")]
    out: list[str] = []
    for spec in specs:
        if spec in known:
            out.append(spec)
            continue
        pattern = re.escape(spec.rstrip("/")) + r"/s\d+"
        seeds = sorted(
            (r for r in known if re.fullmatch(pattern, r)),
            key=lambda r: int(r.rsplit("/s", 1)[1]),
        )
        if not seeds:
            raise PromptMeasureError(
                f"unknown run or trial {spec!r}{did_you_mean(spec, known)}: name a run id of "
                "the `runs` table (e.g. timestep/0000/s0) or a trial (timestep/0000) for all its "
                "seeds"
            )
        out.extend(seeds)
    return list(dict.fromkeys(out))


@dataclass
class RunResult:
    """One run's per-image prompt following: ``rows[(set, condition)] = [N]`` float values,
    ``all_named[(set, condition)] = [N]`` bool, and the prompts per set, original and enhanced."""

    run_id: str
    rows: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    all_named: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    originals: dict[str, list[str]] = field(default_factory=dict)
    enhanced: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    """Enhanced minus as written on one prompt set, over the runs (training seeds)."""

    prompt_set: str
    as_written: float
    enhanced: float
    estimate: float
    ci_low: float
    ci_high: float
    n_seeds: int
    verdict: str
    rewritten: float  # fraction of the set's prompts the enhancer changed
    per_seed: tuple[float, ...] = ()  # enhanced - as written, per run


def _verdict(effect: Any, prompt_set: str) -> str:
    if effect.n_seeds < 2:
        return "one seed: an anecdote, no interval (measure more seed runs)"
    if not effect.resolved:
        need = (
            f"; about {effect.seeds_needed} seeds would resolve it" if effect.seeds_needed else ""
        )
        return f"not resolved: the interval contains 0{need}"
    if effect.estimate > 0:
        return "enhancement helps"
    return "enhancement HURTS" if prompt_set == "full" else "enhancement hurts"


def compare(results: Sequence[RunResult], prompt_set: str) -> Comparison:
    """The seed-level comparison of enhanced vs as-written prompts on ``prompt_set``."""
    from harness.stats import paired_effect

    a = [r.rows[(prompt_set, "enhanced")][:, None] for r in results]
    b = [r.rows[(prompt_set, "as_written")][:, None] for r in results]
    effect = paired_effect(a, b, lambda rows: float(rows.mean()), higher_is_better=True, n_boot=200)
    pairs = list(
        zip(results[0].originals[prompt_set], results[0].enhanced[prompt_set], strict=True)
    )
    changed = sum(o != e for o, e in pairs)
    verdict = _verdict(effect, prompt_set)
    if pairs and changed == 0:
        verdict = "no change: the enhancer returned every prompt as written (the same images)"
    return Comparison(
        prompt_set=prompt_set,
        as_written=float(np.mean([x.mean() for x in b])),
        enhanced=float(np.mean([x.mean() for x in a])),
        estimate=effect.estimate,
        ci_low=effect.ci_low,
        ci_high=effect.ci_high,
        n_seeds=effect.n_seeds,
        verdict=verdict,
        per_seed=effect.per_seed,
        rewritten=changed / len(pairs) if pairs else math.nan,
    )


def measure(
    store: Store,
    run_specs: Sequence[str],
    enhancer_cfg: EnhancerConfig,
    *,
    sets: Sequence[str] = PROMPT_SETS,
    seeds: Sequence[int] = (0, 1),
    steps: int = 25,
    solver: str = "euler",
    guidance: float = 3.0,
    device: str = "cpu",
    batch_size: int = 64,
    progress: Callable[[int, str], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> tuple[list[RunResult], list[Comparison], dict[str, Any]]:
    """Render every run on every set with and without the enhancer, score, store the scores.

    Returns the per-run results, one :class:`Comparison` per set, and the enhancer's
    provenance. Raises :class:`PromptMeasureError` (nothing stored) for unknown runs, sets or a
    bad enhancer before any image is generated."""
    from evaluators.scores import Score, put_scores
    from harness.arena_pipeline import _final_dir
    from trainers.data.terse import named_accuracy
    from trainers.domain import load_attribute_net, predict_labels
    from trainers.enhance import EnhancerError, build_enhancer
    from trainers.export import load_export

    if not seeds or len(set(seeds)) != len(seeds):
        raise PromptMeasureError(f"--seeds must be distinct and at least one, got {list(seeds)}")
    for s in sets:
        _check_set(s)
    run_ids = expand_runs(store, run_specs)
    finals = {r: _final_dir(store, r) for r in run_ids}  # refuses a run without an export
    try:
        enhancer = build_enhancer(enhancer_cfg)
    except EnhancerError as err:
        raise PromptMeasureError(str(err)) from None
    assert enhancer is not None
    provenance = enhancer.provenance()
    items = {s: prompt_set(s) for s in sets}
    enhanced = {s: enhancer.enhance([p.prompt for p in items[s]]) for s in sets}
    texts = {s: {"as_written": [p.prompt for p in items[s]], "enhanced": enhanced[s]} for s in sets}
    # One image per distinct (text, seed): a prompt the enhancer left unchanged gives the same
    # image in both conditions (same text, same initial noise), so it is drawn once.
    wanted = {
        s: list(dict.fromkeys((t, seed) for c in CONDITIONS for t in texts[s][c] for seed in seeds))
        for s in sets
    }
    if on_total is not None:
        on_total(len(run_ids) * sum(len(w) for w in wanted.values()))
    net = load_attribute_net(device=device)
    results: list[RunResult] = []
    scores: list[Score] = []
    for run_id in run_ids:
        model = load_export(finals[run_id], device=device)
        shift = float(model.shift)
        result = RunResult(run_id)
        for s in sets:
            labels = np.array([p.labels for p in items[s]])
            result.enhanced[s] = enhanced[s]
            result.originals[s] = [p.prompt for p in items[s]]
            predicted: dict[tuple[str, int], np.ndarray] = {}
            for i in range(0, len(wanted[s]), batch_size):
                chunk = wanted[s][i : i + batch_size]
                images = model.generate(
                    [t for t, _ in chunk],
                    [seed for _, seed in chunk],
                    steps=steps,
                    solver=solver,
                    guidance=guidance,
                )
                for key, row in zip(chunk, predict_labels(net, images).numpy(), strict=True):
                    predicted[key] = row
                if progress is not None:
                    progress(len(chunk), f"{run_id} {s}")
            for c in CONDITIONS:
                pred = np.stack([predicted[(t, seed)] for t in texts[s][c] for seed in seeds])
                lab = np.repeat(labels, len(seeds), axis=0)
                frac, all_ok = named_accuracy(pred, lab)
                result.rows[(s, c)], result.all_named[(s, c)] = frac, all_ok
                prov = {
                    "prompt_set": {"name": s, "hash": set_hash(items[s]), "size": len(items[s])},
                    "prompt_enhancer": provenance if c == "enhanced" else None,
                    "solver": solver,
                    "steps": steps,
                    "guidance": guidance,
                    "shift": shift,
                    "seeds": list(seeds),
                    "extractor": {"name": "attribute-net", "recipe_hash": net.recipe_hash},
                    "scored_against": "the attributes the original prompt names",
                }
                for metric, values in (
                    (f"prompt_following/{s}", frac),
                    (f"prompt_following_all/{s}", all_ok),
                ):
                    scores.append(
                        Score(run_id, "run", metric, float(np.mean(values)), len(values), prov)
                    )
        results.append(result)
    put_scores(store, scores)
    return results, [compare(results, s) for s in sets], provenance


def comparisons_json(
    comparisons: Sequence[Comparison], provenance: dict[str, Any], run_ids: Sequence[str]
) -> dict[str, Any]:
    """The JSON the CLI prints with ``--json``."""
    return {
        "prompt_enhancer": provenance,
        "runs": list(run_ids),
        "comparisons": [c.__dict__ for c in comparisons],
    }
