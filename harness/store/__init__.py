"""The results store: one DuckDB file with studies, trials, runs, metrics and samples, the
arena's contestants, raters, pairwise comparisons and renders, image-metric scores and the
judges' answers. Every write to the file is a :class:`Store` method.

Concurrency contract (:mod:`harness.store.core`): DuckDB 2.0 locks the whole file for any
read-write opener and blocks even read-only openers while it is held, so no process keeps the
file. Every operation attaches it, runs one short transaction, commits and detaches, holding an
flock on the sidecar ``<file>.lock`` meanwhile; attaching is retried with backoff while another
process holds the file, up to ``Store(timeout=...)`` seconds, then :class:`StoreBusyError`
names the file and the holder. Notebooks and other long readers use :func:`open_snapshot`.

The methods are grouped by table: :mod:`~harness.store.runs` (studies, trials, runs,
metrics, samples, run-directory ingest), :mod:`~harness.store.arena` (contestants, raters,
comparisons, renders), :mod:`~harness.store.scores` and :mod:`~harness.store.judgments`;
:mod:`~harness.store.schema` holds the schema and the value sets its columns allow.

Typical use::

    store = Store("results.duckdb")
    store.create_study("timestep", spec, directions=["minimize"], objectives=["fid"])
    store.register_run("timestep/0", run_dir, config, config_hash, study="timestep", trial=0)
    store.upsert_trial("timestep", 0, "running", params={"shift": 3.0}, run_id="timestep/0")
    store.ingest_run_dir("timestep/0", run_dir)
    store.upsert_trial("timestep", 0, "complete", values=[12.3], ended_at=time.time())
    store.trials("timestep")
    store.query("SELECT name, max(step) AS last FROM metrics WHERE run_id = ? GROUP BY name",
                ["timestep/0"])
    store.add_contestant("timestep/0@euler-8", run_id="timestep/0", solver="euler", steps=8)
    store.add_comparisons([{"prompt": "a red circle", "seed": 0, "left_id": "a", "right_id": "b",
                            "outcome": "left", "rater_id": "ana", "rater_kind": "human",
                            "time": 1.7e9}])

The schema is the SQL in :data:`MIGRATIONS`; README.md ("The results store") documents every
column.
"""

from __future__ import annotations

from evaluators.sinks import decode_json
from harness.store.arena import (
    ArenaTables,
    ComparisonsAdded,
    RaterError,
    check_rater_kind,
    comparison_hash,
)
from harness.store.core import (
    DEFAULT_TIMEOUT_S,
    LockStats,
    NotAStoreError,
    SchemaVersionError,
    StoreBusyError,
    StoreError,
    open_snapshot,
)
from harness.store.judgments import JudgmentTable
from harness.store.runs import SAMPLE_COLUMNS, IngestError, IngestResult, RunTables
from harness.store.schema import (
    DIRECTIONS,
    MIGRATIONS,
    OUTCOMES,
    RATER_KINDS,
    SCHEMA_VERSION,
    TRIAL_STATES,
    Direction,
    RaterKind,
    TrialState,
)
from harness.store.scores import ScoreTable

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DIRECTIONS",
    "MIGRATIONS",
    "OUTCOMES",
    "RATER_KINDS",
    "SAMPLE_COLUMNS",
    "SCHEMA_VERSION",
    "TRIAL_STATES",
    "ComparisonsAdded",
    "Direction",
    "IngestError",
    "IngestResult",
    "LockStats",
    "NotAStoreError",
    "RaterError",
    "RaterKind",
    "SchemaVersionError",
    "Store",
    "StoreBusyError",
    "StoreError",
    "TrialState",
    "check_rater_kind",
    "comparison_hash",
    "decode_json",
    "open_snapshot",
]


class Store(RunTables, ArenaTables, ScoreTable, JudgmentTable):
    """The results store in one DuckDB file (or ``":memory:"``). Cheap to construct; holds no
    connection to a file between operations. Thread-safe; safe to use from many processes."""
