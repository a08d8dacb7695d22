"""A randomised kill campaign: 20 SIGKILLs of the runner and of trainer processes at random
times, then a clean run. Every trial group must end complete exactly once, every seed run with
one ``ok`` status, and no metric row may be duplicated (metrics.jsonl and DuckDB).

The randomness is seeded (``KILL_CAMPAIGN_SEED`` overrides the default) and the seed is
printed, so a failing campaign can be replayed."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

from harness.runner import _trainer_groups
from harness.spec import load_study
from harness.store import Store
from tests.harness.test_runner import study_run_cmd, write_study
from tests.trainers.trainer_utils import REPO, env

pytestmark = pytest.mark.slow

KILLS = 20
STEPS = 24  # log and checkpoint every 4 steps


def trainer_groups(work: Path) -> list[int]:
    return sorted(_trainer_groups(sorted((work / "runs").glob("*/*/s*"))))


def test_no_trial_is_lost_or_duplicated_by_kills(tmp_path: Path) -> None:
    seed = int(os.environ.get("KILL_CAMPAIGN_SEED", "1717"))
    print(f"kill campaign seed {seed} (rerun with KILL_CAMPAIGN_SEED={seed})")
    rng = random.Random(seed)
    study_file = write_study(
        tmp_path / "kills.yaml",
        {"timesteps.sampler": ["uniform", "cosmap"]},
        2,
        steps=STEPS,
        eval_every=1000,  # only the final evaluation: this test is about kills
        design="grid",
        repeats=2,
        retries=KILLS,  # a trainer killed from outside is always retried here
        # Every seed run of both configurations at once: the clean run is one wave.
        resources={"devices": "cpu", "trials_per_device": 4},
    )
    spec = load_study(study_file)
    work = tmp_path / "work"
    cmd = study_run_cmd(study_file, work)
    log = open(tmp_path / "runners.log", "a")  # noqa: SIM115 (closed in finally)
    kills: list[str] = []

    def start() -> subprocess.Popen:
        log.write(f"\n=== runner start after {len(kills)} kill(s)\n")
        log.flush()
        return subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    t0 = time.time()
    runner = start()
    try:
        while len(kills) < KILLS:
            # Half the time wait for the live runner's trainers, so that kills land at random
            # points of a trainer's life (start-up, training, checkpointing, final evaluation)
            # and of the runner's (following, retrying, ingesting); else the runner may still be
            # starting (recovering orphans, re-queueing, enqueueing, asking).
            if rng.random() < 0.5:
                wait_for(lambda r=runner: children(r, work) or r.poll() is not None, 60)
            time.sleep(rng.uniform(0.0, 2.5))
            if runner.poll() is not None:  # the study finished between kills: start it again
                assert runner.returncode == 0, (tmp_path / "runners.log").read_text()[-4000:]
                runner = start()
                continue
            # A trainer of the live runner (it retries it), else an orphan of a killed one.
            trainers = children(runner, work) or trainer_groups(work)
            if trainers and rng.random() < 0.65:
                victim = rng.choice(trainers)
                kill_group(victim)
                kills.append(f"trainer {victim} at {time.time() - t0:.1f}s")
            else:
                runner.kill()
                runner.wait()
                kills.append(f"runner {runner.pid} at {time.time() - t0:.1f}s")
                runner = start()
        print("kills:", "; ".join(kills))
        t1 = time.time()
        # The clean run: it finishes whatever the kills left.
        rc = runner.wait(timeout=400)
        log.flush()
        assert rc == 0, (tmp_path / "runners.log").read_text()[-4000:]
        print(f"kills took {t1 - t0:.1f}s, the clean run {time.time() - t1:.1f}s")
    finally:
        for pgid in trainer_groups(work):
            kill_group(pgid)
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        log.close()
    print(f"campaign: {time.time() - t0:.1f}s")
    output = (tmp_path / "runners.log").read_text()

    study = optuna.load_study(
        study_name="kills", storage=f"sqlite:///{(work / 'optuna.db').resolve()}"
    )
    trials = study.get_trials()
    states = Counter(t.state for t in trials)
    assert (
        not states[optuna.trial.TrialState.RUNNING] and not states[optuna.trial.TrialState.WAITING]
    ), states
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    groups = Counter(t.user_attrs["run_number"] for t in complete)
    assert set(groups.values()) == {1}, groups  # each group complete exactly once
    # Every group that was ever started ended complete (none lost), and the configurations
    # are the study's, each once.
    assert set(groups) == {t.user_attrs.get("run_number", t.number) for t in trials}
    assert len(complete) == spec.trials == len(spec.configurations())
    assert sorted(t.params["timesteps.sampler"] for t in complete) == ["cosmap", "uniform"]

    store = Store(work / "harness.duckdb")
    stored = store.trials("kills")
    assert sum(r["state"] == "complete" for r in stored) == spec.trials
    for t in complete:
        root = work / "runs" / "kills" / f"{t.user_attrs['run_number']:04d}"
        for k in range(spec.repeats):
            run = root / f"s{k}"
            assert json.loads((run / "status.json").read_text())["status"] == "ok"
            lines = (run / "metrics.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines]  # no torn line left either
            keys = Counter((r["step"], r["name"]) for r in records)
            assert set(keys.values()) == {1}, [k for k, n in keys.items() if n > 1]
            losses = sorted(r["step"] for r in records if r["name"] == "train/loss")
            assert losses == list(range(4, STEPS + 1, 4))  # nothing lost either
            run_id = f"kills/{t.user_attrs['run_number']:04d}/s{k}"
            rows = store.query(
                "SELECT count(*) AS n, count(DISTINCT (step, name)) AS d FROM metrics "
                "WHERE run_id = ?",
                [run_id],
            )[0]
            assert rows["n"] == rows["d"] == len(records), (run_id, rows, len(records))
    # The kills were seen for what they were.
    assert "retry" in output or "its runner died" in output


def children(runner: subprocess.Popen, work: Path) -> list[int]:
    """The trainers (process groups) that ``runner`` launched and that still run."""
    out = []
    for pgid in trainer_groups(work):
        try:
            stat = Path(f"/proc/{pgid}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2 :].split()[1]) == runner.pid:  # its parent pid
            out.append(pgid)
    return out


def kill_group(pgid: int) -> None:
    """SIGKILL a trainer's process group; one that ended meanwhile is not an error."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def wait_for(condition: Callable[[], object], timeout: float) -> None:
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.1)
