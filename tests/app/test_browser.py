"""The app in a real browser: `harness app` started as a process, Chromium driven by Playwright,
votes cast with the keyboard, a screenshot of every page saved as a test artifact
(``$HARNESS_ARTIFACTS`` or ``tests/artifacts/``).

Needs the system Chromium (``apt-get install chromium``; ``.ci/run`` installs it); Playwright's
own browser download is not used. Skipped, saying so, where no Chromium is installed.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from arena_fixture import build
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("HARNESS_ARTIFACTS") or ROOT / "tests" / "artifacts") / "app"
# Streamlit's pages scroll inside their own container, so a "full page" screenshot is the
# viewport: a tall one shows each page whole.
# Offline: no first-run, update or QUIC traffic (the machine has no network).
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium on PATH: install it (Debian: apt-get install chromium; .ci/run does)",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, object]]:
    """The fixture arena served by `harness app` on a free port: (base URL, arena)."""
    arena = build(tmp_path / "work")
    port = _free_port()
    log = open(tmp_path / "app.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "app", "--workdir", str(arena.workdir),
         "--port", str(port), "--address", "127.0.0.1"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"the app did not start:\n{(tmp_path / 'app.log').read_text()}"
                )
            time.sleep(0.2)
        yield base, arena
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the CLI and its streamlit child
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _settle(page, images: int = 0) -> None:
    """Wait until the script run is over and at least ``images`` images have loaded."""
    page.wait_for_function(
        """n => !document.querySelector('[data-testid="stStatusWidget"]')
               && [...document.querySelectorAll('[data-testid="stImage"] img')]
                      .filter(i => i.complete && i.naturalWidth > 0).length >= n""",
        arg=images,
    )
    page.wait_for_timeout(300)  # plotly's first paint


def _human_votes(arena) -> int:
    rows = arena.store.query(
        "SELECT count(*) AS n FROM comparisons WHERE rater_id = ?", [arena.rater_id]
    )
    return rows[0]["n"]


def _wait_votes(arena, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _human_votes(arena) != n:
        assert time.monotonic() < deadline, f"expected {n} stored votes, got {_human_votes(arena)}"
        time.sleep(0.1)


def _record_requests(page, base: str) -> list[str]:
    """Every URL the page asks for (documents, scripts, fonts, images, the websocket)."""
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.on("websocket", lambda ws: urls.append(ws.url))
    return urls


def _outside(urls: list[str], base: str) -> list[str]:
    """The URLs that do not go to the app's own host (data: and blob: URIs stay in the page)."""
    host = urllib.parse.urlsplit(base).netloc
    return [
        u
        for u in urls
        if urllib.parse.urlsplit(u).scheme not in ("data", "blob")
        and urllib.parse.urlsplit(u).netloc != host
    ]


def test_pages_render_and_keyboard_votes_are_stored(served) -> None:
    from playwright.sync_api import expect, sync_playwright

    base, arena = served
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1500})
        urls = _record_requests(page, base)
        page.set_default_timeout(30_000)  # generous: CI machines are shared
        expect.set_options(timeout=30_000)

        page.goto(base)  # the default page, at /
        expect(page.get_by_role("heading", name="Arena leaderboard")).to_be_visible()
        expect(page.get_by_text("3 contestants, 5 votes")).to_be_visible()
        expect(page.get_by_role("heading", name="c-good (C-GOOD)")).to_be_visible()
        _settle(page)
        page.screenshot(path=ARTIFACTS / "leaderboard.png", full_page=True)

        page.goto(f"{base}/rate")  # no token: no buttons
        expect(page.get_by_text("Rating needs a personal link")).to_be_visible()
        assert page.get_by_role("button", name="A is better").count() == 0

        page.goto(f"{base}/rate?token={arena.token}")
        expect(page.get_by_role("button", name="A is better")).to_be_visible()
        _settle_rate(page)
        page.screenshot(path=ARTIFACTS / "rate.png", full_page=True)
        for n, key in enumerate("abtx", start=1):
            page.keyboard.press(key)
            expect(page.get_by_text(f"{n} of 20 votes this session")).to_be_visible()
            _wait_votes(arena, n)
        page.keyboard.press("u")  # undo the last vote
        expect(page.get_by_text("3 of 20 votes this session")).to_be_visible()
        _wait_votes(arena, 3)
        _settle_rate(page)
        page.screenshot(path=ARTIFACTS / "rate-after-votes.png", full_page=True)
        outcomes = sorted(
            r["outcome"]
            for r in arena.store.query(
                "SELECT outcome FROM comparisons WHERE rater_id = ?", [arena.rater_id]
            )
        )
        assert outcomes == ["left", "right", "tie"]

        page.goto(f"{base}/studies")
        expect(page.get_by_role("heading", name="Studies")).to_be_visible()
        expect(page.get_by_text("3 trials: 2 complete")).to_be_visible()
        page.get_by_role("tab", name="Ablation").click()
        expect(page.get_by_role("heading", name="Study toy")).to_be_visible()
        page.screenshot(path=ARTIFACTS / "study-ablation.png", full_page=True)
        page.get_by_role("tab", name="Plots").click()
        expect(page.get_by_role("heading", name="Objective history")).to_be_visible()
        _settle(page)
        page.screenshot(path=ARTIFACTS / "study-plots.png", full_page=True)

        page.goto(f"{base}/runs?run=toy/2")
        expect(page.get_by_text("Failed: loss is NaN at step 30")).to_be_visible()
        expect(page.get_by_role("heading", name="Final samples")).to_be_visible()
        _settle(page, images=4)
        page.screenshot(path=ARTIFACTS / "run.png", full_page=True)
        browser.close()
    assert urls and not _outside(urls, base), f"requests outside the app: {_outside(urls, base)}"


RATE_IMAGES = '[data-testid="stMarkdownContainer"] img[src^="data:image/png"]'
# The pair is on screen: the progress text counts this vote and both images are decoded.
NEXT_PAIR = (
    "k => document.body.innerText.includes(`${k} of 20 votes this session`)"
    f" && [...document.querySelectorAll('{RATE_IMAGES}')]"
    ".filter(i => i.complete && i.naturalWidth > 0).length === 2"
)


def _settle_rate(page) -> None:
    """Wait until the rating page's script run is over and both images are decoded."""
    page.wait_for_function(
        """sel => !document.querySelector('[data-testid="stStatusWidget"]')
               && [...document.querySelectorAll(sel)]
                      .filter(i => i.complete && i.naturalWidth > 0).length === 2""",
        arg=RATE_IMAGES,
    )


def test_rating_page_fits_a_laptop_screen_is_lossless_and_fast(served) -> None:
    """At 1366x768: both framed images and every vote button on screen without scrolling; the
    images are the render files' own bytes; vote -> next pair timed over a whole session; and
    nothing is fetched from outside the app."""
    from playwright.sync_api import expect, sync_playwright

    base, arena = served
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    files = {Path(r["path"]).read_bytes() for r in arena.store.query("SELECT path FROM renders")}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        urls = _record_requests(page, base)
        page.set_default_timeout(30_000)
        expect.set_options(timeout=30_000)
        page.goto(f"{base}/rate?token={arena.token}")
        expect(page.get_by_role("button", name="A is better")).to_be_visible()
        _settle_rate(page)
        page.screenshot(path=ARTIFACTS / "rate-1366x768.png")

        images = page.locator(RATE_IMAGES)
        assert images.count() == 2
        for k in range(2):
            img = images.nth(k)
            box = img.bounding_box()
            assert box and box["y"] >= 0 and box["y"] + box["height"] <= 768, box
            assert box["width"] >= 200, f"image shown too small: {box}"
            border = img.evaluate(
                "e => getComputedStyle(e).borderTopWidth + ' ' + getComputedStyle(e).borderTopStyle"
            )
            assert border == "2px solid", border  # the frame
            src = img.get_attribute("src")
            sent = base64.b64decode(src.split(",", 1)[1])
            assert sent in files, "the page sent bytes that are not a render file's"
            # What the rater sees is the file scaled to fill its frame: a corner and the centre
            # of the shown image have the file's corner and centre colours.
            with Image.open(io.BytesIO(sent)) as f, Image.open(io.BytesIO(img.screenshot())) as s:
                f, s = f.convert("RGB"), s.convert("RGB")
                inset = 2 + 4 + 3  # the border, the padding, a few pixels in
                assert s.getpixel((inset, inset)) == f.getpixel((0, 0))
                assert s.getpixel((s.width // 2, s.height // 2)) == f.getpixel(
                    (f.width // 2, f.height // 2)
                )
        for name in ("A is better", "B is better", "Tie", "Both bad", "Undo"):
            box = page.get_by_role("button", name=name).bounding_box()
            assert box is not None, name
            assert box["x"] >= 0 and box["x"] + box["width"] <= 1366, (name, box)
            assert box["y"] >= 0 and box["y"] + box["height"] <= 768, (name, box)

        # Vote -> next pair on screen, for every vote of a session but its last (which ends
        # the session). Between votes the page finishes its run, as it does while a person
        # looks at a pair (that is when the next pair is prefetched).
        page.wait_for_timeout(500)  # a key pressed right after the first paint can be lost
        seconds = []
        for k in range(1, 20):
            t0 = time.perf_counter()
            page.keyboard.press("a")
            page.wait_for_function(NEXT_PAIR, arg=k, polling="raf")
            seconds.append(time.perf_counter() - t0)
            _settle_rate(page)
        page.keyboard.press("b")
        expect(page.get_by_text("Session complete: 20 votes")).to_be_visible()
        expect(page.get_by_text("20 of 20 votes this session")).to_be_visible()
        expect(page.get_by_role("button", name="Start another session")).to_be_visible()
        _wait_votes(arena, 20)
        page.screenshot(path=ARTIFACTS / "rate-session-end.png")
        browser.close()
    median, worst = statistics.median(seconds), max(seconds)
    print(f"vote -> next pair over {len(seconds)} votes: median {median:.3f} s, max {worst:.3f} s")
    (ARTIFACTS / "vote-latency.txt").write_text(
        f"median {median:.3f} s, max {worst:.3f} s, n {len(seconds)}: "
        + " ".join(f"{x:.3f}" for x in seconds)
        + "\n"
    )
    assert median <= 0.6, f"vote -> next pair median {median:.2f} s (target 0.3 s)"
    assert not _outside(urls, base), f"requests outside the app: {_outside(urls, base)}"
