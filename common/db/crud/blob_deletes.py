"""Blob deletes not confirmed yet: a dataset's or prefix version's row is deleted together
with a ``pending_blob_deletes`` record of its blob, and the record is removed only once the
blob store confirmed the delete (``common/blob_deletes.py`` retries the rest)."""

from __future__ import annotations

import uuid
from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Session, col, select

from common.db.crud.transaction import commit
from common.db.models import PendingBlobDelete
from common.db.types import utcnow

_MAX_ERROR_CHARS = 1000


def add_pending_blob_delete(
    session: Session, *, tenant_id: uuid.UUID, kind: str, item_id: uuid.UUID, object_key: str
) -> None:
    """Record, in the caller's transaction (the one deleting the row), that the blob at
    ``object_key`` must go. Not committed here."""
    exists = session.exec(
        select(PendingBlobDelete.id).where(col(PendingBlobDelete.object_key) == object_key)
    ).first()
    if exists is None:
        session.add(
            PendingBlobDelete(
                tenant_id=tenant_id, kind=kind, item_id=item_id, object_key=object_key
            )
        )


def finish_pending_blob_delete(*, session: Session, object_key: str) -> None:
    """The blob is gone: drop its record."""
    session.exec(
        sa.delete(PendingBlobDelete).where(col(PendingBlobDelete.object_key) == object_key)
    )
    commit(session)


def fail_pending_blob_delete(
    *, session: Session, object_key: str, error: str, now: datetime | None = None
) -> PendingBlobDelete | None:
    """One more failed try at deleting the blob (kept for the next retry)."""
    record = session.exec(
        select(PendingBlobDelete)
        .where(col(PendingBlobDelete.object_key) == object_key)
        .execution_options(populate_existing=True)
    ).first()
    if record is None:
        return None
    record.attempts += 1
    record.last_attempt_at = now or utcnow()
    record.last_error = error[:_MAX_ERROR_CHARS]
    session.add(record)
    commit(session)
    session.refresh(record)
    return record


def list_pending_blob_deletes(
    *, session: Session, tenant_id: uuid.UUID | None = None, limit: int = 1000
) -> list[PendingBlobDelete]:
    """Pending blob deletes, least recently tried first (never tried before any)."""
    stmt = select(PendingBlobDelete)
    if tenant_id is not None:
        stmt = stmt.where(col(PendingBlobDelete.tenant_id) == tenant_id)
    stmt = stmt.order_by(
        col(PendingBlobDelete.last_attempt_at).is_not(None),
        col(PendingBlobDelete.last_attempt_at),
        col(PendingBlobDelete.created_at),
    ).limit(limit)
    return list(session.exec(stmt).all())
