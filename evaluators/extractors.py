"""The standard feature extractors behind FID / KID / CMMD, with weights that never download.

Two extractors, both the libraries' own networks:

* :class:`InceptionExtractor`: torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF-FID
  Inception port) as torchmetrics wraps it (``NoTrainInceptionV3``), pool3 features ``[N, 2048]``.
  ``resize="clean"`` is torchmetrics' default (bilinear with antialiasing, the "clean" resize of
  Parmar et al.); ``resize="legacy-tf"`` is torch-fidelity's bit-exact TF1 bilinear resize
  (the original FID code's, aliased when downscaling). FID/KID numbers are only comparable
  within one resize mode, so the mode is part of every score's provenance.
* :class:`ClipExtractor`: transformers ``CLIPModel`` image embeddings, L2-normalised, the CMMD
  embedding of Jayasumana et al. 2024 (google-research/cmmd resizes ``[0, 1]`` images to the
  processor's crop size with torch bicubic interpolation, normalises with the processor's mean
  and std, and takes ``image_embeds``; we do the same).

Weights are looked up, in order, at an explicit path, an environment variable, and the usual
caches; nothing is ever downloaded (torch-fidelity and torchmetrics would fetch the Inception
weights from GitHub if given no path, so a path is always passed):

* Inception: ``path`` argument > ``$HARNESS_INCEPTION_WEIGHTS`` > torch hub's checkpoint cache
  (``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``, where
  ``torch.hub`` would have put a download).
* CLIP: ``path_or_id`` argument > ``$HARNESS_CLIP_PATH`` > the default hub id looked up in the
  Hugging Face cache (``HF_HOME``) with ``local_files_only``.

A missing file is a :class:`trainers.errors.WeightsError` naming what was looked for, every place
looked in and how to get it. Each extractor reports the sha256 of its weights; that hash, the
input size and the resize mode go into every score's provenance.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.errors import WeightsError, download_hint, resolve_pretrained_dir

__all__ = [
    "CLIP_ENV",
    "CLIP_SCORE_DEFAULT_ID",
    "CMMD_CLIP_DEFAULT_ID",
    "INCEPTION_ENV",
    "INCEPTION_FILE",
    "INCEPTION_LAYERS",
    "INCEPTION_URL",
    "RESIZE_MODES",
    "ClipExtractor",
    "Extractor",
    "InceptionExtractor",
    "ResizeMode",
    "extract_features",
    "file_sha256",
    "load_clip",
    "resolve_clip_dir",
    "resolve_inception_weights",
]

INCEPTION_ENV = "HARNESS_INCEPTION_WEIGHTS"
CLIP_ENV = "HARNESS_CLIP_PATH"
# torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3 (a test keeps them equal); spelled
# out so that error messages do not need to import torch-fidelity.
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
# CMMD's paper model (ViT-L/14 at 336 px); CLIP score's usual model (torchmetrics' default).
CMMD_CLIP_DEFAULT_ID = "openai/clip-vit-large-patch14-336"
CLIP_SCORE_DEFAULT_ID = "openai/clip-vit-large-patch14"

ResizeMode = Literal["clean", "legacy-tf"]
RESIZE_MODES: tuple[str, ...] = ("clean", "legacy-tf")
_RESIZE_NAMES = {
    "clean": "torch bilinear, antialiased (torchmetrics default)",
    "legacy-tf": "TF1 bilinear, not antialiased (torch-fidelity / original TF FID)",
}

_hash_memo: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, memoised on (path, size, mtime) (a 95 MB file takes ~0.3 s)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_memo:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        _hash_memo[key] = h.hexdigest()
    return _hash_memo[key]


# ---------------------------------------------------------------------------------------------
# Locating weights


def _inception_cache_file() -> Path:
    # torch.hub.load_state_dict_from_url saves to <hub dir>/checkpoints/<file name>.
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def resolve_inception_weights(path: str | Path | None = None) -> Path:
    """The Inception weights file: ``path`` > ``$HARNESS_INCEPTION_WEIGHTS`` > torch hub cache.

    An explicitly named file (argument or environment variable) that does not exist is an error
    even if the cache has one: the user asked for that file.
    """
    fix = (
        f"download {INCEPTION_URL} on a machine with network access, copy it here and pass its "
        f"path (--inception PATH) or set {INCEPTION_ENV}=PATH, or put it at "
        f"{_inception_cache_file()}"
    )
    for value, source in (
        (path, "the inception weights path"),
        (os.environ.get(INCEPTION_ENV), f"${INCEPTION_ENV}"),
    ):
        if value:
            p = Path(value).expanduser()
            if not p.is_file():
                what = "is a directory, not a file" if p.is_dir() else "does not exist"
                raise WeightsError(f"Inception weights {p} ({source}) {what}; {fix}")
            return p
    cached = _inception_cache_file()
    if cached.is_file():
        return cached
    raise WeightsError(
        f"Inception weights {INCEPTION_FILE} not found: no path given, {INCEPTION_ENV} is not "
        f"set, and the torch hub cache has no {cached}; the harness never downloads: {fix}"
    )


def resolve_clip_dir(path_or_id: str | None = None, default_id: str = CMMD_CLIP_DEFAULT_ID) -> Path:
    """The CLIP model directory: ``path_or_id`` > ``$HARNESS_CLIP_PATH`` > ``default_id`` in the
    Hugging Face cache (looked up with ``local_files_only``; never downloaded)."""
    source = path_or_id or os.environ.get(CLIP_ENV) or default_id
    try:
        return resolve_pretrained_dir(
            source, what="CLIP model", setting=f"--clip or {CLIP_ENV}", example_id=default_id
        )
    except WeightsError as err:
        tried = "" if path_or_id or os.environ.get(CLIP_ENV) else f" (no --clip, {CLIP_ENV} unset)"
        raise WeightsError(f"{err}{tried}") from err


def load_clip(directory: Path) -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` from a local directory, offline, eval mode, frozen.

    Refuses a checkpoint with missing weights (transformers would initialise them at random).
    """
    from transformers import CLIPModel, CLIPProcessor

    hint = download_hint(CMMD_CLIP_DEFAULT_ID, f"--clip or {CLIP_ENV}")
    if not (directory / "config.json").is_file():
        raise WeightsError(f"CLIP model {directory} has no config.json; {hint}")
    try:
        model, info = CLIPModel.from_pretrained(
            str(directory), local_files_only=True, output_loading_info=True
        )
        processor = CLIPProcessor.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # OSError, SafetensorError, ValueError, ...
        raise WeightsError(
            f"cannot load a CLIP model and processor from {directory} ({type(err).__name__}: "
            f"{err}); it needs config.json, the weights, the tokenizer and "
            f"preprocessor_config.json as written by save_pretrained; {hint}"
        ) from err
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise WeightsError(
            f"CLIP weights in {directory} do not fit CLIPModel ({len(missing)} missing, e.g. "
            f"{missing[:3]}); point --clip at a full CLIP checkpoint (vision and text towers)"
        )
    return model.eval().requires_grad_(False), processor


def _clip_weights_sha256(directory: Path) -> str:
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    if not files:
        raise WeightsError(f"CLIP model {directory} holds no *.safetensors or *.bin weights")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Extractors


class Extractor(Protocol):
    """``features(images uint8 [B, 3, H, W]) -> float32 [B, dim]`` plus what identifies it."""

    name: str
    dim: int

    def features(self, images: Tensor) -> Tensor: ...

    def provenance(self) -> dict[str, Any]: ...


def _check_uint8(images: Tensor) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(
            f"images must be uint8 [B, 3, H, W] in [0, 255], got dtype {images.dtype} "
            "(convert [-1, 1] floats with trainers.data.shapes.to_uint8)"
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")


# torch-fidelity's feature names: the width of the average-pooled activations after each block.
INCEPTION_LAYERS: dict[int, str] = {64: "pool1", 192: "pool2", 768: "mixed_6e", 2048: "pool3"}


class InceptionExtractor:
    """Inception-v3 features through torchmetrics / torch-fidelity: pool3 (2048-d, the FID
    standard) by default; ``dim`` 64, 192 or 768 picks an earlier layer, as torchmetrics'
    ``FrechetInceptionDistance(feature=...)`` does (cheaper, and not comparable to pool3 FID)."""

    name: ClassVar[str] = "inception-v3-compat"
    input_size: ClassVar[int] = 299

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        resize: ResizeMode = "clean",
        dim: int = 2048,
        device: str | torch.device = "cpu",
    ) -> None:
        if dim not in INCEPTION_LAYERS:
            raise ValueError(f"Inception dim must be one of {sorted(INCEPTION_LAYERS)}, got {dim}")
        self.dim = dim
        if resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {resize!r}; allowed: {', '.join(RESIZE_MODES)}")
        self.path = resolve_inception_weights(weights)
        self.resize = resize
        self._check_file(self.path)
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            net = NoTrainInceptionV3(
                name=self.name,
                features_list=[str(self.dim)],
                feature_extractor_weights_path=str(self.path),
                antialias=resize == "clean",
            )
        except Exception as err:  # RuntimeError from load_state_dict on mismatched keys/shapes
            raise WeightsError(
                f"Inception weights {self.path} do not fit torch-fidelity's "
                f"FeatureExtractorInceptionV3 ({type(err).__name__}: {str(err)[:300]}); get the "
                f"right file from {INCEPTION_URL}"
            ) from err
        self.net = net.to(device)
        self.weights_sha256 = file_sha256(self.path)

    @staticmethod
    def _check_file(path: Path) -> None:
        # torch-fidelity loads with weights_only=False (arbitrary pickled code). Read the file
        # once with weights_only=True first: a tensors-only state dict passes, anything else is
        # refused with a message naming the file, before the library unpickles it.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise WeightsError(
                f"Inception weights {path} are not a readable PyTorch state dict "
                f"({type(err).__name__}: {str(err)[:200]}); the file is corrupt or not the "
                f"torch-fidelity weights: get {INCEPTION_URL}"
            ) from err
        if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
            raise WeightsError(
                f"Inception weights {path} are not torch-fidelity's FeatureExtractorInceptionV3 "
                f"state dict (no Mixed_7c layers); get {INCEPTION_URL}"
            )

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Features ``[B, dim]`` float32 (CPU) of uint8 images ``[B, 3, H, W]``."""
        _check_uint8(images)
        device = next(self.net.parameters()).device
        # Autocast off: a caller's autocast context would silently run the extractor in bf16.
        with torch.autocast(device_type=device.type, enabled=False):
            return self.net(images.to(device)).float().cpu()

    def provenance(self) -> dict[str, Any]:
        """What makes these features these features (goes into every score's provenance)."""
        return {
            "name": self.name,
            "layer": INCEPTION_LAYERS[self.dim],
            "dim": self.dim,
            "weights_sha256": self.weights_sha256,
            "input_size": self.input_size,
            "resize": self.resize,
            "resize_detail": _RESIZE_NAMES[self.resize],
        }


class ClipExtractor:
    """L2-normalised CLIP image embeddings, preprocessed as google-research/cmmd does."""

    name: ClassVar[str] = "clip-image-embeds"

    def __init__(
        self,
        path_or_id: str | None = None,
        *,
        default_id: str = CMMD_CLIP_DEFAULT_ID,
        device: str | torch.device = "cpu",
    ) -> None:
        self.directory = resolve_clip_dir(path_or_id, default_id)
        self.model, self.processor = load_clip(self.directory)
        self.model.to(device)
        ip = self.processor.image_processor
        crop = ip.crop_size if getattr(ip, "crop_size", None) else ip.size
        self.input_size = int(crop["height"] if "height" in crop else crop["shortest_edge"])
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.dim = int(self.model.config.projection_dim)
        self.weights_sha256 = _clip_weights_sha256(self.directory)
        self.model_name = getattr(self.model.config, "_name_or_path", "") or self.directory.name

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings ``[B, projection_dim]`` float32 of uint8 ``[B, 3, H, W]``."""
        _check_uint8(images)
        device = next(self.model.parameters()).device
        x = images.to(device).float() / 255.0
        # As google-research/cmmd: torch bicubic resize of [0, 1] images to the model's input
        # size (no center crop), then the processor's mean/std. The processor itself works on
        # one PIL/numpy image at a time and crops; doing the two tensor ops here keeps a batch
        # on the device and matches the reference preprocessing.
        s = self.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False)
        x = (x - self.mean.to(device)) / self.std.to(device)
        with torch.autocast(device_type=device.type, enabled=False):
            emb = _as_tensor(self.model.get_image_features(pixel_values=x))
        return F.normalize(emb.float(), dim=-1).cpu()

    def provenance(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model_name,
            "dim": self.dim,
            "weights_sha256": self.weights_sha256,
            "input_size": self.input_size,
            "resize": "bicubic",
            "resize_detail": "torch bicubic to the input size, no crop (google-research/cmmd)",
            "normalized": True,
        }


def _as_tensor(out: Any) -> Tensor:
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output holds the
    # projected embedding; transformers 4 returned the tensor itself.
    return out if isinstance(out, Tensor) else out.pooler_output


class ClipScoreModel(nn.Module):
    """A ``CLIPModel`` seen through the interface torchmetrics' ``CLIPScore`` expects.

    torchmetrics 1.9 calls ``get_image_features`` / ``get_text_features`` and treats the result as
    a tensor; transformers 5 returns a model output instead, so unwrap it here.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return _as_tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return _as_tensor(out)


def extract_features(
    extractor: Extractor,
    images: Tensor,
    *,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> Tensor:
    """Features ``[N, dim]`` float32 of uint8 images ``[N, 3, H, W]``, in batches.

    ``on_batch(n)`` is called after each batch with its size (progress bars). The batch size
    changes the float32 results only in the last bits (tests bound it).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_uint8(images)
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        out.append(extractor.features(chunk))
        if on_batch is not None:
            on_batch(len(chunk))
    if not out:
        return torch.zeros(0, extractor.dim)
    return torch.cat(out)
