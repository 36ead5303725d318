"""Prefix versions: one immutable row (and blob) per successful training job; exactly one
is the tenant's active prefix, the one generate uses. Activating an older version is a
rollback, effective from the next generate request."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter

from common.db import crud
from common.db.errors import NotFoundError
from common.db.models import Prefix, PrefixPublic
from services.api.deps import ContextDep, CurrentTenant, SessionDep
from services.api.errors import ApiError
from services.api.schemas import Page

router = APIRouter(prefix="/v1/prefixes", tags=["prefixes"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such prefix version (or not the caller's)"}
}


def _prefix(session: Any, tenant_id: uuid.UUID, prefix_id: uuid.UUID) -> Prefix:
    prefix = crud.get_prefix_by_id(session=session, tenant_id=tenant_id, prefix_id=prefix_id)
    if prefix is None:
        raise NotFoundError(f"prefix {prefix_id} not found")
    return prefix


@router.get("", response_model=Page[PrefixPublic])
def list_prefixes(tenant: CurrentTenant, session: SessionDep) -> Any:
    """The caller's prefix versions, oldest (version 1) first; `active` marks the one in use."""
    rows = crud.list_prefixes(session=session, tenant_id=tenant.id)
    return Page[PrefixPublic](data=[PrefixPublic.model_validate(p) for p in rows])


@router.get("/{prefix_id}", response_model=PrefixPublic, responses=NOT_FOUND)
def get_prefix(prefix_id: uuid.UUID, tenant: CurrentTenant, session: SessionDep) -> Any:
    return _prefix(session, tenant.id, prefix_id)


@router.post(
    "/{prefix_id}/activate",
    response_model=PrefixPublic,
    responses={**NOT_FOUND, 409: {"description": "trained for another base model"}},
)
def activate_prefix(
    prefix_id: uuid.UUID, tenant: CurrentTenant, session: SessionDep, context: ContextDep
) -> Any:
    """Make this version the active one (roll back to an earlier version, or forward again)."""
    prefix = _prefix(session, tenant.id, prefix_id)
    if prefix.base_model_fingerprint != context.model_fingerprint:
        raise ApiError(
            409,
            "incompatible_prefix",
            f"prefix {prefix_id} was trained for another base model than the one served",
        )
    return crud.activate_prefix(session=session, tenant_id=tenant.id, version=prefix.version)
