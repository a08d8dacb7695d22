"""Run directories recorded relative to the work directory, so that a work directory can be
moved or copied and every command still finds its files.

Where a run directory is recorded (the ``run_dir`` user attribute of Optuna trials, the
``runs.run_dir`` column of the DuckDB store), it is written by :func:`to_stored` (``runs/<study>/
<number>/...`` when it lies inside the work directory, else absolute) and read back by
:func:`resolve_run_dir` against the work directory the command was given. Stores written before
this recorded absolute paths: such a path is used as it is while it exists; otherwise the part
from its ``runs/`` component on is re-rooted under the current work directory (a moved work
directory), and the recorded path is returned unchanged if that does not exist either (so that
error messages name what was recorded). A trial also records the work directory it ran in
(``workdir``), for workers that share an Optuna storage but not a work directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

RUNS = "runs"


def to_stored(path: str | Path, work: str | Path | None) -> str:
    """How ``path`` is recorded: POSIX-relative to ``work`` when inside it, else absolute."""
    absolute = Path(path).expanduser().resolve()
    if work is None:
        return str(absolute)
    root = Path(work).expanduser().resolve()
    try:
        return absolute.relative_to(root).as_posix()
    except ValueError:  # outside the work directory (a run registered by hand): keep it whole
        return str(absolute)


def resolve_run_dir(stored: str | Path, work: str | Path | None) -> Path:
    """The directory a recorded run directory names now, under the work directory ``work``
    (None: relative paths are taken relative to the current directory, as before)."""
    p = Path(stored).expanduser()
    root = None if work is None else Path(work).expanduser()
    if not p.is_absolute():
        return (root / p) if root is not None else p
    if p.exists() or root is None:
        return p
    parts = PurePath(p).parts
    # The last "runs" component first: <old work>/runs/<study>/<number>; an earlier one is
    # tried too in case a study itself is named "runs".
    for i in reversed(range(len(parts))):
        if parts[i] == RUNS:
            candidate = root.joinpath(*parts[i:])
            if candidate.exists():
                return candidate
    return p


def trial_run_dir(user_attrs: Mapping[str, Any], work: str | Path | None) -> Path | None:
    """The run directory of an Optuna trial (its ``run_dir`` user attribute, None without one),
    under the work directory ``work``. A trial also records the work directory it ran in
    (``workdir``): workers sharing one Optuna storage (PostgreSQL) each train in their own, and
    a caller that gives no ``work`` (None) reads the trial where it ran; a run directory absent
    under ``work`` is looked up there too."""
    stored = user_attrs.get("run_dir")
    if not stored:
        return None
    origin = user_attrs.get("workdir")
    candidates = [resolve_run_dir(stored, work)] if work is not None else []
    if origin:
        candidates.append(resolve_run_dir(stored, origin))
    if not candidates:
        candidates.append(Path(stored))
    return next((c for c in candidates if c.exists()), candidates[0])


def store_work_root(store: Any) -> Path | None:
    """The work directory of a :class:`harness.store.Store`: the folder of its file (the store
    is ``<work>/harness.duckdb``); None for an in-memory store."""
    if getattr(store, "memory", False):
        return None
    return Path(store.path).parent
