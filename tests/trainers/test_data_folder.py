"""The image-folder data set: loading, resize + centre crop, and errors that name the fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.data.folder import ImageFolderDataset, load_square_rgb
from trainers.data.shapes import ShapesDataset
from trainers.errors import DataError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _stripes(size: tuple[int, int], horizontal: bool) -> Image.Image:
    """Red | green | blue in the proportions 1/4 | 1/2 | 1/4 along the long side."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    n = w if horizontal else h
    for colour, (a, b) in zip(
        (RED, GREEN, BLUE), ((0, n // 4), (n // 4, 3 * n // 4), (3 * n // 4, n)), strict=True
    ):
        if horizontal:
            arr[:, a:b] = colour
        else:
            arr[a:b, :] = colour
    return Image.fromarray(arr)


def _write(folder: Path, items: list[tuple[str, Image.Image | bytes | None, dict]]) -> Path:
    """Write images and a metadata.jsonl with one line per item (extra keys from the dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, image, extra in items:
        if isinstance(image, Image.Image):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            image.save(folder / name)
        elif isinstance(image, bytes):
            (folder / name).write_bytes(image)
        lines.append(json.dumps({"file_name": name, **extra}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "data",
        [
            ("wide.png", _stripes((64, 32), horizontal=True), {"text": "a wide image"}),
            ("sub/tall.jpg", _stripes((20, 40), horizontal=False), {"text": "a tall image"}),
            ("gray.png", Image.new("L", (16, 16), 200), {"text": "gray"}),
            ("rgba.png", Image.new("RGBA", (10, 12), (10, 20, 30, 128)), {"text": "rgba"}),
            ("pal.gif", Image.new("P", (30, 30), 3), {"text": "palette"}),
        ],
    )


def test_loads_like_the_shapes_dataset(folder: Path) -> None:
    ds = ImageFolderDataset(folder, resolution=16)
    assert len(ds) == 5
    assert ds.images.shape == (5, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert ds.captions == ["a wide image", "a tall image", "gray", "rgba", "palette"]
    assert ds.files[1] == folder / "sub" / "tall.jpg"
    item = ds[0]
    assert set(item) == {"image", "caption"} and item["caption"] == "a wide image"
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
    shapes = ShapesDataset(size=2, resolution=16)
    for attr in ("images", "captions", "fingerprint"):
        assert hasattr(ds, attr) and hasattr(shapes, attr)
    assert ds.images.shape[1:] == shapes.images.shape[1:]


def test_modes_are_converted_to_rgb(folder: Path) -> None:
    ds = ImageFolderDataset(folder, resolution=8)
    assert (ds.images[2] == 200).all()  # grayscale -> equal channels
    assert ds.images[3, :, 4, 4].tolist() == [10, 20, 30]  # alpha dropped


@pytest.mark.parametrize("horizontal", [True, False])
def test_resize_shorter_side_then_centre_crop(tmp_path: Path, horizontal: bool) -> None:
    # 64x32 stripes red|green|blue (1/4, 1/2, 1/4 of the long side): resizing to 32x16 and
    # cropping the central 16 keeps exactly the green half.
    size = (64, 32) if horizontal else (32, 64)
    path = tmp_path / "stripes.png"
    _stripes(size, horizontal).save(path)
    arr = load_square_rgb(path, 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    inner = arr[:, 2:-2] if horizontal else arr[2:-2, :]  # away from bicubic ringing
    assert (inner == np.array(GREEN, dtype=np.uint8)).all()
    assert arr[..., 1].mean() > 240 and arr[..., 0].mean() < 15 and arr[..., 2].mean() < 15


def test_downscaling_is_antialiased(tmp_path: Path) -> None:
    # A one-pixel checkerboard averages to mid-gray when downscaled with a wide filter;
    # point sampling (no antialiasing) would keep pure black and white.
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(board).save(tmp_path / "board.png")
    arr = load_square_rgb(tmp_path / "board.png", 8).astype(int)
    assert np.abs(arr - 127.5).max() < 10


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    # Stored landscape, top half red, bottom half blue; EXIF says "rotate 90 degrees clockwise
    # for display", which puts red on the right and blue on the left.
    arr = np.zeros((32, 64, 3), dtype=np.uint8)
    arr[:16], arr[16:] = RED, BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = load_square_rgb(tmp_path / "rotated.jpg", 16).astype(int)
    left, right = out[:, :6].reshape(-1, 3).mean(0), out[:, -6:].reshape(-1, 3).mean(0)
    assert left[2] > 200 and left[0] < 50  # blue
    assert right[0] > 200 and right[2] < 50  # red


def test_custom_caption_column_and_blank_lines(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (8, 8), RED).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text(
        '\n{"file_name": "a.png", "caption": "red square", "text": 3}\n\n'
    )
    ds = ImageFolderDataset(folder, resolution=8, caption_column="caption")
    assert ds.captions == ["red square"] and len(ds) == 1


def test_fingerprint_tracks_pixels_and_captions(tmp_path: Path) -> None:
    def make(name: str, colour: tuple[int, int, int], caption: str) -> str:
        item = ("a.png", Image.new("RGB", (8, 8), colour), {"text": caption})
        return ImageFolderDataset(_write(tmp_path / name, [item]), 8).fingerprint()

    base = make("a", RED, "red")
    assert make("b", RED, "red") == base  # content, not location
    assert make("c", BLUE, "red") != base
    assert make("d", RED, "crimson") != base


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=re.escape(str(missing))) as err:
        ImageFolderDataset(missing, 16)
    assert "data.path" in str(err.value)


def test_missing_metadata_explains_the_format(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        ImageFolderDataset(tmp_path, 16)
    msg = str(err.value)
    assert str(tmp_path) in msg and "metadata.jsonl" in msg and "file_name" in msg
    assert '{"file_name": "0001.png", "text": ' in msg  # an example line


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "line 2 is not valid JSON"),
        ('["a.png", "x"]', "line 2 must be a JSON object"),
        ('{"text": "no file"}', "line 2 has no 'file_name'"),
        ('{"file_name": "a.png", "caption": "x"}', "did you mean caption_column='caption'"),
        ('{"file_name": "a.png", "text": 5}', "line 2: caption 'text' must be a string"),
    ],
)
def test_bad_metadata_line_is_named(tmp_path: Path, line: str, expected: str) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = json.dumps({"file_name": "a.png", "text": "ok"})
    (tmp_path / "metadata.jsonl").write_text(f"{good}\n{line}\n{good}\n")
    with pytest.raises(DataError, match=expected) as err:
        ImageFolderDataset(tmp_path, 8)
    assert str(tmp_path / "metadata.jsonl") in str(err.value)


def test_missing_image_names_file_and_line(tmp_path: Path) -> None:
    _write(
        tmp_path,
        [("a.png", Image.new("RGB", (8, 8)), {"text": "a"}), ("b.png", None, {"text": "b"})],
    )
    with pytest.raises(DataError, match=r"line 2: image .*b\.png does not exist"):
        ImageFolderDataset(tmp_path, 8)


def test_unreadable_image_names_file_and_line(tmp_path: Path) -> None:
    _write(tmp_path, [("a.png", b"this is not a png", {"text": "a"})])
    with pytest.raises(DataError, match=r"line 1: cannot read image .*a\.png"):
        ImageFolderDataset(tmp_path, 8)


def test_truncated_image_is_unreadable(tmp_path: Path) -> None:
    Image.new("RGB", (64, 64), RED).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    _write(tmp_path, [("a.png", data[: len(data) // 2], {"text": "a"})])
    with pytest.raises(DataError, match="cannot read image"):
        ImageFolderDataset(tmp_path, 8)


def test_empty_metadata(tmp_path: Path) -> None:
    (tmp_path / "metadata.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="lists no images"):
        ImageFolderDataset(tmp_path, 8)
