"""The training queue: claim a job under a lease, keep it with heartbeats, release or finish it.

``claim_next_job`` is the production claim (round-robin over tenants, interactive
before batch); ``claim_oldest_job`` is plain FIFO. ``owner`` must be unique per worker attempt
(e.g. ``f"{hostname}:{pid}:{uuid4()}"``): a job whose lease expired is handed to someone else.
``attempts`` counts the claims so far (1 while the first attempt runs).

The round-robin key of a queued job, its tenant's most recent job start, is stored on the job
(``tenant_last_started_at``) and kept current here: set when a job is queued (enqueued, or
given back by a release, a retry or an expired lease) and on every start of a sibling. So a
claim reads the first entries of an index instead of computing the key for every queued job
(with 60,000 queued jobs that took 1.9 s per claim; bench/nightly_planning.py)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, func, select

from common.db.crud.transaction import commit, id_in, sql_timestamp
from common.db.models import (
    CLAIM_ORDER,
    NEVER_STARTED,
    TERMINAL_JOB_STATES,
    JobState,
    Tenant,
    TenantStatus,
    TrainingJob,
)
from common.db.types import utcnow

_CLAIM_TRIES = 5


def tenant_last_starts(
    *, session: Session, tenant_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, datetime]:
    """The most recent job start of each of these tenants (NEVER_STARTED for a tenant that
    never started one): the round-robin key a job of theirs is queued with."""
    starts = dict.fromkeys(tenant_ids, NEVER_STARTED)
    if not starts:
        return starts
    rows = session.exec(
        select(TrainingJob.tenant_id, func.max(TrainingJob.started_at))
        .where(id_in(session, col(TrainingJob.tenant_id), list(starts)))
        .group_by(col(TrainingJob.tenant_id))
    ).all()
    for tenant_id, started in rows:
        if tenant_id is not None and started is not None:
            starts[tenant_id] = started
    return starts


def _own_tenant_last_start() -> sa.ColumnElement[datetime]:
    """In an UPDATE of training_jobs: the updated job's tenant's most recent job start (an
    operator job, without tenant, gets NEVER_STARTED)."""
    sibling = aliased(TrainingJob)
    latest = (
        select(func.max(sibling.started_at))
        .where(col(sibling.tenant_id) == col(TrainingJob.tenant_id))
        .scalar_subquery()
    )
    return func.coalesce(latest, sql_timestamp(NEVER_STARTED))


def _advance_queued_siblings(session: Session, tenant_id: uuid.UUID | None) -> None:
    """A job of the tenant just started: its queued jobs move behind every tenant that
    started a job less recently. Does not commit."""
    if tenant_id is None:  # operator jobs keep NEVER_STARTED
        return
    latest = (
        select(func.max(TrainingJob.started_at))
        .where(col(TrainingJob.tenant_id) == tenant_id)
        .scalar_subquery()
    )
    # SKIP LOCKED: a queued sibling another claimer is taking right now needs no new key,
    # and waiting for it could deadlock against that claimer doing the same for this job.
    queued = (
        select(TrainingJob.id)
        .where(col(TrainingJob.tenant_id) == tenant_id, col(TrainingJob.state) == JobState.queued)
        .with_for_update(skip_locked=True)
    )
    session.exec(
        sa.update(TrainingJob)
        .where(col(TrainingJob.id).in_(queued))
        .values(tenant_last_started_at=func.coalesce(latest, sql_timestamp(NEVER_STARTED)))
    )


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
                "tenant_last_started_at": _own_tenant_last_start(),
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
        "started_at": func.coalesce(col(TrainingJob.started_at), sql_timestamp(at)),
        "updated_at": at,
    }


def reclaim_expired_jobs(*, session: Session, now: datetime | None = None) -> int:
    """Run the expired-lease sweep on its own (``claim_oldest_job`` also runs it). Returns
    how many jobs changed state."""
    try:
        changed = _reclaim_expired(session, now or utcnow())
    except BaseException:
        session.rollback()
        raise
    commit(session)
    return changed


def count_queued_jobs(*, session: Session, limit: int) -> int:
    """Queued jobs, counted up to ``limit`` (an upper bound of the claimable ones: a job of
    a tenant with a running job or being deleted counts too). The scheduler starts trainer
    processes for that many free slots, no more."""
    if limit <= 0:
        return 0
    queued = (
        select(TrainingJob.id).where(col(TrainingJob.state) == JobState.queued).limit(limit)
    ).subquery()
    return int(session.exec(select(func.count()).select_from(queued)).one())


def claim_oldest_job(
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
            row = None
            for priority in CLAIM_ORDER:  # one index range per priority, oldest first
                row = session.exec(
                    select(TrainingJob.id, TrainingJob.tenant_id)
                    .where(
                        col(TrainingJob.state) == JobState.queued,
                        col(TrainingJob.priority) == priority,
                    )
                    .order_by(col(TrainingJob.created_at), col(TrainingJob.id))
                    .limit(1)
                    .with_for_update(skip_locked=True)
                ).first()
                if row is not None:
                    break
            if row is None:
                commit(session)
                return None
            candidate, tenant_id = row
            result = session.exec(
                sa.update(TrainingJob)
                .where(
                    col(TrainingJob.id) == candidate,
                    col(TrainingJob.state) == JobState.queued,
                )
                .values(**_claimed_values(owner, at, lease_seconds))
            )
            if result.rowcount == 1:
                _advance_queued_siblings(session, tenant_id)
        except BaseException:
            session.rollback()
            raise
        if result.rowcount == 1:
            commit(session)
            return session.get(TrainingJob, candidate, populate_existing=True)
        session.rollback()  # another claimer took it first (SQLite); try the next one
    return None


def claim_next_job(
    *, session: Session, owner: str, lease_seconds: float, now: datetime | None = None
) -> TrainingJob | None:
    """The scheduler's claim: like :func:`claim_oldest_job`, but fair between tenants.

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
    tenant_busy = (
        sa.exists()
        .where(
            # IS NOT DISTINCT FROM: operator jobs (NULL tenant) are one "tenant".
            col(sibling.tenant_id).is_not_distinct_from(col(TrainingJob.tenant_id)),
            col(sibling.state) == JobState.running,
        )
        .correlate(TrainingJob)
    )
    for _ in range(_CLAIM_TRIES * 2):
        at = now or utcnow()
        try:
            _reclaim_expired(session, at)
            row = None
            for priority in CLAIM_ORDER:
                # Walks ix_training_jobs_queued_fair_order from its start: the first
                # entry whose tenant is active and not busy is the one.
                stmt = (
                    select(TrainingJob.id, TrainingJob.tenant_id)
                    .join(Tenant, col(Tenant.id) == col(TrainingJob.tenant_id), isouter=True)
                    .where(
                        col(TrainingJob.state) == JobState.queued,
                        col(TrainingJob.priority) == priority,
                        # An operator job (no tenant: a base prefix) is claimable like a
                        # tenant's; its "tenant" compares as NULL, so it is never busy.
                        sa.or_(
                            col(Tenant.status) == TenantStatus.active,
                            col(TrainingJob.tenant_id).is_(None),
                        ),
                        ~tenant_busy,
                    )
                    .order_by(
                        col(TrainingJob.tenant_last_started_at),
                        col(TrainingJob.created_at),
                        col(TrainingJob.id),
                    )
                    .limit(1)
                )
                if skipped:
                    stmt = stmt.where(
                        sa.or_(
                            col(TrainingJob.tenant_id).is_(None),
                            col(TrainingJob.tenant_id).not_in(skipped),
                        )
                    )
                row = session.exec(stmt).first()
                if row is not None:
                    break
            if row is None:
                commit(session)
                return None
            candidate, tenant_id = row
            if tenant_id is not None:
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
                    # Operator jobs: at most one running at a time (IS NULL).
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
            if result.rowcount == 1:
                _advance_queued_siblings(session, tenant_id)
        except BaseException:
            session.rollback()
            raise
        if result.rowcount == 1:
            commit(session)
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
            tenant_last_started_at=_own_tenant_last_start(),
        )
    )
    commit(session)
    return result.rowcount == 1


def _owned_running(owner: str) -> list[sa.ColumnElement[bool]]:
    return [
        col(TrainingJob.state) == JobState.running,
        col(TrainingJob.lease_owner) == owner,
    ]


def job_lease_owners(
    *, session: Session, job_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[JobState, str | None]]:
    """State and lease owner of each of these jobs (the scheduler watches its trainers)."""
    if not job_ids:
        return {}
    rows = session.exec(
        select(TrainingJob.id, TrainingJob.state, TrainingJob.lease_owner).where(
            col(TrainingJob.id).in_(list(job_ids))
        )
    ).all()
    return {job_id: (JobState(state), owner) for job_id, state, owner in rows}


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
            col(TrainingJob.lease_expires_at) > sql_timestamp(at),
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
    commit(session)
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
                else_=sql_timestamp(at),
            ),
            tenant_last_started_at=_own_tenant_last_start(),
            **values,
        )
    else:
        stmt = stmt.values(state=state, finished_at=at, **values)
    result = session.exec(stmt)
    commit(session)
    return result.rowcount == 1
