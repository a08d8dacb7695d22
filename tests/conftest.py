"""Test-session setup shared by every package's tests."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def harness_cache(tmp_path_factory: pytest.TempPathFactory):
    """A fresh cache for the session (attribute network, reference stats, latents), inherited by
    trainer subprocesses: tests never read or write the user's ~/.cache."""
    path = tmp_path_factory.mktemp("harness-cache")
    old = os.environ.get("HARNESS_CACHE")
    os.environ["HARNESS_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("HARNESS_CACHE", None)
    else:
        os.environ["HARNESS_CACHE"] = old
