"""Small file-system primitives every floor uses: atomic writes, an exclusive file lock, and
the cache directory for nets the harness trains itself (attribute net, REPA patch encoder)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def default_cache_dir() -> Path:
    """``$HARNESS_CACHE/domain`` if set, else ``~/.cache/diffusion-harness/domain``."""
    root = os.environ.get("HARNESS_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "diffusion-harness"
    return base / "domain"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half."""
    # A reader never sees a half-written file: write a unique temp file in the same directory
    # (same filesystem, so os.replace is atomic), fsync, then rename over the target.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block."""
    # flock locks belong to the open file description, so they also exclude threads of one
    # process that open the lock file separately. The lock file itself is never deleted
    # (deleting it would let two processes lock two different inodes).
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
