"""Tenants and their API keys.

The admin token creates and lists tenants; a tenant's own key may read and delete that
tenant and manage its keys. A tenant key used with another tenant's id gets the same 404
as an id that does not exist.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Query

from common.db import crud
from common.db.errors import NotFoundError, TenantNotActiveError
from common.db.models import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyPublic,
    Tenant,
    TenantCreate,
    TenantErasure,
    TenantStatus,
)
from services.api.deps import AdminDep, Caller, CallerDep, ContextDep, SessionDep
from services.api.schemas import (
    ApiKeyCreateRequest,
    ErasureProgress,
    Page,
    TenantCreated,
    TenantCreateRequest,
    TenantDeletion,
    TenantOut,
)
from services.api.tenant_erasure import start_tenant_erasure

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such tenant (or not the caller's)"}
}
GONE: dict[int | str, dict[str, Any]] = {
    410: {"description": "the tenant is being deleted (admin token; its own keys get 401)"}
}


def _tenant_for(session: Any, caller: Caller, tenant_id: uuid.UUID) -> Tenant:
    tenant = None
    if caller.may_act_on(tenant_id):
        tenant = crud.get_tenant(session=session, tenant_id=tenant_id)
    if tenant is None:
        raise NotFoundError(f"tenant {tenant_id} not found")
    return tenant


def _active_tenant_for(session: Any, caller: Caller, tenant_id: uuid.UUID) -> Tenant:
    """A tenant whose keys may be managed: being deleted gives 410."""
    tenant = _tenant_for(session, caller, tenant_id)
    if tenant.status != TenantStatus.active:
        raise TenantNotActiveError(f"tenant {tenant_id} is being deleted")
    return tenant


def _erasure_for(session: Any, caller: Caller, tenant_id: uuid.UUID) -> TenantErasure | None:
    """The erasure under way, for the admin (a tenant's own key stops working with it)."""
    if caller.tenant is not None:
        return None
    return crud.get_tenant_erasure(session=session, tenant_id=tenant_id)


def _progress(erasure: TenantErasure) -> ErasureProgress:
    return ErasureProgress(
        step=erasure.step.value,
        requested_at=erasure.requested_at,
        updated_at=erasure.updated_at,
        runs=erasure.runs,
        jobs_cancelled=erasure.jobs_cancelled,
        objects_erased=erasure.objects_erased,
        rows_erased=erasure.rows_erased,
        last_error=erasure.last_error,
    )


@router.post("", status_code=201, response_model=TenantCreated)
def create_tenant(_: AdminDep, session: SessionDep, body: TenantCreateRequest | None = None) -> Any:
    """Create a tenant and its first API key (admin token). The key is shown only here."""
    name = (body.name if body else None) or f"tenant-{uuid.uuid4().hex[:12]}"
    tenant = crud.create_tenant(session=session, tenant_in=TenantCreate(name=name))
    key, plaintext = crud.create_api_key(
        session=session, tenant_id=tenant.id, key_in=ApiKeyCreate(name="initial")
    )
    return TenantCreated(
        id=tenant.id,
        name=tenant.name,
        status=tenant.status.value,
        created_at=tenant.created_at,
        api_key=plaintext,
        api_key_id=key.id,
    )


@router.get("", response_model=Page[TenantOut])
def list_tenants(
    _: AdminDep,
    session: SessionDep,
    offset: int = Query(default=0, ge=0, le=1_000_000),
    limit: int = Query(default=100, ge=1, le=1000),
) -> Any:
    """Every tenant, oldest first (admin token), in the shape of `GET /tenants/{id}`."""
    return Page[TenantOut](
        data=[
            _tenant_out(tenant, crud.get_tenant_erasure(session=session, tenant_id=tenant.id))
            if tenant.status == TenantStatus.deleting
            else _tenant_out(tenant, None)
            for tenant in crud.list_tenants(session=session, offset=offset, limit=limit)
        ]
    )


def _tenant_out(tenant: Tenant, erasure: TenantErasure | None) -> TenantOut:
    return TenantOut(
        id=tenant.id,
        name=tenant.name,
        status=tenant.status.value,
        created_at=tenant.created_at,
        deletion=_progress(erasure) if erasure is not None else None,
    )


@router.get("/{tenant_id}", response_model=TenantOut, responses=NOT_FOUND)
def get_tenant(tenant_id: uuid.UUID, caller: CallerDep, session: SessionDep) -> Any:
    """A tenant: `status` is `active`, or `deleting` while its erasure runs, with
    `deletion` saying which step it is at (then 404). A deleting tenant's own keys no longer
    work: the admin follows the deletion. Once the erasure deleted the tenant's rows,
    `name` and `created_at` are null until the erasure ends."""
    erasure = _erasure_for(session, caller, tenant_id)
    tenant = crud.get_tenant(session=session, tenant_id=tenant_id)
    if tenant is None and erasure is not None:
        return TenantOut(
            id=tenant_id,
            name=None,
            status=TenantStatus.deleting.value,
            created_at=None,
            deletion=_progress(erasure),
        )
    return _tenant_out(_tenant_for(session, caller, tenant_id), erasure)


@router.delete(
    "/{tenant_id}",
    status_code=202,
    response_model=TenantDeletion,
    responses=NOT_FOUND,
)
def delete_tenant(
    tenant_id: uuid.UUID, caller: CallerDep, session: SessionDep, context: ContextDep
) -> Any:
    """Delete a tenant with everything it owns (admin token, or the tenant's own key).
    Answers 202 at once: the tenant is `deleting` (its keys stop working now) until its
    jobs are cancelled, its objects (every version), rows and the inference replicas'
    cached prefixes are erased and a final check found nothing; then an audit record
    (ids, times, counts) is kept and `GET` gives 404. Deleting again (admin) resumes an
    interrupted erasure; deleting a tenant that is gone gives 404."""
    if _erasure_for(session, caller, tenant_id) is None:
        _tenant_for(session, caller, tenant_id)
    start_tenant_erasure(context=context, tenant_id=tenant_id)
    context.api_keys.forget_tenant(tenant_id)  # its keys stop working here at once
    return TenantDeletion(id=tenant_id, status=TenantStatus.deleting.value)


@router.get("/{tenant_id}/keys", response_model=Page[ApiKeyPublic], responses=NOT_FOUND | GONE)
def list_keys(tenant_id: uuid.UUID, caller: CallerDep, session: SessionDep) -> Any:
    """The tenant's API keys (hashes are never shown; revoked keys have `revoked_at`)."""
    _active_tenant_for(session, caller, tenant_id)
    keys = crud.list_api_keys(session=session, tenant_id=tenant_id)
    return Page[ApiKeyPublic](data=[ApiKeyPublic.model_validate(k) for k in keys])


@router.post(
    "/{tenant_id}/keys", status_code=201, response_model=ApiKeyCreated, responses=NOT_FOUND | GONE
)
def create_key(
    tenant_id: uuid.UUID,
    caller: CallerDep,
    session: SessionDep,
    body: ApiKeyCreateRequest | None = None,
) -> Any:
    """A new API key for the tenant; `key` is shown only in this answer."""
    _active_tenant_for(session, caller, tenant_id)
    key, plaintext = crud.create_api_key(
        session=session,
        tenant_id=tenant_id,
        key_in=ApiKeyCreate(name=body.name if body else None),
    )
    return ApiKeyCreated.model_validate(key, update={"key": plaintext})


@router.delete(
    "/{tenant_id}/keys/{key_id}", response_model=ApiKeyPublic, responses=NOT_FOUND | GONE
)
def revoke_key(
    tenant_id: uuid.UUID,
    key_id: uuid.UUID,
    caller: CallerDep,
    session: SessionDep,
    context: ContextDep,
) -> Any:
    """Revoke a key: it stops working at once on this API replica, on the others within
    `api_key_cache_seconds` (revoking again changes nothing)."""
    _active_tenant_for(session, caller, tenant_id)
    revoked = crud.revoke_api_key(session=session, tenant_id=tenant_id, key_id=key_id)
    context.api_keys.forget_tenant(tenant_id)
    return revoked
