"""A captioned image folder in the diffusers / datasets ``imagefolder`` convention.

The folder holds the images (any layout) and a ``metadata.jsonl`` with one JSON object per line::

    {"file_name": "images/0001.png", "text": "a red circle on a white background"}

``file_name`` is relative to the folder; the caption column (``text`` by default) is a string.
Every image is loaded once, converted to RGB, resized so its shorter side equals the resolution
(bicubic, antialiased) and centre-cropped to a square, then kept in memory as one uint8 tensor,
like :class:`trainers.data.shapes.ShapesDataset` (``N * 3 * R * R`` bytes: 2 GB for 10k images
at 256 px).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from trainers.data.shapes import to_model_range
from trainers.errors import DataError

__all__ = ["METADATA_FILE", "DataError", "ImageFolderDataset", "load_square_rgb"]

METADATA_FILE = "metadata.jsonl"
_EXAMPLE = '{"file_name": "0001.png", "text": "a red circle on a white background"}'


def load_square_rgb(path: Path, resolution: int) -> np.ndarray:
    """Image at ``path`` as an (R, R, 3) uint8 array: shorter side -> R, then centre crop.

    Raises OSError (incl. UnidentifiedImageError), ValueError or SyntaxError from PIL for
    unreadable files.
    """
    with Image.open(path) as im:
        # Phone photos store their rotation in EXIF; apply it so the crop sees the upright image.
        im = ImageOps.exif_transpose(im).convert("RGB")
        w, h = im.size
        scale = resolution / min(w, h)
        # max(): rounding must never make the shorter side smaller than the crop.
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        # PIL's resize widens the filter support when downscaling, i.e. it is antialiased.
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        return np.asarray(im, dtype=np.uint8)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Every image of an image folder, pre-processed to ``resolution`` and kept in memory.

    Attributes:
        images: uint8 [N, 3, R, R].
        captions: list of N captions.
        files: list of N image paths (as resolved from ``file_name``).

    Args:
        path: the folder holding ``metadata.jsonl`` and the images.
        resolution: side R of the square training images.
        caption_column: the metadata key holding the caption.

    Raises:
        DataError: missing folder or metadata, a malformed line (its number is given), a missing
            or unreadable image, or no images at all.
    """

    def __init__(self, path: str | Path, resolution: int, caption_column: str = "text"):
        if resolution < 1:
            raise DataError(f"data.resolution must be positive, got {resolution}")
        self.path, self.resolution, self.caption_column = Path(path), resolution, caption_column
        entries = self._read_metadata()
        arrays, self.captions, self.files = [], [], []
        for lineno, file, caption in entries:
            if not file.is_file():
                raise DataError(
                    f"{self.metadata_file} line {lineno}: image {file} does not exist; fix "
                    "file_name (it is relative to the folder) or add the image"
                )
            try:
                arrays.append(load_square_rgb(file, resolution))
            # PIL reports some broken files (e.g. a PNG with bad chunks) with SyntaxError.
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                raise DataError(
                    f"{self.metadata_file} line {lineno}: cannot read image {file} "
                    f"({type(err).__name__}: {err}); replace the file or remove the line"
                ) from None
            self.captions.append(caption)
            self.files.append(file)
        # [N, R, R, 3] -> [N, 3, R, R], the layout of ShapesDataset.images
        self.images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    @property
    def metadata_file(self) -> Path:
        return self.path / METADATA_FILE

    def _read_metadata(self) -> list[tuple[int, Path, str]]:
        """(line number, image path, caption) for every non-blank metadata line."""
        if not self.path.is_dir():
            raise DataError(
                f"image folder {self.path} does not exist or is not a directory; set data.path "
                f"to a folder holding the images and a {METADATA_FILE}"
            )
        if not self.metadata_file.is_file():
            raise DataError(
                f"{self.path} has no {METADATA_FILE}; it must hold one JSON object per line with "
                f"the image path relative to the folder under 'file_name' and the caption under "
                f"{self.caption_column!r}, e.g. {_EXAMPLE}"
            )
        entries = []
        with self.metadata_file.open("rb") as fh:  # decoded per line: an error names its line
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"{self.metadata_file} line {lineno} is not UTF-8 text (byte "
                        f"{raw[err.start]:#04x} at column {err.start + 1}); save the file as "
                        "UTF-8, e.g. `iconv -f latin1 -t utf-8`"
                    ) from None
                if not line.strip():
                    continue
                entries.append(self._parse_line(lineno, line))
        if not entries:
            raise DataError(
                f"{self.metadata_file} lists no images; add one line per image, e.g. {_EXAMPLE}"
            )
        return entries

    def _parse_line(self, lineno: int, line: str) -> tuple[int, Path, str]:
        where = f"{self.metadata_file} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where} is not valid JSON ({err}); expected e.g. {_EXAMPLE}"
            ) from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{where} must be a JSON object, got {type(obj).__name__}; e.g. {_EXAMPLE}"
            )
        file_name = obj.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise DataError(
                f"{where} has no 'file_name' string (keys: {sorted(obj)}); e.g. {_EXAMPLE}"
            )
        caption = obj.get(self.caption_column)
        if not isinstance(caption, str):
            if self.caption_column not in obj:
                others = [k for k, v in obj.items() if isinstance(v, str) and k != "file_name"]
                hint = f"; did you mean caption_column={others[0]!r}?" if others else ""
                raise DataError(
                    f"{where} has no caption column {self.caption_column!r} "
                    f"(keys: {sorted(obj)}){hint}"
                )
            raise DataError(
                f"{where}: caption {self.caption_column!r} must be a string, got "
                f"{type(caption).__name__}"
            )
        return lineno, self.path / file_name, caption

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        """``{"image": float [3, R, R] in [-1, 1], "caption": str}``."""
        return {"image": to_model_range(self.images[i]), "caption": self.captions[i]}

    def fingerprint(self) -> str:
        """Content hash of the processed pixels (shape included) and the captions."""
        h = hashlib.sha256(str(tuple(self.images.shape)).encode())
        h.update(self.images.numpy().tobytes())
        h.update(json.dumps(self.captions).encode())  # JSON: captions may contain newlines
        return h.hexdigest()[:16]
