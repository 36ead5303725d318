"""The scheduler: one named Ray actor per cluster (and namespace) that runs the durable job
queue (the database) on trainer processes.

    handle, created = start_scheduler(settings)     # a second start finds the running one
    wait_until_ready(handle)                        # model shared, database and store checked
    ...
    stop_scheduler(handle)                          # running jobs go back to the queue

At start the actor checks the schema and the blob store and gets a reference to the frozen
weights from the model's holder (:mod:`common.model_holder`: one object-store copy per
cluster, shared with the inference replicas); every trainer maps that
:class:`~common.shared_weights.SharedModel` zero-copy. The scheduler itself never unpickles
it, and imports neither torch nor transformers.

Trainers are processes of a :class:`~workers.trainer_pool.TrainerPool`: Ray actors that
each run exactly one job and are then killed (``ray.kill``), never reused; the pool keeps
``trainer_warm_processes`` of them started and prepared (torch imported, model mapped,
database connected) before any job is claimed for them, so a job does not pay a process
start (0: a process is started for each claimed job). Then, every ``scheduler_poll_seconds``:

1. collects finished trainers and kills their processes. A trainer finishes its own job
   (published, failed, cancelled); a trainer whose process died (killed, out of memory,
   node lost: ``RayActorError``, ``NodeDiedError``, …) or that raised is failed here *with
   retry*: its orphan blob, if any, is swept and the job goes back to the queue while
   attempts remain;
2. returns expired leases to the queue (``attempts`` + 1; failed after ``max_attempts``) —
   that is how jobs of a dead scheduler come back: its trainer processes die with it (Ray
   kills the actors of a dead owner), their leases stop being renewed and run out;
3. force-stops (kills the process of) trainers whose job is no longer theirs (cancelled,
   reclaimed, erased) and did not stop by themselves within a grace period;
4. tends the pool (:meth:`TrainerPool.maintain`): starts a process for each queued job a
   free slot could take and, once those are ready, the warm spares; replaces one that failed
   to start (after a backoff) or died while waiting; ends idle ones beyond that;
5. claims jobs (:func:`crud.claim_next_job`: interactive first, one running job per
   tenant, round-robin across tenants) while trainer slots are free *and* a prepared
   process waits (or none are kept warm, or their starts keep failing: then a process is
   started for the claimed job, whose attempt fails with the reason), fails at once a job
   whose hyperparameters are invalid (a user error), and hands each job to its process
   (``max_restarts=0``, ``max_task_retries=0``: retries go through the queue with a new
   lease owner);
6. resumes unfinished tenant erasures (``common/erasure.py``: a runner died or failed), on
   a thread of its own — the one place that does; on the same thread, every
   ``storage_sweep_seconds``, retries pending blob deletes (``common/blob_deletes.py``) and
   sweeps again the prefix of every tenant erased within ``erasure_resweep_window_seconds``.

Whenever a trainer ends (however: finished, crashed, force-stopped, cut off), the prefix of
its tenant is swept again if the tenant is being deleted or gone, so nothing it wrote
outlives the erasure. A trainer running longer than ``job_max_runtime_seconds`` (plus a
grace period: the trainer stops itself first) is force-stopped and its job failed without
retry; a trainer Ray killed for memory (``OutOfMemoryError``: for an actor, Ray reports the
out-of-memory kill through its death cause) fails its job without retry too (the same
batch would run out of memory again).

A claimed job's first lease is ``trainer_start_timeout_seconds``; the trainer's first
heartbeat shortens it to ``job_lease_seconds``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import ray
from ray.exceptions import (
    GetTimeoutError,
    NodeDiedError,
    OutOfMemoryError,
    RayActorError,
    RayTaskError,
    TaskCancelledError,
    WorkerCrashedError,
)

from common.blob_deletes import delete_orphan_prefix_blobs, drain_pending_blob_deletes
from common.blobstore import BlobStore, build_blob_store
from common.config import Settings
from common.db import crud
from common.db.engine import create_db_engine, require_migrated, session_scope
from common.db.models import JobState, TrainingJob
from common.db.types import utcnow
from common.erasure import (
    ErasureOptions,
    resume_pending_erasures,
    resweep_recently_erased,
    serve_evictor_if_running,
    sweep_if_not_active,
)
from common.errors import InvalidInputError, PrefixdError
from common.hyperparameters import parse_hyperparameters
from common.model_holder import model_holder
from workers.trainer_pool import PooledProcess, TrainerPool, error_line
from workers.trainer_report import Outcome, TrainerReport

log = logging.getLogger(__name__)

SCHEDULER_NAME = "prefixd-scheduler"
_REPORTS_KEPT = 200


@dataclass
class _Running:
    job_id: uuid.UUID
    tenant_id: uuid.UUID | None  # None: an operator job (a base prefix)
    owner: str
    attempt: int
    process: PooledProcess  # the trainer process running it (its one job)
    ref: Any  # ray.ObjectRef of the job's report
    claimed_at: str
    pid: int | None = None
    node_id: str | None = None
    lost_since: float | None = None
    force_stopped: bool = False
    started: float | None = None  # time.monotonic() when the trainer reported its start
    claimed: float = 0.0  # time.monotonic() at the claim
    over_runtime: bool = False

    def public(self) -> dict[str, Any]:
        return {
            "job_id": str(self.job_id),
            "tenant_id": str(self.tenant_id) if self.tenant_id is not None else None,
            "owner": self.owner,
            "attempt": self.attempt,
            "claimed_at": self.claimed_at,
            "pid": self.pid,
            "node_id": self.node_id,
            "lease_lost": self.lost_since is not None,
        }


def describe_trainer_error(error: BaseException) -> str:
    """One line saying how a trainer task ended abnormally."""
    if isinstance(error, OutOfMemoryError):
        return (
            "the trainer was killed for running out of memory; resubmit with a smaller "
            "batch_size (not retried: the same batch would run out again)"
        )
    if isinstance(error, NodeDiedError):
        return "the node running the trainer died"
    if isinstance(error, RayActorError) and error.actor_init_failed:
        return f"the trainer process failed to start: {error_line(error)}"
    # A trainer process is an actor: its death (killed, out of memory, node lost) fails
    # its job's call with RayActorError (ActorDiedError), a task's with WorkerCrashedError.
    if isinstance(error, WorkerCrashedError | RayActorError):
        return "the trainer process died (killed, out of memory, or its node was lost)"
    if isinstance(error, TaskCancelledError):
        return "the trainer was stopped"
    if isinstance(error, RayTaskError):
        cause = error.cause
        if cause is not None:
            return f"the trainer raised {type(cause).__name__}: {cause}"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"the trainer failed: {type(error).__name__}: {first_line}"


class Scheduler:
    """The actor's class (see the module docstring). Its methods are called through Ray;
    the claiming loop runs in a thread of the actor process."""

    def __init__(self, settings: Settings, creator_token: str) -> None:
        self.settings = settings
        self.creator_token = creator_token
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.incarnation = uuid.uuid4().hex[:8]
        self.weights_id: str | None = None  # the frozen weights' object id, once set up
        self._pool: TrainerPool | None = None
        self._lock = threading.RLock()
        # Keyed by lease owner, not job id: a trainer that lost its lease (frozen past it)
        # still runs while the job's next attempt does, and both must stay watched.
        self._running: dict[str, _Running] = {}
        self._reports: deque[dict[str, Any]] = deque(maxlen=_REPORTS_KEPT)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._started_at = utcnow().isoformat()
        self._self_handle: Any = None
        self._erasures: threading.Thread | None = None
        self._erasures_checked = -float("inf")
        self._storage_swept = -float("inf")
        self._thread = threading.Thread(target=self._main, name="prefixd-scheduler", daemon=True)
        self._thread.start()

    # --- methods called through Ray -------------------------------------------------------

    def token(self) -> str:
        return self.creator_token

    def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until the scheduler is set up; re-raise what made the setup fail."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the scheduler was not ready after {timeout} s")
        if self._error is not None:
            raise self._error
        return self.status()

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "name": SCHEDULER_NAME,
                "namespace": self.settings.scheduler_namespace,
                "host": self.host,
                "pid": self.pid,
                "incarnation": self.incarnation,
                "started_at": self._started_at,
                "ready": self._ready.is_set() and self._error is None,
                "error": None if self._error is None else str(self._error),
                "stopping": self._stopping.is_set(),
                "slots": self._slots_or_none(),
                "weights_object_id": self.weights_id,
                "warm_processes": self.settings.trainer_warm_processes,
                "trainer_pool": None if self._pool is None else self._pool.status(),
                "running": [r.public() for r in self._running.values()],
                "reports": list(self._reports),
            }

    def trainer_started(self, info: dict[str, Any]) -> None:
        """A trainer reports its process id and node (operators, tests)."""
        with self._lock:
            entry = self._running.get(str(info.get("owner")))
            if entry is not None and str(entry.job_id) == info["job_id"]:
                entry.pid = info.get("pid")
                entry.node_id = info.get("node_id")
                entry.started = time.monotonic()

    def shutdown(self, release: bool = True, timeout: float = 60.0) -> dict[str, int]:
        """Stop claiming, stop the running trainers and (``release``) give their jobs back
        to the queue without counting the interrupted attempt."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            entries = list(self._running.values())
            self._running.clear()
        for entry in entries:
            TrainerPool.retire(entry.process)
        if self._pool is not None:
            self._pool.shutdown()
        if entries:
            ray.wait([e.ref for e in entries], num_returns=len(entries), timeout=timeout)
        released = 0
        if release and entries:
            engine = self._engine
            for entry in entries:
                try:
                    with session_scope(engine) as session:
                        released += crud.release_job(
                            session=session,
                            job_id=entry.job_id,
                            owner=entry.owner,
                            reason="the worker was stopped during this attempt; requeued",
                        )
                except Exception as error:  # the lease runs out instead
                    log.warning("could not release job %s: %s", entry.job_id, error)
        return {"stopped": len(entries), "released": released}

    # --- the loop ---------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._setup()
        except BaseException as error:
            log.exception("the scheduler could not start")
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        log.info(
            "scheduler %s ready (slots %s, weights %s)",
            self.incarnation,
            self._slots_or_none(),
            self.weights_id,
        )
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:  # the database or the store hiccuped: try again next round
                log.exception("scheduler round failed")
            self._stopping.wait(self.settings.scheduler_poll_seconds)

    def _setup(self) -> None:
        s = self.settings
        if s.job_heartbeat_seconds >= s.job_lease_seconds:
            raise InvalidInputError(
                f"PREFIXD_JOB_HEARTBEAT_SECONDS ({s.job_heartbeat_seconds}) must be less than "
                f"PREFIXD_JOB_LEASE_SECONDS ({s.job_lease_seconds})"
            )
        self._engine = create_db_engine(s)
        require_migrated(self._engine)
        self._store: BlobStore = build_blob_store(s)
        self._store.check()
        # The same object-store copy as the inference replicas': one per cluster, owned by
        # a detached holder actor, mapped zero-copy by every trainer. Only a reference
        # here: Ray resolves it in each trainer process (unpickling the tokenizer would
        # import transformers and torch into this process, seconds of CPU at every start).
        holder = model_holder(s)
        shared = holder.get.remote()
        self.weights_id = ray.get(holder.weights_id.remote())
        self._self_handle = ray.get_runtime_context().current_actor
        self._pool = TrainerPool(s, shared)
        self._maintain_pool()  # the warm processes start now, before any job is claimed

    def _tick(self) -> None:
        self._collect_finished()
        with session_scope(self._engine) as session:
            crud.reclaim_expired_jobs(session=session)
        self._watch_leases()
        self._maintain_pool()
        self._claim()
        self._resume_erasures()

    def _maintain_pool(self) -> None:
        """Warm processes: one for each queued job a free slot could take (a burst of jobs
        starts its processes side by side), plus ``trainer_warm_processes`` spares — those
        only once every such job has a ready process, so that starting spares does not slow
        down the starts jobs wait for."""
        assert self._pool is not None
        spares = self.settings.trainer_warm_processes
        if spares == 0:
            return  # a process is started for each claimed job
        with self._lock:
            free = max(self._slots() - len(self._running), 0)
        for_jobs = 0
        if free > 0:
            with session_scope(self._engine) as session:
                for_jobs = crud.count_queued_jobs(session=session, limit=free)
        ready = self._pool.ready_count()
        self._pool.maintain(for_jobs + (spares if ready >= for_jobs else 0))

    def _resume_erasures(self) -> None:
        """The one place that resumes unfinished tenant erasures (``common/erasure.py``):
        those whose runner died (lease run out) or failed (no progress for
        ``erasure_lease_seconds``), on a thread of their own so claiming goes on."""
        now = time.monotonic()
        every = min(5.0, self.settings.erasure_lease_seconds / 4)
        if now - self._erasures_checked < every:
            return
        if self._erasures is not None and self._erasures.is_alive():
            return
        self._erasures_checked = now
        self._erasures = threading.Thread(
            target=self._run_erasures, name="prefixd-erasures", daemon=True
        )
        self._erasures.start()

    def _run_erasures(self) -> None:
        self._sweep_storage()
        try:
            for tenant_id in resume_pending_erasures(
                engine=self._engine,
                store=self._store,
                options=ErasureOptions.from_settings(self.settings),
                evictor=serve_evictor_if_running,
                owner_role=f"scheduler-{self.incarnation}",
            ):
                log.info("resumed and finished the erasure of tenant %s", tenant_id)
        except Exception:
            log.exception("resuming tenant erasures failed")

    def _sweep_storage(self) -> None:
        """Every ``storage_sweep_seconds``: retry pending blob deletes and sweep recently
        erased tenants again (on the erasure thread)."""
        now = time.monotonic()
        if now - self._storage_swept < self.settings.storage_sweep_seconds:
            return
        self._storage_swept = now
        try:
            drain_pending_blob_deletes(self._engine, self._store)
        except Exception:
            log.exception("retrying pending blob deletes failed")
        try:
            resweep_recently_erased(
                self._engine,
                self._store,
                window_seconds=self.settings.erasure_resweep_window_seconds,
            )
        except Exception:
            log.exception("sweeping recently erased tenants failed")

    def _sweep_after_trainer(self, entry: _Running) -> None:
        if entry.tenant_id is None:  # an operator job: nothing under tenants/ to sweep
            return
        try:
            sweep_if_not_active(
                self._engine,
                self._store,
                entry.tenant_id,
                f"the trainer of job {entry.job_id} ended",
            )
        except Exception as error:  # the periodic re-sweep catches it
            log.warning("sweep after the trainer of job %s failed: %s", entry.job_id, error)

    def _collect_finished(self) -> None:
        with self._lock:
            entries = list(self._running.values())
        if not entries:
            return
        done, _ = ray.wait([e.ref for e in entries], num_returns=len(entries), timeout=0)
        done_ids = {ref.hex() for ref in done}
        for entry in entries:
            if entry.ref.hex() not in done_ids:
                continue
            try:
                report = asdict(ray.get(entry.ref, timeout=10))
            except GetTimeoutError:
                continue
            except Exception as error:
                report = self._trainer_died(entry, error)
            # One job per process: it ends now, whatever its job's outcome.
            TrainerPool.retire(entry.process)
            self._sweep_after_trainer(entry)
            report["attempt"] = entry.attempt
            report["finished_at"] = utcnow().isoformat()
            with self._lock:
                self._running.pop(entry.owner, None)
                self._reports.append(report)
            log.info(
                "job %s attempt %d: %s%s",
                entry.job_id,
                entry.attempt,
                report["outcome"],
                f" ({report['error']})" if report.get("error") else "",
            )

    def _trainer_died(self, entry: _Running, error: BaseException) -> dict[str, Any]:
        reason = describe_trainer_error(error)
        base = {
            "job_id": str(entry.job_id),
            "owner": entry.owner,
            "pid": entry.pid or 0,
            "node_id": entry.node_id,
            "error": reason,
        }
        if entry.over_runtime:  # failed for good already (job_max_runtime_seconds)
            return base | {"outcome": "failed", "error": self._runtime_error(entry)}
        if entry.force_stopped:  # its job was no longer its own: nothing to finish
            return base | {"outcome": "stopped"}
        with session_scope(self._engine) as session:
            held = crud.holds_job_lease(session=session, job_id=entry.job_id, owner=entry.owner)
        if not held:
            # Its lease ran out (it was frozen or cut off) and the job went back to the queue,
            # maybe to a newer attempt already running: sweeping the tenant's blobs now could
            # delete that attempt's blob before it publishes. Nothing here is ours to finish.
            return base | {"outcome": "lease_lost"}
        try:
            delete_orphan_prefix_blobs(self._engine, self._store, entry.tenant_id)
        except Exception as sweep_error:
            log.warning("orphan sweep for tenant %s failed: %s", entry.tenant_id, sweep_error)
        out_of_memory = isinstance(error, OutOfMemoryError)
        with session_scope(self._engine) as session:
            crud.finish_job(
                session=session,
                job_id=entry.job_id,
                owner=entry.owner,
                state=JobState.failed,
                error=f"attempt {entry.attempt}: {reason}",
                retry=not out_of_memory,
            )
        if out_of_memory:
            return base | {"outcome": "failed", "crashed": True}
        return base | {"outcome": "retrying", "crashed": True}

    def _runtime_error(self, entry: _Running) -> str:
        limit = self.settings.job_max_runtime_seconds
        return (
            f"attempt {entry.attempt}: the trainer ran past job_max_runtime_seconds "
            f"({limit:g} s) and was stopped; not retried (ask for fewer epochs or less data)"
        )

    def _stop_grace(self) -> float:
        """Seconds a trainer gets to stop by itself before it is force-stopped: the
        setting, plus three heartbeats (it notices at its next one)."""
        settings = self.settings
        return settings.trainer_stop_grace_seconds + 3 * settings.job_heartbeat_seconds

    def _stop_over_runtime(self, entries: list[_Running], now: float) -> None:
        """The backstop of the runtime limit: the trainer stops itself between two steps
        at ``job_max_runtime_seconds``; one still running a grace period later (stuck in a
        step, frozen) is force-stopped here and its job failed without retry."""
        grace = self._stop_grace()
        limit = self.settings.job_max_runtime_seconds
        for entry in entries:
            if entry.over_runtime or entry.force_stopped:
                continue
            began = (
                entry.started
                if entry.started is not None
                else entry.claimed + self.settings.trainer_start_timeout_seconds
            )
            if now - began <= limit + grace:
                continue
            entry.over_runtime = entry.force_stopped = True
            log.warning("stopping the trainer of job %s: past its runtime limit", entry.job_id)
            try:
                with session_scope(self._engine) as session:
                    crud.finish_job(
                        session=session,
                        job_id=entry.job_id,
                        owner=entry.owner,
                        state=JobState.failed,
                        error=self._runtime_error(entry),
                        retry=False,
                    )
            finally:
                TrainerPool.retire(entry.process)

    def _watch_leases(self) -> None:
        with self._lock:
            entries = list(self._running.values())
        if not entries:
            return
        with session_scope(self._engine) as session:
            owners = crud.job_lease_owners(session=session, job_ids=[e.job_id for e in entries])
        grace = self._stop_grace()
        now = time.monotonic()
        self._stop_over_runtime(entries, now)
        for entry in entries:
            state, owner = owners.get(entry.job_id, (None, None))
            if state == JobState.running and owner == entry.owner:
                entry.lost_since = None
                continue
            if entry.lost_since is None:
                entry.lost_since = now
            elif now - entry.lost_since > grace and not entry.force_stopped:
                log.warning(
                    "stopping the trainer of job %s: the job is no longer its own", entry.job_id
                )
                entry.force_stopped = True
                TrainerPool.retire(entry.process)

    def _slots_or_none(self) -> int | None:
        try:
            return self._slots()
        except Exception:
            return None

    def _slots(self) -> int:
        s = self.settings
        if s.trainer_slots is not None:
            return s.trainer_slots
        resources = ray.cluster_resources()
        fitting = int(resources.get("CPU", 0) // s.trainer_num_cpus)
        if s.trainer_num_gpus > 0:
            fitting = min(fitting, int(resources.get("GPU", 0) // s.trainer_num_gpus))
        for name, amount in s.trainer_resources.items():
            fitting = min(fitting, int(resources.get(name, 0) // amount))
        if fitting <= 0:
            return 0
        # Warm processes hold a trainer's resources while they wait: leave them room.
        return max(fitting - s.trainer_warm_processes, 1)

    def _new_owner(self) -> str:
        return f"scheduler@{self.host}:{self.pid}:{self.incarnation}:{uuid.uuid4().hex[:12]}"

    def _claim(self) -> None:
        assert self._pool is not None
        slots = self._slots()
        warm = self.settings.trainer_warm_processes > 0
        while not self._stopping.is_set():
            with self._lock:
                if len(self._running) >= slots:
                    return
            if warm and not self._pool.has_ready() and not self._pool.failing:
                return  # a job is claimed only for a process that is ready to run it
            owner = self._new_owner()
            with session_scope(self._engine) as session:
                job = crud.claim_next_job(
                    session=session,
                    owner=owner,
                    lease_seconds=self.settings.trainer_start_timeout_seconds,
                )
            if job is None:
                return
            if self._refuse_bad_hyperparameters(job, owner):
                continue
            self._launch(job, owner)

    def _refuse_bad_hyperparameters(self, job: TrainingJob, owner: str) -> bool:
        """Fail a job with invalid hyperparameters at once (a user error: no retry) rather
        than start a trainer process for it; the trainer checks them again anyway."""
        try:
            parse_hyperparameters(job.hyperparameters)
        except InvalidInputError as error:
            with session_scope(self._engine) as session:
                crud.finish_job(
                    session=session,
                    job_id=job.id,
                    owner=owner,
                    state=JobState.failed,
                    error=str(error),
                    retry=False,
                )
            report = asdict(TrainerReport(job_id=str(job.id), owner=owner, outcome=Outcome.FAILED))
            report |= {"error": str(error), "attempt": job.attempts}
            with self._lock:
                self._reports.append(report | {"finished_at": utcnow().isoformat()})
            return True
        return False

    def _launch(self, job: TrainingJob, owner: str) -> None:
        assert self._pool is not None
        process = self._pool.take() or self._pool.start_cold()
        entry = _Running(
            job_id=job.id,
            tenant_id=job.tenant_id,
            owner=owner,
            attempt=job.attempts,
            process=process,
            ref=process.run(str(job.id), owner, self._self_handle),
            claimed_at=utcnow().isoformat(),
            pid=process.pid,  # known for a warm process; a cold one reports it at its start
            node_id=process.node_id,
            claimed=time.monotonic(),
        )
        with self._lock:
            self._running[owner] = entry
        log.info(
            "job %s (tenant %s) attempt %d started in %s",
            job.id,
            job.tenant_id,
            job.attempts,
            f"warm trainer process {process.pid}" if process.pid else "a new trainer process",
        )


SchedulerActor = ray.remote(Scheduler)


# --- driver-side helpers --------------------------------------------------------------------


def start_scheduler(
    settings: Settings, *, runtime_env: dict[str, Any] | None = None
) -> tuple[Any, bool]:
    """Start the scheduler actor, or find the one already running under the fixed name in
    ``settings.scheduler_namespace``. Returns ``(handle, created)``: ``created`` is False
    when another start made it. Ray must be initialized. The actor lives as long as the
    process that created it (and is restarted by Ray if its process dies)."""
    token = uuid.uuid4().hex
    handle: Any = SchedulerActor.options(
        name=SCHEDULER_NAME,
        namespace=settings.scheduler_namespace,
        get_if_exists=True,
        max_restarts=-1,
        max_concurrency=16,
        num_cpus=0,
        runtime_env=runtime_env,
    ).remote(settings, token)
    created = ray.get(handle.token.remote()) == token
    return handle, created


def find_scheduler(settings: Settings) -> Any | None:
    try:
        return ray.get_actor(SCHEDULER_NAME, namespace=settings.scheduler_namespace)
    except ValueError:
        return None


def _unwrap(error: BaseException) -> BaseException:
    cause = getattr(error, "cause", None)
    if isinstance(error, RayTaskError) and isinstance(cause, PrefixdError):
        return cause
    return error


def wait_until_ready(handle: Any, timeout: float = 600.0) -> dict[str, Any]:
    """Wait for the actor's setup; a setup failure a user can fix (database not migrated,
    missing model, bucket not found) is raised as that :class:`PrefixdError`."""
    try:
        return dict(ray.get(handle.wait_ready.remote(timeout)))
    except RayTaskError as error:
        unwrapped = _unwrap(error)
        if unwrapped is not error:
            raise unwrapped from None
        raise


def scheduler_status(handle: Any, timeout: float = 30.0) -> dict[str, Any]:
    return dict(ray.get(handle.status.remote(), timeout=timeout))


def stop_scheduler(handle: Any, *, release: bool = True, timeout: float = 60.0) -> dict[str, int]:
    """Stop the running trainers (their jobs go back to the queue when ``release``), then
    end the actor for good."""
    result: dict[str, int] = {}
    try:
        result = dict(ray.get(handle.shutdown.remote(release, timeout), timeout=timeout + 30))
    except (RayActorError, GetTimeoutError) as error:
        log.warning("scheduler shutdown incomplete: %s", error)
    ray.kill(handle, no_restart=True)
    return result


__all__ = [
    "SCHEDULER_NAME",
    "Scheduler",
    "SchedulerActor",
    "describe_trainer_error",
    "find_scheduler",
    "scheduler_status",
    "start_scheduler",
    "stop_scheduler",
    "wait_until_ready",
]
