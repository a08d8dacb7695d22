"""The arena app: leaderboard, pairwise rating sessions, study and run browser.

Start it with ``harness app [--workdir DIR] [--port P]`` (which runs ``streamlit run
app/main.py -- --workdir DIR`` headless). One page per file under ``app/views/``; this script
only builds the navigation. A personal rating link (``/rate?token=...``, printed by
``harness raters add NAME``) opens the rating page directly.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import streamlit as st

# `streamlit run app/main.py` puts app/ on sys.path, not the repository root.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

VIEWS = Path(__file__).resolve().parent / "views"


def _import_heavy() -> None:
    import importlib

    for name in (
        "evaluators.ratings",
        "plotly.graph_objects",
        "optuna.visualization",
        "harness.report_html",
    ):
        importlib.import_module(name)


@st.cache_resource(show_spinner=False)
def _warm_up() -> bool:
    """Import the rating engine, plotly and Optuna's plots in the background once per server
    process (several seconds on a small CPU), so that the first visitor of each page does not
    wait for them. Imports are thread-safe: a page that needs a module first simply waits."""
    threading.Thread(target=_import_heavy, name="warm-up", daemon=True).start()
    return True


@st.cache_resource(show_spinner=False)
def _favicon() -> bytes:
    """The tab icon, drawn here (two framed squares: a pair to compare). Streamlit fetches a
    ``:material/...:`` page icon from fonts.gstatic.com; the app must load nothing from
    outside (raters' browsers may be offline, and no third party learns who rates)."""
    import io

    from PIL import Image, ImageDraw

    im = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    draw.rectangle((1, 6, 14, 25), fill=(255, 75, 75), outline=(90, 90, 90))
    draw.rectangle((17, 6, 30, 25), fill=(60, 110, 220), outline=(90, 90, 90))
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


def main() -> None:
    # No tracebacks for raters, however the app was started (`harness app` passes it too):
    # expected errors are shown as messages by the pages, anything else as a generic notice.
    st.set_option("client.showErrorDetails", "none")
    _warm_up()
    st.set_page_config(page_title="Diffusion arena", page_icon=_favicon(), layout="wide")
    pages = [
        st.Page(
            VIEWS / "leaderboard.py",
            title="Leaderboard",
            icon=":material/leaderboard:",
            url_path="leaderboard",
            default=True,
        ),
        st.Page(VIEWS / "rate.py", title="Rate", icon=":material/compare:", url_path="rate"),
        st.Page(
            VIEWS / "studies.py", title="Studies", icon=":material/science:", url_path="studies"
        ),
        st.Page(VIEWS / "runs.py", title="Runs", icon=":material/photo_library:", url_path="runs"),
    ]
    page = st.navigation(pages, position="top")
    from app import common  # after sys.path holds the repository root
    from harness.store import StoreError

    try:
        page.run()
    except StoreError as err:  # the store failed under a page: a message, never a traceback
        common.show_store_error(err)


main()
