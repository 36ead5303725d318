"""Trainer processes started ahead of the jobs they will run: one job per process, always.

A trainer process takes seconds to start (a Ray worker, the torch and transformers imports,
the frozen model mapped: ~10 s of CPU), far longer than a small job trains. The scheduler
(:mod:`workers.scheduler`) therefore keeps ``trainer_warm_processes`` of them started and
prepared (:func:`workers.trainer.prepare_trainer`: imports done, database connected, store
client built, the shared weights mapped and placed) *before* a job is claimed for them —
and, while jobs queue, one more for each free trainer slot:

    pool = TrainerPool(settings, shared)
    pool.maintain()                # every scheduler round: starts, liveness, replacements
    process = pool.take()          # a prepared process, or None (then claim nothing)
    ref = process.run(job_id, owner, scheduler)      # its one and only job
    ...
    pool.retire(process)           # ray.kill once the job ended, however it ended

Isolation is by process, as with a fresh process per job: a process runs exactly one job
(a second ``run`` is refused) and is then killed, so nothing of one tenant's job (examples,
tensors, optimizer state, file handles) is there for the next, which runs in another
process. Nothing in a warm process belongs to a job before its ``run``.

Each process is a Ray actor holding a trainer's resources (``trainer_num_cpus``,
``trainer_num_gpus``, ``trainer_resources``) from its start, so it lands on a node that can
run the job and already has its GPU; ``max_restarts=0`` (a process that died is replaced
by a new one, never restarted into the old one's state). A process that fails to start is
logged and replaced after a backoff; one that dies while waiting is noticed by a liveness
call each round, logged and replaced — a job is only ever handed to a process that is
ready. The processes are owned by the scheduler actor and die with it.

``trainer_warm_processes`` = 0: no process waits; :meth:`TrainerPool.start_cold` starts one
for each claimed job, which then pays the start in its own time (the former behaviour).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import RayActorError

from common.config import Settings
from workers.trainer_report import TrainerReport

# The training code (torch, transformers) is imported by the trainer processes only, never
# by the scheduler that owns the pool (see common/model_holder.py).
if TYPE_CHECKING:
    from common.shared_weights import SharedModel
    from workers.trainer import PreparedTrainer

log = logging.getLogger(__name__)

# How often an idle process is asked whether it is still alive.
_LIVENESS_SECONDS = 1.0
# Longest wait before the next start after starts failed in a row (doubling from 1 s).
_MAX_BACKOFF_SECONDS = 60.0

JobEntry = Callable[[Settings, "SharedModel", str, str, Any, "PreparedTrainer | None"], Any]


def run_claimed_job(
    settings: Settings,
    shared: SharedModel,
    job_id: str,
    owner: str,
    scheduler: Any,
    prepared: PreparedTrainer | None,
) -> TrainerReport:
    """The job a trainer process runs: :func:`run_training_job`, reporting its start (pid,
    node) to the scheduler."""
    from workers.trainer import run_training_job

    def on_start(info: dict[str, Any]) -> None:
        if scheduler is not None:  # fire and forget: the scheduler may be gone
            scheduler.trainer_started.remote(info)

    return run_training_job(settings, shared, job_id, owner, on_start=on_start, prepared=prepared)


class TrainerProcess:
    """One trainer process (a Ray actor): prepared at its start (``prepare``; else by its
    job, in the job's time), then one job."""

    def __init__(
        self, settings: Settings, shared: SharedModel, entry: JobEntry, prepare: bool = True
    ) -> None:
        from workers.trainer import prepare_trainer

        began = time.monotonic()
        self._settings, self._shared, self._entry = settings, shared, entry
        self._prepared = prepare_trainer(settings, shared) if prepare else None
        self._used = False
        self._info = {
            "pid": os.getpid(),
            "node_id": str(ray.get_runtime_context().get_node_id()),
            "prepare_seconds": time.monotonic() - began,
        }

    def ready(self) -> dict[str, Any]:
        """Its pid and node once prepared (the liveness call too)."""
        return dict(self._info)

    def run(self, job_id: str, owner: str, scheduler: Any) -> Any:
        if self._used:
            raise RuntimeError(
                f"trainer process {os.getpid()} already ran a job: a process runs one job only"
            )
        self._used = True
        prepared, self._prepared = self._prepared, None
        return self._entry(self._settings, self._shared, job_id, owner, scheduler, prepared)


TrainerProcessActor = ray.remote(TrainerProcess)


@dataclass
class PooledProcess:
    """The scheduler's view of one trainer process."""

    actor: Any
    created: float  # time.monotonic()
    starting: Any | None  # the ``ready`` call of its start, until it resolves
    pid: int | None = None
    node_id: str | None = None
    ready_at: float | None = None
    liveness: Any | None = None  # an outstanding ``ready`` call while it waits
    liveness_sent: float = 0.0
    prepare_seconds: float | None = None  # its preparation, in the process

    def run(self, job_id: str, owner: str, scheduler: Any) -> Any:
        """Hand it its job; returns the ``ray.ObjectRef`` of the job's report."""
        return self.actor.run.remote(job_id, owner, scheduler)


class TrainerPool:
    """The warm trainer processes of one scheduler (see the module docstring). Methods are
    called from the scheduler's threads; a lock keeps the lists consistent."""

    def __init__(
        self,
        settings: Settings,
        shared: SharedModel | ray.ObjectRef[Any],
        *,
        entry: JobEntry = run_claimed_job,
    ) -> None:
        # ``shared``: the model, or a reference to it that Ray resolves in each process.
        self.settings, self.shared, self.entry = settings, shared, entry
        self.target = settings.trainer_warm_processes
        self._lock = threading.RLock()
        self._starting: list[PooledProcess] = []
        self._ready: deque[PooledProcess] = deque()
        self._failures_in_a_row = 0
        self._next_start = 0.0
        self._closed = False
        self.counts = {"started": 0, "start_failed": 0, "died_idle": 0, "handed_out": 0}
        self.last_error: str | None = None

    # --- processes ----------------------------------------------------------------------------

    def _spawn(self, *, prepare: bool = True) -> PooledProcess:
        s = self.settings
        actor: Any = TrainerProcessActor.options(
            num_cpus=s.trainer_num_cpus,
            num_gpus=s.trainer_num_gpus,
            resources=s.trainer_resources or None,
            max_restarts=0,
            max_task_retries=0,
        ).remote(s, self.shared, self.entry, prepare)
        self.counts["started"] += 1
        return PooledProcess(actor=actor, created=time.monotonic(), starting=actor.ready.remote())

    def start_cold(self) -> PooledProcess:
        """A process started now for a job claimed now (no warm process: ``target`` 0). Its
        ``run`` call waits for its start; a failed start fails that call."""
        with self._lock:
            process = self._spawn(prepare=False)  # its job prepares it: in the job's time
            self.counts["handed_out"] += 1
            return process

    def take(self) -> PooledProcess | None:
        """The longest-waiting prepared process, no longer the pool's; None when none is."""
        with self._lock:
            if not self._ready:
                return None
            self.counts["handed_out"] += 1
            return self._ready.popleft()

    def has_ready(self) -> bool:
        return self.ready_count() > 0

    def ready_count(self) -> int:
        with self._lock:
            return len(self._ready)

    @staticmethod
    def retire(process: PooledProcess) -> None:
        """End the process (after its job, or to force-stop it)."""
        try:
            ray.kill(process.actor, no_restart=True)
        except Exception as error:  # already gone
            log.debug("killing trainer process %s: %s", process.pid, error)

    # --- every round ----------------------------------------------------------------------------

    def maintain(self, wanted: int | None = None) -> None:
        """Notice finished starts (ready or failed), processes that died while waiting and
        starts that take too long; then start processes until ``wanted`` (default
        ``target``) are ready or starting, or end ready ones beyond it."""
        with self._lock:
            if self._closed:
                return
            wanted = self.target if wanted is None else wanted
            self._collect_starts()
            self._check_liveness()
            now = time.monotonic()
            while len(self._starting) + len(self._ready) < wanted and now >= self._next_start:
                self._starting.append(self._spawn())
            while len(self._ready) > wanted:  # no job waits for them: free their resources
                self.retire(self._ready.pop())

    @property
    def failing(self) -> bool:
        """Starts keep failing (3 in a row): better to hand a job a process started for it,
        whose failure then fails the job's attempt with the reason, than to keep it queued."""
        with self._lock:
            return self._failures_in_a_row >= 3

    def _collect_starts(self) -> None:
        if not self._starting:
            return
        refs = [p.starting for p in self._starting]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done_ids = {ref.hex() for ref in done}
        now = time.monotonic()
        limit = self.settings.trainer_start_timeout_seconds
        still: list[PooledProcess] = []
        for process in self._starting:
            ref = process.starting
            assert ref is not None
            if ref.hex() not in done_ids:
                if now - process.created > limit:
                    self._start_failed(
                        process, f"not ready after trainer_start_timeout_seconds ({limit:g} s)"
                    )
                else:
                    still.append(process)
                continue
            try:
                info: dict[str, Any] = ray.get(ref, timeout=10)
            except Exception as error:
                self._start_failed(process, error_line(error))
                continue
            process.starting = None
            process.pid, process.node_id = info.get("pid"), info.get("node_id")
            process.ready_at = process.liveness_sent = now
            process.prepare_seconds = info.get("prepare_seconds")
            self._ready.append(process)
            self._failures_in_a_row = 0
            log.info(
                "trainer process %s ready on node %s (started in %.1f s)",
                process.pid,
                process.node_id,
                now - process.created,
            )
        self._starting = still

    def _start_failed(self, process: PooledProcess, reason: str) -> None:
        self.retire(process)
        self.counts["start_failed"] += 1
        self._failures_in_a_row += 1
        backoff = min(_MAX_BACKOFF_SECONDS, 2.0 ** (self._failures_in_a_row - 1))
        self._next_start = time.monotonic() + backoff
        self.last_error = f"a trainer process failed to start: {reason}"
        log.warning("%s; starting another in %.0f s", self.last_error, backoff)

    def _check_liveness(self) -> None:
        if not self._ready:
            return
        pending = [p.liveness for p in self._ready if p.liveness is not None]
        done_ids: set[str] = set()
        if pending:
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
            done_ids = {ref.hex() for ref in done}
        now = time.monotonic()
        alive: deque[PooledProcess] = deque()
        for process in self._ready:
            if process.liveness is not None and process.liveness.hex() in done_ids:
                try:
                    ray.get(process.liveness, timeout=10)
                except Exception as error:
                    self.counts["died_idle"] += 1
                    self.last_error = (
                        f"trainer process {process.pid} died while waiting for a job: "
                        f"{error_line(error)}"
                    )
                    log.warning("%s; replacing it", self.last_error)
                    self.retire(process)
                    continue
                process.liveness = None
            if process.liveness is None and now - process.liveness_sent >= _LIVENESS_SECONDS:
                process.liveness = process.actor.ready.remote()
                process.liveness_sent = now
            alive.append(process)
        self._ready = alive

    # --- the end ------------------------------------------------------------------------------

    def shutdown(self) -> int:
        """Kill every waiting and starting process (running ones are the scheduler's)."""
        with self._lock:
            self._closed = True
            processes = [*self._starting, *self._ready]
            self._starting, self._ready = [], deque()
        for process in processes:
            self.retire(process)
        return len(processes)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "warm_target": self.target,
                "ready": [
                    {
                        "pid": p.pid,
                        "node_id": p.node_id,
                        "prepare_seconds": p.prepare_seconds,
                        "started_in_seconds": (
                            None if p.ready_at is None else round(p.ready_at - p.created, 3)
                        ),
                    }
                    for p in self._ready
                ],
                "starting": len(self._starting),
                **self.counts,
                "last_error": self.last_error,
            }


def error_line(error: BaseException) -> str:
    """One line of what went wrong in a trainer process (the error its start raised, for a
    start that failed)."""
    cause = getattr(error, "cause", None)  # a RayTaskError: what the process itself raised
    if isinstance(cause, BaseException):
        error = cause
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if isinstance(error, RayActorError) and error.actor_init_failed and lines:
        # "...error raised in its creation task, <traceback>": its last line is the error.
        return lines[-1]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


__all__ = [
    "PooledProcess",
    "TrainerPool",
    "TrainerProcess",
    "TrainerProcessActor",
    "error_line",
    "run_claimed_job",
]
