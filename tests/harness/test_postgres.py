"""Several `harness study run` workers sharing one study on a real PostgreSQL server.

`.ci/run` starts the server (`.ci/postgres.sh`) and sets HARNESS_TEST_POSTGRES. Without it the
test is skipped locally, but in CI (CI=true) a missing server is a failure, not a skip.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import optuna
import pytest

from tests.harness.test_runner import study_run_cmd, write_study
from tests.trainers.trainer_utils import REPO, env

URL = os.environ.get("HARNESS_TEST_POSTGRES")
pytestmark = pytest.mark.slow

if not URL and os.environ.get("CI"):
    raise RuntimeError("CI must set HARNESS_TEST_POSTGRES (see .ci/run and .ci/postgres.sh)")


def fresh_database(url: str, name: str) -> str:
    """Create database ``name`` on the server of ``url``; return its URL."""
    import psycopg

    base, _, _ = url.rpartition("/")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{base}/{name}"


@pytest.mark.skipif(
    not URL, reason="no PostgreSQL server: run `bash .ci/postgres.sh` and export its URL"
)
def test_two_workers_share_one_study_and_run_exactly_n_trials(tmp_path: Path) -> None:
    name = f"shared-{uuid.uuid4().hex[:8]}"
    # A fresh database: both workers start at once and race to create Optuna's schema.
    url = fresh_database(URL, name.replace("-", "_"))
    search = {"timesteps.sampler": ["uniform", "logit_normal", "mode", "cosmap"]}
    study_file = write_study(
        tmp_path / f"{name}.yaml",
        search,
        3,
        steps=6,
        optuna={"sampler": "random", "pruner": "none", "seed": 0, "storage": url},
    )
    workers = [
        subprocess.Popen(
            study_run_cmd(study_file, tmp_path / f"worker{i}"),
            env=env(),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for w, out in zip(workers, outputs, strict=True):
        assert w.returncode == 0, out[-3000:]
    study = optuna.load_study(study_name=name, storage=url)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3 and len(states) == 3, states
    # Each trial ran in exactly one worker's work directory; a repeat (the random sampler asked
    # for a configuration already trained) reuses its original's run, trained nowhere else.
    # run_dir is relative to the work directory the trial ran in (its workdir attribute).
    run_dirs = [Path(t.user_attrs["workdir"]) / t.user_attrs["run_dir"] for t in study.trials]
    repeats = {
        t.number: t.user_attrs["repeat_of"] for t in study.trials if "repeat_of" in t.user_attrs
    }
    assert all(run_dirs[n] == run_dirs[original] for n, original in repeats.items())
    assert len(set(run_dirs)) == 3 - len(repeats), (run_dirs, repeats)
    assert all((d / "s0" / "status.json").exists() for d in run_dirs)
    # Both workers took part (otherwise nothing was shared).
    assert {d.parents[2].name for d in run_dirs} == {"worker0", "worker1"}
