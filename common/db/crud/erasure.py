"""Tenant erasure state (``common/erasure.py`` runs the steps) and the deletion audit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlmodel import Session, col, select

from common.db.crud.tenants import mark_tenant_deleting
from common.db.crud.transaction import commit
from common.db.errors import (
    NotFoundError,
)
from common.db.models import (
    DeletionAudit,
    TenantErasure,
)
from common.db.types import utcnow


def list_deletion_audits(
    *, session: Session, tenant_id: uuid.UUID | None = None
) -> Sequence[DeletionAudit]:
    stmt = select(DeletionAudit)
    if tenant_id is not None:
        stmt = stmt.where(col(DeletionAudit.tenant_id) == tenant_id)
    return session.exec(stmt.order_by(col(DeletionAudit.requested_at))).all()


def recently_erased_tenants(*, session: Session, since: datetime) -> list[uuid.UUID]:
    """Tenants whose erasure completed at or after ``since`` (re-swept for a while)."""
    stmt = (
        select(DeletionAudit.tenant_id)
        .where(col(DeletionAudit.completed_at) >= since)
        .order_by(col(DeletionAudit.completed_at))
    )
    return list(session.exec(stmt).all())


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
    commit(session)
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
    commit(session)
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
    commit(session)
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
