"""The store's schema and vocabulary: the value sets its columns allow, and the migrations
that create and upgrade a file."""

from __future__ import annotations

from typing import Literal, get_args

from evaluators.judging import OUTCOMES, JudgeKind

TrialState = Literal["running", "complete", "pruned", "failed"]
Direction = Literal["minimize", "maximize"]
RaterKind = Literal["human", JudgeKind]
"""A person, or a judge's kind (:data:`evaluators.judging.JudgeKind`)."""
TRIAL_STATES: tuple[str, ...] = get_args(TrialState)
DIRECTIONS: tuple[str, ...] = get_args(Direction)
RATER_KINDS: tuple[str, ...] = get_args(RaterKind)
# OUTCOMES: the rating engine's outcomes, defined with the judges' contract (evaluators.judging
# imports nothing heavy, so the store stays free of numpy/scipy).
__all__ = [
    "DIRECTIONS",
    "MIGRATIONS",
    "OUTCOMES",
    "RATER_KINDS",
    "SCHEMA_VERSION",
    "TRIAL_STATES",
    "Direction",
    "RaterKind",
    "TrialState",
]

# -- schema ------------------------------------------------------------------------------------
# MIGRATIONS[i] upgrades a file from schema version i to i + 1; MIGRATIONS[0] creates v1 from an
# empty file. A new file runs them all, so a fresh file and a migrated one cannot drift apart.
# To change the schema: append the SQL that upgrades the previous version, bump SCHEMA_VERSION,
# and document the change in README.md. Times are UTC epoch seconds (DOUBLE), as in
# metrics.jsonl; JSON columns hold canonical JSON text (sorted keys).
_SCHEMA_V1 = f"""
CREATE TABLE schema_version (
    version     INTEGER NOT NULL
);
CREATE TABLE studies (
    name        VARCHAR PRIMARY KEY,
    spec        JSON NOT NULL,
    directions  VARCHAR[] NOT NULL,
    objectives  VARCHAR[] NOT NULL,
    created_at  DOUBLE NOT NULL
);
CREATE TABLE trials (
    study       VARCHAR NOT NULL,
    number      INTEGER NOT NULL,
    state       VARCHAR NOT NULL CHECK (state IN {TRIAL_STATES!r}),
    params      JSON,
    values      DOUBLE[],
    error       VARCHAR,
    stderr_tail VARCHAR,
    started_at  DOUBLE,
    ended_at    DOUBLE,
    gpu_seconds DOUBLE,
    run_id      VARCHAR,
    updated_at  DOUBLE NOT NULL,
    PRIMARY KEY (study, number)
);
CREATE TABLE runs (
    run_id      VARCHAR PRIMARY KEY,
    study       VARCHAR,
    trial       INTEGER,
    run_dir     VARCHAR NOT NULL,
    config      JSON NOT NULL,
    config_hash VARCHAR NOT NULL,
    registered_at DOUBLE NOT NULL
);
CREATE TABLE metrics (
    run_id      VARCHAR NOT NULL,
    step        BIGINT NOT NULL,
    name        VARCHAR NOT NULL,
    value       DOUBLE,
    time        DOUBLE,
    PRIMARY KEY (run_id, step, name)
);
CREATE TABLE samples (
    run_id      VARCHAR NOT NULL,
    path        VARCHAR NOT NULL,
    tag         VARCHAR,
    step        BIGINT,
    prompt_id   INTEGER,
    prompt      VARCHAR,
    seed        BIGINT,
    steps       INTEGER,
    nfe         INTEGER,
    cfg         DOUBLE,
    solver      VARCHAR,
    shift       DOUBLE,
    sha256      VARCHAR NOT NULL,
    extra       JSON,
    PRIMARY KEY (run_id, path)
);
"""


# v2: the arena. A contestant is a trained model at a sampler setting (or an external image set:
# run_id NULL); a comparison is one vote between two contestants' images for the same prompt and
# seed. comparison_id is a content hash of the vote (see _comparison_id), so importing the same
# vote twice stores it once. comparisons.rater_kind copies raters.kind so that per-kind
# leaderboards filter one table. No FOREIGN KEYs: DuckDB refuses to update a referenced row (a
# contestant whose details are filled in later); add_comparisons checks the references instead.
# The value lists are spelled out, not derived from RATER_KINDS / OUTCOMES: a migration is
# history and must not change when the constants do.
_SCHEMA_V2 = """
CREATE TABLE contestants (
    contestant_id VARCHAR PRIMARY KEY,
    run_id      VARCHAR,
    label       VARCHAR,
    solver      VARCHAR,
    steps       INTEGER,
    guidance    DOUBLE,
    shift       DOUBLE,
    extra       JSON,
    created_at  DOUBLE NOT NULL
);
CREATE TABLE raters (
    rater_id    VARCHAR PRIMARY KEY,
    kind        VARCHAR NOT NULL CHECK (kind IN ('human', 'judge', 'domain')),
    name        VARCHAR,
    extra       JSON,
    created_at  DOUBLE NOT NULL
);
CREATE TABLE comparisons (
    comparison_id VARCHAR PRIMARY KEY,
    prompt      VARCHAR NOT NULL,
    seed        BIGINT NOT NULL,
    left_id     VARCHAR NOT NULL,
    right_id    VARCHAR NOT NULL,
    left_image  VARCHAR,
    right_image VARCHAR,
    outcome     VARCHAR NOT NULL CHECK (outcome IN ('left', 'right', 'tie', 'both_bad')),
    rater_id    VARCHAR NOT NULL,
    rater_kind  VARCHAR NOT NULL CHECK (rater_kind IN ('human', 'judge', 'domain')),
    time        DOUBLE NOT NULL,
    session     VARCHAR,
    extra       JSON,
    CHECK (left_id <> right_id)
);
"""


# v3: measurements with provenance and the judges' cache.
# - scores: one image-metric value (FID, KID, CMMD, CLIP score, ...) of an image set. score_id is
#   a content hash of (target, metric, provenance); provenance is canonical JSON naming the
#   extractor, its weights hash, resolution, resize mode, reference set and sample count and the
#   sampler settings and seeds of the images; provenance_hash is its hash, so that scores with
#   different provenance are never compared silently (group by it).
# - judgments: every MLLM/domain judge answer, keyed by a hash of (image hashes, prompt, judge,
#   model, rubric version, mode, order), so nothing is asked twice; an unparseable answer is
#   stored with parsed = false and its raw text, never dropped.
# - renders: the arena's paired images: every contestant rendered on the same prompt set with the
#   same seeds (so the same initial noise); comparisons refer to these images.
# - raters.token_hash: the salted hash of a human rater's personal voting token (never the
#   token itself).
_SCHEMA_V3 = """
CREATE TABLE scores (
    score_id    VARCHAR PRIMARY KEY,
    target      VARCHAR NOT NULL,
    target_kind VARCHAR NOT NULL CHECK (target_kind IN ('run', 'contestant', 'folder')),
    metric      VARCHAR NOT NULL,
    value       DOUBLE NOT NULL,
    num_images  INTEGER NOT NULL,
    provenance  JSON NOT NULL,
    provenance_hash VARCHAR NOT NULL,
    time        DOUBLE NOT NULL
);
CREATE TABLE judgments (
    judgment_key VARCHAR PRIMARY KEY,
    judge       VARCHAR NOT NULL,
    model       VARCHAR NOT NULL,
    mode        VARCHAR NOT NULL CHECK (mode IN ('absolute', 'pairwise')),
    rubric_version VARCHAR NOT NULL,
    prompt      VARCHAR NOT NULL,
    images      VARCHAR[] NOT NULL,
    parsed      BOOLEAN NOT NULL,
    result      JSON,
    raw         VARCHAR,
    error       VARCHAR,
    latency_s   DOUBLE,
    time        DOUBLE NOT NULL
);
CREATE TABLE renders (
    contestant_id VARCHAR NOT NULL,
    prompt_id   INTEGER NOT NULL,
    prompt      VARCHAR NOT NULL,
    category    VARCHAR,
    seed        BIGINT NOT NULL,
    path        VARCHAR NOT NULL,
    sha256      VARCHAR NOT NULL,
    extra       JSON,
    time        DOUBLE NOT NULL,
    PRIMARY KEY (contestant_id, prompt_id, seed)
);
ALTER TABLE raters ADD COLUMN token_hash VARCHAR;
"""

# v4: seeds. A study trains every configuration (trial) ``repeats`` times; each seed run is a
# run of its own (run_id STUDY/TRIAL/sK) with its index and training seed. eval_images holds the
# per-image results of every evaluation (evals/step_*.npz in the run directory; the features
# stay in that file), so that two configurations can be compared on the same prompts and
# sampling seeds.
_SCHEMA_V4 = """
ALTER TABLE runs ADD COLUMN repeat INTEGER;
ALTER TABLE runs ADD COLUMN seed BIGINT;
CREATE TABLE eval_images (
    run_id      VARCHAR NOT NULL,
    step        BIGINT NOT NULL,
    split       VARCHAR NOT NULL,
    row         INTEGER NOT NULL,
    sample_seed BIGINT NOT NULL,
    labels      INTEGER[] NOT NULL,
    correct     BOOLEAN[] NOT NULL,
    PRIMARY KEY (run_id, step, split, row)
);
"""

MIGRATIONS: tuple[str, ...] = (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3, _SCHEMA_V4)
SCHEMA_VERSION = 4
assert len(MIGRATIONS) == SCHEMA_VERSION, "every schema version needs its migration"
