"""`harness app` as a real process: it listens on 127.0.0.1 only by default, and a SIGTERM to
it stops the Streamlit server it started (no orphan left serving)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc (Linux)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` from /proc (every thread's list)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def _listeners(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses (hex, as /proc writes them) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.add(address)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_sigterm_stops_the_streamlit_server_and_it_listened_on_loopback(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "app", "--workdir", str(tmp_path / "work"),
         "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    server: list[int] = []
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, "harness app exited before serving"
                assert time.monotonic() < deadline, "the app did not serve within 15 s"
                time.sleep(0.2)
        server = _children(proc.pid)
        assert server, "no Streamlit child process"
        listening = _listeners(port)
        assert listening == {"0100007F"}, listening  # 127.0.0.1 only, not 0.0.0.0 / ::
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=12)
        deadline = time.monotonic() + 3
        while any(_alive(pid) for pid in server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in server), "the Streamlit server outlived harness app"
        assert not _listeners(port)
    finally:
        for pid in [proc.pid, *server]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=5)
