"""``harness eval``: score a run's samples or an image folder and store the scores.

What is evaluated (``RUN_OR_SAMPLES``), tried in this order:

1. a run id registered in the store (``runs`` table): its samples come from the ``samples``
   table (prompt, seed, steps, cfg, solver, shift), the images from ``<run_dir>/samples/``;
2. a run directory (has ``samples/manifest.jsonl``): the manifest gives the same fields; if the
   store knows a run with that directory the scores are filed under its run id;
3. a plain image folder: every image in it, captions from a ``metadata.jsonl`` sidecar
   (``{"file_name", "text"}`` lines, the layout :mod:`trainers.data.folder` reads) if present.

One sample set is scored: ``--tag`` (e.g. ``step_000500``), else ``final``, else the latest step.

Reference (real images) for FID / KID / CMMD: ``--reference embedded`` is the embedded shapes
data's ``val`` split rendered at the samples' resolution (with the run's ``data.seed``);
``--reference FOLDER`` an image folder, loaded at the samples' resolution (shorter side resized,
centre crop) so real and generated images reach the extractor through the same resize. A run
trained on shapes defaults to ``embedded``, a run trained on a folder to that folder; a plain
folder has no default.

Every score is stored in the ``scores`` table with its provenance (:mod:`evaluators.scores`)
and printed as a table. Weights are resolved before any image is processed, so a missing file
fails in a second, not after minutes of feature extraction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from evaluators.metrics import METRICS
from harness.store import SAMPLE_COLUMNS, Store, decode_json
from harness.workpaths import store_work_root, to_stored
from trainers.names import did_you_mean

__all__ = [
    "ALL_METRICS",
    "EvalError",
    "EvalOptions",
    "ImageSet",
    "evaluate",
    "load_image_set",
    "parse_metrics",
    "print_scores",
]

ALL_METRICS: tuple[str, ...] = tuple(METRICS)
DEFAULT_METRICS = "fid,kid,cmmd,clip_score"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# The samples columns a score needs to describe its images (not the hash or extras).
_SAMPLE_FIELDS = tuple(c for c in SAMPLE_COLUMNS if c not in ("sha256", "extra"))


class EvalError(ValueError):
    """Bad input to ``harness eval``; the message names the problem and the fix."""


@dataclass(frozen=True)
class EvalOptions:
    """Everything ``harness eval`` takes besides the target (the CLI's options)."""

    metrics: tuple[str, ...] = ("fid", "kid", "cmmd", "clip_score")
    reference: str | None = None
    reference_size: int = 1000
    tag: str | None = None
    inception: str | None = None
    clip: str | None = None
    resize: str = "clean"
    batch_size: int = 32
    device: str = "cpu"
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 0
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        from evaluators.extractors import RESIZE_MODES

        if self.resize not in RESIZE_MODES:
            raise EvalError(
                f"--resize {self.resize!r}{did_you_mean(self.resize, RESIZE_MODES)}: allowed "
                f"{', '.join(RESIZE_MODES)}"
            )
        if self.reference_size < 2 or self.batch_size < 1 or self.kid_subsets < 1:
            raise EvalError("--reference-size must be >= 2 and --batch-size >= 1")


@dataclass
class ImageSet:
    """The images being scored, what they are, and how they were made."""

    target: str
    target_kind: str  # run | folder
    images: Tensor  # uint8 [N, 3, R, R]
    prompts: list[str] | None
    provenance: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)  # the run config's data section

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])


def parse_metrics(text: str) -> tuple[str, ...]:
    """``"fid,kid"`` -> ``("fid", "kid")``; unknown names get a "did you mean"."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise EvalError(f"--metrics is empty; allowed: {', '.join(ALL_METRICS)}")
    for m in names:
        if m not in ALL_METRICS:
            raise EvalError(
                f"unknown metric {m!r}{did_you_mean(m, ALL_METRICS)}; allowed: "
                f"{', '.join(ALL_METRICS)}"
            )
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# What is evaluated


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise EvalError(f"cannot read sample image {path} ({type(err).__name__}: {err})") from None


def _stack(arrays: Sequence[np.ndarray], where: str) -> Tensor:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise EvalError(f"{where}: images of different sizes {sorted(shapes)}; pass one --tag")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _one_or_all(values: Sequence[Any]) -> Any:
    distinct = sorted({v for v in values if v is not None}, key=repr)
    return distinct[0] if len(distinct) == 1 else (distinct or None)


def _pick_tag(records: list[dict[str, Any]], tag: str | None, where: str) -> list[dict[str, Any]]:
    tags = sorted({str(r.get("tag")) for r in records})
    if tag is None:
        if "final" in tags:
            tag = "final"
        else:
            last = max(records, key=lambda r: (r.get("step") or -1, str(r.get("tag"))))
            tag = str(last.get("tag"))
    chosen = [r for r in records if str(r.get("tag")) == tag]
    if not chosen:
        raise EvalError(
            f"{where} has no samples tagged {tag!r}{did_you_mean(tag, tags)}; tags: "
            f"{', '.join(tags)}"
        )
    return chosen


def _samples_set(
    target: str,
    kind: str,
    run_dir: Path,
    records: list[dict[str, Any]],
    tag: str | None,
    data: dict[str, Any],
) -> ImageSet:
    where = f"run {target}"
    if not records:
        raise EvalError(f"{where} has no samples (empty {run_dir / 'samples' / 'manifest.jsonl'})")
    chosen = sorted(
        _pick_tag(records, tag, where), key=lambda r: (r.get("prompt_id") or 0, r.get("seed") or 0)
    )
    images = _stack([_read_png(run_dir / "samples" / r["path"]) for r in chosen], where)
    prompts = [r.get("prompt") for r in chosen]
    listing = [[r.get("prompt_id"), r.get("prompt"), r.get("seed")] for r in chosen]
    provenance = {
        "kind": "samples",
        "tag": chosen[0].get("tag"),
        "step": _one_or_all([r.get("step") for r in chosen]),
        "resolution": int(images.shape[-1]),
        "sampler": {
            "solver": _one_or_all([r.get("solver") for r in chosen]),
            "steps": _one_or_all([r.get("steps") for r in chosen]),
            "nfe": _one_or_all([r.get("nfe") for r in chosen]),
            "guidance": _one_or_all([r.get("cfg") for r in chosen]),
            "shift": _one_or_all([r.get("shift") for r in chosen]),
        },
        "seeds": sorted({r.get("seed") for r in chosen if r.get("seed") is not None}),
        # The exact (prompt id, prompt, seed) list: two sets are paired only if it matches.
        "prompts_sha256": hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16],
    }
    enhancer = _enhancer_of(chosen)
    if enhancer is not None:
        # The prompt enhancer that rewrote the prompts (backend, version): scores of images made
        # from other texts are never compared as if paired. Absent without one, so the scores
        # stored before enhancers existed keep their provenance hash.
        provenance["prompt_enhancer"] = enhancer
    has_prompts = all(isinstance(p, str) and p for p in prompts)
    return ImageSet(target, kind, images, prompts if has_prompts else None, provenance, data)


def _enhancer_of(records: Sequence[dict[str, Any]]) -> Any:
    """The samples' prompt enhancer provenance (a manifest has it at the top level, the store
    in ``extra``): one dict, a list if they differ, None if there was none."""
    found = []
    for r in records:
        prov = r.get("prompt_enhancer") or (r.get("extra") or {}).get("prompt_enhancer")
        if prov is not None and prov not in found:
            found.append(prov)
    return found[0] if len(found) == 1 else (found or None)


def _folder_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    )


def _first_side(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return min(im.size)


def _folder_images(
    folder: Path, resolution: int | None, limit: int | None = None, *, captions: bool = True
) -> tuple[Tensor, list[str] | None, list[Path]]:
    """uint8 images (shorter side -> resolution, centre crop), and the files: with ``captions``
    and a ``metadata.jsonl``, the images it lists (in its order) and their captions; else every
    image file, sorted by path, and no captions."""
    from trainers.data.folder import METADATA_FILE, ImageFolderDataset, load_square_rgb

    if captions and (folder / METADATA_FILE).is_file():
        ds_res = resolution
        if ds_res is None:  # the first listed image's shorter side
            with (folder / METADATA_FILE).open(encoding="utf-8") as fh:
                first = next((line for line in fh if line.strip()), "{}")
            try:
                ds_res = _first_side(folder / json.loads(first)["file_name"])
            except (ValueError, KeyError, TypeError, OSError):
                ds_res = 256  # the dataset below reports the bad line precisely
        ds = ImageFolderDataset(folder, ds_res)
        images, captions, files = ds.images, list(ds.captions), list(ds.files)
        if limit is not None:
            images, captions, files = images[:limit], captions[:limit], files[:limit]
        return images, captions, files
    files = _folder_files(folder)
    if not files:
        raise EvalError(
            f"{folder} holds no images ({', '.join(sorted(_IMAGE_SUFFIXES))}); point at a run, "
            "a run directory or an image folder"
        )
    files = files[:limit] if limit is not None else files
    res = resolution if resolution is not None else _first_side(files[0])
    arrays = []
    for f in files:
        try:
            arrays.append(load_square_rgb(f, res))
        except (OSError, ValueError, SyntaxError) as err:
            raise EvalError(f"cannot read image {f} ({type(err).__name__}: {err})") from None
    return _stack(arrays, str(folder)), None, files


def _files_sha256(files: Sequence[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def load_image_set(target: str, store: Store, tag: str | None = None) -> ImageSet:
    """Resolve ``RUN_OR_SAMPLES`` (run id, run directory or image folder) to its images."""
    rows = store.query("SELECT run_dir, config FROM runs WHERE run_id = ?", [target])
    if rows:
        run_dir = store.run_dir_path(rows[0]["run_dir"])  # recorded relative to the work dir
        data = (json.loads(rows[0]["config"]) or {}).get("data") or {}
        cols = ", ".join(_SAMPLE_FIELDS)
        records = decode_json(
            store.query(f"SELECT {cols}, extra FROM samples WHERE run_id = ?", [target])
        )
        if not records and (run_dir / "samples" / "manifest.jsonl").is_file():
            records = _read_manifest(run_dir / "samples" / "manifest.jsonl")
        return _samples_set(target, "run", run_dir, records, tag, data)
    path = Path(target).expanduser()
    if not path.is_dir():
        known = [r["run_id"] for r in store.query("SELECT run_id FROM runs ORDER BY run_id")]
        raise EvalError(
            f"{target!r} is neither a run id in {store.path}{did_you_mean(target, known)} nor a "
            "directory; pass a run id, a run directory (with samples/manifest.jsonl) or an "
            "image folder"
        )
    path = path.resolve()
    manifest = path / "samples" / "manifest.jsonl"
    if manifest.is_file():
        # Recorded relative to the work directory (absolute by stores written before).
        stored = to_stored(path, store_work_root(store))
        rows = store.query(
            "SELECT run_id FROM runs WHERE run_dir = ? OR run_dir = ?", [stored, str(path)]
        )
        data = {}
        if (path / "config.json").is_file():
            cfg = json.loads((path / "config.json").read_text())
            data = (cfg.get("config", cfg) or {}).get("data") or {}
        if rows:
            return _samples_set(rows[0]["run_id"], "run", path, _read_manifest(manifest), tag, data)
        return _samples_set(str(path), "folder", path, _read_manifest(manifest), tag, data)
    if tag is not None:
        raise EvalError(f"--tag applies to a run's samples; {path} is a plain image folder")
    images, captions, files = _folder_images(path, None)
    provenance = {
        "kind": "folder",
        "resolution": int(images.shape[-1]),
        "sampler": None,
        "seeds": None,
        "files_sha256": _files_sha256(files, path),
    }
    return ImageSet(str(path), "folder", images, captions, provenance)


def _read_manifest(path: Path) -> list[dict[str, Any]]:
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise EvalError(f"{path}:{lineno}: not valid JSON ({err})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
            raise EvalError(f"{path}:{lineno}: a manifest record needs a 'path' string")
        out.append(rec)
    return out


# ---------------------------------------------------------------------------------------------
# The reference


def reference_source(spec: str | None, image_set: ImageSet, size: int) -> Any:
    """The :class:`~evaluators.image_metrics.ReferenceSource` for ``--reference`` (or the
    default for the image set: the run's training data); ``size`` images will be used."""
    from evaluators.image_metrics import ReferenceSource

    res = image_set.resolution
    data = image_set.data
    if spec is None:
        if data.get("kind") == "folder" and data.get("path"):
            spec = str(data["path"])  # a run trained on a folder: that folder
        elif image_set.provenance.get("kind") == "samples":
            spec = "embedded"  # a run of the embedded data (the trainer's default data)
        else:
            raise EvalError(
                f"{image_set.target} has no default reference for FID/KID/CMMD; pass "
                "--reference embedded (the embedded shapes data) or --reference FOLDER (real "
                "images)"
            )
    if spec == "embedded":
        from trainers.data.shapes import DATASET_VERSION, ShapesDataset

        seed = int(data.get("seed", 0) or 0)

        def load_shapes(n: int) -> Tensor:
            return ShapesDataset(seed=seed, split="val", size=n, resolution=res).images

        describe = {"dataset": "shapes", "version": DATASET_VERSION, "split": "val", "seed": seed}
        return ReferenceSource(f"{DATASET_VERSION}/val/seed{seed}", describe, load_shapes, res)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise EvalError(f"--reference {spec!r} is neither 'embedded' nor an existing image folder")
    folder = folder.resolve()
    # A reference folder is its image files sorted by path (captions are not needed); the
    # first ``size`` are used. The cache key must change when they do: hash their names and
    # bytes (only those: a 50k-image folder is not read whole for a 1000-image reference).
    files = _folder_files(folder)[:size]
    if not files:
        raise EvalError(f"--reference {folder} holds no images")
    fingerprint = _files_sha256(files, folder)

    def load_folder(n: int) -> Tensor:
        return _folder_images(folder, res, limit=n, captions=False)[0]

    describe = {"dataset": "folder", "name": folder.name, "files_sha256": fingerprint}
    return ReferenceSource(f"folder/{fingerprint}", describe, load_folder, res)


# ---------------------------------------------------------------------------------------------
# Evaluating


Progress = Callable[[str, int], Callable[[int], None]]


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


class _LazyBar:
    """A progress bar that appears only if the reference features are computed (not cached)."""

    def __init__(self, progress: Progress, description: str) -> None:
        self.progress, self.description = progress, description
        self.advance: Callable[[int], None] | None = None

    def start(self, total: int) -> None:
        self.advance = self.progress(self.description, total)

    def __call__(self, n: int) -> None:
        if self.advance is not None:
            self.advance(n)


def _check_counts(metrics: Sequence[str], image_set: ImageSet, opts: EvalOptions) -> None:
    from evaluators.image_metrics import require_images
    from evaluators.metrics import METRICS

    for m in metrics:
        require_images(m, len(image_set.images), "generated")
        if METRICS[m].reference:
            require_images(m, opts.reference_size, "reference")


def _load_networks(families: set[str], opts: EvalOptions) -> dict[str, Any]:
    """The extractor of every family that needs a network file (Inception, CLIP), loaded before
    any image is processed; one CLIP is shared when cmmd and clip_score resolve to the same
    directory. The attribute net is not here: it trains itself when not cached."""
    from evaluators.extractors import (
        CLIP_SCORE_DEFAULT_ID,
        ClipExtractor,
        InceptionExtractor,
        resolve_clip_dir,
    )

    nets: dict[str, Any] = {}
    if "inception" in families:
        resize = opts.resize
        nets["inception"] = InceptionExtractor(opts.inception, resize=resize, device=opts.device)  # type: ignore[arg-type]
    if "clip" in families:
        nets["clip"] = ClipExtractor(opts.clip, device=opts.device)
    if "clip_text" in families:  # CLIP score's default model (ViT-L/14 at 224) unless --clip
        clip_dir = resolve_clip_dir(opts.clip, CLIP_SCORE_DEFAULT_ID)
        clip = nets.get("clip")
        same = clip is not None and clip.directory == clip_dir
        nets["clip_text"] = clip if same else ClipExtractor(str(clip_dir), device=opts.device)
    return nets


@dataclass
class _FamilyOutput:
    """A family's network run once: the compute functions' inputs and the scores' provenance."""

    inputs: Any  # evaluators.metrics.MetricInputs
    extractor: dict[str, Any]
    reference: dict[str, Any] | None = None


def _feature_family(
    family: str,
    network: Any,
    image_set: ImageSet,
    source: Any,
    opts: EvalOptions,
    progress: Progress,
) -> _FamilyOutput:
    """Inception / CLIP image features of the generated and the reference images."""
    from evaluators.image_metrics import FeatureSet, reference_features
    from evaluators.metrics import MetricInputs

    label = {"inception": "Inception", "clip": "CLIP"}[family]
    bar = _LazyBar(progress, f"{label} features: reference")
    ref, ref_prov = reference_features(
        network,
        source,
        opts.reference_size,
        cache_dir=opts.cache_dir,
        batch_size=opts.batch_size,
        on_start=bar.start,
        on_batch=bar,
    )
    fs = FeatureSet(network, batch_size=opts.batch_size)
    n = len(image_set.images)
    fs.update(image_set.images, on_batch=progress(f"{label} features: generated", n))
    inputs = MetricInputs(fake=fs.features, real=ref, network=network, options=_options(opts))
    return _FamilyOutput(inputs, network.provenance(), ref_prov)


def _clip_text_family(
    scorer: Any, image_set: ImageSet, opts: EvalOptions, progress: Progress
) -> _FamilyOutput:
    """CLIP score reads images and captions itself (no reference)."""
    from evaluators.metrics import MetricInputs

    model_prov = {
        "name": "clip-score",
        "model": scorer.model_name,
        "weights_sha256": scorer.weights_sha256,
        "preprocess": "CLIPProcessor (resize shortest edge, centre crop)",
    }
    inputs = MetricInputs(
        images=image_set.images,
        prompts=image_set.prompts,
        network=scorer,
        options=_options(opts),
        progress=progress("CLIP score", len(image_set.images)),
    )
    return _FamilyOutput(inputs, model_prov)


def _options(opts: EvalOptions) -> dict[str, Any]:
    keys = ("kid_subsets", "kid_subset_size", "seed", "batch_size")
    return {k: getattr(opts, k) for k in keys}


def evaluate(
    target: str, opts: EvalOptions, store: Store, progress: Progress = _no_progress
) -> list[Any]:
    """Score ``target`` with ``opts.metrics``, store the scores and return them (``Score``).

    Metrics come from the registry (:mod:`evaluators.metrics`): each family's network runs once
    for all of its metrics, then every metric's compute function turns the features into values.
    """
    from evaluators.metrics import FAMILIES, METRICS, compute_function
    from evaluators.scores import Score, put_scores

    image_set = load_image_set(target, store, opts.tag)
    metrics = opts.metrics
    for m in metrics:
        if METRICS[m].prompts and image_set.prompts is None:
            raise EvalError(
                f"{m} needs a caption per image and {image_set.target} has none: for a plain "
                "folder add a metadata.jsonl sidecar with lines like "
                f'{{"file_name": "0001.png", "text": "a red circle"}}, or drop {m} from --metrics'
            )
    _check_counts(metrics, image_set, opts)
    families = {METRICS[m].family for m in metrics}
    needs_ref = bool(families & {"inception", "clip"})
    source = reference_source(opts.reference, image_set, opts.reference_size) if needs_ref else None

    # Load every network first: a missing weight file fails before any image is processed.
    nets = _load_networks(families, opts)

    n = len(image_set.images)
    base = {"images": image_set.provenance, "num_images": n}
    scores: list[Score] = []
    for family in FAMILIES:
        if family not in families:
            continue
        if family == "attribute_net":
            out = _domain_family(image_set, opts)
        elif family == "clip_text":
            out = _clip_text_family(nets[family], image_set, opts, progress)
        else:
            out = _feature_family(family, nets[family], image_set, source, opts, progress)
        for m in metrics:
            if METRICS[m].family != family:
                continue
            reference = out.reference if METRICS[m].reference else None
            for name, value, params in compute_function(m)(out.inputs):
                prov = {
                    **base,
                    "extractor": out.extractor,
                    "reference": reference,
                    "metric": params,
                }
                scores.append(
                    Score(image_set.target, image_set.target_kind, name, float(value), n, prov)
                )  # type: ignore[arg-type]

    put_scores(store, scores)
    return scores


def _caption_labels() -> dict[str, tuple[int, ...]]:
    import itertools

    from trainers.data.shapes import ATTRIBUTE_NAMES, ATTRIBUTES, ShapeAttrs

    out = {}
    for values in itertools.product(*(ATTRIBUTES[a] for a in ATTRIBUTE_NAMES)):
        attrs = ShapeAttrs(**dict(zip(ATTRIBUTE_NAMES, values, strict=True)))
        out[attrs.caption] = attrs.labels
    return out


def _domain_family(image_set: ImageSet, opts: EvalOptions) -> _FamilyOutput:
    """The embedded data's attribute network on shapes prompts: domain FID and accuracies."""
    from evaluators.metrics import MetricInputs
    from trainers.data.shapes import DATASET_VERSION, to_model_range
    from trainers.domain import DomainMetrics, load_attribute_net, reference_stats

    if opts.reference not in (None, "embedded"):
        raise EvalError("domain_fid / attr_acc compare with the embedded data: drop --reference")
    table = _caption_labels()
    prompts = image_set.prompts or []
    unknown = [p for p in prompts if p not in table]
    if not prompts or unknown:
        raise EvalError(
            "domain_fid / attr_acc need the embedded shapes captions as prompts (e.g. 'a large "
            f"red circle in the center on a white background'); {image_set.target} has "
            + (f"other prompts, e.g. {unknown[0]!r}" if unknown else "no prompts")
        )
    net = load_attribute_net(device=opts.device)
    seed = int(image_set.data.get("seed", 0) or 0)
    ref = reference_stats(
        net, seed=seed, split="val", size=opts.reference_size, resolution=image_set.resolution
    )
    dm = DomainMetrics(net, ref)
    dm.update(to_model_range(image_set.images), torch.tensor([table[p] for p in prompts]))
    reference = {
        "dataset": "shapes",
        "version": DATASET_VERSION,
        "split": "val",
        "seed": seed,
        "num_images": opts.reference_size,
        "resolution": image_set.resolution,
    }
    extractor = {"name": "attribute-net", "recipe_hash": net.recipe_hash}
    return _FamilyOutput(MetricInputs(fake=dm.compute(), network=net), extractor, reference)


# ---------------------------------------------------------------------------------------------
# Output


@contextmanager
def rich_progress(console: Any) -> Iterator[Progress]:
    """A rich progress display; yields ``progress(description, total) -> on_batch(n)``."""
    from harness.live import progress_bar

    with progress_bar(console) as bar:

        def make(description: str, total: int) -> Callable[[int], None]:
            task = bar.add_task(description, total=total)
            return lambda n: bar.advance(task, n)

        yield make


def print_scores(scores: Sequence[Any], console: Any) -> None:
    """The scores as a rich table: metric, value, images, reference, extractor, provenance."""
    from rich.table import Table

    from evaluators.metrics import higher_is_better

    if not scores:
        return
    table = Table(title=f"{scores[0].target} ({scores[0].target_kind})")
    for name, justify in (
        ("metric", "left"),
        ("value", "right"),
        ("better", "center"),
        ("images", "right"),
        ("reference", "left"),
        ("extractor", "left"),
        ("provenance", "left"),
    ):
        # Metric names, values and hashes are read and copied whole: never wrap them.
        keep = name in ("metric", "value", "provenance")
        table.add_column(name, justify=justify, no_wrap=keep)  # type: ignore[arg-type]
    for s in scores:
        ref = s.provenance.get("reference") or {}
        ref_text = f"{ref.get('dataset', '')} n={ref['num_images']}" if ref else "-"
        ext = s.provenance.get("extractor") or {}
        ext_hash = str(ext.get("weights_sha256") or ext.get("recipe_hash") or "")[:8]
        ext_text = f"{ext.get('name', '')} {ext_hash}"
        better = higher_is_better(s.metric)
        table.add_row(
            s.metric,
            f"{s.value:.4f}",
            "higher" if better else "lower",
            str(s.num_images),
            ref_text,
            ext_text.strip(),
            s.provenance_hash,
        )
    console.print(table)


def run(target: str, workdir: Path, metrics: str = DEFAULT_METRICS, **options: Any) -> int:
    """``harness eval`` end to end: returns the exit code (0 ok, 2 bad input or weights, 1 the
    store stayed locked). Errors go to stderr with the fix; scores go to the store and stdout."""
    from rich.console import Console

    from evaluators.image_metrics import NotEnoughImagesError
    from evaluators.sinks import RecordError
    from harness.store import StoreBusyError, StoreError
    from trainers.errors import DataError, WeightsError

    # soft_wrap: messages are not broken at the terminal width (paths stay greppable).
    out, err = Console(), Console(stderr=True, soft_wrap=True)
    try:
        opts = EvalOptions(metrics=parse_metrics(metrics), **options)
        store = Store(workdir / "harness.duckdb")
        with rich_progress(err) as progress:
            scores = evaluate(target, opts, store, progress)
    except StoreBusyError as e:
        err.print(str(e), markup=False, highlight=False)
        return 1
    except (EvalError, WeightsError, NotEnoughImagesError, DataError, StoreError, RecordError) as e:
        err.print(f"harness eval: {e}", markup=False, highlight=False)
        return 2
    print_scores(scores, out)
    out.print(
        f"{len(scores)} scores stored in {store.path}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 0
