"""Test-session setup shared by every package's tests."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def harness_cache(tmp_path_factory: pytest.TempPathFactory):
    """A fresh cache for the test run (attribute network, reference stats, latents), inherited by
    trainer subprocesses: tests never read or write the user's ~/.cache.

    Under pytest-xdist every worker is its own session; they share one cache beside their
    temporary directories (the attribute network is trained once under a file lock, cache files
    are written atomically), so the network is not trained once per worker."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        path = base.parent / "harness-cache"
        path.mkdir(exist_ok=True)
    else:
        path = tmp_path_factory.mktemp("harness-cache")
    old = os.environ.get("HARNESS_CACHE")
    os.environ["HARNESS_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("HARNESS_CACHE", None)
    else:
        os.environ["HARNESS_CACHE"] = old
