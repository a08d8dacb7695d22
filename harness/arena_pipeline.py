"""The arena pipeline: contestants, paired rendering, judging rounds and judge agreement.

Flow (each step a ``harness`` command, each resumable)::

    harness arena add RUN_ID... --steps 8,25     contestants = (trained run, sampler setting)
    harness arena render --num-prompts 16        every contestant, same prompts, same seeds
    harness judge --judge domain --pairs 50      pairs from the rating engine, verdicts stored
    harness leaderboard                          Bradley-Terry ratings (+ underpowered pairs)
    harness arena agreement                      each judge against the human votes

**Contestants.** A contestant is a run's exported model (``runs.run_dir/final``) at a sampler
setting. Its id is readable and deterministic, ``<run_id>@<solver>-<steps>-cfg<guidance>``
(``timestep/0003/s0@euler-8-cfg3``), so registering the same run and setting again is a no-op and
the id says what it is. The shift is the one the run trained with (the export records it).

**Paired rendering.** Every contestant renders the same prompt set with the same seeds. The
initial noise of an image depends only on its seed (:func:`trainers.sampling.initial_noise`), so
two contestants' images for one (prompt, seed) start from the same noise and any comparison
between them is paired: differences come from the models and settings, not from the draw.
Images go to ``WORKDIR/arena/renders/<contestant>/p<prompt_id>_s<seed>.png`` and the
``renders`` table; a (contestant, prompt_id, seed) already there is skipped, and each batch is
stored as soon as it is rendered, so an interrupted render resumes where it stopped.

**Judging rounds.** :func:`judge_round` asks the rating engine's pair sampler
(:func:`evaluators.ratings.next_pairs`, over the judge's own comparisons so far) which
contestant pairs would most reduce the ranking's uncertainty, picks for each an item (prompt,
seed) both rendered, preferring one this judge never saw for that pair, then one it saw only
in the other left/right order (that measures its position bias), randomises the sides, asks the
judge and stores every verdict with an outcome as a comparison. Verdicts without one are
counted and reported, never stored as votes.

**Agreement.** :func:`judge_agreement` compares each judge with the human votes on the same
(prompt, seed, contestant pair), and measures its swap consistency from the items it judged in
both orders. See its docstring for how ties are counted.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from harness.store import Store, StoreError, decode_json
from trainers.config import EnhancerConfig
from trainers.names import did_you_mean

if TYPE_CHECKING:
    from rich.console import Console

    from evaluators.judging import PairItem, PairJudge
    from trainers.enhance import PromptEnhancer

# The embedded prompts are drawn from the data set's own splits at an index offset of their
# own, so that they are neither the runs' sample-grid prompts (index 0..) nor the periodic
# evaluation's (100_000..): the arena is not scored on the images the trainer looked at.
EMBEDDED_INDEX_OFFSET = 200_000
EMBEDDED_DATA_SEED = 0
RENDERS_DIR = Path("arena") / "renders"
# File prompt ids are CRC-32 of the text (31 bits): the same prompt gets the same id in any
# file and any line order; a collision is detected and refused (see file_prompts).
_FILE_ID_MASK = 0x7FFF_FFFF


class ArenaError(StoreError, ValueError):
    """Refused arena input: an unknown run, a missing export, no renders yet, a bad judge."""


# -- contestants ---------------------------------------------------------------------------------
def _solvers() -> tuple[str, ...]:
    from trainers.config import Solver

    return get_args(Solver)


def contestant_id(
    run_id: str, solver: str, steps: int, guidance: float, enhancer: str | None = None
) -> str:
    """``<run_id>@<solver>-<steps>-cfg<guidance>``, e.g. ``timestep/0003/s0@euler-8-cfg3``;
    with a prompt enhancer its label follows a ``+`` (``...cfg3+shapes@1a2b3c4d``)."""
    cid = f"{run_id}@{solver}-{steps}-cfg{float(guidance):g}"
    return f"{cid}+{enhancer}" if enhancer else cid


def parse_int_list(text: str, what: str) -> list[int]:
    """``"8,25"`` -> ``[8, 25]`` (each >= 1, no repeats); a clear error otherwise."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part.isdigit() or int(part) < 1:
            raise ArenaError(f"{what}: {part!r} in {text!r} is not a whole number >= 1 (e.g. 8,25)")
        if int(part) in values:
            raise ArenaError(f"{what}: {part} is given twice in {text!r}")
        values.append(int(part))
    return values


@dataclass(frozen=True)
class AddedContestant:
    contestant_id: str
    run_id: str
    solver: str
    steps: int
    guidance: float
    shift: float
    created: bool  # False: it was registered before with the same definition


def add_run_contestants(
    store: Store,
    run_ids: Sequence[str],
    *,
    steps: Sequence[int],
    solver: str = "euler",
    guidance: float = 3.0,
    label: str | None = None,
    enhancer: EnhancerConfig | None = None,
) -> list[AddedContestant]:
    """Register one contestant per (run, steps value) at ``solver`` and ``guidance``.

    Every run must be registered in the store and have its export (``run_dir/final``); all runs
    are checked before anything is registered. ``label`` names the contestants in the
    leaderboard (suffixed with the run and/or the setting when several are registered at once).
    ``enhancer``: the contestant's prompts are rewritten by this prompt enhancer before
    rendering; it is built (and checked) now, and its config and provenance (backend and
    version) are part of the contestant (its id ends in ``+<backend>@<version>``).
    """
    solvers = _solvers()
    if solver not in solvers:
        raise ArenaError(
            f"--solver {solver!r} is not one of {', '.join(solvers)}{did_you_mean(solver, solvers)}"
        )
    if not (math.isfinite(guidance) and guidance >= 0.0):
        raise ArenaError(f"--guidance must be a finite number >= 0, got {guidance}")
    if not steps or any(not isinstance(s, int) or s < 1 for s in steps):
        raise ArenaError(f"--steps must be whole numbers >= 1, got {list(steps)}")
    if not run_ids:
        raise ArenaError("name at least one run id (see the `runs` table, e.g. timestep/0000/s0)")
    finals = {run_id: _final_dir(store, run_id) for run_id in dict.fromkeys(run_ids)}
    metas = {run_id: _check_export(run_id, final) for run_id, final in finals.items()}
    enhancer_extra, enhancer_tag = {}, None
    if enhancer is not None:
        prov = _build_enhancer(enhancer).provenance()
        enhancer_extra = {
            "prompt_enhancer": {"config": enhancer.model_dump(mode="json"), "provenance": prov}
        }
        from trainers.enhance import enhancer_label

        enhancer_tag = enhancer_label(prov)
    added = []
    for run_id, final in finals.items():
        meta = metas[run_id]
        shift = float(meta["shift"])
        run_solver, run_guidance = solver, float(guidance)
        if meta.get("distill"):
            # A distilled student samples with its method's sampler ("ode" is Euler) and the
            # teacher's guidance baked in: it is rendered without classifier-free guidance.
            sampler = meta["distill"]["sampler"]
            run_solver, run_guidance = ("euler" if sampler == "ode" else sampler), 1.0
        for n in steps:
            cid = contestant_id(run_id, run_solver, n, run_guidance, enhancer_tag)
            parts = [label] if label else []
            if label and len(finals) > 1:
                parts.append(run_id)
            if label and len(steps) > 1:
                parts.append(f"{run_solver}-{n}")
            created = store.add_contestant(
                cid,
                run_id=run_id,
                label=" ".join(parts) if parts else None,
                solver=run_solver,
                steps=n,
                guidance=run_guidance,
                shift=shift,
                extra={"final_dir": str(final)} | enhancer_extra,
            )
            added.append(AddedContestant(cid, run_id, run_solver, n, run_guidance, shift, created))
    return added


def _build_enhancer(cfg: EnhancerConfig) -> PromptEnhancer:
    from trainers.enhance import EnhancerError, build_enhancer

    try:
        enhancer = build_enhancer(cfg)
    except EnhancerError as err:
        raise ArenaError(f"--enhancer: {err}") from None
    assert enhancer is not None
    return enhancer


def contestant_enhancer(contestant: dict[str, Any]) -> PromptEnhancer | None:
    """The prompt enhancer a contestant renders with (None: prompts as written), rebuilt from
    its stored config; refused if it no longer gives the version it was registered with (its
    renders would mix two rewriters)."""
    from trainers.enhance import enhancer_label

    stored = (contestant.get("extra") or {}).get("prompt_enhancer")
    if not stored:
        return None
    enhancer = _build_enhancer(EnhancerConfig.model_validate(stored["config"]))
    now, then = enhancer.provenance(), stored["provenance"]
    if now.get("version") != then.get("version"):
        raise ArenaError(
            f"contestant {contestant['contestant_id']!r} was registered with prompt enhancer "
            f"{enhancer_label(then)}, but its config now gives {enhancer_label(now)} (the model "
            "or instruction changed): register it again (`harness arena add ... --enhancer`), "
            "which gives a new contestant id"
        )
    return enhancer


def _final_dir(store: Store, run_id: str) -> Path:
    """``runs.run_dir/final`` of a registered run, checked to hold an export."""
    rows = store.query("SELECT run_dir FROM runs WHERE run_id = ?", [run_id])
    if not rows:
        known = [r["run_id"] for r in store.query("SELECT run_id FROM runs ORDER BY run_id")]
        listed = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "") if known else "none"
        raise ArenaError(
            f"unknown run {run_id!r}{did_you_mean(run_id, known)}: it is not registered in "
            f"{store.path} (registered runs: {listed}). Runs are registered by `harness study "
            "run`, or from Python with Store.ingest_run_dir(run_id, run_dir)"
        )
    final = store.run_dir_path(rows[0]["run_dir"]) / "final"  # relative to the work dir
    if not (final / "harness.json").is_file():
        raise ArenaError(
            f"run {run_id!r} has no exported model: {final / 'harness.json'} does not exist. "
            "A run writes final/ when it ends with status ok; finish (resume) the run first"
        )
    return final


def _export_meta(final: Path) -> dict[str, Any]:
    import json

    return json.loads((final / "harness.json").read_text())


def _check_export(run_id: str, final: Path) -> dict[str, Any]:
    """The export's metadata, after loading the model once on the CPU: garbage weights or a
    wrong architecture are refused when the contestant is added, not when it is rendered."""
    from trainers.export import load_export

    try:
        meta = _export_meta(final)
        if not isinstance(meta, dict) or "shift" not in meta:
            raise ValueError(f"{final / 'harness.json'} has no 'shift'")
        load_export(final, device="cpu")
    except Exception as err:  # any failure to load is this export's fault, named below
        why = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err) else ''}"
        raise ArenaError(
            f"run {run_id!r}: the exported model in {final} cannot be loaded ({why}). "
            "Nothing was registered. Re-export it (resume the run so it finishes and writes "
            "final/ again) or leave this run out"
        ) from None
    return meta


# -- prompts -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArenaPrompt:
    prompt_id: int
    prompt: str
    category: str | None  # "seen" / "heldout" for the embedded prompts; None from a file


def embedded_prompts(num_prompts: int, *, data_seed: int = EMBEDDED_DATA_SEED) -> list[ArenaPrompt]:
    """``num_prompts`` captions of the embedded data, alternating seen compositions (val split)
    and held-out ones (never in training); ids 0, 1, ... (stable: prompt i never changes)."""
    from trainers.data.shapes import sample_attrs

    if num_prompts < 1:
        raise ArenaError(f"--num-prompts must be >= 1, got {num_prompts}")
    out = []
    for i in range(num_prompts):
        split = "val" if i % 2 == 0 else "heldout"
        attrs = sample_attrs(data_seed, split, EMBEDDED_INDEX_OFFSET + i // 2)
        out.append(ArenaPrompt(i, attrs.caption, "seen" if split == "val" else "heldout"))
    return out


def file_prompts(path: str | Path, num_prompts: int | None = None) -> list[ArenaPrompt]:
    """Prompts from a text file, one per line (blank lines and ``#`` comments skipped, repeats
    kept once); the first ``num_prompts`` if given. Ids are CRC-32 of the prompt text."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ArenaError(f"cannot read prompts file {path}: {err}") from None
    texts = list(dict.fromkeys(s.strip() for s in lines if s.strip() and not s.startswith("#")))
    if not texts:
        raise ArenaError(f"prompts file {path} has no prompts (one per line)")
    texts = texts[:num_prompts] if num_prompts is not None else texts
    return _text_prompts(str(path), [(t, None) for t in texts])


def _text_prompts(where: str, items: Sequence[tuple[str, str | None]]) -> list[ArenaPrompt]:
    """(text, category) -> prompts with CRC-32 ids; two texts sharing an id are refused."""
    out, seen = [], {}
    for text, category in items:
        pid = zlib.crc32(text.encode()) & _FILE_ID_MASK
        if pid in seen:
            raise ArenaError(f"{where}: prompts {seen[pid]!r} and {text!r} share the id {pid}")
        seen[pid] = text
        out.append(ArenaPrompt(pid, text, category))
    return out


def terse_arena_prompts(num_prompts: int | None = None) -> list[ArenaPrompt]:
    """The shipped terse prompt set (``trainers/data/terse_prompts.jsonl``: one to three
    attributes named), for comparing contestants with and without a prompt enhancer; ids are
    CRC-32 of the text like a file's, categories ``terse-seen`` / ``terse-heldout``."""
    from trainers.data.terse import terse_prompts

    items = [(p.prompt, f"terse-{p.category}") for p in terse_prompts()][:num_prompts]
    return _text_prompts("the terse prompt set", items)


def load_prompts(source: str, num_prompts: int | None) -> list[ArenaPrompt]:
    """``"embedded"`` (default count 16), ``"terse"`` (the terse set, default all 96) or the
    path of a text file."""
    if source == "embedded":
        return embedded_prompts(16 if num_prompts is None else num_prompts)
    if source == "terse":
        return terse_arena_prompts(num_prompts)
    if not Path(source).is_file():
        raise ArenaError(
            f"--prompts {source!r} is neither 'embedded', 'terse' nor an existing text file"
            f"{did_you_mean(source, ['embedded', 'terse'])}"
        )
    return file_prompts(source, num_prompts)


# -- rendering -----------------------------------------------------------------------------------
@dataclass
class RenderSummary:
    rendered: int = 0
    skipped: int = 0  # already rendered
    contestants: int = 0
    not_renderable: list[str] = field(default_factory=list)  # external image sets (no run)


def render_dir(workdir: str | Path, cid: str) -> Path:
    """Where a contestant's renders go: a readable, filesystem-safe name plus a short hash of
    the id (``a/b`` and ``a_b`` must not share a folder)."""
    safe = re.sub(r"[^A-Za-z0-9._@-]+", "_", cid).strip("._") or "contestant"
    digest = hashlib.sha256(cid.encode()).hexdigest()[:8]
    return Path(workdir) / RENDERS_DIR / f"{safe}-{digest}"


def render_contestants(
    store: Store,
    workdir: str | Path,
    prompts: Sequence[ArenaPrompt],
    seeds: Sequence[int],
    *,
    contestants: Sequence[str] | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    progress: bool = True,
    console: Console | None = None,
) -> RenderSummary:
    """Render every contestant (or those named) on ``prompts`` x ``seeds``; skip what the
    ``renders`` table already has. Each batch's PNGs and rows are stored before the next batch
    starts, so Ctrl-C loses at most one batch. Same prompt + seed = same initial noise for all.
    """
    if not prompts:
        raise ArenaError("no prompts to render")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ArenaError(f"seeds must be distinct and at least one, got {list(seeds)}")
    rows = {c["contestant_id"]: c for c in store.contestants()}
    if not rows:
        raise ArenaError(
            f"no contestants in {store.path}: register some first (`harness arena add RUN_ID "
            "--steps 8,25`)"
        )
    wanted = list(contestants) if contestants is not None else sorted(rows)
    for cid in wanted:
        if cid not in rows:
            raise ArenaError(f"unknown contestant {cid!r}{did_you_mean(cid, rows)}")
    _check_prompt_ids(store, prompts)
    summary = RenderSummary()
    todo: dict[str, list[tuple[ArenaPrompt, int]]] = {}
    for cid in wanted:
        if rows[cid]["run_id"] is None:
            summary.not_renderable.append(cid)
            continue
        done = {
            (r["prompt_id"], r["seed"])
            for r in store.query(
                "SELECT prompt_id, seed FROM renders WHERE contestant_id = ?", [cid]
            )
        }
        missing = [(p, s) for p in prompts for s in seeds if (p.prompt_id, s) not in done]
        summary.skipped += len(prompts) * len(seeds) - len(missing)
        summary.contestants += 1
        if missing:
            todo[cid] = missing
    total = sum(len(v) for v in todo.values())
    with _progress(progress, console, total, "rendering") as advance:
        for cid, items in todo.items():
            model = _load_contestant_model(store, rows[cid], device)
            model.enhancer = contestant_enhancer(rows[cid])
            out = render_dir(workdir, cid)
            out.mkdir(parents=True, exist_ok=True)
            for i in range(0, len(items), batch_size):
                batch = items[i : i + batch_size]
                _render_batch(store, rows[cid], model, out, batch)
                summary.rendered += len(batch)
                advance(len(batch), cid)
    return summary


def _check_prompt_ids(store: Store, prompts: Sequence[ArenaPrompt]) -> None:
    """A prompt id must mean one prompt text in a work dir: refuse a set that reuses an id."""
    ids = [p.prompt_id for p in prompts]
    stored = store.query(
        "SELECT DISTINCT prompt_id, prompt FROM renders WHERE prompt_id IN (SELECT unnest(?))",
        [ids],
    )
    texts = {p.prompt_id: p.prompt for p in prompts}
    for r in stored:
        if texts[r["prompt_id"]] != r["prompt"]:
            raise ArenaError(
                f"prompt id {r['prompt_id']} was rendered for {r['prompt']!r}, but this prompt "
                f"set has {texts[r['prompt_id']]!r} there: one work dir holds one meaning per "
                "prompt id. Use another --workdir, or the prompt set that was rendered before"
            )


def _load_contestant_model(store: Store, row: dict[str, Any], device: str) -> Any:
    import torch

    from trainers.export import load_export

    final = _final_dir(store, row["run_id"])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_export(final, device=device)


def _render_batch(
    store: Store,
    contestant: dict[str, Any],
    model: Any,
    out: Path,
    batch: list[tuple[ArenaPrompt, int]],
) -> None:
    """Generate one batch, write its PNGs, register them in one transaction."""
    from PIL import Image

    from trainers.data.shapes import to_uint8

    # generate() draws the initial noise from each item's seed alone (initial_noise), so this
    # image starts from the same noise for every contestant; that is what pairs comparisons.
    enhancer = getattr(model, "enhancer", None)
    texts = [p.prompt for p, _ in batch]
    given = texts if enhancer is None else enhancer.enhance(texts)
    images = model.generate(
        given,
        [s for _, s in batch],
        steps=contestant["steps"],
        solver=contestant["solver"],
        guidance=contestant["guidance"],
        shift=contestant["shift"],
    )
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()  # [B, H, W, 3]
    extra = {
        "run_id": contestant["run_id"],
        "solver": contestant["solver"],
        "steps": contestant["steps"],
        "guidance": contestant["guidance"],
        "shift": contestant["shift"],
        "resolution": list(pixels.shape[1:3]),
    }
    if enhancer is not None:
        extra["prompt_enhancer"] = enhancer.provenance()
    rows = []
    for (p, seed), px, text in zip(batch, pixels, given, strict=True):
        path = (out / f"p{p.prompt_id:06d}_s{seed}.png").resolve()
        Image.fromarray(px).save(path)
        rows.append(
            {
                "contestant_id": contestant["contestant_id"],
                "prompt_id": p.prompt_id,
                "prompt": p.prompt,
                "category": p.category,
                "seed": seed,
                "path": str(path),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                # The original prompt is the render's prompt (what raters judge against); the
                # text the model was given is kept beside it.
                "extra": extra | ({"enhanced_prompt": text} if enhancer is not None else {}),
                "time": time.time(),
            }
        )
    store.add_renders(rows)


def renders(store: Store, contestant: str | None = None) -> list[dict[str, Any]]:
    """Rows of the ``renders`` table (``extra`` decoded), by contestant, prompt id, seed."""
    sql, params = "SELECT * FROM renders", []
    if contestant is not None:
        sql, params = sql + " WHERE contestant_id = ?", [contestant]
    return decode_json(store.query(sql + " ORDER BY contestant_id, prompt_id, seed", params))


@contextmanager
def _progress(enabled: bool, console: Console | None, total: int, what: str) -> Iterator[Any]:
    """A rich progress bar; yields ``advance(n, note)``."""
    from harness.live import progress_bar

    bar = progress_bar(
        console, f"{what} [dim]{{task.fields[note]}}", disable=not enabled or total == 0
    )
    with bar:
        task = bar.add_task(what, total=total, note="")
        yield lambda n, note="": bar.update(task, advance=n, note=note)


# -- judges --------------------------------------------------------------------------------------
def build_judge(name: str, store: Store, **options: Any) -> PairJudge:
    """The judge called ``name`` in the registry :data:`evaluators.judging.JUDGES`: ``domain``
    (the attribute network, offline), ``openai`` (an OpenAI-compatible API) or ``local:<dir>``
    (a local vision-language model); each judge's module is imported only when asked for. A
    name the registry refuses is an :class:`ArenaError` that says what is allowed."""
    from evaluators.judging import JudgeError
    from evaluators.judging import build_judge as build

    try:
        return build(name, store, **options)
    except JudgeError as err:
        raise ArenaError(str(err)) from None


@dataclass
class JudgeSummary:
    rater_id: str
    asked: int = 0  # verdicts asked for
    stored: int = 0  # comparisons stored
    no_verdict: int = 0  # verdicts with outcome None (not stored)
    no_verdict_reasons: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (a, b, why)
    interrupted: bool = False


def _render_index(store: Store) -> dict[str, dict[tuple[int, int], dict[str, Any]]]:
    index: dict[str, dict[tuple[int, int], dict[str, Any]]] = defaultdict(dict)
    for r in store.query(
        "SELECT contestant_id, prompt_id, prompt, category, seed, path FROM renders"
    ):
        index[r["contestant_id"]][(r["prompt_id"], r["seed"])] = r
    return index


def _empty_counts(names: Sequence[str]) -> Any:
    import numpy as np

    from evaluators.ratings import PairCounts

    return PairCounts(tuple(names), np.zeros((0, 2), np.int64), np.zeros((0, 4), np.int64))


def plan_pairs(
    store: Store,
    rater_id: str,
    pairs: int,
    *,
    seed: int | None = None,
    contestants: Sequence[str] | None = None,
) -> tuple[list[PairItem], list[tuple[str, str, str]]]:
    """The items of one judging round, and the sampled pairs left out: ``(a, b, why)``.

    Pairs and items come from :func:`harness.voting.choose_pairs` over this rater's
    comparisons so far (``seed`` defaults to their number, so every round differs and a rerun
    of the same state gives the same plan): information first (``next_pairs``), every
    contestant covered, and never a (pair, prompt, seed) this rater already judged while an
    unjudged one exists anywhere; once all are judged, the least-judged come back (one judged
    once is shown in the other order). Never the same item twice in a round (slots beyond the
    items left are reported as skipped). Sides are random. ``contestants``: only pairs among
    these (e.g. a tuned model and its base); default every rendered one.
    """
    from evaluators.judging import PairItem
    from evaluators.ratings import aggregate

    if pairs < 1:
        raise ArenaError(f"--pairs must be >= 1, got {pairs}")
    index = _render_index(store)
    names = sorted(c for c, items in index.items() if items)
    if contestants is not None:
        for cid in contestants:
            if cid not in names:
                raise ArenaError(
                    f"contestant {cid!r}{did_you_mean(cid, names)} has no renders in "
                    f"{store.path}; rendered: {', '.join(names) or 'none'}"
                )
        names = sorted(set(contestants))
    if len(names) < 2:
        raise ArenaError(
            f"no renders yet to judge in {store.path} ({len(names)} contestant(s) rendered, need "
            "2): run `harness arena add RUN_ID --steps ...` and `harness arena render` first"
        )
    mine = store.query(
        "SELECT left_id, right_id, outcome, prompt, seed FROM comparisons WHERE rater_id = ? "
        "ORDER BY time, comparison_id",
        [rater_id],
    )
    from harness.voting import choose_pairs, item_key

    known = set(names)
    battles = [
        (r["left_id"], r["right_id"], r["outcome"])
        for r in mine
        if r["left_id"] in known and r["right_id"] in known
    ]
    counts = aggregate(battles, names=names) if battles else _empty_counts(names)
    seed = len(mine) if seed is None else seed
    rng = random.Random(seed)
    # (pair, prompt, seed) -> the (left, right) orders this rater already judged it in
    judged: dict[tuple[frozenset[str], str, int], list[tuple[str, str]]] = defaultdict(list)
    for r in mine:
        key = item_key(r["left_id"], r["right_id"], r["prompt"], r["seed"])
        judged[key].append((r["left_id"], r["right_id"]))
    prompts = {c: {k: row["prompt"] for k, row in index[c].items()} for c in names}
    times = {key: len(orders) for key, orders in judged.items()}
    picks, skipped = choose_pairs(names, prompts, times, counts, pairs, seed=seed, rng=rng)
    items = []
    for pick in picks:
        left, right = pick.sides
        k = pick.key
        seen = set(judged.get(item_key(left, right, index[left][k]["prompt"], k[1]), ()))
        if len(seen) == 1 and (left, right) in seen:  # judged once: show the other order
            left, right = right, left
        la, ra = index[left][k], index[right][k]
        items.append(
            PairItem(
                la["prompt"],
                int(k[1]),
                left,
                right,
                Path(la["path"]),
                Path(ra["path"]),
                la["category"],
            )
        )
    return items, skipped


def judge_round(
    store: Store,
    judge: PairJudge,
    pairs: int,
    *,
    seed: int | None = None,
    contestants: Sequence[str] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    console: Console | None = None,
) -> JudgeSummary:
    """Plan ``pairs`` items (:func:`plan_pairs`), ask ``judge`` in batches, store each batch's
    verdicts that have an outcome as comparisons (``rater_id``/``rater_kind`` from the judge,
    the render paths as images, the verdict detail in ``extra.verdict``). Ctrl-C stops after
    the current batch is lost and returns what was stored (``interrupted``). ``contestants``:
    only pairs among these."""
    items, skipped = plan_pairs(store, judge.rater_id, pairs, seed=seed, contestants=contestants)
    store.add_rater(judge.rater_id, judge.kind, name=getattr(judge, "name", None))
    summary = JudgeSummary(judge.rater_id, skipped=skipped)
    try:
        with _progress(progress, console, len(items), f"judging ({judge.rater_id})") as advance:
            for i in range(0, len(items), batch_size):
                batch = items[i : i + batch_size]
                verdicts = list(judge.judge_pairs(batch))
                if len(verdicts) != len(batch):
                    raise ArenaError(
                        f"judge {judge.rater_id!r} returned {len(verdicts)} verdicts for "
                        f"{len(batch)} pairs; a judge answers one verdict per pair"
                    )
                _store_verdicts(store, judge, batch, verdicts, summary)
                advance(len(batch), f"{summary.stored} stored")
    except KeyboardInterrupt:
        summary.interrupted = True
    return summary


@dataclass
class UntilSummary:
    """What :func:`judge_until_width` did: every round's summary, the widest 95% interval
    after the last round (None before any vote), whether it reached the target, and why it
    stopped (``reached``, ``exhausted``, ``max_votes``, ``no_verdicts``, ``interrupted``)."""

    rater_id: str
    width: float
    rounds: list[JudgeSummary] = field(default_factory=list)
    widest: float | None = None
    widest_contestant: str | None = None
    reached: bool = False
    reason: str = ""

    @property
    def asked(self) -> int:
        return sum(r.asked for r in self.rounds)

    @property
    def stored(self) -> int:
        return sum(r.stored for r in self.rounds)


def interval_widths(
    store: Store,
    rater_id: str,
    names: Sequence[str] | None = None,
    *,
    rounds: int = 1000,
) -> dict[str, float]:
    """Each contestant's 95% interval width (upper - lower, rating points) on a leaderboard of
    ``rater_id``'s votes only (among ``names`` when given): the same rows as
    ``harness leaderboard`` computes (:func:`harness.arena.rating_intervals`), so provisional
    contestants get the widened interval. A contestant with no vote is absent."""
    from evaluators.ratings import aggregate
    from harness.arena import NOT_GOLD, rating_intervals

    rows = store.query(
        f"SELECT left_id, right_id, outcome FROM comparisons WHERE rater_id = ? AND {NOT_GOLD} "
        "ORDER BY time, comparison_id",
        [rater_id],
    )
    keep = None if names is None else set(names)
    battles = [
        (r["left_id"], r["right_id"], r["outcome"])
        for r in rows
        if keep is None or (r["left_id"] in keep and r["right_id"] in keep)
    ]
    if not battles:
        return {}
    # Only the intervals: not the Elo and top-flip search of a full leaderboard, every round.
    counts = aggregate(battles)
    _, lower, upper, _ = rating_intervals(counts, rounds=rounds)
    return {name: float(upper[k] - lower[k]) for k, name in enumerate(counts.names)}


def _fresh_left(store: Store, rater_id: str, names: Sequence[str]) -> int:
    """How many (pair, prompt, seed) combinations among ``names`` ``rater_id`` never judged."""
    from harness.voting import item_key

    index = _render_index(store)
    done = {
        item_key(r["left_id"], r["right_id"], r["prompt"], r["seed"])
        for r in store.query(
            "SELECT left_id, right_id, prompt, seed FROM comparisons WHERE rater_id = ?",
            [rater_id],
        )
    }
    left = 0
    for a, b in itertools.combinations(sorted(names), 2):
        for k in set(index[a]) & set(index[b]):
            left += item_key(a, b, index[a][k]["prompt"], k[1]) not in done
    return left


def judge_until_width(
    store: Store,
    judge: PairJudge,
    width: float,
    *,
    pairs: int = 20,
    max_votes: int | None = None,
    contestants: Sequence[str] | None = None,
    batch_size: int = 8,
    rounds: int = 1000,
    report: Callable[[str], None] = print,
    progress: bool = False,
    console: Console | None = None,
) -> UntilSummary:
    """Judge rounds of ``pairs`` (:func:`judge_round`) until every contestant's 95% interval
    (:func:`interval_widths`, this judge's votes) is at most ``width`` rating points. Also
    stops when this judge has judged every (pair, prompt, seed) combination (``exhausted``),
    when ``max_votes`` verdicts were asked for (``max_votes``), when a whole round stored
    nothing (``no_verdicts``: the judge answers nothing, more rounds would only repeat that)
    or on Ctrl-C. A round is shortened to the cap and to the unjudged combinations left, so
    this never asks a repeat. ``report`` gets one line per round and one saying why it
    stopped."""
    if width <= 0:
        raise ArenaError(f"--until-width must be > 0 rating points, got {width}")
    if max_votes is not None and max_votes < 1:
        raise ArenaError(f"--max-votes must be >= 1, got {max_votes}")
    if contestants is not None:
        names = sorted(set(contestants))
    else:
        names = sorted(c for c, items in _render_index(store).items() if items)
    out = UntilSummary(judge.rater_id, width)

    def measure() -> bool:
        widths = interval_widths(store, judge.rater_id, names, rounds=rounds)
        missing = [c for c in names if c not in widths]
        if missing:  # a contestant without a vote has no interval at all
            out.widest, out.widest_contestant = math.inf, missing[0]
        elif widths:
            out.widest_contestant, out.widest = max(widths.items(), key=lambda kv: kv[1])
        return out.widest is not None and out.widest <= width

    while True:
        if measure():
            out.reached, out.reason = True, "reached"
            break
        fresh = _fresh_left(store, judge.rater_id, names)
        if fresh == 0:
            out.reason = "exhausted"
            break
        # No more than the fresh combinations left: a repeat would add no new information.
        cap = fresh if max_votes is None else min(fresh, max_votes - out.asked)
        budget = min(pairs, cap)
        if budget < 1:
            out.reason = "max_votes"
            break
        summary = judge_round(
            store,
            judge,
            budget,
            contestants=contestants,
            batch_size=batch_size,
            progress=progress,
            console=console,
        )
        out.rounds.append(summary)
        measure()
        widest = "no votes yet" if out.widest is None else f"{out.widest:.1f}"
        report(
            f"round {len(out.rounds)}: {summary.asked} asked, {summary.stored} stored "
            f"({out.stored} in all); widest 95% interval {widest} "
            f"({out.widest_contestant}), target {width:g}"
        )
        if summary.interrupted:
            out.reason = "interrupted"
            break
        if summary.stored == 0:
            out.reason = "no_verdicts"
            break
    report(_until_message(out))
    return out


def _until_message(out: UntilSummary) -> str:
    widest = "no votes" if out.widest is None else f"{out.widest:.1f} ({out.widest_contestant})"
    if out.reached:
        return (
            f"reached: every 95% interval <= {out.width:g} rating points (widest {widest}) "
            f"after {out.stored} stored comparisons"
        )
    why = {
        "exhausted": "every (pair, prompt, seed) combination is judged by this judge; render "
        "more prompts or seeds (`harness arena render`) to go on",
        "max_votes": f"the --max-votes cap of {out.asked} verdicts asked was hit; raise it",
        "no_verdicts": "the last round stored no verdict (see the reasons above)",
        "interrupted": "interrupted (Ctrl-C); what was stored is kept",
    }[out.reason]
    return f"NOT reached: widest 95% interval {widest} > {out.width:g}; stopped: {why}"


def _store_verdicts(
    store: Store,
    judge: PairJudge,
    batch: Sequence[PairItem],
    verdicts: Sequence[Any],
    summary: JudgeSummary,
) -> None:
    rows = []
    for item, verdict in zip(batch, verdicts, strict=True):
        summary.asked += 1
        if verdict.outcome is None:
            summary.no_verdict += 1
            reason = str(verdict.detail.get("error", "no reason given"))[:200]
            summary.no_verdict_reasons[reason] = summary.no_verdict_reasons.get(reason, 0) + 1
            continue
        summary.outcomes[verdict.outcome] = summary.outcomes.get(verdict.outcome, 0) + 1
        rows.append(
            {
                "prompt": item.prompt,
                "seed": item.seed,
                "left_id": item.left_id,
                "right_id": item.right_id,
                "left_image": str(item.left_image),
                "right_image": str(item.right_image),
                "outcome": verdict.outcome,
                "rater_id": judge.rater_id,
                "rater_kind": judge.kind,
                "time": time.time(),
                "extra": {"verdict": dict(verdict.detail), "category": item.category},
            }
        )
    if rows:
        summary.stored += store.add_comparisons(rows).inserted


# -- agreement -----------------------------------------------------------------------------------
def _canonical(left: str, right: str, outcome: str) -> tuple[tuple[str, str], str]:
    """(pair sorted, label): label ``first``/``second`` names the winner in sorted order, and
    ``none`` stands for tie and both_bad alike (neither image preferred)."""
    a, b = sorted((left, right))
    if outcome == "left":
        return (a, b), "first" if left == a else "second"
    if outcome == "right":
        return (a, b), "first" if right == a else "second"
    return (a, b), "none"


def judge_agreement(store: Store) -> list[dict[str, Any]]:
    """Per judge rater (kind ``judge`` or ``domain``): agreement with human votes and swap
    consistency.

    Items are (prompt, seed, unordered contestant pair); sides are normalised away. Each
    outcome becomes one of three labels: the first contestant preferred, the second preferred,
    or *neither* (``tie`` and ``both_bad`` both mean no preference: the rating engine counts
    them alike, and whether two bad images are "a tie" or "both bad" is a judgement of quality,
    not of which is better).

    * ``agreement``: over every (judge verdict, human vote) on the same item, the fraction with
      the same label (so a tie matches only a tie or both_bad). Several humans on one item each
      count: a contested item weighs as much as it was contested.
    * ``decisive_agreement``: the same over the couples where both picked a winner, i.e. "when
      both prefer one image, is it the same one?".
    * ``swap_consistency``: over the items this judge judged in both left/right orders, every
      (one order, other order) couple of its stored verdicts, the fraction with the same label;
      plus each verdict that asked both orders itself and says whether its two answers agreed
      (the MLLM judge's ``answers`` + ``agree``, or ``swap_consistent``).

    Gold votes (attention checks, ``extra.gold``) are left out, as in the leaderboard.
    """
    from harness.arena import NOT_GOLD

    rows = decode_json(
        store.query(
            "SELECT prompt, seed, left_id, right_id, outcome, rater_id, rater_kind, extra "
            f"FROM comparisons WHERE {NOT_GOLD} ORDER BY time, comparison_id"
        )
    )
    human: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    judges: dict[str, dict[str, Any]] = {}
    for r in rows:
        pair, label = _canonical(r["left_id"], r["right_id"], r["outcome"])
        key = (r["prompt"], r["seed"], *pair)
        if r["rater_kind"] == "human":
            human[key].append(label)
            continue
        j = judges.setdefault(
            r["rater_id"],
            {"kind": r["rater_kind"], "items": defaultdict(list), "detail_swaps": []},
        )
        j["items"][key].append((r["left_id"] == pair[0], label))
        swapped = _detail_swap(r["extra"])
        if swapped is not None:
            j["detail_swaps"].append(swapped)
    return [_agreement_row(rater, j, human) for rater, j in sorted(judges.items())]


def _detail_swap(extra: dict[str, Any] | None) -> bool | None:
    """Whether a verdict that asked both orders itself got the same outcome in both: the MLLM
    judge's detail has ``answers`` (one per order) and ``agree``; other judges may report
    ``swap_consistent``. None when the verdict says nothing about it."""
    verdict = (extra or {}).get("verdict") or {}
    if isinstance(verdict.get("swap_consistent"), bool):
        return verdict["swap_consistent"]
    if len(verdict.get("answers") or ()) == 2 and isinstance(verdict.get("agree"), bool):
        return verdict["agree"]
    return None


def _rate(hits: int, n: int) -> float | None:
    return hits / n if n else None


def _agreement_row(
    rater: str, j: dict[str, Any], human: dict[tuple[Any, ...], list[str]]
) -> dict[str, Any]:
    n = agree = decisive = decisive_agree = 0
    swaps = swap_ok = 0
    for key, verdicts in j["items"].items():
        for _, label in verdicts:
            for vote in human.get(key, ()):
                n += 1
                agree += label == vote
                if label != "none" and vote != "none":
                    decisive += 1
                    decisive_agree += label == vote
        forward = [label for sorted_side, label in verdicts if sorted_side]
        backward = [label for sorted_side, label in verdicts if not sorted_side]
        for f in forward:
            for b in backward:
                swaps += 1
                swap_ok += f == b
    swaps += len(j["detail_swaps"])
    swap_ok += sum(j["detail_swaps"])
    return {
        "rater_id": rater,
        "kind": j["kind"],
        "judged_items": len(j["items"]),
        "human_pairs": n,
        "agree": agree,
        "agreement": _rate(agree, n),
        "decisive_pairs": decisive,
        "decisive_agree": decisive_agree,
        "decisive_agreement": _rate(decisive_agree, decisive),
        "swap_pairs": swaps,
        "swap_consistent": swap_ok,
        "swap_consistency": _rate(swap_ok, swaps),
    }


# -- leaderboard: underpowered pairs -------------------------------------------------------------
def underpowered_pairs(
    store: Store,
    rater_kind: str | None = None,
    *,
    rounds: int = 1000,
    seed: int = 0,
    min_battles: int = 20,
) -> list[dict[str, Any]]:
    """For each pair of neighbours in the leaderboard order (the comparisons a reader makes),
    :func:`evaluators.ratings.pair_power`'s verdict: ``a, b, underpowered, reason, battles,
    difference, lower, upper``. Same votes, rounds and seed as :func:`harness.arena.leaderboard`
    (gold votes left out), so the intervals match the table."""
    from evaluators.ratings import aggregate, bootstrap_ratings, pair_power
    from harness.arena import NOT_GOLD
    from harness.store import check_rater_kind

    sql, params = f"SELECT left_id, right_id, outcome FROM comparisons WHERE {NOT_GOLD}", []
    if rater_kind is not None:
        sql += " AND rater_kind = ?"
        params.append(check_rater_kind(rater_kind))
    battles = [
        (r["left_id"], r["right_id"], r["outcome"])
        for r in store.query(sql + " ORDER BY time, comparison_id", params)
    ]
    if not battles:
        return []
    counts = aggregate(battles)
    ratings = bootstrap_ratings(counts, rounds=rounds, seed=seed)
    order = [str(row["name"]) for row in ratings.table()]
    out = []
    for a, b in itertools.pairwise(order):
        p = pair_power(counts, ratings, a, b, min_battles=min_battles)
        out.append(
            {
                "a": a,
                "b": b,
                "underpowered": p.underpowered,
                "reason": p.reason,
                "battles": p.battles,
                "difference": p.difference,
                "lower": p.lower,
                "upper": p.upper,
            }
        )
    return out
