"""Tenant erasure: erase a tenant everywhere, durably and resumably, and prove it.

    audit = erase_tenant(engine=engine, store=blobs, tenant_id=tenant_id, evictor=evictor)
    resume_pending_erasures(engine=engine, store=blobs, options=options)  # the scheduler
    find_tenant_leftovers(engine, blobs, tenant_id)                       # [] once erased

Marking the tenant ``deleting`` (:func:`crud.begin_tenant_erasure`) records, in the same
commit, its ``tenant_erasures`` row (next step, lease, counts, last error); from then on
nothing can be added to the tenant and its keys are refused. The steps, each idempotent and
committed together with the move to the next one while the runner holds the lease (this
module runs its own transactions; a crash repeats at most the step it was in):

1. ``cancel_jobs`` — queued and running jobs turn ``cancelled``; a trainer stops at its
   next heartbeat, and one already publishing is refused and deletes its blob;
2. ``delete_objects`` — everything under ``tenants/<id>/``, every version and delete marker,
   every unfinished multipart upload (local store: temporary files);
3. ``delete_rows`` — one transaction: record the tenant's prefix ids in the erasure row,
   delete its job events, every row of a table with a ``tenant_id`` column, the tenant row;
4. ``evict_replicas`` — done when every running inference replica answered that it neither
   caches nor loads those prefix ids (:class:`ServeReplicaEvictor`); without Serve, the
   replicas' own sweep (``prefix_cache_sweep_seconds``) is the bound;
5. ``verify`` — a last sweep of ``tenants/<id>/``, then :func:`find_tenant_leftovers` must
   find nothing (objects, versions, unfinished uploads, temporary files, pending blob
   deletes, rows);
6. one transaction writes the ``deletion_audits`` record (ids, times, counts; one per
   tenant however often it runs) and deletes the erasure row.

Runners: ``DELETE /v1/tenants/{id}`` (background of an API replica) and ``prefixd tenants
delete`` (foreground). Two never work on one erasure at once (:class:`ErasureBusyError`).
Resumption has one place, the scheduler's loop: an erasure whose lease ran out or that made
no progress for ``erasure_lease_seconds`` is run again.

**Bounds.** A generate request that resolved the tenant's prefix before step 1 may finish;
none can start after it (the key is refused). A writer that ends *after* step 5 — a trainer
force-stopped or cut off past its lease, a trainer whose publish outcome was unknown (it
keeps its blob), an upload whose replica died between writing and deleting, an S3 multipart
upload left unfinished — can leave data under the tenant's prefix after its audit record
was written. So the erasure stays true afterwards by sweeping again
(:func:`sweep_if_not_active`, :func:`resweep_recently_erased`): the scheduler sweeps
``tenants/<id>/`` whenever a trainer of a tenant that is no longer active ends (however it
ended), the API whenever an upload of such a tenant ends, and the scheduler's loop sweeps
every tenant erased within ``erasure_resweep_window_seconds`` every
``storage_sweep_seconds``. Every sweep also aborts unfinished multipart uploads (the bucket
lifecycle rule in docs/OPERATIONS.md is the backstop for one started after the window).
``prefixd tenants verify-deleted`` reports anything left (objects, versions, markers,
unfinished uploads, temporary files, rows, pending blob deletes) and ``prefixd tenants
delete`` sweeps it again.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, col, select

from common.blobstore import BlobStore, tenant_key_prefix
from common.db import crud
from common.db.engine import session_scope
from common.db.errors import ConflictError, NotFoundError
from common.db.models import (
    DeletionAudit,
    ErasureStep,
    JobEvent,
    JobState,
    PrefixVersion,
    Tenant,
    TenantErasure,
    TenantStatus,
    TrainingJob,
)
from common.db.types import utcnow
from common.errors import PrefixdError

log = logging.getLogger(__name__)

SERVE_APP_NAME = "prefixd"  # `prefixd up`, deploy/serve_config.yaml
INFERENCE_DEPLOYMENT = "inference"
STEP_ORDER: tuple[ErasureStep, ...] = tuple(ErasureStep)
DONE = "done"
WAITING = "waiting for the runner that holds it"
# Tables that outlive the tenant on purpose: the audit record and the erasure's own state.
_KEPT_TABLES = frozenset({"deletion_audits", "tenant_erasures"})
_MAX_ERROR_CHARS = 2000


class ErasureBusyError(ConflictError):
    """Another runner holds the erasure's lease (it is under way elsewhere)."""


class ErasureLeaseLostError(ConflictError):
    """This runner's lease on the erasure was taken over; it stopped."""


class ErasureIncompleteError(PrefixdError):
    """A step could not confirm its result (a replica still holds a prefix, something was
    still found); the erasure stays unfinished and is resumed."""


# --- inference replicas ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaReport:
    """What the inference replicas answered: how many, and which of the asked prefix ids
    one of them still holds (cached, or being loaded)."""

    replicas: int
    held: frozenset[str] = frozenset()


class ReplicaEvictor(Protocol):
    """Make every inference replica drop these prefix ids; report what is still held."""

    def __call__(self, prefix_ids: list[str]) -> ReplicaReport: ...


class ServeReplicaEvictor:
    """Asks every replica of the inference deployment to drop prefix ids
    (``InferenceServer.forget``) with Serve's ``broadcast``, which calls every replica the
    handle's router knows. A replica it does not know yet (just started) is asked by the
    next tries, until as many distinct replicas answered as Serve reports running. (Repeated
    routed calls, before, counted on the router spreading them at random: it need not; in
    Serve's high-throughput mode 100 calls all reached the same replica.) Needs Ray to be
    initialized (it is, inside an API replica or the scheduler)."""

    def __init__(
        self,
        handle: Any = None,
        *,
        app_name: str = SERVE_APP_NAME,
        deployment: str = INFERENCE_DEPLOYMENT,
        call_timeout_s: float = 30.0,
        tries: int = 10,
        retry_seconds: float = 0.5,
    ) -> None:
        self.handle = handle
        self.app_name, self.deployment = app_name, deployment
        self.call_timeout_s, self.tries, self.retry_seconds = call_timeout_s, tries, retry_seconds

    def running_replicas(self) -> int:
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        if app is None or self.deployment not in app.deployments:
            return 0
        states = app.deployments[self.deployment].replica_states
        return int(sum(n for state, n in states.items() if str(state).endswith("RUNNING")))

    def __call__(self, prefix_ids: list[str]) -> ReplicaReport:
        expected = self.running_replicas()
        if expected == 0:
            return ReplicaReport(0)
        handle = self.handle
        if handle is None:
            from ray import serve

            handle = serve.get_deployment_handle(self.deployment, app_name=self.app_name)
        seen: dict[str, list[str]] = {}
        for attempt in range(self.tries):
            if attempt:
                time.sleep(self.retry_seconds)
            answers = handle.broadcast("forget", list(prefix_ids))
            for answer in answers.results(timeout_s=self.call_timeout_s):
                seen[str(answer["replica"])] = list(answer["held"])
            if len(seen) >= expected:
                break
        if len(seen) < expected:
            raise ErasureIncompleteError(
                f"only {len(seen)} of {expected} inference replicas answered the eviction"
            )
        return ReplicaReport(len(seen), frozenset(i for held in seen.values() for i in held))


def serve_evictor_if_running(app_name: str = SERVE_APP_NAME) -> ServeReplicaEvictor | None:
    """An evictor for the Serve application, when this process is connected to Ray and
    the application runs; None otherwise (then no replica exists to evict from, or the
    replicas' sweeper is the bound)."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray import serve

        if app_name not in serve.status().applications:
            return None
    except Exception as error:  # Serve unreachable: the sweeper bound applies
        log.warning("cannot look for the Serve application %r: %s", app_name, error)
        return None
    return ServeReplicaEvictor(app_name=app_name)


# --- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErasureOptions:
    lease_seconds: float = 60.0
    replica_timeout_seconds: float = 60.0
    verify_rounds: int = 3
    poll_seconds: float = 0.25

    @classmethod
    def from_settings(cls, settings: Any) -> ErasureOptions:
        return cls(
            lease_seconds=settings.erasure_lease_seconds,
            replica_timeout_seconds=settings.erasure_replica_timeout_seconds,
        )


def runner_name(role: str) -> str:
    """A lease owner unique to this process and call."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


@dataclass
class ErasureRun:
    """One runner's pass over an erasure (what a step function gets)."""

    engine: Engine
    store: BlobStore
    tenant_id: uuid.UUID
    owner: str
    options: ErasureOptions
    evictor: ReplicaEvictor | None = None
    prefix_ids: list[str] = field(default_factory=list)

    def renew(self) -> None:
        with session_scope(self.engine) as session:
            held = crud.renew_tenant_erasure(
                session=session,
                tenant_id=self.tenant_id,
                owner=self.owner,
                lease_seconds=self.options.lease_seconds,
            )
        if not held:
            raise ErasureLeaseLostError(
                f"the erasure of tenant {self.tenant_id} was taken over by another runner"
            )


StepFunction = Callable[[ErasureRun, Session], dict[str, Any]]


def tenant_tables() -> list[sa.Table]:
    """Every table with a ``tenant_id`` column except the audit and the erasure state,
    dependents first (so deleting in this order never trips a foreign key)."""
    import common.db.models  # noqa: F401  (every table registered)

    return [
        table
        for table in reversed(SQLModel.metadata.sorted_tables)
        if "tenant_id" in table.c and table.name not in _KEPT_TABLES
    ]


def _job_ids(tenant_id: uuid.UUID) -> Any:
    return select(TrainingJob.id).where(col(TrainingJob.tenant_id) == tenant_id)


def _cancel_jobs(run: ErasureRun, session: Session) -> dict[str, Any]:
    now = utcnow()
    result = session.exec(
        sa.update(TrainingJob)
        .where(
            col(TrainingJob.tenant_id) == run.tenant_id,
            col(TrainingJob.state).in_([JobState.queued, JobState.running]),
        )
        .values(
            state=JobState.cancelled,
            lease_owner=None,
            lease_expires_at=None,
            error="cancelled: the tenant is being deleted",
            finished_at=now,
            updated_at=now,
        )
    )
    return {"jobs_cancelled": result.rowcount}


def _delete_objects(run: ErasureRun, session: Session) -> dict[str, Any]:
    return {"objects_erased": run.store.delete_prefix(tenant_key_prefix(run.tenant_id))}


def _delete_rows(run: ErasureRun, session: Session) -> dict[str, Any]:
    tenant_id = run.tenant_id
    # Lock order as everywhere: the tenant row first (publish and claims take it too).
    session.exec(select(Tenant.id).where(col(Tenant.id) == tenant_id).with_for_update()).first()
    prefix_ids = sorted(
        str(i)
        for i in session.exec(
            select(PrefixVersion.id).where(col(PrefixVersion.tenant_id) == tenant_id)
        )
    )
    rows = session.exec(
        sa.delete(JobEvent).where(col(JobEvent.job_id).in_(_job_ids(tenant_id)))
    ).rowcount
    for table in tenant_tables():
        rows += session.exec(sa.delete(table).where(table.c.tenant_id == tenant_id)).rowcount
    rows += session.exec(sa.delete(Tenant).where(col(Tenant.id) == tenant_id)).rowcount
    return {"rows_erased": rows, "prefix_ids": prefix_ids}


def _evict_replicas(run: ErasureRun, session: Session) -> dict[str, Any]:
    if not run.prefix_ids or run.evictor is None:
        return {}
    deadline = time.monotonic() + run.options.replica_timeout_seconds
    while True:
        report = run.evictor(run.prefix_ids)
        if not report.held:
            return {}
        if time.monotonic() > deadline:
            raise ErasureIncompleteError(
                f"{len(report.held)} prefix(es) of tenant {run.tenant_id} still held by an "
                f"inference replica after {run.options.replica_timeout_seconds:g} s"
            )
        run.renew()
        time.sleep(run.options.poll_seconds)


def _verify(run: ErasureRun, session: Session) -> dict[str, Any]:
    swept = 0
    found: list[str] = []
    for round_ in range(run.options.verify_rounds):
        swept += run.store.delete_prefix(tenant_key_prefix(run.tenant_id))
        found = find_tenant_leftovers(run.engine, run.store, run.tenant_id, include_erasure=False)
        if not found:
            return {"objects_erased": swept}
        run.renew()
        time.sleep(run.options.poll_seconds * (round_ + 1))
    raise ErasureIncompleteError(
        f"tenant {run.tenant_id} is not erased yet: {'; '.join(found[:10])}"
        + (f" (and {len(found) - 10} more)" if len(found) > 10 else "")
    )


# The step functions, looked up at run time (tests replace one to fail a step).
STEPS: dict[ErasureStep, StepFunction] = {
    ErasureStep.cancel_jobs: _cancel_jobs,
    ErasureStep.delete_objects: _delete_objects,
    ErasureStep.delete_rows: _delete_rows,
    ErasureStep.evict_replicas: _evict_replicas,
    ErasureStep.verify: _verify,
}


def _next(step: ErasureStep) -> ErasureStep | None:
    index = STEP_ORDER.index(step)
    return STEP_ORDER[index + 1] if index + 1 < len(STEP_ORDER) else None


def _advance(
    run: ErasureRun, session: Session, step: ErasureStep, deltas: dict[str, Any]
) -> DeletionAudit | None:
    """Record the step's result and move on, in the step's own transaction; after the last
    step write the audit record and drop the erasure row. Returns the audit at the end."""
    erasure = session.exec(
        select(TenantErasure)
        .where(col(TenantErasure.tenant_id) == run.tenant_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).first()
    if erasure is None or erasure.lease_owner != run.owner or erasure.step != step:
        session.rollback()
        raise ErasureLeaseLostError(
            f"the erasure of tenant {run.tenant_id} was taken over by another runner"
        )
    for name in ("jobs_cancelled", "objects_erased", "rows_erased"):
        setattr(erasure, name, getattr(erasure, name) + int(deltas.get(name, 0)))
    if "prefix_ids" in deltas:
        erasure.prefix_ids = list(deltas["prefix_ids"])
    now = utcnow()
    following = _next(step)
    if following is None:
        audit = session.exec(
            select(DeletionAudit).where(col(DeletionAudit.tenant_id) == run.tenant_id)
        ).first()
        if audit is None:  # never a second record: the tenant id is unique there
            audit = DeletionAudit(tenant_id=run.tenant_id, requested_at=erasure.requested_at)
        audit.objects_erased += erasure.objects_erased
        audit.rows_erased += erasure.rows_erased
        audit.completed_at = now
        session.add(audit)
        session.delete(erasure)
        session.commit()
        session.refresh(audit)
        return audit
    erasure.step = following
    erasure.updated_at = now
    erasure.lease_expires_at = now + timedelta(seconds=run.options.lease_seconds)
    erasure.last_error = None
    session.add(erasure)
    session.commit()
    run.prefix_ids = list(erasure.prefix_ids)
    return None


def _claim(
    engine: Engine,
    tenant_id: uuid.UUID,
    owner: str,
    options: ErasureOptions,
    *,
    wait: bool,
    on_wait: Callable[[], None] | None = None,
) -> TenantErasure | DeletionAudit:
    """The erasure with this runner's lease; or the audit record when it finished (maybe
    meanwhile, by someone else). Waits for another runner when ``wait``."""
    waited = False
    while True:
        with session_scope(engine) as session:
            erasure = crud.claim_tenant_erasure(
                session=session,
                tenant_id=tenant_id,
                owner=owner,
                lease_seconds=options.lease_seconds,
            )
            if erasure is not None:
                session.expunge(erasure)
                return erasure
            if crud.get_tenant_erasure(session=session, tenant_id=tenant_id) is None:
                audit = crud.get_deletion_audit(session=session, tenant_id=tenant_id)
                if audit is None:
                    raise NotFoundError(f"tenant {tenant_id} not found")
                return audit
        if not wait:
            raise ErasureBusyError(f"the erasure of tenant {tenant_id} runs elsewhere")
        if not waited and on_wait is not None:
            on_wait()
        waited = True
        time.sleep(options.poll_seconds)


def erase_tenant(
    *,
    engine: Engine,
    store: BlobStore,
    tenant_id: uuid.UUID,
    evictor: ReplicaEvictor | None = None,
    options: ErasureOptions | None = None,
    owner: str | None = None,
    wait: bool = True,
    on_step: Callable[[str], None] | None = None,
) -> DeletionAudit:
    """Mark the tenant deleting (if it is not yet) and run its erasure to the end (see the
    module docstring); returns the audit record. Resumes an unfinished erasure where it
    stopped. Raises :class:`NotFoundError` for an unknown tenant or one erased before;
    :class:`ErasureBusyError` when another runner holds it and not ``wait`` (with ``wait``,
    this call waits for it, and takes over if it stops). A step that fails releases the
    lease with the error recorded, and raises."""
    with session_scope(engine) as session:
        crud.begin_tenant_erasure(session=session, tenant_id=tenant_id)
    return resume_erasure(
        engine=engine,
        store=store,
        tenant_id=tenant_id,
        evictor=evictor,
        options=options,
        owner=owner,
        wait=wait,
        on_step=on_step,
    )


def resume_erasure(
    *,
    engine: Engine,
    store: BlobStore,
    tenant_id: uuid.UUID,
    evictor: ReplicaEvictor | None = None,
    options: ErasureOptions | None = None,
    owner: str | None = None,
    wait: bool = True,
    on_step: Callable[[str], None] | None = None,
) -> DeletionAudit:
    """Run an erasure that was begun, from its recorded step to the end."""
    options = options or ErasureOptions()
    owner = owner or runner_name("erasure")
    claimed = _claim(
        engine,
        tenant_id,
        owner,
        options,
        wait=wait,
        on_wait=None if on_step is None else lambda: on_step(WAITING),
    )
    if isinstance(claimed, DeletionAudit):
        if on_step is not None:
            on_step(DONE)
        return claimed
    run = ErasureRun(
        engine, store, tenant_id, owner, options, evictor, prefix_ids=list(claimed.prefix_ids)
    )
    step: ErasureStep | None = claimed.step
    try:
        while step is not None:
            if on_step is not None:
                on_step(step.value)
            with session_scope(engine) as session:
                deltas = STEPS[step](run, session)
                audit = _advance(run, session, step, deltas)
            if audit is not None:
                if on_step is not None:
                    on_step(DONE)
                log.info(
                    "tenant %s erased: %d object(s), %d row(s)",
                    tenant_id,
                    audit.objects_erased,
                    audit.rows_erased,
                )
                return audit
            step = _next(step)
    except ErasureLeaseLostError:
        raise
    except BaseException as error:
        _release(run, f"{step.value if step else '?'}: {type(error).__name__}: {error}")
        raise
    raise AssertionError("unreachable")


def _release(run: ErasureRun, error: str) -> None:
    try:
        with session_scope(run.engine) as session:
            crud.release_tenant_erasure(
                session=session,
                tenant_id=run.tenant_id,
                owner=run.owner,
                error=error[:_MAX_ERROR_CHARS],
            )
    except Exception as release_error:  # the lease runs out instead
        log.warning("could not release the erasure of %s: %s", run.tenant_id, release_error)


def resume_pending_erasures(
    *,
    engine: Engine,
    store: BlobStore,
    options: ErasureOptions,
    evictor: Callable[[], ReplicaEvictor | None] = lambda: None,
    owner_role: str = "scheduler",
) -> list[uuid.UUID]:
    """Run to the end every erasure nobody works on (lease run out, or no progress for
    ``options.lease_seconds``); the scheduler calls it from its loop. Failures are logged
    and recorded on the erasure (tried again after the grace period). Returns the tenants
    whose erasure finished."""
    with session_scope(engine) as session:
        pending = crud.resumable_tenant_erasures(
            session=session, grace_seconds=options.lease_seconds
        )
    finished: list[uuid.UUID] = []
    for tenant_id in pending:
        try:
            resume_erasure(
                engine=engine,
                store=store,
                tenant_id=tenant_id,
                evictor=evictor(),
                options=options,
                owner=runner_name(owner_role),
                wait=False,
            )
        except (ErasureBusyError, ErasureLeaseLostError, NotFoundError):
            continue  # someone else runs or finished it
        except Exception as error:
            log.warning("resuming the erasure of tenant %s failed: %s", tenant_id, error)
            continue
        finished.append(tenant_id)
    return finished


# --- sweeping again after the erasure ------------------------------------------------------------


def tenant_is_active(engine: Engine, tenant_id: uuid.UUID) -> bool:
    """Whether the tenant exists and is not being deleted."""
    with session_scope(engine) as session:
        tenant = session.get(Tenant, tenant_id, populate_existing=True)
        return tenant is not None and tenant.status == TenantStatus.active


def sweep_tenant_prefix(store: BlobStore, tenant_id: uuid.UUID) -> int:
    """Erase everything under ``tenants/<id>/`` (versions, markers, unfinished multipart
    uploads, temporary files); returns how many objects and uploads were found."""
    prefix = tenant_key_prefix(tenant_id)
    aborted = store.abort_incomplete_uploads(prefix)
    return aborted + store.delete_prefix(prefix)


def sweep_if_not_active(engine: Engine, store: BlobStore, tenant_id: uuid.UUID, why: str) -> int:
    """After a writer of the tenant ended (``why``): if the tenant is being deleted or is
    gone, sweep its prefix again, so a late write never outlives the erasure. Returns what
    was found (0 for an active tenant, whose data is left alone)."""
    if tenant_is_active(engine, tenant_id):
        return 0
    found = sweep_tenant_prefix(store, tenant_id)
    if found:
        log.warning(
            "erased tenant %s: %d late object(s)/upload(s) swept after %s", tenant_id, found, why
        )
    return found


def resweep_recently_erased(
    engine: Engine, store: BlobStore, *, window_seconds: float
) -> dict[uuid.UUID, int]:
    """Sweep the prefix of every tenant whose erasure completed within ``window_seconds``
    (the scheduler's loop); returns what was found per tenant (only those with finds)."""
    if window_seconds <= 0:
        return {}
    since = utcnow() - timedelta(seconds=window_seconds)
    with session_scope(engine) as session:
        tenants = crud.recently_erased_tenants(session=session, since=since)
    found: dict[uuid.UUID, int] = {}
    for tenant_id in tenants:
        if tenant_is_active(engine, tenant_id):  # cannot happen (ids are never reused)
            continue
        count = sweep_tenant_prefix(store, tenant_id)
        if count:
            log.warning("erased tenant %s: %d late object(s)/upload(s) swept", tenant_id, count)
            found[tenant_id] = count
    return found


# --- verification ------------------------------------------------------------------------------


def _describe_version(version: Any) -> str:
    text = f"object {version.key}"
    if version.version_id is not None:
        text += f" (version {version.version_id}{', delete marker' if version.is_delete_marker else ''})"
    return text


def find_tenant_leftovers(
    engine: Engine, store: BlobStore, tenant_id: uuid.UUID, *, include_erasure: bool = True
) -> list[str]:
    """Everything of the tenant still stored: every object version (and delete marker)
    under ``tenants/<id>/``, unfinished multipart uploads and temporary files there, its
    pending blob deletes, its tenant row, rows of every table with a ``tenant_id``
    column, its jobs' events, and (``include_erasure``) an erasure still under way. The
    audit record is not a leftover. Empty means erased."""
    prefix = tenant_key_prefix(tenant_id)
    found = [_describe_version(v) for v in store.list_versions(prefix)]
    found += [upload.describe() for upload in store.list_incomplete_uploads(prefix)]
    with session_scope(engine) as session:
        for pending in crud.list_pending_blob_deletes(session=session, tenant_id=tenant_id):
            found.append(
                f"pending blob delete of {pending.kind} {pending.item_id} ({pending.object_key}; "
                f"{pending.attempts} failed attempt(s)"
                + (f", last error: {pending.last_error}" if pending.last_error else "")
                + ")"
            )
        if session.get(Tenant, tenant_id, populate_existing=True) is not None:
            found.append(f"row in tenants ({tenant_id})")
        counts: Iterable[tuple[str, Any]] = [
            (
                "job_events",
                sa.select(sa.func.count())
                .select_from(JobEvent)
                .where(col(JobEvent.job_id).in_(_job_ids(tenant_id))),
            ),
            *(
                (
                    table.name,
                    sa.select(sa.func.count())
                    .select_from(table)
                    .where(table.c.tenant_id == tenant_id),
                )
                for table in tenant_tables()
                if table.name != "pending_blob_deletes"  # listed one by one above
            ),
        ]
        for name, stmt in counts:
            count = int(session.execute(stmt).scalar_one())
            if count:
                found.append(f"{count} row(s) in {name}")
        if include_erasure:
            erasure = crud.get_tenant_erasure(session=session, tenant_id=tenant_id)
            if erasure is not None:
                found.append(f"erasure under way (next step: {erasure.step.value})")
    return found
