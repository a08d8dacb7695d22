"""The study runner: Optuna proposes, trainer processes train, the store records.

One runner process owns a set of device slots and runs one worker thread per slot. A trial is
one configuration trained ``repeats`` times (seed runs ``s0 .. s{K-1}`` under the trial's run
directory, seeds ``base.seed + k``). A free worker takes the next queued seed run of a started
trial, or asks Optuna for a new trial and queues its seed runs, so one configuration's seeds
train side by side on several slots. Each seed run launches the trainer in its own directory;
the objective's mean over seeds at a step is reported to Optuna once every seed has reached it
(pruning stops all seeds with SIGTERM); when the last seed ends, the trial is told the mean of
its seeds' final objectives, and each seed run is ingested into DuckDB.

Trials are grouped by ``run_number``: the trial number whose run directory they use. A trial
that was interrupted (Ctrl-C, or a runner that died) is re-queued with the same parameters and
the same ``run_number``, so its retry resumes each seed's checkpoint in the same directories
(a seed that finished is not trained again) and counts once towards ``trials``. Every step of
that hand-over is idempotent (:meth:`StudyRunner.recover_orphans`): a runner killed at any
point leaves a state the next start completes, with no group lost or queued twice. A trainer
killed from outside (the OOM killer, preemption) is relaunched from its checkpoint up to the
study's ``retries`` times before its trial fails.

Ask/tell is used rather than ``study.optimize`` so that the decision to start another trial
and the ``ask`` happen under one lock: with several slots the study runs exactly ``trials``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import signal
import socket
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from rich.console import Console

from harness.launch import Outcome, TrainerProcess
from harness.live import StudyView
from harness.optuna_attrs import copied_attrs, headline_attrs, set_metric_names_once
from harness.spec import MODEL_REF_KEYS, SpecError, StudySpec
from harness.store import Store, StoreError
from harness.workpaths import resolve_run_dir, to_stored
from trainers.rundir import RunDir, atomic_write_json, read_json

# Heartbeats and stale-trial retries are marked experimental in Optuna 5 (stable since 2.8/2.9);
# the warning says nothing a user can act on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# The live view reports trials; Optuna's own INFO lines ("A new study created ...") repeat it.
optuna.logging.set_verbosity(optuna.logging.WARNING)

HEARTBEAT_S = 10
GRACE_S = 60
RUNNER_FILE = "runner.json"


@dataclass(frozen=True)
class Workdir:
    root: Path

    @property
    def store(self) -> Path:
        return self.root / "harness.duckdb"

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{(self.root / 'optuna.db').resolve()}"

    def run_dir(self, study: str, number: int) -> Path:
        return self.root / "runs" / study / f"{number:04d}"


def make_storage(url: str) -> RDBStorage:
    """Optuna RDB storage with heartbeats: a trial whose runner died is failed and re-queued.

    Creating the storage creates Optuna's schema on a fresh database; two workers starting at
    once on one fresh PostgreSQL database would both try (CREATE TYPE ... duplicate key), so
    the creation is serialised with the same cross-process lock the runner uses for asks."""
    with url_lock(url, "schema"):
        return RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
        )


@contextlib.contextmanager
def url_lock(url: str, name: str, engine: Any = None) -> Iterator[None]:
    """An exclusive lock named ``name`` shared by every process that uses the storage ``url``.

    PostgreSQL: a session-level advisory lock keyed by a hash of the name (workers on any
    machine). SQLite: an ``flock`` on a file beside the database (workers on one machine).
    Other URLs: no lock (callers also hold a thread lock)."""
    digest = hashlib.sha256(name.encode()).digest()
    if url.startswith("postgresql"):
        import sqlalchemy
        from sqlalchemy import text

        key = int.from_bytes(digest[:8], "big", signed=True)
        own = engine is None
        if own:
            engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()
        finally:
            if own:
                engine.dispose()
    elif url.startswith("sqlite:///"):
        with open(f"{url.removeprefix('sqlite:///')}.{digest.hex()[:12]}.lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    else:
        yield


def claim_lock(storage: RDBStorage, url: str, study: str) -> contextlib.AbstractContextManager:
    """Serialise "decide whether to start a trial, then ask" across worker processes, so that
    several workers sharing one study together run exactly ``trials``."""
    return url_lock(url, f"claim:{study}", storage.engine)


def device_slots(spec: StudySpec) -> list[list[str] | None]:
    """One entry per concurrently running trial: a list of GPU ids, or None for CPU."""
    import torch

    res = spec.resources
    if res.devices == "cpu" or (res.devices == "auto" and not torch.cuda.is_available()):
        return [None] * res.trials_per_device
    gpus = [
        str(i) for i in (range(torch.cuda.device_count()) if res.devices == "auto" else res.devices)
    ]
    per = res.gpus_per_trial
    groups = [gpus[i : i + per] for i in range(0, len(gpus) - per + 1, per)]
    if not groups:
        raise ValueError(f"resources.gpus_per_trial={per} but only {len(gpus)} GPUs: {gpus}")
    return [g for g in groups for _ in range(res.trials_per_device)]


def cpu_threads_per_trial(cpu_slots: int) -> int | None:
    """The usable cores divided among ``cpu_slots`` concurrent CPU trials (None: no CPU slot)."""
    if cpu_slots == 0:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // cpu_slots)


class TrialFailed(RuntimeError):
    pass


class Repeat(Exception):
    """The sampler proposed a configuration that already completed (training is deterministic)."""

    def __init__(self, original: optuna.trial.FrozenTrial):
        self.original = original


TEACHER_REF = "best:"


def resolve_teacher_ref(spec: StudySpec, store: Store) -> StudySpec:
    """``base.teacher: best:NAME`` (distillation) or ``base.init: best:NAME`` (fine-tuning) ->
    the run directory of study NAME's best complete trial in this work directory's store.
    Anything else is returned unchanged."""
    for key in MODEL_REF_KEYS:
        spec = _resolve_ref(spec, store, key)
    return spec


def _resolve_ref(spec: StudySpec, store: Store, key: str) -> StudySpec:
    teacher = spec.base.get(key)
    if not (isinstance(teacher, str) and teacher.startswith(TEACHER_REF)):
        return spec
    name = teacher[len(TEACHER_REF) :]
    hint = (
        f"run that study first with the same --workdir, e.g. `harness study run "
        f"studies/{name}.yaml`, or set base.{key} to a finished run directory"
    )
    rows = store.query("SELECT directions FROM studies WHERE name = ?", [name])
    if not rows:
        raise SpecError(
            spec.path, [f"base.{key}: {teacher!r}: no study {name!r} in {store.path}; {hint}"]
        )
    directions = rows[0]["directions"]
    if len(directions) != 1:
        raise SpecError(
            spec.path,
            [
                f"base.{key}: {teacher!r}: study {name!r} has {len(directions)} objectives, "
                f"so it has no single best trial; set base.{key} to a run directory"
            ],
        )
    done = store.query(
        "SELECT t.number, t.values[1] AS value, r.run_dir FROM trials t JOIN runs r USING (run_id) "
        "WHERE t.study = ? AND t.state = 'complete' AND t.values IS NOT NULL",
        [name],
    )
    if not done:
        raise SpecError(
            spec.path, [f"base.{key}: {teacher!r}: study {name!r} has no complete trial; {hint}"]
        )
    sign = 1.0 if directions[0] == "minimize" else -1.0
    best = min(done, key=lambda r: (sign * r["value"], r["number"]))
    run_dir = str(store.run_dir_path(best["run_dir"]))  # recorded relative to the work dir
    return spec.model_copy(update={"base": {**spec.base, key: run_dir}})


class StudyRunner:
    """Runs one study's trials on this machine's device slots; several runners may share it.

    The contract with a trainer (any entry of :data:`trainers.registry.TRAINERS`):

    - **Launch**: ``python -m <module> --config <seed dir>/config.json --run-dir <seed dir>``
      (``torchrun`` with one process per GPU when a slot has several) in its own process group,
      with ``CUDA_VISIBLE_DEVICES`` set to the slot's GPUs, or ``OMP_NUM_THREADS`` to the
      slot's share of the CPU, and ``HARNESS_CAPTURED=1`` (stdout/stderr go to the run dir's
      logs). The config is the base config with the trial's parameters and ``seed = base + k``
      applied; it validates against the trainer's config model before launch.
    - **Metrics**: the trainer appends ``{"step", name: value}`` records to ``metrics.jsonl``;
      the runner follows the file and calls :meth:`_on_metric` per new value. A study's
      objective must be a name in the trainer's registry entry.
    - **Stop**: SIGTERM to the process group asks for a checkpoint and a ``stopped`` status
      (pruning, Ctrl-C); the trainer must exit soon after. Relaunching in the same directory
      must resume from the checkpoint and produce what an uninterrupted run would.
    - **End**: ``status.json`` with ``ok | stopped | failed`` and a reason. No status file
      means the process died (the exit code is classified: signal, OOM killer, crash).
    - **Files**: whatever the run dir layout (:mod:`trainers.rundir`) names; the runner ingests
      a finished seed run's dir into the store and writes nothing in it besides
      ``config.json`` and ``runner.json`` (the host and pid of the runner that launched it,
      which :meth:`recover_orphans` reads).

    Hooks inside the runner, in the order they run for one configuration: :meth:`_new_job`
    (ask Optuna under the claim lock) -> :meth:`_start_job` (queue the seed runs) ->
    :meth:`_run_seed` per seed (skips a seed whose status is ``ok``) -> :meth:`_on_metric` per
    value (reports the mean over seeds at a step once every seed reached it; True prunes every
    seed) -> :meth:`_finish` once the last seed ended (tells Optuna the mean and records the
    per-seed values).
    """

    def __init__(self, spec: StudySpec, workdir: Path, console: Console | None = None):
        self.spec = spec
        # Absolute: run directories recorded in Optuna and DuckDB must resolve from any cwd
        # (`study report` reads every seed run's files through them).
        self.work = Workdir(Path(workdir).resolve())
        self.work.root.mkdir(parents=True, exist_ok=True)
        # soft_wrap: event lines in a log file stay one line each, however long.
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.store = Store(self.work.store)
        self.source_spec = spec  # before best:STUDY references are resolved
        self.spec = spec = resolve_teacher_ref(spec, self.store)
        self.url = spec.optuna.storage or self.work.optuna_url
        self.storage = make_storage(self.url)
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.jobs: list[TrialJob] = []  # configurations being trained by this runner
        self._target = spec.trials
        self.errors: list[BaseException] = []
        self.host = socket.gethostname()
        self.view: StudyView | None = None
        self.cpu_threads: int | None = None

    # -- study --------------------------------------------------------------------------------
    def open_study(self) -> optuna.Study:
        spec = self.spec
        study = optuna.create_study(
            study_name=spec.name,
            storage=self.storage,
            sampler=spec.make_sampler(),
            pruner=spec.make_pruner(),
            directions=list(spec.directions),
            load_if_exists=True,
        )
        done = len(study.get_trials(deepcopy=False))
        # Not GridSampler: it picks a grid point no trial has taken (from the storage, so it
        # never repeats one), and its seed shuffles the grid: another seed, other grid ids.
        if done and spec.optuna.seed is not None and spec.optuna.sampler != "grid":
            study.sampler = self._sampler_after(done)
        # A grid or ofat design's configurations, or the file's optuna.enqueue: once per study,
        # under the same lock workers claim trials with, so that a second worker (or a rerun)
        # finds them there and enqueues nothing. Each one that no trial was given yet (a runner
        # killed half-way through this loop) is enqueued.
        first = spec.configurations() or spec.optuna.enqueue
        if first:
            with claim_lock(self.storage, self.url, spec.name):
                given = [_given_params(t) for t in study.get_trials(deepcopy=False)]
                for params in map(dict, first):
                    # An enqueue entry may leave parameters to the sampler: a trial given a
                    # superset of the entry's values is that entry's.
                    match = next((g for g in given if params.items() <= g.items()), None)
                    if match is None:
                        study.enqueue_trial(params)
                    else:
                        given.remove(match)
        # The budget (trials) is left out so that asking for more trials is not a different study.
        stored = spec.model_dump(mode="json", exclude={"trials"})
        if stored["optuna"].get("storage"):  # a password in the URL is never stored
            from evaluators.redact import drop_password

            stored["optuna"]["storage"] = drop_password(stored["optuna"]["storage"])
        self._store_model_refs_relative(stored)
        self.store.create_study(spec.name, stored, spec.directions, spec.metrics)
        set_metric_names_once(study, spec.metrics)  # optuna-dashboard: names, not "Objective 0"
        return study

    def _sampler_after(self, trials: int) -> optuna.samplers.BaseSampler:
        """The study's sampler for a study that already has ``trials`` trials. Seeded with
        ``optuna.seed`` alone, a restarted runner's sampler would replay the random stream of
        the first run and propose its configurations again (each then a repeat); seeded with
        (seed, trials) it is as reproducible (the same history gives the same proposals) and
        proposes new ones. A grid or ofat design enqueues its configurations and is unaffected."""
        digest = hashlib.sha256(f"{self.spec.optuna.seed}:{trials}".encode()).digest()
        seed = int.from_bytes(digest[:4], "big")
        optuna_settings = self.spec.optuna.model_copy(update={"seed": seed})
        return self.spec.model_copy(update={"optuna": optuna_settings}).make_sampler()

    def _store_model_refs_relative(self, stored: dict[str, Any]) -> None:
        """A ``best:STUDY`` reference resolved to a run directory is recorded in the study's
        stored spec relative to the work directory, so that the study reruns after its work
        directory was moved or copied (the spec must equal the stored one). A path recorded
        absolute by an earlier version is kept when it names the same run."""
        rows = self.store.query("SELECT spec FROM studies WHERE name = ?", [self.spec.name])
        old_base = json.loads(rows[0]["spec"]).get("base", {}) if rows else {}
        for key in MODEL_REF_KEYS:
            source = self.source_spec.base.get(key)
            if not (isinstance(source, str) and source.startswith(TEACHER_REF)):
                continue
            resolved = Path(stored["base"][key])
            relative = to_stored(resolved, self.work.root)
            old = old_base.get(key)
            if (
                isinstance(old, str)
                and old != relative
                and resolve_run_dir(old, self.work.root).resolve() == resolved.resolve()
            ):
                relative = old
            stored["base"][key] = relative

    def _group(self, t: optuna.trial.FrozenTrial) -> int:
        return int(t.user_attrs.get("run_number", t.number))

    def counts(self, study: optuna.Study) -> dict[str, int]:
        """Trial groups (one per run directory) by the state of their latest trial."""
        latest: dict[int, optuna.trial.FrozenTrial] = {}
        for t in study.get_trials(deepcopy=False):
            if t.state == TrialState.WAITING and "run_number" not in t.user_attrs:
                continue  # enqueued by the study file (optuna.enqueue), not started yet
            latest[self._group(t)] = t  # trials come in number order: the last one wins
        out = {s.name.lower(): 0 for s in TrialState}
        for t in latest.values():
            out[t.state.name.lower()] += 1
        out["groups"] = len(latest)
        return out

    def _should_start(self, study: optuna.Study, target: int) -> bool:
        """A re-queued trial (a resumption) always runs; otherwise start one while fewer
        than ``target`` trials have started (an enqueued one is taken first by ``ask``)."""
        c = self.counts(study)
        return c["waiting"] > 0 or c["groups"] < target

    # -- orphans ------------------------------------------------------------------------------
    def recover_orphans(self, study: optuna.Study) -> None:
        """Make every interrupted trial resume, wherever its runner was killed.

        - A RUNNING trial whose runner (on this host) is dead: its trainers are stopped (they
          checkpoint), the trial is re-queued, then failed (:meth:`_recover_orphan`).
        - A trial group whose latest trial failed to be re-queued but has no later trial (a
          runner killed after failing it and before re-queueing it; or Optuna's stale-heartbeat
          retry, which also fails first and enqueues second): it is re-queued.

        Each step is safe to redo, a group gets a new trial only when it has no later one, and
        it all runs under the claim lock (as asks do): a kill at any point leaves a state that
        the next start completes, and no group is queued twice."""
        with claim_lock(self.storage, self.url, self.spec.name):
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                self._recover_orphan(study, t)
            self._requeue_lost(study)
        self._sync_store(study)

    def _sync_store(self, study: optuna.Study) -> None:
        """A runner killed after telling Optuna how a trial ended and before writing it to the
        store leaves the store's row ``running``: Optuna is the record, so copy its end."""
        stored = {r["number"]: r["state"] for r in self.store.trials(self.spec.name)}
        states = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}
        states[TrialState.FAIL] = "failed"
        for t in study.get_trials(deepcopy=False, states=tuple(states)):
            if stored.get(t.number) == "running":
                ended = t.datetime_complete.timestamp() if t.datetime_complete else time.time()
                self.store.upsert_trial(
                    self.spec.name,
                    t.number,
                    states[t.state],
                    values=t.values if t.state == TrialState.COMPLETE else None,
                    error=t.user_attrs.get("error"),
                    ended_at=ended,
                )

    def _recover_orphan(self, study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        group = self._group(t)
        trial_dir = self.work.run_dir(self.spec.name, group)
        # The seed runs' runner.json files of this trial (earlier trials of the group leave
        # theirs until a seed is relaunched); a torn or empty one (a runner killed while
        # writing it, before the write was atomic) says nothing.
        infos = [
            i
            for p in sorted(trial_dir.glob(f"s*/{RUNNER_FILE}"))
            if isinstance(i := read_json(p), dict) and i.get("trial", t.number) == t.number
        ]
        # The owner is recorded when the trial is asked, under the claim lock that is held
        # here: a RUNNING trial without one was asked by a runner killed inside its claim.
        owner = t.user_attrs.get("runner")
        owners = [owner] if isinstance(owner, dict) else infos
        if any(o.get("host") != self.host or _alive(o.get("runner_pid")) for o in owners):
            return  # another live runner owns it, or another host (heartbeats cover it)
        # Every seed run's trainer checkpoints and exits before the retry is queued, so the
        # group never trains twice at once. A runner killed between launching a trainer and
        # writing its runner.json left no pid: such a trainer is found by its --run-dir.
        groups = {i.get("trainer_pid") for i in infos} | _trainer_groups(
            sorted(trial_dir.glob("s*"))
        )
        for pgid in groups:
            _stop_group(pgid)
        reason = "interrupted: its runner died; re-queued to resume"
        self.storage.set_trial_user_attr(t._trial_id, "error", reason)
        self.storage.set_trial_user_attr(t._trial_id, "requeue", True)
        # Queue the retry first, then fail the trial: killed in between, the trial is still
        # RUNNING with a dead owner, and the next start only fails it (the group has a later
        # trial); the other order is covered too (_requeue_lost).
        self._requeue_once(study, t.number, _given_params(t), group)
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        self.store.upsert_trial(
            self.spec.name, t.number, "failed", error=reason, ended_at=time.time()
        )
        self.console.print(f"[yellow]trial {t.number}: its runner died; re-queued to resume")

    def _requeue_lost(self, study: optuna.Study) -> None:
        """Re-queue each group whose latest trial is a FAIL meant to be retried."""
        trials = study.get_trials(deepcopy=False)
        latest: dict[int, optuna.trial.FrozenTrial] = {}
        for t in trials:
            latest[self._group(t)] = t  # trials come in number order: the last one wins
        for group, t in latest.items():
            if t.state != TrialState.FAIL:
                continue
            # "requeue": failed because it was interrupted (set before it was failed). No
            # "error" at all: failed by Optuna's stale-heartbeat check, whose retry callback
            # (up to 3 per trial, counted in retry_history) runs as a second step.
            stale = "error" not in t.user_attrs and len(t.system_attrs.get("retry_history", [])) < 3
            if t.user_attrs.get("requeue") or stale:
                self._requeue_once(study, t.number, _given_params(t), group)
                self.console.print(
                    f"[yellow]trial {t.number} was interrupted and never re-queued; re-queued"
                )

    def _requeue_once(
        self, study: optuna.Study, number: int, params: dict[str, Any], group: int
    ) -> None:
        """Queue a retry of trial ``number`` (same parameters, same run directory) unless its
        group already has a later trial (the retry, queued before a kill). Callers hold the
        claim lock, so two runners never both queue one."""
        later = [
            t
            for t in study.get_trials(deepcopy=False)
            if t.number > number and self._group(t) == group
        ]
        if not later:
            self._requeue(study, params, group)

    def _requeue(self, study: optuna.Study, params: dict[str, Any], group: int) -> None:
        study.enqueue_trial(params, user_attrs={"run_number": group}, skip_if_exists=False)

    # -- running ------------------------------------------------------------------------------
    def run(self, n_trials: int | None = None) -> optuna.Study:
        study = self.open_study()
        self.recover_orphans(study)
        target = self._target = n_trials if n_trials is not None else self.spec.trials
        slots = device_slots(self.spec)
        # CPU slots share the cores: each trainer gets its share of intra-op threads (two
        # trainers of two threads each on two cores run several times slower than one).
        self.cpu_threads = cpu_threads_per_trial(sum(s is None for s in slots))
        c = self.counts(study)
        self.console.print(
            f"study [bold]{self.spec.name}[/]: {c['complete']} complete, {c['pruned']} pruned, "
            f"{c['fail']} failed of {target}; {len(slots)} slot(s); work dir {self.work.root}"
        )
        self.view = self._make_view(study, target, c)
        threads = [
            threading.Thread(target=self._worker, args=(study, slot, target), daemon=True)
            for slot in slots
        ]
        _stop_on_signals()
        try:
            with self.view.show():
                for th in threads:
                    th.start()
                _wait_for(threads)
        except KeyboardInterrupt:
            self.console.print("[yellow]interrupted: stopping trainers (they checkpoint)...")
            self.stopping.set()
            with self.lock:
                procs = [p for job in self.jobs for p in job.procs.values()]
            for proc in procs:
                proc.stop(signal.SIGTERM)
            _wait_for(threads)  # each worker follows its trainer until it has checkpointed
            for job in list(self.jobs):  # seeds that never started: the trial resumes later
                self.jobs.remove(job)
                self._finish(study, job, Outcome("interrupted", "stopped"), 0.0)
            raise
        if self.errors:
            raise self.errors[0]
        return study

    def _make_view(self, study: optuna.Study, target: int, c: dict[str, int]) -> StudyView:
        best = None
        if not self.spec.multi_objective and c["complete"]:
            t = study.best_trial
            best = (t.number, list(t.values))
        counts = {"complete": c["complete"], "pruned": c["pruned"], "failed": c["fail"]}
        return StudyView(
            self.console,
            self.spec.name,
            target,
            self.spec.metrics,
            self.spec.directions,
            counts,
            best,
        )

    def _worker(self, study: optuna.Study, slot: list[str] | None, target: int) -> None:
        try:
            self._work(study, slot, target)
        except BaseException as err:  # surface it in the main thread, stop the other slots
            self.errors.append(err)
            self.stopping.set()

    def _work(self, study: optuna.Study, slot: list[str] | None, target: int) -> None:
        """Take the next seed run: one of a started configuration's, else ask Optuna for a new
        configuration (trial) and take its first seed. Return when there is neither."""
        while not self.stopping.is_set():
            with self.lock:
                job = next((j for j in self.jobs if j.pending and not j.stopping), None)
                if job is None:
                    job = self._new_job(study)
                    if job is None:
                        return
                    if not job.pending:  # nothing to train (a repeat, or a config refused)
                        continue
                seed = job.pending.popleft()
                job.running += 1
            self._run_seed(study, job, seed, slot)

    def _new_job(self, study: optuna.Study) -> TrialJob | None:
        with claim_lock(self.storage, self.url, self.spec.name):
            optuna.storages.fail_stale_trials(study)
            if not self._should_start(study, self._target):
                return None
            with warnings.catch_warnings():
                # We record heartbeats ourselves while following the trainer.
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                trial = study.ask()
            group = self._origin(study, trial)
            trial.set_user_attr("run_number", group)
            # Who runs it, recorded inside the claim: recover_orphans (which holds the claim
            # lock) then knows every RUNNING trial's owner, even one whose runner was killed
            # before it launched any trainer.
            trial.set_user_attr("runner", {"host": self.host, "runner_pid": os.getpid()})
            self.storage.record_heartbeat(trial._trial_id)
            if group != trial.number:
                self._inherit_sampler_attrs(study, trial, group)
        return self._start_job(study, trial, group)

    def _inherit_sampler_attrs(self, study: optuna.Study, trial: optuna.Trial, group: int) -> None:
        """A resumed trial is the same grid point as the one it resumes: GridSampler keys its
        bookkeeping on these system attrs (and fails in ``tell`` without them)."""
        original = study.get_trials(deepcopy=False)[group]
        for key in ("grid_id", "search_space"):
            if key in original.system_attrs:
                self.storage.set_trial_system_attr(trial._trial_id, key, original.system_attrs[key])

    def _origin(self, study: optuna.Study, trial: optuna.Trial) -> int:
        if "run_number" in trial.user_attrs:
            return int(trial.user_attrs["run_number"])
        failed = self.storage.get_trial(trial._trial_id).system_attrs.get("failed_trial")
        if failed is not None:  # a heartbeat retry: resume the original trial's directory
            return self._group(study.get_trials(deepcopy=False)[int(failed)])
        return trial.number

    def _prepare(
        self, study: optuna.Study, trial: optuna.Trial, group: int
    ) -> tuple[dict[str, Any], list[SeedRun], int | None]:
        """Suggest the parameters, write every seed run's config and register the runs."""
        params = self.spec.suggest(trial)
        model = self.spec.trainer_info.config
        configs = [
            model.model_validate(self.spec.seed_config(params, k)) for k in range(self.spec.repeats)
        ]
        key = configs[0].hash()  # the configuration's identity: its first seed's config
        for done in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if done.user_attrs.get("config_hash") == key:
                raise Repeat(done)
        trial_dir = self.work.run_dir(self.spec.name, group)
        seeds = []
        for k, config in enumerate(configs):
            run = RunDir(trial_dir / f"s{k}")
            run.create()
            stored = run.read_config()
            if stored is None:
                run.write_config(config.to_dict(), config.hash())
            elif stored.get("config_hash") != config.hash():
                raise TrialFailed(
                    f"{run.config} holds a different config; delete {trial_dir} to rerun it"
                )
            run_id = f"{self.spec.name}/{group:04d}/s{k}"
            self.store.register_run(
                run_id,
                run.root,
                config.to_dict(),
                config.hash(),
                study=self.spec.name,
                trial=trial.number,
                repeat=k,
            )
            seeds.append(SeedRun(k, config.seed, run, run_id))
        # Relative to the work directory, which may be moved (harness/workpaths.py).
        trial.set_user_attr("run_dir", to_stored(trial_dir, self.work.root))
        trial.set_user_attr("workdir", str(self.work.root))  # workers sharing a storage
        trial.set_user_attr("config_hash", key)
        trial.set_user_attr("seeds", [s.seed for s in seeds])
        total = getattr(getattr(configs[0], "train", None), "steps", None)
        return params, seeds, total

    def _start_job(self, study: optuna.Study, trial: optuna.Trial, group: int) -> TrialJob:
        """The configuration's seed runs, queued; a repeat or a refused config ends at once
        (the job then has nothing pending)."""
        started = time.time()
        try:
            params, seeds, total = self._prepare(study, trial, group)
        except Repeat as rep:  # reuse the result rather than train the same config again
            self._repeat(study, trial, rep.original, started)
            return TrialJob(trial, group, {}, [], started)
        except Exception as err:  # a config the trainer refuses: the trial fails, the study goes on
            job = TrialJob(trial, group, {}, [], started)
            self._finish(study, job, Outcome("failed", f"{type(err).__name__}: {err}"), {})
            return job
        job = TrialJob(trial, group, params, seeds, started)
        self.jobs.append(job)
        self.store.upsert_trial(
            self.spec.name,
            trial.number,
            "running",
            params=params,
            started_at=started,
            run_id=seeds[0].run_id,
        )
        seed_text = f" x {len(seeds)} seeds" if len(seeds) > 1 else ""
        self.console.print(f"trial {trial.number} started: {_fmt(params)}{seed_text}")
        self._view().started(trial.number, _fmt(params) + seed_text, "", total)
        return job

    def _run_seed(
        self, study: optuna.Study, job: TrialJob, seed: SeedRun, slot: list[str] | None
    ) -> None:
        """Train one seed run (or take its finished result from disk), ingest it, and finish
        the trial when it was the configuration's last seed."""
        status = seed.run.read_status()
        if status is not None and status.get("status") == "ok":  # finished before a restart
            outcome = Outcome("complete", final=_final_metrics(seed.run))
            for rec in seed.run.read_metrics():
                self._on_metric(job, seed.k, rec["step"], rec["name"], rec["value"])
        else:
            outcome = self._train_seed(job, seed, slot)
        if self.stopping.is_set() and outcome.state == "failed" and "by a signal" in outcome.reason:
            outcome = Outcome(
                "interrupted", outcome.reason, exit_code=outcome.exit_code, final=outcome.final
            )
        try:
            self.store.ingest_run_dir(seed.run_id, seed.run.root)
        except StoreError as err:  # the trial's outcome stands; its files stay in the run dir
            self.console.print(f"[red]{seed.run_id}: could not ingest {seed.run.root}: {err}")
        with self.lock:
            job.outcomes[seed.k] = outcome
            job.running -= 1
            if outcome.state != "complete" and not job.stopping:
                job.cause = (seed.k, outcome)
                job.stop_siblings(pruned=outcome.state == "pruned")
            if self.stopping.is_set():
                job.pending.clear()  # the rerun trains them
            last = job.running == 0 and not job.pending
            if last:
                self.jobs.remove(job)
        if last:
            self._finish(study, job, job.outcome(self.spec.repeats), _gpu_seconds(job, slot))

    def _train_seed(self, job: TrialJob, seed: SeedRun, slot: list[str] | None) -> Outcome:
        """Train one seed run. A trainer that died without a status (killed from outside: the
        OOM killer, preemption; or a crash) is relaunched from its checkpoint up to
        ``retries`` times; one that failed and said why (a bad config, a non-finite loss)
        would fail again and is not; nor is one stopped on purpose (pruning, Ctrl-C)."""
        retries = self.spec.retries
        for attempt in range(retries + 1):
            outcome = self._launch_seed(job, seed, slot)
            if not outcome.died or self.stopping.is_set():
                return outcome
            with self.lock:
                if job.stopping or attempt == retries:
                    break
                job.retries += 1
                total = job.retries
            job.trial.set_user_attr("retries_used", total)
            self.console.print(
                f"[yellow]trial {job.trial.number} seed {seed.seed} (s{seed.k}): "
                f"{outcome.reason}; retry {attempt + 1}/{retries} from its checkpoint"
            )
        if attempt:
            outcome.reason += f" (after {attempt} retr{'y' if attempt == 1 else 'ies'})"
        return outcome

    def _launch_seed(self, job: TrialJob, seed: SeedRun, slot: list[str] | None) -> Outcome:
        """Launch the seed run's trainer and follow it to its end."""
        proc = TrainerProcess(
            self.spec.trainer_info.module,
            seed.run.root,
            slot,
            gpus=len(slot) if slot else 1,
            cpu_threads=self.cpu_threads,
        )
        with self.lock:
            if job.stopping:  # a sibling failed or was pruned while this one was queued
                return Outcome("pruned" if job.pruned else "failed", "not started")
            proc.start()
            job.procs[seed.k] = proc
        # Atomic: recover_orphans reads it after a kill; a half-written one would say nothing.
        atomic_write_json(
            seed.run.root / RUNNER_FILE,
            {
                "host": self.host,
                "runner_pid": os.getpid(),
                "trainer_pid": proc.proc.pid,
                "trial": job.trial.number,
                "seed": seed.seed,
            },
        )
        where = f"GPU {','.join(slot)}" if slot else "CPU"
        self.console.print(
            f"trial {job.trial.number} seed {seed.seed} (s{seed.k}) started on {where}"
        )
        beat = [0.0]  # the first poll records a heartbeat at once
        t0 = time.time()
        try:
            outcome = proc.follow(
                lambda step, name, value: self._on_metric(job, seed.k, step, name, value),
                on_poll=lambda: self._heartbeat(job.trial, beat),
            )
        finally:
            with self.lock:
                job.procs.pop(seed.k, None)
                job.seconds += time.time() - t0
        return outcome

    def _repeat(
        self,
        study: optuna.Study,
        trial: optuna.Trial,
        original: optuna.trial.FrozenTrial,
        started: float,
    ) -> None:
        for key, value in copied_attrs(original.user_attrs, self.spec.metrics).items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("repeat_of", original.number)
        _tell(study, trial, values=original.values)
        self.store.upsert_trial(
            self.spec.name,
            trial.number,
            "complete",
            params=dict(original.params),
            values=original.values,
            started_at=started,
            ended_at=time.time(),
            gpu_seconds=0.0,
            error=f"repeat of trial {original.number}: result reused, not retrained",
        )
        self.console.print(
            f"trial {trial.number} repeats trial {original.number}'s config: result reused"
        )
        self._view().ended(trial.number, "complete", original.values)

    def _heartbeat(self, trial: optuna.Trial, beat: list[float]) -> None:
        """Tell Optuna the trial is alive (every HEARTBEAT_S while its trainer runs)."""
        now = time.time()
        if now - beat[0] > HEARTBEAT_S:
            self.storage.record_heartbeat(trial._trial_id)
            beat[0] = now

    def _view(self) -> StudyView:
        if self.view is None:  # trials run outside run() (tests): a view nobody shows
            self.view = StudyView(
                self.console,
                self.spec.name,
                self.spec.trials,
                self.spec.metrics,
                self.spec.directions,
            )
        return self.view

    def _on_metric(self, job: TrialJob, k: int, step: int, name: str, value: float | None) -> bool:
        """Follow seed ``k``'s metrics. The pruner sees the configuration's objective at a step
        only once every seed has reached it, as their mean: the same quantity, over the same
        number of seeds, as every other trial's (like with like). True: stop this seed."""
        if k == 0:
            self._view().metric(job.trial.number, step, name, value)
        if self.spec.multi_objective or value is None or name != self.spec.metrics[0]:
            return job.pruned
        with self.lock:
            job.curves[k][step] = value
            ready = [
                st
                for st in sorted(job.curves[k])
                if st not in job.reported and all(st in c for c in job.curves.values())
            ]
            for st in ready:
                mean = sum(c[st] for c in job.curves.values()) / len(job.curves)
                job.trial.report(mean, st)
                job.reported.add(st)
                if not job.stopping and job.trial.should_prune():
                    job.stop_siblings(pruned=True, reason=f"pruned at step {st}")
            return job.pruned

    def _finish(self, study: optuna.Study, job: TrialJob, outcome: Outcome, gpu_s: float) -> None:
        """Tell Optuna and the store how the configuration ended: complete with the mean of
        its seeds' final objectives (the per-seed values in the ``seed_values`` attribute),
        pruned, failed (naming the seed), or interrupted (re-queued to resume)."""
        trial, ended = job.trial, time.time()
        # One attribute per objective / headline metric, not a blob of every metric.
        for key, value in headline_attrs(outcome.final, self.spec.metrics).items():
            trial.set_user_attr(key, value)
        common = dict(
            params=job.params,
            started_at=job.started,
            ended_at=ended,
            gpu_seconds=gpu_s,
            run_id=job.seeds[0].run_id if job.seeds else None,
        )
        values: list[float] | None = None
        if outcome.state == "complete":
            per_seed = [job.outcomes[s.k].final for s in job.seeds]
            missing = sorted({m for f in per_seed for m in self.spec.metrics if m not in f})
            if missing:
                outcome = Outcome(
                    "failed", f"objective metric(s) never written: {', '.join(missing)}"
                )
            else:
                seed_values = {m: [float(f[m]) for f in per_seed] for m in self.spec.metrics}
                trial.set_user_attr("seed_values", seed_values)
                values = [sum(v) / len(v) for v in seed_values.values()]
        name = self.spec.name
        self._view().ended(trial.number, outcome.state, values)
        if outcome.state == "complete":
            _tell(study, trial, values=values)
            self.store.upsert_trial(name, trial.number, "complete", values=values, **common)
            shown = _fmt(dict(zip(self.spec.metrics, values, strict=True)))
            over = f" (mean of {len(job.seeds)} seeds)" if len(job.seeds) > 1 else ""
            self.console.print(f"[green]trial {trial.number} complete[/]: {shown}{over}")
        elif outcome.state == "pruned":
            _tell(study, trial, state=TrialState.PRUNED)
            self.store.upsert_trial(name, trial.number, "pruned", error=outcome.reason, **common)
            self.console.print(f"[cyan]trial {trial.number} pruned[/] ({outcome.reason})")
        elif outcome.state == "interrupted":
            # Flagged, re-queued, then failed, under the claim lock: a runner killed anywhere
            # in between leaves a state the next start's recover_orphans completes.
            trial.set_user_attr("error", outcome.reason)
            trial.set_user_attr("requeue", True)
            with claim_lock(self.storage, self.url, name):
                self._requeue_once(study, trial.number, trial.params, job.group)
                _tell(study, trial, state=TrialState.FAIL)
        else:
            trial.set_user_attr("error", outcome.reason)
            _tell(study, trial, state=TrialState.FAIL)
        if outcome.state in ("failed", "interrupted"):
            self.store.upsert_trial(
                name,
                trial.number,
                "failed",
                error=outcome.reason,
                stderr_tail=outcome.stderr_tail,
                **common,
            )
            if outcome.state == "interrupted":
                self.console.print(
                    f"[yellow]trial {trial.number} interrupted; it resumes on the next run"
                )
            else:
                tail = "\n    ".join(outcome.stderr_tail.strip().splitlines()[-8:])
                self.console.print(
                    f"[red]trial {trial.number} failed[/]: {outcome.reason}"
                    + (f"\n    {tail}" if tail else "")
                )


@dataclass(frozen=True)
class SeedRun:
    """Seed run ``k`` of a configuration: its training seed, run directory and store id."""

    k: int
    seed: int
    run: RunDir
    run_id: str


class TrialJob:
    """One configuration this runner is training: an Optuna trial and its seed runs, queued,
    running and ended. Fields are guarded by the runner's lock."""

    def __init__(
        self,
        trial: optuna.Trial,
        group: int,
        params: dict[str, Any],
        seeds: list[SeedRun],
        started: float,
    ):
        self.trial, self.group, self.params, self.seeds = trial, group, params, seeds
        self.started = started
        self.pending: deque[SeedRun] = deque(seeds)
        self.running = 0
        self.procs: dict[int, TrainerProcess] = {}
        self.outcomes: dict[int, Outcome] = {}
        self.curves: dict[int, dict[int, float]] = {s.k: {} for s in seeds}
        self.reported: set[int] = set()
        self.stopping = False
        self.pruned = False
        self.prune_reason = ""
        self.cause: tuple[int, Outcome] | None = None  # the first seed that did not complete
        self.seconds = 0.0
        self.retries = 0  # relaunches of trainers that died (all seeds)

    def stop_siblings(self, pruned: bool, reason: str = "") -> None:
        """Stop every seed of this configuration: a pruned or failed seed ends it. Queued
        seeds are dropped; running ones get SIGTERM (they checkpoint, so a rerun resumes)."""
        self.stopping, self.pruned = True, self.pruned or pruned
        self.prune_reason = self.prune_reason or reason
        self.pending.clear()
        for proc in self.procs.values():
            proc.pruned = proc.pruned or pruned
            proc.stop()

    def outcome(self, repeats: int) -> Outcome:
        """The configuration's outcome from its seeds': interrupted > failed > pruned >
        complete (the mean of the seeds' final metrics)."""
        ended = [self.outcomes[k] for k in sorted(self.outcomes)]
        interrupted = next((o for o in ended if o.state == "interrupted"), None)
        if interrupted is not None:
            return interrupted
        if self.cause is not None and self.cause[1].state == "failed":
            k, o = self.cause
            seed = self.seeds[k].seed
            return Outcome("failed", f"seed {seed}: {o.reason}", o.stderr_tail, o.exit_code)
        if self.pruned or any(o.state == "pruned" for o in ended):
            reason = self.prune_reason or next(
                (o.reason for o in ended if o.state == "pruned"), "pruned"
            )
            return Outcome("pruned", reason)
        if len(ended) < repeats:
            return Outcome("failed", f"only {len(ended)} of {repeats} seeds ran")
        names = set.intersection(*(set(o.final) for o in ended))
        final = {m: sum(o.final[m] for o in ended) / len(ended) for m in sorted(names)}
        return Outcome("complete", final=final)


def _final_metrics(run: RunDir) -> dict[str, float]:
    """The last value of every metric in a run directory's ``metrics.jsonl``."""
    return {m["name"]: m["value"] for m in run.read_metrics() if m["value"] is not None}


def _gpu_seconds(job: TrialJob, slot: list[str] | None) -> float:
    return job.seconds * len(slot) if slot else 0.0


def _wait_for(threads: list[threading.Thread]) -> None:
    """Wait until the threads end, interruptibly. Not ``Thread.join``: on CPython 3.11 a
    KeyboardInterrupt raised inside ``join(timeout)`` can mark a still-running thread as
    stopped (the bpo-45274 fix releases the thread's own state lock), after which the runner
    would exit without waiting for its trainers to checkpoint."""
    while any(th.is_alive() for th in threads):
        time.sleep(0.2)


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (a scheduler, ``kill``) both stop the study cleanly: the main thread
    gets KeyboardInterrupt, the trainers get SIGTERM and checkpoint. SIGINT is reset too, since a
    runner started in the background by a shell inherits it ignored."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _tell(study: optuna.Study, trial: optuna.Trial, **kw: Any) -> None:
    """``study.tell``. GridSampler calls ``study.stop()`` once the grid is used up, which Optuna
    only allows inside ``optimize``; the trial's state is already stored by then, and our own
    loop decides when to stop, so that one error is ignored."""
    try:
        study.tell(trial, **kw)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise


def _fmt(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def _given_params(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The parameters a trial was given: those it suggested and, for a trial taken from the
    queue (a design's configuration, a retry) and killed before it suggested them, the queued
    ones (Optuna keeps them in the ``fixed_params`` system attribute)."""
    return {**t.system_attrs.get("fixed_params", {}), **t.params}


def _trainer_groups(run_dirs: list[Path]) -> set[int]:
    """Process groups of the trainers running in ``run_dirs``, found by the ``--run-dir DIR``
    of their command line (Linux ``/proc``; elsewhere none are found)."""
    wanted = {d.resolve() for d in run_dirs}
    found: set[int] = set()
    if not wanted or not Path("/proc").is_dir():
        return found
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            for flag, value in itertools.pairwise(args):
                if flag == "--run-dir":
                    where = Path(value)
                    if not where.is_absolute():
                        where = Path(os.readlink(entry / "cwd")) / where
                    if where.resolve() in wanted:
                        found.add(os.getpgid(int(entry.name)))
        except (OSError, ProcessLookupError):  # gone meanwhile, or not ours to read
            continue
    return found


def _alive(pid: int | None) -> bool:
    """Whether process ``pid`` runs. A zombie does not: a killed runner's trainer is reparented
    to the container's PID 1, which may never reap it."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # Linux: the state letter follows the parenthesised command name
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] != "Z"


def _stop_group(pid: int | None, timeout: float = 120) -> None:
    """SIGTERM an orphaned trainer's process group and wait for it to checkpoint and exit."""
    if not _alive(pid):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
