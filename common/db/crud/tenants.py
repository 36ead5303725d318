"""Tenants and their API keys."""

from __future__ import annotations

import hashlib
import secrets
import uuid

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from common.db.crud.transaction import commit
from common.db.errors import (
    ConflictError,
    NotFoundError,
    TenantNotActiveError,
)
from common.db.models import (
    ApiKey,
    ApiKeyCreate,
    Tenant,
    TenantCreate,
    TenantErasure,
    TenantStatus,
)
from common.db.types import utcnow

API_KEY_PREFIX = "pfx_"


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


def list_tenants(*, session: Session, offset: int = 0, limit: int = 100) -> list[Tenant]:
    stmt = select(Tenant).order_by(col(Tenant.created_at), col(Tenant.id))
    return list(session.exec(stmt.offset(offset).limit(limit)).all())


def lock_tenant(session: Session, tenant_id: uuid.UUID) -> Tenant | None:
    """The tenant row, locked until the transaction ends (PostgreSQL ``FOR UPDATE``; SQLite
    serializes writers anyway). Publishing and deletion serialize on this lock."""
    stmt = select(Tenant).where(col(Tenant.id) == tenant_id).with_for_update()
    return session.exec(stmt.execution_options(populate_existing=True)).first()


def require_active_tenant(session: Session, tenant_id: uuid.UUID, *, lock: bool) -> Tenant:
    tenant = (
        lock_tenant(session, tenant_id)
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
    tenant = lock_tenant(session, tenant_id)
    if tenant is None:
        session.rollback()
        raise NotFoundError(f"tenant {tenant_id} not found")
    tenant.status = TenantStatus.deleting
    session.add(tenant)
    if session.get(TenantErasure, tenant_id) is None:
        session.add(TenantErasure(tenant_id=tenant_id))
    commit(session)
    session.refresh(tenant)
    return tenant


def hash_api_key(api_key: str) -> str:
    """SHA-256 (hex) of a key. Keys are 256-bit random, so a fast hash is enough."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def create_api_key(
    *, session: Session, tenant_id: uuid.UUID, key_in: ApiKeyCreate | None = None
) -> tuple[ApiKey, str]:
    """Make a key for the tenant. Returns the row and the plaintext key — the only time the
    plaintext exists; only its hash is stored."""
    require_active_tenant(session, tenant_id, lock=False)
    plaintext = API_KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.model_validate(
        key_in or ApiKeyCreate(),
        update={"tenant_id": tenant_id, "key_hash": hash_api_key(plaintext)},
    )
    session.add(key)
    commit(session)
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
        commit(session)
        session.refresh(key)
    return key
