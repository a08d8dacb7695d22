"""The arena app: leaderboard, pairwise rating sessions, study and run browser.

Start it with ``harness app [--workdir DIR] [--port P]`` (which runs ``streamlit run
app/main.py -- --workdir DIR`` headless). One page per file under ``app/views/``; this script
only builds the navigation. A personal rating link (``/rate?token=...``, printed by
``harness raters add NAME``) opens the rating page directly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

# `streamlit run app/main.py` puts app/ on sys.path, not the repository root.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

VIEWS = Path(__file__).resolve().parent / "views"


def main() -> None:
    st.set_page_config(
        page_title="Diffusion arena", page_icon=":material/leaderboard:", layout="wide"
    )
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
    st.navigation(pages, position="top").run()


main()
