"""Data-layer functions, in the style of fastapi/full-stack-fastapi-template's ``crud.py``.

Every function is keyword-only and takes ``session=``. Each function that changes rows is
one transaction and commits it itself (and rolls back on error), so API handlers, the
scheduler and the trainer never commit: they call one of these. Functions that read only
never commit.

Tenant isolation: every lookup a tenant can reach takes the ``tenant_id`` and filters by it;
a row of another tenant is reported exactly like a missing one.

Job leases: :func:`claim_next_job` hands a queued job to ``owner`` for ``lease_seconds``;
the owner keeps it with :func:`heartbeat_job` and ends it with :func:`finish_job` or
:func:`publish_prefix`. ``owner`` must be unique per worker attempt (e.g.
``f"{hostname}:{pid}:{uuid4()}"``): a job whose lease expired is handed to someone else.
``attempts`` counts the claims so far (1 while the first attempt runs).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, func, select

from common.blobstore.keys import key_belongs_to_tenant
from common.db.errors import (
    ConflictError,
    LeaseLostError,
    NotFoundError,
    QuotaExceededError,
    TenantNotActiveError,
)
from common.db.models import (
    TERMINAL_JOB_STATES,
    ApiKey,
    ApiKeyCreate,
    Dataset,
    DatasetCreate,
    DeletionAudit,
    JobEvent,
    JobEventCreate,
    JobPriority,
    JobState,
    NightlyRun,
    NightlyRunPublic,
    Prefix,
    PrefixCreate,
    Tenant,
    TenantCreate,
    TenantErasure,
    TenantStatus,
    TrainingJob,
    TrainingJobCreate,
)
from common.db.types import UTCDateTime, utcnow
from common.errors import InvalidInputError

API_KEY_PREFIX = "pfx_"

# interactive (0) before batch (1); then oldest first.
_PRIORITY_RANK = sa.case((col(TrainingJob.priority) == JobPriority.interactive, 0), else_=1)
_CLAIM_TRIES = 5


def _commit(session: Session) -> None:
    try:
        session.commit()
    except BaseException:
        session.rollback()
        raise


def _ts(value: datetime) -> sa.ColumnElement[datetime]:
    return sa.literal(value, UTCDateTime())


# --- tenants ------------------------------------------------------------------------------


def create_tenant(*, session: Session, tenant_in: TenantCreate) -> Tenant:
    tenant = Tenant.model_validate(tenant_in)
    session.add(tenant)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ConflictError(f"a tenant named {tenant_in.name!r} already exists") from None
    session.refresh(tenant)
    return tenant


def get_tenant(*, session: Session, tenant_id: uuid.UUID) -> Tenant | None:
    return session.get(Tenant, tenant_id)


def get_tenant_by_name(*, session: Session, name: str) -> Tenant | None:
    return session.exec(select(Tenant).where(col(Tenant.name) == name)).first()


def list_tenants(*, session: Session, offset: int = 0, limit: int = 100) -> list[Tenant]:
    stmt = select(Tenant).order_by(col(Tenant.created_at), col(Tenant.id))
    return list(session.exec(stmt.offset(offset).limit(limit)).all())


def _lock_tenant(session: Session, tenant_id: uuid.UUID) -> Tenant | None:
    """The tenant row, locked until the transaction ends (PostgreSQL ``FOR UPDATE``; SQLite
    serializes writers anyway). Publishing and deletion serialize on this lock."""
    stmt = select(Tenant).where(col(Tenant.id) == tenant_id).with_for_update()
    return session.exec(stmt.execution_options(populate_existing=True)).first()


def _require_active_tenant(session: Session, tenant_id: uuid.UUID, *, lock: bool) -> Tenant:
    tenant = (
        _lock_tenant(session, tenant_id)
        if lock
        else session.get(Tenant, tenant_id, populate_existing=True)
    )
    if tenant is None:
        raise NotFoundError(f"tenant {tenant_id} not found")
    if tenant.status != TenantStatus.active:
        raise TenantNotActiveError(f"tenant {tenant_id} is being deleted")
    return tenant


def mark_tenant_deleting(*, session: Session, tenant_id: uuid.UUID) -> Tenant:
    """Flag the tenant as being deleted (idempotent). From the commit on, nothing can be
    added to it: no dataset, job, key or prefix version. The same commit records the
    erasure's state (``tenant_erasures``), so a marked tenant is always erased to the end,
    by whoever resumes it (``common/erasure.py``)."""
    tenant = _lock_tenant(session, tenant_id)
    if tenant is None:
        session.rollback()
        raise NotFoundError(f"tenant {tenant_id} not found")
    tenant.status = TenantStatus.deleting
    session.add(tenant)
    if session.get(TenantErasure, tenant_id) is None:
        session.add(TenantErasure(tenant_id=tenant_id))
    _commit(session)
    session.refresh(tenant)
    return tenant


# --- API keys -------------------------------------------------------------------------------


def hash_api_key(api_key: str) -> str:
    """SHA-256 (hex) of a key. Keys are 256-bit random, so a fast hash is enough."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def create_api_key(
    *, session: Session, tenant_id: uuid.UUID, key_in: ApiKeyCreate | None = None
) -> tuple[ApiKey, str]:
    """Make a key for the tenant. Returns the row and the plaintext key — the only time the
    plaintext exists; only its hash is stored."""
    _require_active_tenant(session, tenant_id, lock=False)
    plaintext = API_KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.model_validate(
        key_in or ApiKeyCreate(),
        update={"tenant_id": tenant_id, "key_hash": hash_api_key(plaintext)},
    )
    session.add(key)
    _commit(session)
    session.refresh(key)
    return key, plaintext


def get_tenant_by_api_key(*, session: Session, api_key: str) -> Tenant | None:
    """The active tenant a key belongs to; ``None`` for an unknown or revoked key, or a
    tenant that is being deleted."""
    if not api_key:
        return None
    stmt = (
        select(Tenant)
        .join(ApiKey, col(ApiKey.tenant_id) == col(Tenant.id))
        .where(
            col(ApiKey.key_hash) == hash_api_key(api_key),
            col(ApiKey.revoked_at).is_(None),
            col(Tenant.status) == TenantStatus.active,
        )
    )
    return session.exec(stmt).first()


def list_api_keys(*, session: Session, tenant_id: uuid.UUID) -> list[ApiKey]:
    stmt = select(ApiKey).where(col(ApiKey.tenant_id) == tenant_id).order_by(col(ApiKey.created_at))
    return list(session.exec(stmt).all())


def revoke_api_key(*, session: Session, tenant_id: uuid.UUID, key_id: uuid.UUID) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None or key.tenant_id != tenant_id:
        raise NotFoundError(f"API key {key_id} not found")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.add(key)
        _commit(session)
        session.refresh(key)
    return key


# --- datasets -------------------------------------------------------------------------------


def add_dataset(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    dataset_in: DatasetCreate,
    max_total_bytes: int | None = None,
) -> Dataset:
    """Record a dataset whose blob is already written (under the tenant's key prefix).
    With ``max_total_bytes``, the tenant's datasets including this one must fit in it (checked
    under the tenant's row lock, so concurrent uploads cannot overshoot together); else
    :class:`QuotaExceededError` and nothing is recorded."""
    if not key_belongs_to_tenant(dataset_in.object_key, tenant_id):
        raise InvalidInputError(
            f"dataset object key {dataset_in.object_key!r} is outside tenant {tenant_id}'s prefix"
        )
    try:
        _require_active_tenant(session, tenant_id, lock=max_total_bytes is not None)
        if max_total_bytes is not None:
            used = tenant_dataset_bytes(session=session, tenant_id=tenant_id)
            if used + dataset_in.size_bytes > max_total_bytes:
                raise QuotaExceededError(
                    f"dataset storage quota exceeded: {used} bytes stored + "
                    f"{dataset_in.size_bytes} uploaded > tenant_dataset_bytes_quota "
                    f"{max_total_bytes}",
                    limit="tenant_dataset_bytes_quota",
                )
    except BaseException:
        session.rollback()
        raise
    dataset = Dataset.model_validate(dataset_in, update={"tenant_id": tenant_id})
    session.add(dataset)
    _commit(session)
    session.refresh(dataset)
    return dataset


def get_dataset(*, session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> Dataset | None:
    dataset = session.get(Dataset, dataset_id)
    return dataset if dataset is not None and dataset.tenant_id == tenant_id else None


def list_datasets(
    *, session: Session, tenant_id: uuid.UUID, offset: int = 0, limit: int = 100
) -> list[Dataset]:
    stmt = (
        select(Dataset)
        .where(col(Dataset.tenant_id) == tenant_id)
        .order_by(col(Dataset.created_at).desc(), col(Dataset.id))
        .offset(offset)
        .limit(limit)
    )
    return list(session.exec(stmt).all())


def tenant_dataset_bytes(*, session: Session, tenant_id: uuid.UUID) -> int:
    """Total size of the tenant's datasets (its storage quota counts these)."""
    stmt = select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(
        col(Dataset.tenant_id) == tenant_id
    )
    return int(session.exec(stmt).one())


def delete_dataset(*, session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> Dataset:
    """Delete the dataset's row and return it (the caller then deletes its blob). A dataset
    that a queued or running job of the tenant reads is kept: :class:`ConflictError`."""
    try:
        # The tenant's row lock serializes this with job submissions (enqueue_job with a
        # quota takes it too), so no new job can start reading the dataset meanwhile.
        _lock_tenant(session, tenant_id)
        dataset = session.get(Dataset, dataset_id, populate_existing=True)
        if dataset is None or dataset.tenant_id != tenant_id:
            raise NotFoundError(f"dataset {dataset_id} not found")
        unfinished = session.exec(
            select(
                TrainingJob.id, TrainingJob.dataset_ids, TrainingJob.validation_dataset_id
            ).where(
                col(TrainingJob.tenant_id) == tenant_id,
                col(TrainingJob.state).not_in(list(TERMINAL_JOB_STATES)),
            )
        ).all()
        for job_id, dataset_ids, validation_id in unfinished:
            if str(dataset_id) in dataset_ids or validation_id == dataset_id:
                raise ConflictError(
                    f"dataset {dataset_id} is used by job {job_id}, which has not finished: "
                    "cancel the job or wait for it"
                )
        session.delete(dataset)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return dataset


# --- training jobs --------------------------------------------------------------------------


def _job_by_idempotency_key(session: Session, tenant_id: uuid.UUID, key: str) -> TrainingJob | None:
    stmt = select(TrainingJob).where(
        col(TrainingJob.tenant_id) == tenant_id, col(TrainingJob.idempotency_key) == key
    )
    return session.exec(stmt).first()


def enqueue_job(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    job_in: TrainingJobCreate,
    max_unfinished_jobs: int | None = None,
) -> tuple[TrainingJob, bool]:
    """Queue a training job. Returns ``(job, created)``: a resubmission with an idempotency
    key the tenant already used returns the existing job and ``created=False``. Every
    dataset (and the validation dataset) must be the tenant's, else :class:`NotFoundError`.
    With ``max_unfinished_jobs``, a tenant that already has that many queued or running jobs
    gets :class:`QuotaExceededError` (checked under the tenant's row lock)."""
    if job_in.idempotency_key is not None:
        existing = _job_by_idempotency_key(session, tenant_id, job_in.idempotency_key)
        if existing is not None:
            return existing, False
    try:
        _require_active_tenant(session, tenant_id, lock=max_unfinished_jobs is not None)
        dataset_ids = list(dict.fromkeys(job_in.dataset_ids))
        wanted = [*dataset_ids]
        if job_in.validation_dataset_id is not None:
            wanted.append(job_in.validation_dataset_id)
        found = set(
            session.exec(
                select(Dataset.id).where(
                    col(Dataset.tenant_id) == tenant_id, col(Dataset.id).in_(wanted)
                )
            ).all()
        )
        missing = [str(d) for d in dict.fromkeys(wanted) if d not in found]
        if missing:
            raise NotFoundError(f"dataset(s) not found: {', '.join(missing)}")
        if max_unfinished_jobs is not None:
            unfinished = count_unfinished_jobs(session=session, tenant_id=tenant_id)
            if unfinished >= max_unfinished_jobs:
                raise QuotaExceededError(
                    f"job quota exceeded: {unfinished} queued or running job(s), "
                    f"tenant_unfinished_jobs_quota is {max_unfinished_jobs}; wait for one to "
                    "finish or cancel one",
                    limit="tenant_unfinished_jobs_quota",
                )
    except BaseException:
        session.rollback()
        raise
    job = TrainingJob.model_validate(
        job_in, update={"tenant_id": tenant_id, "dataset_ids": [str(d) for d in dataset_ids]}
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent submission with the same idempotency key won the race.
        session.rollback()
        if job_in.idempotency_key is not None:
            existing = _job_by_idempotency_key(session, tenant_id, job_in.idempotency_key)
            if existing is not None:
                return existing, False
        raise
    session.refresh(job)
    return job, True


def count_unfinished_jobs(*, session: Session, tenant_id: uuid.UUID) -> int:
    """The tenant's queued and running jobs."""
    stmt = select(func.count()).where(
        col(TrainingJob.tenant_id) == tenant_id,
        col(TrainingJob.state).not_in(list(TERMINAL_JOB_STATES)),
    )
    return int(session.exec(stmt).one())


def count_jobs_by_state(*, session: Session) -> dict[JobState, int]:
    """Jobs of every tenant per state (every state present, zeros included)."""
    stmt = select(TrainingJob.state, func.count()).group_by(col(TrainingJob.state))
    counts = {state: 0 for state in JobState}
    for state, count in session.exec(stmt).all():
        counts[JobState(state)] = int(count)
    return counts


def get_job(
    *, session: Session, job_id: uuid.UUID, tenant_id: uuid.UUID | None = None
) -> TrainingJob | None:
    """A job by id; with ``tenant_id``, only if it belongs to that tenant."""
    job = session.get(TrainingJob, job_id, populate_existing=True)
    if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
        return None
    return job


def list_jobs(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    state: JobState | None = None,
    offset: int = 0,
    limit: int = 100,
) -> list[TrainingJob]:
    stmt = select(TrainingJob).where(col(TrainingJob.tenant_id) == tenant_id)
    if state is not None:
        stmt = stmt.where(col(TrainingJob.state) == state)
    stmt = stmt.order_by(col(TrainingJob.created_at).desc(), col(TrainingJob.id))
    return list(session.exec(stmt.offset(offset).limit(limit)).all())


def cancel_job(
    *, session: Session, job_id: uuid.UUID, tenant_id: uuid.UUID | None = None
) -> TrainingJob:
    """Cancel a queued or running job (a running job's owner learns it from its next
    heartbeat, which returns False). A finished job is returned unchanged."""
    now = utcnow()
    stmt = select(TrainingJob).where(col(TrainingJob.id) == job_id).with_for_update()
    job = session.exec(stmt.execution_options(populate_existing=True)).first()
    if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
        session.rollback()
        raise NotFoundError(f"job {job_id} not found")
    if job.state not in TERMINAL_JOB_STATES:
        job.state = JobState.cancelled
        job.lease_owner = None
        job.lease_expires_at = None
        job.finished_at = now
        job.updated_at = now
        session.add(job)
        _commit(session)
        session.refresh(job)
    else:
        session.rollback()
    return job


def _reclaim_expired(session: Session, now: datetime) -> int:
    """Running jobs whose lease expired go back to ``queued``, or to ``failed`` once they
    have used ``max_attempts`` attempts. Does not commit."""
    stmt = (
        select(
            TrainingJob.id, TrainingJob.attempts, TrainingJob.max_attempts, TrainingJob.lease_owner
        )
        .where(
            col(TrainingJob.state) == JobState.running,
            col(TrainingJob.lease_expires_at) < now,
        )
        .order_by(col(TrainingJob.lease_expires_at))
        .limit(100)
        .with_for_update(skip_locked=True)
    )
    changed = 0
    for job_id, attempts, max_attempts, owner in session.exec(stmt).all():
        values: dict[str, Any] = {
            "lease_owner": None,
            "lease_expires_at": None,
            "updated_at": now,
        }
        if attempts >= max_attempts:
            values |= {
                "state": JobState.failed,
                "finished_at": now,
                "error": (
                    f"failed after {attempts} attempt(s): the lease of attempt {attempts} "
                    f"expired (worker {owner} stopped heartbeating); max_attempts is "
                    f"{max_attempts}"
                ),
            }
        else:
            values |= {
                "state": JobState.queued,
                "error": f"attempt {attempts} lost its lease (worker {owner}); retrying",
            }
        result = session.exec(
            sa.update(TrainingJob)
            .where(
                col(TrainingJob.id) == job_id,
                col(TrainingJob.state) == JobState.running,
                col(TrainingJob.lease_expires_at) < now,
            )
            .values(**values)
        )
        changed += result.rowcount
    return changed


def _claimed_values(owner: str, at: datetime, lease_seconds: float) -> dict[str, Any]:
    """The columns a successful claim sets: running, leased to ``owner``, one more attempt."""
    return {
        "state": JobState.running,
        "lease_owner": owner,
        "lease_expires_at": at + timedelta(seconds=lease_seconds),
        "heartbeat_at": at,
        "attempts": col(TrainingJob.attempts) + 1,
        "started_at": func.coalesce(col(TrainingJob.started_at), _ts(at)),
        "updated_at": at,
    }


def reclaim_expired_jobs(*, session: Session, now: datetime | None = None) -> int:
    """Run the expired-lease sweep on its own (``claim_next_job`` also runs it). Returns
    how many jobs changed state."""
    try:
        changed = _reclaim_expired(session, now or utcnow())
    except BaseException:
        session.rollback()
        raise
    _commit(session)
    return changed


def claim_next_job(
    *, session: Session, owner: str, lease_seconds: float, now: datetime | None = None
) -> TrainingJob | None:
    """Take the next queued job: interactive before batch, then oldest first. The job turns
    ``running`` with ``owner`` holding a lease of ``lease_seconds``; ``attempts`` grows by
    one. Expired leases are reclaimed first. On PostgreSQL the row is picked with
    ``SELECT … FOR UPDATE SKIP LOCKED``, so parallel claimers never take the same job nor
    wait for each other; on SQLite (one writer at a time) a compare-and-set update makes
    the same guarantee. Returns ``None`` when nothing is claimable."""
    if not owner:
        raise ValueError("owner must be a non-empty string")
    if lease_seconds <= 0:
        raise ValueError("lease_seconds must be positive")
    for _ in range(_CLAIM_TRIES):
        at = now or utcnow()
        try:
            _reclaim_expired(session, at)
            candidate = session.exec(
                select(TrainingJob.id)
                .where(col(TrainingJob.state) == JobState.queued)
                .order_by(_PRIORITY_RANK, col(TrainingJob.created_at), col(TrainingJob.id))
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if candidate is None:
                _commit(session)
                return None
            result = session.exec(
                sa.update(TrainingJob)
                .where(
                    col(TrainingJob.id) == candidate,
                    col(TrainingJob.state) == JobState.queued,
                )
                .values(**_claimed_values(owner, at, lease_seconds))
            )
        except BaseException:
            session.rollback()
            raise
        if result.rowcount == 1:
            _commit(session)
            return session.get(TrainingJob, candidate, populate_existing=True)
        session.rollback()  # another claimer took it first (SQLite); try the next one
    return None


def claim_next_fair_job(
    *, session: Session, owner: str, lease_seconds: float, now: datetime | None = None
) -> TrainingJob | None:
    """The scheduler's claim: like :func:`claim_next_job`, but fair between tenants.

    - a tenant with a running job gets no second one (at most one running job per tenant);
    - a tenant being deleted gets nothing;
    - among the claimable jobs: interactive before batch, then round-robin across tenants
      (the tenant whose most recent job start is oldest goes first, a tenant that never
      started a job before everyone), then oldest job first.

    So a tenant with many queued jobs cannot starve the others: after each of its starts,
    every other tenant with a queued job of the same priority comes first.

    Concurrency: on PostgreSQL the candidate's tenant row is locked with ``FOR NO KEY UPDATE
    SKIP LOCKED`` (claimers of one tenant serialize, others pass by; inserts that reference
    the tenant are not blocked), and the job turns ``running`` by a compare-and-set update
    that also requires no running job of the tenant — which on SQLite (one writer at a
    time) is what makes the per-tenant limit hold."""
    if not owner:
        raise ValueError("owner must be a non-empty string")
    if lease_seconds <= 0:
        raise ValueError("lease_seconds must be positive")
    sibling = aliased(TrainingJob)
    skipped: set[uuid.UUID] = set()
    for _ in range(_CLAIM_TRIES * 2):
        at = now or utcnow()
        try:
            _reclaim_expired(session, at)
            tenant_busy = (
                sa.exists()
                .where(
                    col(sibling.tenant_id) == col(TrainingJob.tenant_id),
                    col(sibling.state) == JobState.running,
                )
                .correlate(TrainingJob)
            )
            last_start = (
                select(func.max(sibling.started_at))
                .where(col(sibling.tenant_id) == col(TrainingJob.tenant_id))
                .correlate(TrainingJob)
                .scalar_subquery()
            )
            stmt = (
                select(TrainingJob.id, TrainingJob.tenant_id)
                .join(Tenant, col(Tenant.id) == col(TrainingJob.tenant_id))
                .where(
                    col(TrainingJob.state) == JobState.queued,
                    col(Tenant.status) == TenantStatus.active,
                    ~tenant_busy,
                )
                .order_by(
                    _PRIORITY_RANK,
                    last_start.asc().nulls_first(),
                    col(TrainingJob.created_at),
                    col(TrainingJob.id),
                )
                .limit(1)
            )
            if skipped:
                stmt = stmt.where(col(TrainingJob.tenant_id).not_in(skipped))
            row = session.exec(stmt).first()
            if row is None:
                _commit(session)
                return None
            candidate, tenant_id = row
            locked = session.exec(
                select(Tenant.id)
                .where(col(Tenant.id) == tenant_id, col(Tenant.status) == TenantStatus.active)
                .with_for_update(skip_locked=True, key_share=True)
            ).first()
            if locked is None:  # another claimer, a publish or a deletion holds the tenant
                session.rollback()
                skipped.add(tenant_id)
                continue
            busy_now = (
                sa.exists()
                .where(
                    col(sibling.tenant_id) == tenant_id,
                    col(sibling.state) == JobState.running,
                )
                .correlate_except(sibling)
            )
            result = session.exec(
                sa.update(TrainingJob)
                .where(
                    col(TrainingJob.id) == candidate,
                    col(TrainingJob.state) == JobState.queued,
                    ~busy_now,
                )
                .values(**_claimed_values(owner, at, lease_seconds))
            )
        except BaseException:
            session.rollback()
            raise
        if result.rowcount == 1:
            _commit(session)
            return session.get(TrainingJob, candidate, populate_existing=True)
        session.rollback()  # taken, cancelled, or the tenant got a running job meanwhile
    return None


def release_job(
    *,
    session: Session,
    job_id: uuid.UUID,
    owner: str,
    reason: str,
    now: datetime | None = None,
) -> bool:
    """Give a running job back to the queue without counting the attempt: the owner stops
    for a reason that is not the job's fault (a graceful worker shutdown). Returns False,
    changing nothing, when ``owner`` no longer holds the lease."""
    at = now or utcnow()
    result = session.exec(
        sa.update(TrainingJob)
        .where(col(TrainingJob.id) == job_id, *_owned_running(owner))
        .values(
            state=JobState.queued,
            attempts=sa.case(
                (col(TrainingJob.attempts) > 0, col(TrainingJob.attempts) - 1), else_=0
            ),
            lease_owner=None,
            lease_expires_at=None,
            error=reason,
            updated_at=at,
        )
    )
    _commit(session)
    return result.rowcount == 1


def list_all_jobs(
    *,
    session: Session,
    tenant_id: uuid.UUID | None = None,
    state: JobState | None = None,
    offset: int = 0,
    limit: int = 100,
) -> list[TrainingJob]:
    """Jobs of every tenant, newest first (operators only: ``prefixd jobs list``; tenant
    requests go through :func:`list_jobs`, which requires the tenant)."""
    stmt = select(TrainingJob)
    if tenant_id is not None:
        stmt = stmt.where(col(TrainingJob.tenant_id) == tenant_id)
    if state is not None:
        stmt = stmt.where(col(TrainingJob.state) == state)
    stmt = stmt.order_by(col(TrainingJob.created_at).desc(), col(TrainingJob.id))
    return list(session.exec(stmt.offset(offset).limit(limit)).all())


def _owned_running(owner: str) -> list[sa.ColumnElement[bool]]:
    return [
        col(TrainingJob.state) == JobState.running,
        col(TrainingJob.lease_owner) == owner,
    ]


def holds_job_lease(
    *, session: Session, job_id: uuid.UUID, owner: str, now: datetime | None = None
) -> bool:
    """Whether ``owner`` still holds the job's unexpired lease (read only). The scheduler
    asks before it cleans up after a dead trainer: once the lease ran out, the job may
    already run again under another owner, whose blob must not be swept."""
    at = now or utcnow()
    found = session.exec(
        select(TrainingJob.id).where(
            col(TrainingJob.id) == job_id,
            *_owned_running(owner),
            col(TrainingJob.lease_expires_at) > _ts(at),
        )
    ).first()
    return found is not None


def heartbeat_job(
    *,
    session: Session,
    job_id: uuid.UUID,
    owner: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> bool:
    """Extend the lease, only while ``owner`` still holds it. False means: stop working on
    this job (it was cancelled, reclaimed after the lease expired, or finished)."""
    at = now or utcnow()
    result = session.exec(
        sa.update(TrainingJob)
        .where(col(TrainingJob.id) == job_id, *_owned_running(owner))
        .values(
            lease_expires_at=at + timedelta(seconds=lease_seconds), heartbeat_at=at, updated_at=at
        )
    )
    _commit(session)
    return result.rowcount == 1


def finish_job(
    *,
    session: Session,
    job_id: uuid.UUID,
    owner: str,
    state: JobState,
    error: str | None = None,
    retry: bool = False,
    now: datetime | None = None,
) -> bool:
    """End the owner's attempt: ``failed`` (with ``error``), ``cancelled`` or ``succeeded``
    (a job that produces a prefix ends through :func:`publish_prefix` instead). With
    ``retry=True`` a failure goes back to ``queued`` while attempts remain. Returns False,
    changing nothing, when ``owner`` no longer holds the lease."""
    if state not in TERMINAL_JOB_STATES:
        raise ValueError(f"finish_job needs a final state, not {state}")
    at = now or utcnow()
    values: dict[str, Any] = {
        "lease_owner": None,
        "lease_expires_at": None,
        "updated_at": at,
        "error": error,
    }
    stmt = sa.update(TrainingJob).where(col(TrainingJob.id) == job_id, *_owned_running(owner))
    if state == JobState.failed and retry:
        stmt = stmt.values(
            state=sa.case(
                (col(TrainingJob.attempts) < col(TrainingJob.max_attempts), JobState.queued.value),
                else_=JobState.failed.value,
            ),
            finished_at=sa.case(
                (col(TrainingJob.attempts) < col(TrainingJob.max_attempts), None),
                else_=_ts(at),
            ),
            **values,
        )
    else:
        stmt = stmt.values(state=state, finished_at=at, **values)
    result = session.exec(stmt)
    _commit(session)
    return result.rowcount == 1


def record_job_event(
    *, session: Session, job_id: uuid.UUID, event_in: JobEventCreate, now: datetime | None = None
) -> JobEvent:
    """Append a progress row (step, total steps, loss, validation loss, tokens/s)."""
    event = JobEvent.model_validate(
        event_in, update={"job_id": job_id, "created_at": now or utcnow()}
    )
    session.add(event)
    _commit(session)
    session.refresh(event)
    return event


def list_job_events(
    *, session: Session, job_id: uuid.UUID, after_id: int | None = None, limit: int = 1000
) -> list[JobEvent]:
    """Progress rows of a job in order; ``after_id`` returns only newer rows (polling)."""
    stmt = select(JobEvent).where(col(JobEvent.job_id) == job_id)
    if after_id is not None:
        stmt = stmt.where(col(JobEvent.id) > after_id)
    return list(session.exec(stmt.order_by(col(JobEvent.id)).limit(limit)).all())


def latest_job_events(
    *, session: Session, job_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, JobEvent]:
    """The newest progress row of each of these jobs (jobs without one are left out)."""
    if not job_ids:
        return {}
    newest = (
        select(func.max(JobEvent.id))
        .where(col(JobEvent.job_id).in_(list(job_ids)))
        .group_by(col(JobEvent.job_id))
    )
    rows = session.exec(select(JobEvent).where(col(JobEvent.id).in_(newest))).all()
    return {row.job_id: row for row in rows}


# --- prefixes -------------------------------------------------------------------------------


def _deactivate_all(session: Session, tenant_id: uuid.UUID) -> None:
    session.exec(
        sa.update(Prefix)
        .where(col(Prefix.tenant_id) == tenant_id, col(Prefix.active).is_(True))
        .values(active=False)
    )


def publish_prefix(
    *,
    session: Session,
    job_id: uuid.UUID,
    owner: str,
    prefix_in: PrefixCreate,
    activate: bool = True,
    note: str | None = None,
    now: datetime | None = None,
) -> Prefix:
    """Make a trained prefix visible, in one transaction: check that the tenant exists and
    is not being deleted and that ``owner`` still holds the job's (unexpired) lease; insert
    the next prefix version; make it the tenant's active prefix (deactivating the previous
    one); mark the job succeeded. Call it only after the blob is completely written.
    ``activate=False`` publishes the version inactive (the previous one stays active) and
    records ``note`` (why) on the job.

    Raises :class:`NotFoundError` (job or tenant gone), :class:`TenantNotActiveError` or
    :class:`LeaseLostError`; then nothing was changed and the caller deletes its blob."""
    at = now or utcnow()
    try:
        tenant_id = session.exec(
            select(TrainingJob.tenant_id).where(col(TrainingJob.id) == job_id)
        ).first()
        if tenant_id is None:
            raise NotFoundError(f"job {job_id} not found")
        if not key_belongs_to_tenant(prefix_in.object_key, tenant_id):
            raise InvalidInputError(
                f"prefix object key {prefix_in.object_key!r} is outside tenant {tenant_id}'s prefix"
            )
        # Lock order: tenant, then job (tenant deletion takes the tenant lock first too).
        _require_active_tenant(session, tenant_id, lock=True)
        job = session.exec(
            select(TrainingJob)
            .where(col(TrainingJob.id) == job_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).one()
        if (
            job.state != JobState.running
            or job.lease_owner != owner
            or job.lease_expires_at is None
            or job.lease_expires_at <= at
        ):
            raise LeaseLostError(
                f"job {job_id} is no longer leased to {owner} (state {job.state}); "
                "the prefix was not published"
            )
        latest = session.exec(
            select(func.max(Prefix.version)).where(col(Prefix.tenant_id) == tenant_id)
        ).one()
        if activate:
            _deactivate_all(session, tenant_id)
        prefix = Prefix.model_validate(
            prefix_in,
            update={
                "tenant_id": tenant_id,
                "job_id": job_id,
                "version": (latest or 0) + 1,
                "active": activate,
                "created_at": at,
                "activated_at": at if activate else None,
            },
        )
        session.add(prefix)
        job.state = JobState.succeeded
        job.lease_owner = None
        job.lease_expires_at = None
        job.error = None
        job.note = None if activate else note
        job.finished_at = at
        job.updated_at = at
        session.add(job)
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ConflictError(
            f"a concurrent change to tenant prefixes of job {job_id} won; retry the publish"
        ) from None
    except BaseException:
        session.rollback()
        raise
    session.refresh(prefix)
    return prefix


def activate_prefix(
    *, session: Session, tenant_id: uuid.UUID, version: int, now: datetime | None = None
) -> Prefix:
    """Make ``version`` the tenant's active prefix (a rollback to an older version, or
    forward again). The database guarantees at most one active prefix per tenant."""
    at = now or utcnow()
    try:
        _require_active_tenant(session, tenant_id, lock=True)
        prefix = session.exec(
            select(Prefix)
            .where(col(Prefix.tenant_id) == tenant_id, col(Prefix.version) == version)
            .execution_options(populate_existing=True)
        ).first()
        if prefix is None:
            raise NotFoundError(f"prefix version {version} of tenant {tenant_id} not found")
        if not prefix.active:
            _deactivate_all(session, tenant_id)
            prefix.active = True
            prefix.activated_at = at
            session.add(prefix)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    session.refresh(prefix)
    return prefix


def get_active_prefix(*, session: Session, tenant_id: uuid.UUID) -> Prefix | None:
    stmt = select(Prefix).where(col(Prefix.tenant_id) == tenant_id, col(Prefix.active).is_(True))
    return session.exec(stmt).first()


def get_prefix(*, session: Session, tenant_id: uuid.UUID, version: int) -> Prefix | None:
    stmt = select(Prefix).where(col(Prefix.tenant_id) == tenant_id, col(Prefix.version) == version)
    return session.exec(stmt).first()


def get_prefix_by_id(
    *, session: Session, tenant_id: uuid.UUID, prefix_id: uuid.UUID
) -> Prefix | None:
    """A prefix version by its id, only if it belongs to the tenant."""
    prefix = session.get(Prefix, prefix_id, populate_existing=True)
    return prefix if prefix is not None and prefix.tenant_id == tenant_id else None


def prefix_ids_of_jobs(
    *, session: Session, job_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, uuid.UUID]:
    """The prefix version each of these jobs published (jobs without one are left out)."""
    if not job_ids:
        return {}
    stmt = select(Prefix.job_id, Prefix.id).where(col(Prefix.job_id).in_(list(job_ids)))
    return {job_id: prefix_id for job_id, prefix_id in session.exec(stmt).all() if job_id}


def list_prefixes(*, session: Session, tenant_id: uuid.UUID) -> list[Prefix]:
    stmt = select(Prefix).where(col(Prefix.tenant_id) == tenant_id).order_by(col(Prefix.version))
    return list(session.exec(stmt).all())


# --- deletion audit -------------------------------------------------------------------------


def start_deletion_audit(
    *, session: Session, tenant_id: uuid.UUID, now: datetime | None = None
) -> DeletionAudit:
    audit = DeletionAudit(tenant_id=tenant_id, requested_at=now or utcnow())
    session.add(audit)
    _commit(session)
    session.refresh(audit)
    return audit


def complete_deletion_audit(
    *,
    session: Session,
    audit_id: uuid.UUID,
    objects_erased: int,
    rows_erased: int,
    now: datetime | None = None,
) -> DeletionAudit:
    audit = session.get(DeletionAudit, audit_id)
    if audit is None:
        raise NotFoundError(f"deletion audit {audit_id} not found")
    audit.objects_erased = objects_erased
    audit.rows_erased = rows_erased
    audit.completed_at = now or utcnow()
    session.add(audit)
    _commit(session)
    session.refresh(audit)
    return audit


def list_deletion_audits(
    *, session: Session, tenant_id: uuid.UUID | None = None
) -> Sequence[DeletionAudit]:
    stmt = select(DeletionAudit)
    if tenant_id is not None:
        stmt = stmt.where(col(DeletionAudit.tenant_id) == tenant_id)
    return session.exec(stmt.order_by(col(DeletionAudit.requested_at))).all()


def existing_prefix_ids(*, session: Session, prefix_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of these prefix ids still have a row (inference replicas drop the others)."""
    if not prefix_ids:
        return set()
    rows = session.exec(select(Prefix.id).where(col(Prefix.id).in_(prefix_ids)))
    return set(rows.all())


# --- prefix version removal -----------------------------------------------------------------


def delete_prefix_version(
    *, session: Session, tenant_id: uuid.UUID, prefix_id: uuid.UUID, now: datetime | None = None
) -> tuple[Prefix, Prefix | None]:
    """Delete one prefix version's row (the caller then deletes its blob). If it was the
    active one, the highest remaining version becomes active (or none is). Returns the
    deleted row and the tenant's active prefix afterwards."""
    at = now or utcnow()
    try:
        _require_active_tenant(session, tenant_id, lock=True)
        prefix = session.get(Prefix, prefix_id, populate_existing=True)
        if prefix is None or prefix.tenant_id != tenant_id:
            raise NotFoundError(f"prefix {prefix_id} not found")
        was_active = prefix.active
        deleted = Prefix.model_validate(prefix.model_dump())  # outlives the commit
        session.delete(prefix)
        session.flush()
        active = get_active_prefix(session=session, tenant_id=tenant_id)
        if was_active:
            active = session.exec(
                select(Prefix)
                .where(col(Prefix.tenant_id) == tenant_id)
                .order_by(col(Prefix.version).desc())
                .limit(1)
            ).first()
            if active is not None:
                active.active = True
                active.activated_at = at
                session.add(active)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    if active is not None:
        session.refresh(active)
    return deleted, active


# --- tenant erasure state (common/erasure.py runs the steps) --------------------------------


def get_tenant_erasure(*, session: Session, tenant_id: uuid.UUID) -> TenantErasure | None:
    """The erasure under way for this tenant (None: never started, or finished)."""
    return session.get(TenantErasure, tenant_id, populate_existing=True)


def begin_tenant_erasure(*, session: Session, tenant_id: uuid.UUID) -> TenantErasure:
    """Mark the tenant ``deleting`` and record its erasure (idempotent; see
    :func:`mark_tenant_deleting`). A tenant whose rows are already gone but whose erasure
    has not finished returns that erasure; otherwise an unknown tenant (or one erased
    completely) raises :class:`NotFoundError`."""
    try:
        mark_tenant_deleting(session=session, tenant_id=tenant_id)
    except NotFoundError:
        erasure = get_tenant_erasure(session=session, tenant_id=tenant_id)
        if erasure is None:
            raise
        return erasure
    erasure = get_tenant_erasure(session=session, tenant_id=tenant_id)
    assert erasure is not None
    return erasure


def claim_tenant_erasure(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    owner: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> TenantErasure | None:
    """Take the erasure's lease (compare-and-set): granted when nobody holds it, it ran
    out, or ``owner`` holds it already. None when someone else holds it, or when there is
    no such erasure."""
    at = now or utcnow()
    result = session.exec(
        sa.update(TenantErasure)
        .where(
            col(TenantErasure.tenant_id) == tenant_id,
            sa.or_(
                col(TenantErasure.lease_owner).is_(None),
                col(TenantErasure.lease_expires_at) < at,
                col(TenantErasure.lease_owner) == owner,
            ),
        )
        .values(
            lease_owner=owner,
            lease_expires_at=at + timedelta(seconds=lease_seconds),
            runs=col(TenantErasure.runs) + 1,
            updated_at=at,
        )
    )
    _commit(session)
    if result.rowcount != 1:
        return None
    return get_tenant_erasure(session=session, tenant_id=tenant_id)


def renew_tenant_erasure(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    owner: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> bool:
    """Extend ``owner``'s lease; False when it no longer holds it (or the erasure is done)."""
    at = now or utcnow()
    result = session.exec(
        sa.update(TenantErasure)
        .where(col(TenantErasure.tenant_id) == tenant_id, col(TenantErasure.lease_owner) == owner)
        .values(lease_expires_at=at + timedelta(seconds=lease_seconds), updated_at=at)
    )
    _commit(session)
    return result.rowcount == 1


def release_tenant_erasure(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    owner: str,
    error: str | None = None,
    now: datetime | None = None,
) -> bool:
    """``owner`` stops working on the erasure (it failed with ``error``, or was stopped):
    anyone may take it up again at once, the scheduler after its grace period."""
    at = now or utcnow()
    result = session.exec(
        sa.update(TenantErasure)
        .where(col(TenantErasure.tenant_id) == tenant_id, col(TenantErasure.lease_owner) == owner)
        .values(lease_owner=None, lease_expires_at=None, last_error=error, updated_at=at)
    )
    _commit(session)
    return result.rowcount == 1


def list_tenant_erasures(*, session: Session) -> list[TenantErasure]:
    """Every erasure under way, oldest request first."""
    stmt = select(TenantErasure).order_by(col(TenantErasure.requested_at))
    return list(session.exec(stmt).all())


def resumable_tenant_erasures(
    *, session: Session, grace_seconds: float, now: datetime | None = None
) -> list[uuid.UUID]:
    """Erasures nobody works on: a lease that ran out (its runner died), or no lease and
    no progress for ``grace_seconds`` (its runner failed, or never started)."""
    at = now or utcnow()
    stmt = (
        select(TenantErasure.tenant_id)
        .where(
            sa.or_(
                col(TenantErasure.lease_expires_at) < at,
                sa.and_(
                    col(TenantErasure.lease_owner).is_(None),
                    col(TenantErasure.updated_at) < at - timedelta(seconds=grace_seconds),
                ),
            )
        )
        .order_by(col(TenantErasure.requested_at))
    )
    return list(session.exec(stmt).all())


def get_deletion_audit(*, session: Session, tenant_id: uuid.UUID) -> DeletionAudit | None:
    """The tenant's audit record (one per tenant), once its erasure finished."""
    return session.exec(
        select(DeletionAudit).where(col(DeletionAudit.tenant_id) == tenant_id)
    ).first()


# --- nightly retraining runs (workers/nightly.py) -------------------------------------------


def nightly_idempotency_key(run_date: date) -> str:
    """The idempotency key of every nightly job of that night (one job per tenant)."""
    return f"nightly-{run_date.isoformat()}"


@dataclass
class NightlyJobCounts:
    """The jobs of one night by state, from the jobs themselves."""

    total: int = 0
    unfinished: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    kept_inactive: int = 0  # succeeded, prefix published inactive (the job has a note)
    last_finished_at: datetime | None = None


def nightly_job_counts(
    *, session: Session, run_dates: Sequence[date]
) -> dict[date, NightlyJobCounts]:
    """Count the nightly jobs of these nights (every date present, zeros included)."""
    keys = {nightly_idempotency_key(d): d for d in run_dates}
    counts = {d: NightlyJobCounts() for d in run_dates}
    if not keys:
        return counts
    stmt = (
        sa.select(
            col(TrainingJob.idempotency_key),
            col(TrainingJob.state),
            func.count(),
            func.count(col(TrainingJob.note)),
            func.max(col(TrainingJob.finished_at)),
        )
        .where(col(TrainingJob.idempotency_key).in_(list(keys)))
        .group_by(col(TrainingJob.idempotency_key), col(TrainingJob.state))
    )
    for key, state, number, notes, last in session.execute(stmt).all():
        entry = counts[keys[str(key)]]
        entry.total += number
        if state == JobState.succeeded:
            entry.succeeded += number
            entry.kept_inactive += notes
        elif state == JobState.failed:
            entry.failed += number
        elif state == JobState.cancelled:
            entry.cancelled += number
        else:
            entry.unfinished += number
        if state in TERMINAL_JOB_STATES and last is not None:
            known = entry.last_finished_at
            entry.last_finished_at = last if known is None else max(known, last)
    return counts


def _apply_nightly_counts(run: NightlyRun | NightlyRunPublic, counts: NightlyJobCounts) -> None:
    """Job counts onto a run row (or its public copy); a planned night whose jobs are all
    final gets ``finished_at`` and ``wall_seconds``."""
    run.tenants_planned = counts.total
    run.jobs_succeeded = counts.succeeded
    run.jobs_failed = counts.failed
    run.jobs_cancelled = counts.cancelled
    run.prefixes_kept_inactive = counts.kept_inactive
    if run.planned_at is not None and counts.unfinished == 0:
        candidates = [run.planned_at, counts.last_finished_at]
        run.finished_at = max(t for t in candidates if t is not None)
        run.wall_seconds = (run.finished_at - run.started_at).total_seconds()
    else:
        run.finished_at = None
        run.wall_seconds = None


def get_nightly_run(*, session: Session, run_date: date) -> NightlyRun | None:
    stmt = select(NightlyRun).where(col(NightlyRun.run_date) == run_date)
    return session.exec(stmt.execution_options(populate_existing=True)).first()


def start_nightly_run(
    *, session: Session, run_date: date, now: datetime | None = None
) -> NightlyRun:
    """The night's row, made by its first planning pass (which sets ``started_at``); each
    call counts one more pass (``planner_runs``) and marks the night unfinished again."""
    at = now or utcnow()
    for _ in range(3):
        try:
            run = session.exec(
                select(NightlyRun)
                .where(col(NightlyRun.run_date) == run_date)
                .with_for_update()
                .execution_options(populate_existing=True)
            ).first()
            if run is None:
                run = NightlyRun(run_date=run_date, started_at=at, planner_runs=1)
            else:
                run.planner_runs += 1
                run.finished_at = None
                run.wall_seconds = None
            session.add(run)
            session.commit()
        except IntegrityError:  # a concurrent first pass made the row: count on it
            session.rollback()
            continue
        except BaseException:
            session.rollback()
            raise
        session.refresh(run)
        return run
    raise ConflictError(f"could not record the nightly run of {run_date}; try again")


def finish_nightly_planning(
    *,
    session: Session,
    run_date: date,
    tenants_skipped: int,
    estimated_tokens: int,
    now: datetime | None = None,
) -> NightlyRun:
    """Record the end of a planning pass (``planned_at``, skipped tenants, estimated
    tokens) and the night's job counts as they stand."""
    at = now or utcnow()
    run = get_nightly_run(session=session, run_date=run_date)
    if run is None:
        raise NotFoundError(f"nightly run of {run_date} not found")
    run.planned_at = at
    run.tenants_skipped = tenants_skipped
    run.estimated_tokens = estimated_tokens
    _apply_nightly_counts(run, nightly_job_counts(session=session, run_dates=[run_date])[run_date])
    session.add(run)
    _commit(session)
    session.refresh(run)
    return run


def refresh_nightly_runs(
    *, session: Session, run_dates: Sequence[date] | None = None
) -> list[NightlyRun]:
    """Store the job counts of these nights (default: every night not finished yet);
    a night whose jobs are all final gets ``finished_at`` and ``wall_seconds``."""
    stmt = select(NightlyRun).execution_options(populate_existing=True)
    if run_dates is None:
        stmt = stmt.where(col(NightlyRun.finished_at).is_(None))
    else:
        stmt = stmt.where(col(NightlyRun.run_date).in_(list(run_dates)))
    runs = list(session.exec(stmt.order_by(col(NightlyRun.run_date))).all())
    counts = nightly_job_counts(session=session, run_dates=[r.run_date for r in runs])
    for run in runs:
        _apply_nightly_counts(run, counts[run.run_date])
        session.add(run)
    _commit(session)
    for run in runs:
        session.refresh(run)
    return runs


def list_nightly_runs(
    *, session: Session, offset: int = 0, limit: int = 100
) -> list[NightlyRunPublic]:
    """Nightly runs, newest night first. The job counts of a night not finished yet are
    read from its jobs now (read only; :func:`refresh_nightly_runs` stores them)."""
    stmt = select(NightlyRun).order_by(col(NightlyRun.run_date).desc())
    runs = list(session.exec(stmt.offset(offset).limit(limit)).all())
    open_dates = [r.run_date for r in runs if r.finished_at is None]
    counts = nightly_job_counts(session=session, run_dates=open_dates)
    result = []
    for run in runs:
        public = NightlyRunPublic.model_validate(run)
        if run.finished_at is None:
            _apply_nightly_counts(public, counts[run.run_date])
        result.append(public)
    return result
