"""Screenshot optuna-dashboard's trial page of a finished study (issue: the dashboard showed
"Objective 0" and a ~30-metric attribute blob that made the trial page 8000 px wide).

    uv run harness study run STUDY.yaml --workdir WORK
    uv run python bench/optuna_dashboard_shot.py WORK/optuna.db bench/optuna-dashboard-trial.png

Starts ``optuna-dashboard`` (a dev dependency) on a free local port, opens the study's trial
list in the system Chromium through Playwright (as tests/app/test_browser.py does), saves a
screenshot (and one of the study page beside it, ``*-study.png``) and prints the page's
scroll width and what it shows (objective names, user attribute keys) as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"optuna-dashboard did not answer at {url} within {timeout:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db", type=Path, help="the study's optuna.db")
    ap.add_argument("out", type=Path, help="the PNG to write")
    ap.add_argument("--study-id", type=int, default=1)
    ap.add_argument("--trial", type=int, default=0, help="trial number to select")
    args = ap.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no Chromium on PATH (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    port = _free_port()
    url = f"sqlite:///{args.db.resolve()}"
    proc = subprocess.Popen(
        ["optuna-dashboard", url, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(base + "/api/studies")
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"{base}/dashboard/studies/{args.study_id}/trials", wait_until="networkidle")
            page.get_by_text(f"Trial {args.trial}", exact=True).first.click()
            page.wait_for_timeout(1500)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            width = page.evaluate("document.documentElement.scrollWidth")
            # The study page: the history plot's objective, named (set_metric_names).
            page.goto(f"{base}/dashboard/studies/{args.study_id}", wait_until="networkidle")
            page.wait_for_timeout(3000)
            table = args.out.with_name(args.out.stem + "-study.png")
            page.screenshot(path=str(table), full_page=True)
            browser.close()
        with urllib.request.urlopen(f"{base}/api/studies/{args.study_id}") as r:
            detail = json.load(r)
        trial = next(t for t in detail["trials"] if t["number"] == args.trial)
        print(
            json.dumps(
                {
                    "screenshot": str(args.out),
                    "study_screenshot": str(table),
                    "page_scroll_width_px": width,
                    "objective_names": detail.get("objective_names"),
                    "user_attrs": [a["key"] for a in trial["user_attrs"]],
                    "params": [p["name"] for p in trial["params"]],
                },
                indent=1,
            )
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
