"""What every page shares: the work directory, the store, cached reads, image display.

The store is opened per operation (see :mod:`harness.store`); what is cached is *data*, with
``st.cache_data`` and a short ttl, keyed by the DuckDB path, so that a page shows votes, trials
and metrics that studies and judges wrote a few seconds ago without hammering the file. A
:class:`Store` object holds no connection, so keeping one per path (``st.cache_resource``)
is safe.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import streamlit as st

from evaluators.redact import redact_text
from harness import app_data as data
from harness.store import Store, StoreError

TTL_S = 5
"""How stale a cached read may be (seconds)."""
DEFAULT_WORKDIR = "work"
THUMB_PX = 160


def workdir(argv: Sequence[str] | None = None) -> Path:
    """The work directory: ``--workdir DIR`` after ``streamlit run app/main.py --``, else
    ``$HARNESS_WORKDIR``, else ``work``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--workdir", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return Path(args.workdir or os.environ.get("HARNESS_WORKDIR") or DEFAULT_WORKDIR).resolve()


def db_path() -> str:
    """The work directory's DuckDB file (its path as text: the cache key of every read)."""
    return str(workdir() / "harness.duckdb")


@st.cache_resource(show_spinner=False)
def _store(db: str) -> Store:
    return Store(db)


def store() -> Store | None:
    """The store, or None (with a message on the page) when the work directory has none."""
    db = db_path()
    if not Path(db).exists():
        st.warning(
            f"No results store at `{db}`. Run a study (`harness study run ...`) or start the app "
            "on another work directory: `harness app --workdir DIR`."
        )
        return None
    try:
        return _store(db)
    except StoreError as err:  # not a store, locked for too long, written by a newer harness
        show_store_error(err)
        return None


def show_store_error(err: StoreError) -> None:
    """An expected store failure as a clean message on the page (no traceback)."""
    st.error(f"The results store cannot be read: {redact_text(str(err))}")


# -- cached reads ---------------------------------------------------------------------------------
@st.cache_data(ttl=TTL_S, show_spinner=False)
def leaderboard(db: str, filters: data.Filters) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    return data.leaderboard(_store(db), filters)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def choice_params(db: str) -> list[str]:
    return data.choice_params(_store(db))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def choice_effects(
    db: str, param: str, rater_kind: str | None, style: tuple[str, ...]
) -> dict[str, Any]:
    return data.choice_effects(_store(db), param, rater_kind, style)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def filter_options(db: str) -> dict[str, list[str]]:
    return data.filter_options(_store(db))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def reliability(db: str) -> list[dict[str, Any]]:
    from harness.voting import reliability

    return reliability(_store(db))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def contestant(db: str, contestant_id: str) -> dict[str, Any] | None:
    return data.contestant(_store(db), contestant_id)


@st.cache_data(ttl=60, show_spinner=False, max_entries=512)
def render_png(db: str, contestant_id: str, prompt_id: int, seed: int) -> bytes:
    """A render's PNG, looked up by id. Renders never change once written."""
    from harness.voting import render_image

    return render_image(_store(db), contestant_id, prompt_id, seed)


@st.cache_data(show_spinner=False, max_entries=1024)
def enhanced_prompts(db: str, contestant_ids: tuple[str, ...], prompt_id: int, seed: int) -> dict:
    """What a prompt enhancer made of the prompt for each side that has one (renders never
    change once written)."""
    from harness.voting import enhanced_prompts as lookup

    return lookup(_store(db), contestant_ids, prompt_id, seed)


@st.cache_data(ttl=60, show_spinner=False, max_entries=1024)
def sample_png(db: str, run_id: str, path: str) -> bytes:
    """A registered sample's PNG, looked up by (run id, path) in the store."""
    return data.sample_image(_store(db), run_id, path)


def crisp(png: bytes, px: int) -> bytes:
    """``png`` enlarged by an integer factor with nearest-neighbour sampling when it is smaller
    than ``px``: the browser would otherwise blur a 32-pixel sample into mush when it stretches
    it, and a rater must see the pixels the model made. Larger images are returned as they are.
    """
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        factor = px // max(im.size)
        if factor < 2:
            return png
        big = im.resize((im.width * factor, im.height * factor), Image.Resampling.NEAREST)
        out = io.BytesIO()
        big.save(out, format="PNG")
    return out.getvalue()


def clear_after_vote() -> None:
    """A vote changes the leaderboard and the reliability table: drop their cached copies."""
    leaderboard.clear()
    reliability.clear()


def show_images(images: list[bytes], captions: list[str], per_row: int = 6) -> None:
    """A grid of PNGs with captions, ``per_row`` per row."""
    for start in range(0, len(images), per_row):
        cols = st.columns(per_row)
        for col, img, cap in zip(
            cols, images[start : start + per_row], captions[start : start + per_row], strict=False
        ):
            # PNG: "auto" would re-encode an opaque PNG as JPEG (quality 90).
            col.image(crisp(img, THUMB_PX), caption=cap, width=THUMB_PX, output_format="PNG")


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table cell: 4 significant digits, '-' for missing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
