"""DreamBooth metrics for the embedded data's subjects (:mod:`trainers.data.subject`).

Ruiz et al. 2023 score a personalised model by *subject fidelity* (DINO: mean pairwise cosine
similarity of self-supervised ViT features between generated and real subject images) and
*prompt fidelity* (CLIP-T: image-prompt agreement). Adapted to the shapes data:

**Subject fidelity.** The self-supervised encoder is the data's masked-autoencoder patch encoder
(:func:`trainers.repa_encoder.load_patch_encoder`, trained once without labels and cached). Its
raw features cannot be used as they are: they describe local appearance, so colour and
background dominate them, and the evaluation prompts change exactly those on purpose. Measured
with the default encoder and mean-pooled patch features, real stars in new contexts scored 0.36
against the instance images, base shapes in the same contexts 0.37 and uniform noise 0.72: no
signal. So every image is first reduced to its subject's **silhouette**, and the feature is:

1. resize to 32x32 (antialiased bilinear, as the attribute net does);
2. background colour = per-channel median of the border pixels; foreground weight of a pixel =
   a ramp from 0 to 1 as its largest channel difference to the background goes from 0.2 to 0.4
   ([-1, 1] units; the data's least contrasting colour pair, purple on gray, differs by 0.56);
3. the foreground's bounding box (found on the 3x3-blurred difference, so isolated noisy pixels
   do not stretch it; the silhouette itself stays sharp: a blur would round a small star's 2-3 px
   arms away) is centred and its longer side scaled to 80% of a 32x32 canvas (bilinear), drawn
   white on black: colour, background, position and size are gone;
4. the encoder's 8x8 patch grid of that canvas, **flattened** (``64 * dim`` values; after step 3
   the grids are aligned, and mean-pooling would keep little but the foreground area), minus
   the mean of the same feature over 512 real base-data images (centring removes what every
   silhouette shares, "a blob in the middle of a black canvas").

``subject/fidelity`` is then the mean cosine similarity over all (generated, instance) pairs.
An image with no foreground at all has no silhouette; its similarities are 0.

Two references, computed once from real renders of the *evaluation prompts' contexts*, make the
number readable: ``subject/fidelity_floor`` (base shapes, the four of them in turn, in those
contexts: what an unrelated shape scores) and ``subject/fidelity_ceiling`` (the real subject in
those contexts: what a perfect generator scores, below 1 because of jitter, rotation and 32 px
rasterisation). Measured with the default nets, instance set (5 stars) and 32 prompts at 32 px:
ceiling 0.63 (another render of the same prompts 0.64, at 64 px 0.65), floor 0.01 (all circles
-0.15, squares -0.20, triangles 0.17, diamonds 0.23), uniform noise -0.20, blank images 0, the
instance images among themselves 0.74.

**Prompt fidelity.** The domain attribute network (:func:`trainers.domain.load_attribute_net`,
trained on the four base shapes) classifies each generated image; its accuracy on the four
*context* attributes the prompt asks for (colour, size, position, background; never the shape,
which the subject replaces). On real rendered stars it reads them as well as on base shapes
(2000 stars, 32/64/16 px: colour, position, background 1.000; size 0.999/0.9965/0.9965), so it
needs no retraining for the star; ``subject/prompt_fidelity_ceiling`` reports its accuracy on
the real renders of the prompts, and a warning is issued if any attribute is below 0.95 there
(a new subject the net cannot read would then need a subject-aware attribute net).

Metric names (all higher-is-better, in [-1, 1] for the similarities, [0, 1] for accuracies):

* ``subject/fidelity`` - generated vs instance images;
* ``subject/fidelity_floor`` - real base shapes (prompt contexts) vs instance images;
* ``subject/fidelity_ceiling`` - real subject (prompt contexts) vs instance images;
* ``subject/prompt_fidelity`` - mean of the four per-attribute accuracies;
* ``subject/prompt_fidelity/<attr>`` for ``attr`` in colour, size, position, background;
* ``subject/prompt_fidelity_ceiling`` - the same mean on the real subject renders.

Results do not depend on how images are batched: the generator can be called in any batch size
and both nets run in fixed zero-padded chunks of 128 images (as :mod:`trainers.domain` does), so
the metrics are bit-identical.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from trainers.data.shapes import ATTRIBUTES, ShapesDataset, to_model_range
from trainers.data.subject import (
    CONTEXT_ATTRIBUTES,
    DEFAULT_TOKEN,
    Context,
    InstanceSet,
    context_labels,
    get_subject,
    instance_set,
    render_contexts,
    subject_prompts,
)

if TYPE_CHECKING:
    from trainers.domain import AttributeNet, AttributeNetRecipe
    from trainers.repa_encoder import PatchEncoder, PatchEncoderRecipe

__all__ = [
    "METRIC_NAMES",
    "GenerateFn",
    "SubjectEvaluator",
    "canonical_silhouette",
    "mean_cosine",
    "subject_attribute_accuracy",
]

GenerateFn = Callable[[Sequence[str], Sequence[int]], Tensor]
"""``generate(prompts, seeds)`` -> images ``[N, 3, H, W]`` in [-1, 1], one per (prompt, seed)."""

METRIC_NAMES: tuple[str, ...] = (
    "subject/fidelity",
    "subject/fidelity_floor",
    "subject/fidelity_ceiling",
    "subject/prompt_fidelity",
    *(f"subject/prompt_fidelity/{name}" for name in CONTEXT_ATTRIBUTES),
    "subject/prompt_fidelity_ceiling",
)

SIDE = 32
"""Side of the canonical silhouette canvas (the encoder's input resolution)."""
_FILL = 0.8  # the silhouette's longer side, as a fraction of the canvas
_T0, _T1 = 0.2, 0.4  # foreground ramp on the colour difference to the background
_CHUNK = 128  # images per forward pass, fixed: metrics independent of the batch size
_CENTRE_SEED = 31_337  # real base-data images whose mean feature centres the features
_CENTRE_SIZE = 512
_MIN_REAL_ACCURACY = 0.95


def _resize(images: Tensor, side: int = SIDE) -> Tensor:
    x = images.float().clamp(-1.0, 1.0)
    if x.shape[-2:] != (side, side):
        x = F.interpolate(
            x, size=(side, side), mode="bilinear", antialias=True, align_corners=False
        )
    return x


def _ramp(diff: Tensor) -> Tensor:
    """Foreground weight ``[B, H, W]`` of a colour difference to the background ``[B, 3, H, W]``:
    0 below ``_T0``, 1 above ``_T1`` (largest channel difference), linear between."""
    return ((diff.abs().amax(1) - _T0) / (_T1 - _T0)).clamp(0.0, 1.0)


@torch.no_grad()
def canonical_silhouette(images: Tensor) -> tuple[Tensor, Tensor]:
    """The subject's silhouette, centred and scaled, white on black: ``[B, 3, 32, 32]`` in
    [-1, 1], and ``found [B]`` bool (False: no foreground; the canvas is then all black).

    ``images``: float ``[B, 3, H, W]`` in [-1, 1]. Each image is processed on its own (no batch
    statistics). See the module docstring for the steps.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    x = _resize(images)  # [B, 3, 32, 32]
    b = x.shape[0]
    border = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], 2)
    background = border.median(2).values  # [B, 3]
    diff = x - background[:, :, None, None]  # [B, 3, 32, 32]
    mask = _ramp(diff)  # [B, 32, 32] in [0, 1]: the silhouette
    # The box comes from the 3x3-blurred difference: isolated noisy pixels do not stretch it.
    # The silhouette itself stays sharp (a blur would round a small star's 2-3 px arms away).
    hard = _ramp(F.avg_pool2d(F.pad(diff, (1, 1, 1, 1), mode="replicate"), 3, 1)) > 0.5
    rows, cols = hard.any(2), hard.any(1)  # [B, 32] each
    found = rows.any(1)  # [B]
    idx = torch.arange(SIDE, device=x.device)
    big = torch.full_like(idx, SIDE)
    r0 = torch.where(rows, idx, big).amin(1)
    r1 = torch.where(rows, idx, -1).amax(1) + 1
    c0 = torch.where(cols, idx, big).amin(1)
    c1 = torch.where(cols, idx, -1).amax(1) + 1
    # Canvas -> source affine map in normalised coordinates (align_corners=False): the box's
    # centre to the canvas centre, its longer side to _FILL of the canvas.
    cy, cx = (r0 + r1).float() / 2, (c0 + c1).float() / 2
    scale = torch.maximum(r1 - r0, c1 - c0).float() / _FILL / SIDE
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, 0, 2] = 2 * cx / SIDE - 1
    theta[:, 1, 2] = 2 * cy / SIDE - 1
    theta[~found] = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=x.device)
    grid = F.affine_grid(theta, [b, 1, SIDE, SIDE], align_corners=False)
    canvas = F.grid_sample(
        mask[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )  # [B, 1, 32, 32] in [0, 1]
    canvas = canvas * found[:, None, None, None]
    return (canvas * 2 - 1).expand(-1, 3, -1, -1).contiguous(), found


def mean_cosine(a: np.ndarray | Tensor, b: np.ndarray | Tensor) -> float:
    """Mean cosine similarity over all pairs of rows of ``a [N, F]`` and ``b [M, F]`` (float64).

    A zero row has similarity 0 with everything.
    """
    x = np.asarray(a.detach().cpu() if isinstance(a, Tensor) else a, dtype=np.float64)
    y = np.asarray(b.detach().cpu() if isinstance(b, Tensor) else b, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need [N, F] and [M, F] arrays, got {x.shape} and {y.shape}")
    if not len(x) or not len(y):
        raise ValueError("mean_cosine of an empty set")

    def unit(z: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(z, axis=1, keepdims=True)
        return np.divide(z, norm, out=np.zeros_like(z), where=norm > 0)

    return float((unit(x) @ unit(y).T).mean())


def _chunked(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``fn`` over ``x`` in zero-padded chunks of exactly ``_CHUNK`` rows, autocast off."""
    outs = []
    for i in range(0, len(x), _CHUNK):
        part = x[i : i + _CHUNK]
        n = len(part)
        if n < _CHUNK:
            part = torch.cat([part, part.new_zeros(_CHUNK - n, *part.shape[1:])])
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            outs.append(fn(part)[:n])
    return torch.cat(outs)


def _device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def subject_attribute_accuracy(
    net: AttributeNet, images: Tensor, contexts: Sequence[Context]
) -> dict[str, float]:
    """Accuracy of ``net`` on each context attribute of float ``images [N, 3, H, W]`` in
    [-1, 1] whose contexts (:class:`~trainers.data.shapes.ShapeAttrs`-like) are ``contexts``;
    plus ``"mean"``."""
    correct = _context_correct(net, images, contexts)
    acc = {name: float(correct[:, j].mean()) for j, name in enumerate(CONTEXT_ATTRIBUTES)}
    acc["mean"] = float(np.mean([acc[name] for name in CONTEXT_ATTRIBUTES]))
    return acc


@torch.no_grad()
def _context_correct(net: AttributeNet, images: Tensor, contexts: Sequence[Context]) -> np.ndarray:
    """``[N, 4]`` bool: the net reads context attribute j of image i as its context says."""
    if len(images) != len(contexts):
        raise ValueError(f"{len(images)} images for {len(contexts)} contexts")
    net.eval()
    x = net.preprocess(images.to(_device(net)))
    labels = torch.tensor([context_labels(c) for c in contexts], dtype=torch.long)  # [N, 4]

    def predict(z: Tensor) -> Tensor:
        logits = net(z)
        return torch.stack([logits[name].argmax(1) for name in CONTEXT_ATTRIBUTES], 1)

    pred = _chunked(predict, x).cpu()  # [N, 4]
    return (pred == labels).numpy()


class SubjectEvaluator:
    """Subject fidelity and prompt fidelity of a personalised model (see the module docstring).

    ``subject``/``token``: the subject and its identifier. ``instances``: the instance images the
    model was trained on, or their number ``n`` for ``instance_set(subject, n, resolution,
    instance_seed, token)`` (the trainer's own set). The ``num_prompts`` evaluation prompts are
    ``subject_prompts(subject, num_prompts, prompt_seed, token, exclude=instances)``; every
    prompt is generated once with each sampling seed in ``seeds`` (DreamBooth generates several
    images per prompt), so ``generate`` is asked for ``num_prompts * len(seeds)`` (prompt, seed)
    pairs, prompt-major: ``(p0, s0), (p0, s1), ..., (p1, s0), ...``.

    The nets default to the cached ones (``load_attribute_net`` / ``load_patch_encoder`` with
    ``cache_dir`` and the optional recipes; each is trained once, ~25 s on a CPU); pass
    ``attribute_net`` / ``encoder`` to use others (tests use small recipes). They are put on
    ``device`` in eval mode.
    """

    higher_is_better: ClassVar[dict[str, bool]] = dict.fromkeys(METRIC_NAMES, True)

    def __init__(
        self,
        subject: str = "star",
        token: str = DEFAULT_TOKEN,
        resolution: int = 32,
        device: str | torch.device = "cpu",
        num_prompts: int = 32,
        *,
        seeds: Sequence[int] = (0,),
        prompt_seed: int = 0,
        instances: InstanceSet | int = 5,
        instance_seed: int = 0,
        attribute_net: AttributeNet | None = None,
        encoder: PatchEncoder | None = None,
        cache_dir: Path | str | None = None,
        attribute_recipe: AttributeNetRecipe | None = None,
        encoder_recipe: PatchEncoderRecipe | None = None,
        min_real_accuracy: float = _MIN_REAL_ACCURACY,
    ):
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise ValueError("seeds must name at least one sampling seed")
        self.subject = get_subject(subject)
        self.device = torch.device(device)
        self.resolution = resolution
        if not isinstance(instances, InstanceSet):
            instances = instance_set(self.subject, instances, resolution, instance_seed, token)
        elif instances.subject != self.subject.name:
            raise ValueError(
                f"instances are of subject {instances.subject!r}, not {self.subject.name!r}"
            )
        self.instances = instances
        self.prompts = subject_prompts(
            self.subject, num_prompts, prompt_seed, token, exclude=instances
        )
        self.captions = [caption for caption, _ in self.prompts]
        self.contexts = [attrs for _, attrs in self.prompts]
        # the (prompt index, seed) pairs generated, prompt-major
        self.pairs = [(i, s) for i in range(num_prompts) for s in self.seeds]

        if attribute_net is None:
            from trainers.domain import load_attribute_net

            attribute_net = load_attribute_net(cache_dir, recipe=attribute_recipe)
        if encoder is None:
            from trainers.repa_encoder import load_patch_encoder

            encoder = load_patch_encoder(cache_dir, recipe=encoder_recipe)
        self.attribute_net = attribute_net.to(self.device).eval()
        self.encoder = encoder.to(self.device).eval()

        base = ShapesDataset(
            seed=_CENTRE_SEED, split="all", size=_CENTRE_SIZE, resolution=resolution
        )
        raw, _ = self._raw_features(to_model_range(base.images))
        self._centre = raw.mean(0)  # [F] float64
        self.instance_features = self.features(to_model_range(instances.images))

        shapes = ATTRIBUTES["shape"]
        stream = [prompt_seed, self.subject.stream]
        floor_images = render_contexts(
            [shapes[i % len(shapes)] for i in range(num_prompts)],
            self.contexts,
            resolution,
            [*stream, 3],
        )
        real_images = render_contexts(
            [self.subject.shape] * num_prompts, self.contexts, resolution, [*stream, 4]
        )
        self.floor = mean_cosine(
            self.features(to_model_range(floor_images)), self.instance_features
        )
        real = to_model_range(real_images)
        self.ceiling = mean_cosine(self.features(real), self.instance_features)
        self.real_accuracy = subject_attribute_accuracy(self.attribute_net, real, self.contexts)
        low = {k: v for k, v in self.real_accuracy.items() if v < min_real_accuracy}
        if low:
            warnings.warn(
                f"the attribute net reads real {self.subject.name} renders' context attributes "
                f"with accuracy {low} < {min_real_accuracy}: prompt fidelity is unreliable for "
                "this subject (it needs an attribute net trained on it)",
                UserWarning,
                stacklevel=2,
            )
        self.last_per_image: dict[str, np.ndarray] | None = None

    @torch.no_grad()
    def _raw_features(self, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Uncentred flattened encoder features ``[N, 64 * dim]`` float64 of the silhouettes,
        and ``found [N]``."""
        if not images.is_floating_point():
            raise TypeError(f"images must be float in [-1, 1], got dtype {images.dtype}")
        canvas, found = canonical_silhouette(images.to(self.device))
        feats = _chunked(lambda z: self.encoder(z).flatten(1), canvas)
        return feats.double().cpu().numpy(), found.cpu().numpy()

    def features(self, images: Tensor) -> np.ndarray:
        """The subject-fidelity features ``[N, 64 * dim]`` float64 of float ``images`` in
        [-1, 1]: centred flattened encoder features of the silhouettes; 0 where there is none."""
        raw, found = self._raw_features(images)
        return (raw - self._centre) * found[:, None]

    def _generate(self, generate: GenerateFn, batch_size: int | None) -> Tensor:
        n = len(self.pairs)
        step = n if batch_size is None else batch_size
        if step < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        parts = []
        for start in range(0, n, step):
            pairs = self.pairs[start : start + step]
            out = generate([self.captions[i] for i, _ in pairs], [s for _, s in pairs])
            if not isinstance(out, Tensor):
                raise TypeError(f"generate must return a torch.Tensor, got {type(out).__name__}")
            want = len(pairs)
            if out.ndim != 4 or out.shape[0] != want or out.shape[1] != 3:
                raise ValueError(
                    f"generate returned shape {tuple(out.shape)} for {want} prompts; "
                    f"expected [{want}, 3, H, W]"
                )
            if not out.is_floating_point():
                raise TypeError(f"generate must return float images in [-1, 1], got {out.dtype}")
            parts.append(out.detach())
        images = torch.cat([p.to(self.device) for p in parts])
        if not torch.isfinite(images).all():
            raise ValueError("generated images contain NaN or inf (diverged sampler?)")
        return images

    @torch.no_grad()
    def run(self, generate: GenerateFn, *, batch_size: int | None = None) -> dict[str, float]:
        """The metrics of ``generate``'s images of the evaluation prompts (names in
        :data:`METRIC_NAMES`). ``generate`` is called once, or on slices of ``batch_size``
        pairs. Per-image results (rows in ``pairs`` order) are kept in ``last_per_image``:
        ``prompt [N]`` (index into ``prompts``), ``seed [N]``, ``fidelity [N]`` (mean cosine to the
        instance images), ``found [N]`` (a foreground was found), ``correct [N, 4]``
        (``CONTEXT_ATTRIBUTES`` read as the prompt asks)."""
        images = self._generate(generate, batch_size)  # [N, 3, H, W], N = len(self.pairs)
        raw, found = self._raw_features(images)
        feats = (raw - self._centre) * found[:, None]
        per_image = np.array([mean_cosine(f[None], self.instance_features) for f in feats])
        contexts = [self.contexts[i] for i, _ in self.pairs]
        correct = _context_correct(self.attribute_net, images, contexts)
        acc = {name: float(correct[:, j].mean()) for j, name in enumerate(CONTEXT_ATTRIBUTES)}
        self.last_per_image = {
            "prompt": np.array([i for i, _ in self.pairs], dtype=np.int64),
            "seed": np.array([s for _, s in self.pairs], dtype=np.int64),
            "fidelity": per_image,
            "found": found,
            "correct": correct,
        }
        out = {
            "subject/fidelity": mean_cosine(feats, self.instance_features),
            "subject/fidelity_floor": self.floor,
            "subject/fidelity_ceiling": self.ceiling,
            "subject/prompt_fidelity": float(np.mean(list(acc.values()))),
            **{f"subject/prompt_fidelity/{name}": v for name, v in acc.items()},
            "subject/prompt_fidelity_ceiling": self.real_accuracy["mean"],
        }
        return out
