"""Prefix versions of a tenant: publish, import, activate (roll back), look up, delete."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from common.blobstore.keys import key_belongs_to_tenant
from common.db.crud.base_prefixes import STACK, lock_base_prefix
from common.db.crud.blob_deletes import add_pending_blob_delete
from common.db.crud.tenants import require_active_tenant
from common.db.crud.transaction import commit
from common.db.errors import (
    ConflictError,
    LeaseLostError,
    NotFoundError,
)
from common.db.models import (
    JobEvent,
    JobState,
    PrefixVersion,
    PrefixVersionCreate,
    TrainingJob,
)
from common.db.types import utcnow
from common.errors import InvalidInputError


class NoExpectation:
    """No compare-and-swap: publish activates whatever is active (tools, tests)."""


NO_EXPECTATION = NoExpectation()


def _version_label(session: Session, prefix_id: uuid.UUID | None) -> str:
    if prefix_id is None:
        return "none"
    row = session.get(PrefixVersion, prefix_id)
    return f"version {row.version}" if row is not None else f"deleted version {prefix_id}"


def _active_changed(
    session: Session, tenant_id: uuid.UUID, expected: uuid.UUID | None
) -> str | None:
    """Why the new version must stay inactive (the tenant's active version is no longer
    ``expected``), or None. An expected version that was deleted, with none active now,
    is no change a tenant made on purpose to keep: the new version may become active."""
    current = get_active_prefix(session=session, tenant_id=tenant_id)
    current_id = current.id if current is not None else None
    if current_id == expected:
        return None
    if current_id is None and expected is not None and session.get(PrefixVersion, expected) is None:
        return None
    return (
        "kept inactive: the tenant's active prefix changed while this job ran (it was "
        f"{_version_label(session, expected)} when the job started, it is now "
        f"{_version_label(session, current_id)}: a rollback or another version published "
        "meanwhile); the new version was published inactive (activate it to override)"
    )


def _record_note_event(session: Session, job_id: uuid.UUID, note: str, at: datetime) -> None:
    last = session.exec(select(func.max(JobEvent.step)).where(col(JobEvent.job_id) == job_id)).one()
    session.add(JobEvent(job_id=job_id, step=last or 0, message=note, created_at=at))


def deactivate_all(session: Session, tenant_id: uuid.UUID) -> None:
    session.exec(
        sa.update(PrefixVersion)
        .where(col(PrefixVersion.tenant_id) == tenant_id, col(PrefixVersion.active).is_(True))
        .values(active=False)
    )


def publish_prefix(
    *,
    session: Session,
    job_id: uuid.UUID,
    owner: str,
    prefix_in: PrefixVersionCreate,
    activate: bool = True,
    note: str | None = None,
    expected_active_id: uuid.UUID | NoExpectation | None = NO_EXPECTATION,
    result: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> PrefixVersion:
    """Make a trained prefix visible, in one transaction: check that the tenant exists and
    is not being deleted and that ``owner`` still holds the job's (unexpired) lease; insert
    the next prefix version; make it the tenant's active prefix (deactivating the previous
    one); mark the job succeeded. Call it only after the blob is completely written.
    ``activate=False`` publishes the version inactive (the previous one stays active) and
    records ``note`` (why) on the job.

    ``expected_active_id`` makes the activation a compare-and-swap: the new version is made
    active only if the tenant's active version is still that one (None: none was active) —
    the one the trainer saw when the job started and the quality gate compared against. If
    a rollback or another publish changed it meanwhile, the new version is published
    inactive, the job gets a note and an event saying so, and its metrics
    ``activation: kept_inactive_active_changed`` (the tenant may activate it itself).

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
        tenant = require_active_tenant(session, tenant_id, lock=True)
        # Shared lock: the base cannot be deleted until this version is visible (then the
        # deletion sees it depends on the base and is refused).
        if (
            prefix_in.base_mode == STACK
            and prefix_in.base_prefix_id is not None
            and lock_base_prefix(session, prefix_in.base_prefix_id) is None
        ):
            raise NotFoundError(
                f"base prefix {prefix_in.base_prefix_id} was deleted while the job trained "
                "on it; the stacked prefix was not published"
            )
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
        # The tenant's counter only goes up (under its row lock), so deleting the newest
        # version never frees its number; the max covers rows older than the counter.
        latest = session.exec(
            select(func.max(PrefixVersion.version)).where(col(PrefixVersion.tenant_id) == tenant_id)
        ).one()
        number = max(tenant.last_prefix_version, latest or 0) + 1
        tenant.last_prefix_version = number
        session.add(tenant)
        metrics = dict(prefix_in.metrics)
        if activate and not isinstance(expected_active_id, NoExpectation):
            changed = _active_changed(session, tenant_id, expected_active_id)
            if changed is not None:
                activate, note = False, changed
                metrics["activation"] = "kept_inactive_active_changed"
                _record_note_event(session, job_id, changed, at)
        if activate:
            deactivate_all(session, tenant_id)
        prefix = PrefixVersion.model_validate(
            prefix_in,
            update={
                "metrics": metrics,
                "tenant_id": tenant_id,
                "job_id": job_id,
                "version": number,
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
        job.result = result
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


def add_imported_prefix(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    prefix_in: PrefixVersionCreate,
    activate: bool = False,
    now: datetime | None = None,
) -> PrefixVersion:
    """A prefix version no job trained (an imported PEFT adapter), in one transaction: the
    tenant's next version number (under its row lock, refused for a tenant that is not
    active), inactive unless ``activate`` (then the previous active one is deactivated).
    Call it only after the blob is completely written; when it raises, nothing was changed
    and the caller deletes its blob."""
    at = now or utcnow()
    if not key_belongs_to_tenant(prefix_in.object_key, tenant_id):
        raise InvalidInputError(
            f"prefix object key {prefix_in.object_key!r} is outside tenant {tenant_id}'s prefix"
        )
    try:
        tenant = require_active_tenant(session, tenant_id, lock=True)
        latest = session.exec(
            select(func.max(PrefixVersion.version)).where(col(PrefixVersion.tenant_id) == tenant_id)
        ).one()
        number = max(tenant.last_prefix_version, latest or 0) + 1
        tenant.last_prefix_version = number
        session.add(tenant)
        if activate:
            deactivate_all(session, tenant_id)
        prefix = PrefixVersion.model_validate(
            prefix_in,
            update={
                "tenant_id": tenant_id,
                "job_id": None,
                "version": number,
                "active": activate,
                "created_at": at,
                "activated_at": at if activate else None,
            },
        )
        session.add(prefix)
        commit(session)
    except IntegrityError:
        raise ConflictError(
            f"a concurrent change to the prefixes of tenant {tenant_id} won; retry the import"
        ) from None
    except BaseException:
        session.rollback()
        raise
    session.refresh(prefix)
    return prefix


def activate_prefix(
    *, session: Session, tenant_id: uuid.UUID, version: int, now: datetime | None = None
) -> PrefixVersion:
    """Make ``version`` the tenant's active prefix (a rollback to an older version, or
    forward again). The database guarantees at most one active prefix per tenant."""
    at = now or utcnow()
    try:
        require_active_tenant(session, tenant_id, lock=True)
        prefix = session.exec(
            select(PrefixVersion)
            .where(col(PrefixVersion.tenant_id) == tenant_id, col(PrefixVersion.version) == version)
            .execution_options(populate_existing=True)
        ).first()
        if prefix is None:
            raise NotFoundError(f"prefix version {version} of tenant {tenant_id} not found")
        if (
            prefix.base_mode == STACK
            and prefix.base_prefix_id is not None
            and lock_base_prefix(session, prefix.base_prefix_id) is None
        ):
            raise ConflictError(
                f"prefix version {version} is stacked on base prefix {prefix.base_prefix_id}, "
                "which the operator deleted: it cannot be served"
            )
        if not prefix.active:
            deactivate_all(session, tenant_id)
            prefix.active = True
            prefix.activated_at = at
            session.add(prefix)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    session.refresh(prefix)
    return prefix


def get_active_prefix(*, session: Session, tenant_id: uuid.UUID) -> PrefixVersion | None:
    stmt = select(PrefixVersion).where(
        col(PrefixVersion.tenant_id) == tenant_id, col(PrefixVersion.active).is_(True)
    )
    return session.exec(stmt).first()


def get_prefix(*, session: Session, tenant_id: uuid.UUID, version: int) -> PrefixVersion | None:
    stmt = select(PrefixVersion).where(
        col(PrefixVersion.tenant_id) == tenant_id, col(PrefixVersion.version) == version
    )
    return session.exec(stmt).first()


def get_prefix_by_id(
    *, session: Session, tenant_id: uuid.UUID, prefix_id: uuid.UUID
) -> PrefixVersion | None:
    """A prefix version by its id, only if it belongs to the tenant."""
    prefix = session.get(PrefixVersion, prefix_id, populate_existing=True)
    return prefix if prefix is not None and prefix.tenant_id == tenant_id else None


def prefix_ids_of_jobs(
    *, session: Session, job_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, uuid.UUID]:
    """The prefix version each of these jobs published (jobs without one are left out)."""
    if not job_ids:
        return {}
    stmt = select(PrefixVersion.job_id, PrefixVersion.id).where(
        col(PrefixVersion.job_id).in_(list(job_ids))
    )
    return {job_id: prefix_id for job_id, prefix_id in session.exec(stmt).all() if job_id}


def list_prefixes(*, session: Session, tenant_id: uuid.UUID) -> list[PrefixVersion]:
    stmt = (
        select(PrefixVersion)
        .where(col(PrefixVersion.tenant_id) == tenant_id)
        .order_by(col(PrefixVersion.version))
    )
    return list(session.exec(stmt).all())


def existing_prefix_ids(*, session: Session, prefix_ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of these prefix ids still have a row (inference replicas drop the others)."""
    if not prefix_ids:
        return set()
    rows = session.exec(select(PrefixVersion.id).where(col(PrefixVersion.id).in_(prefix_ids)))
    return set(rows.all())


def delete_prefix_version(
    *, session: Session, tenant_id: uuid.UUID, prefix_id: uuid.UUID, now: datetime | None = None
) -> tuple[PrefixVersion, PrefixVersion | None]:
    """Delete one prefix version's row, recording in the same transaction that its blob
    must go (``pending_blob_deletes``; the caller then deletes the blob). If it was the
    active one, the highest remaining version becomes active (or none is). Returns the
    deleted row and the tenant's active prefix afterwards."""
    at = now or utcnow()
    try:
        require_active_tenant(session, tenant_id, lock=True)
        prefix = session.get(PrefixVersion, prefix_id, populate_existing=True)
        if prefix is None or prefix.tenant_id != tenant_id:
            raise NotFoundError(f"prefix {prefix_id} not found")
        was_active = prefix.active
        deleted = PrefixVersion.model_validate(prefix.model_dump())  # outlives the commit
        session.delete(prefix)
        add_pending_blob_delete(
            session,
            tenant_id=tenant_id,
            kind="prefix",
            item_id=prefix_id,
            object_key=deleted.object_key,
        )
        session.flush()
        active = get_active_prefix(session=session, tenant_id=tenant_id)
        if was_active:
            active = session.exec(
                select(PrefixVersion)
                .where(col(PrefixVersion.tenant_id) == tenant_id)
                .order_by(col(PrefixVersion.version).desc())
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
