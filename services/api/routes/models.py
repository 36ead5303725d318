"""``GET /v1/models`` in OpenAI's shape, and what a request's ``model`` names.

A tenant sees the served base model, under its model id, and each of its own prefix
versions as ``prefix-<version id>`` (the name completions and chat answers carry). As a
request's ``model``: absent, the base model's id or ``default`` → the tenant's active
version; ``prefix-<id>`` → that version of the caller's (another tenant's id, or an unknown
name, is a 404 ``model_not_found``, the same answer).
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter

from common.db import crud
from common.db.models import PrefixVersion
from common.model_loading import EMBEDDED, EMBEDDED_MODEL_ID
from services.api.deps import ContextDep, CurrentTenant, SessionDep
from services.api.errors import ApiError

router = APIRouter(prefix="/v1/models", tags=["generate"])

VERSION_PREFIX = "prefix-"
DEFAULT_MODEL = "default"


def served_model_id(context: Any) -> str:
    model = context.settings.model
    return EMBEDDED_MODEL_ID if model == EMBEDDED else str(model)


def version_model_id(prefix: PrefixVersion) -> str:
    return f"{VERSION_PREFIX}{prefix.id}"


def requested_version(
    context: Any, session: Any, tenant_id: uuid.UUID, model: str | None
) -> PrefixVersion | None:
    """The version ``model`` names, or None for the tenant's active one."""
    if model in (None, "", DEFAULT_MODEL, served_model_id(context)):
        return None
    prefix = None
    if model.startswith(VERSION_PREFIX):
        try:
            wanted = uuid.UUID(model.removeprefix(VERSION_PREFIX))
        except ValueError:
            wanted = None
        if wanted is not None:
            prefix = crud.get_prefix_by_id(session=session, tenant_id=tenant_id, prefix_id=wanted)
    if prefix is None:
        raise ApiError(
            404,
            "model_not_found",
            f"model {model[:120]!r} does not exist: GET /v1/models lists this key's models",
            param="model",
        )
    return prefix


def _entry(model_id: str, created: int, owned_by: str, **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, **extra}


def _listing(context: Any, session: Any, tenant_id: uuid.UUID) -> list[dict[str, Any]]:
    versions = crud.list_prefixes(session=session, tenant_id=tenant_id)
    entries = [_entry(served_model_id(context), 0, "prefixd", served_as="the active version")]
    for prefix in versions:
        entries.append(
            _entry(
                version_model_id(prefix),
                int(prefix.created_at.timestamp()),
                "tenant",
                version=prefix.version,
                active=prefix.active,
            )
        )
    return entries


@router.get("")
def list_models(tenant: CurrentTenant, session: SessionDep, context: ContextDep) -> Any:
    """The base model (served with the caller's active version) and the caller's versions."""
    return {"object": "list", "data": _listing(context, session, tenant.id)}


@router.get("/{model:path}", responses={404: {"description": "no such model for this key"}})
def get_model(model: str, tenant: CurrentTenant, session: SessionDep, context: ContextDep) -> Any:
    for entry in _listing(context, session, tenant.id):
        if entry["id"] == model:
            return entry
    raise ApiError(404, "model_not_found", f"model {model[:120]!r} does not exist", param="model")
