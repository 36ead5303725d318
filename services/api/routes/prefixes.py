"""Prefix versions: one immutable row (and blob) per successful training job; at most one
is the tenant's active prefix, the one generate uses. Activating an older version is a
rollback, effective from the next generate request; deleting a version removes its row and
blob (the active one falls back to the highest remaining version)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from common.blob_deletes import delete_blob
from common.db import crud
from common.db.errors import NotFoundError
from common.db.models import PrefixVersion, PrefixVersionPublic
from common.errors import IncompatiblePrefixError
from common.model_loading import EMBEDDED, EMBEDDED_MODEL_ID
from common.peft_adapter import peft_adapter_files, peft_adapter_zip
from common.prefix_file import prefix_from_bytes
from services.api.deps import ContextDep, CurrentTenant, SessionDep
from services.api.errors import ApiError
from services.api.schemas import Page

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/prefixes", tags=["prefixes"])


class PrefixDeleted(BaseModel):
    id: uuid.UUID
    version: int
    active: PrefixVersionPublic | None = Field(
        description="The tenant's active version now (the fallback), or null if none is left."
    )
    blob_deleted: bool = Field(
        default=True,
        description="False (with status 202) when the object store did not confirm the "
        "delete of the version's data yet: the delete is recorded and retried until it is gone.",
    )


NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such prefix version (or not the caller's)"}
}


def _prefix(session: Any, tenant_id: uuid.UUID, prefix_id: uuid.UUID) -> PrefixVersion:
    prefix = crud.get_prefix_by_id(session=session, tenant_id=tenant_id, prefix_id=prefix_id)
    if prefix is None:
        raise NotFoundError(f"prefix {prefix_id} not found")
    return prefix


@router.get("", response_model=Page[PrefixVersionPublic])
def list_prefixes(tenant: CurrentTenant, session: SessionDep) -> Any:
    """The caller's prefix versions, oldest (version 1) first; `active` marks the one in use."""
    rows = crud.list_prefixes(session=session, tenant_id=tenant.id)
    return Page[PrefixVersionPublic](data=[PrefixVersionPublic.model_validate(p) for p in rows])


@router.get("/{prefix_id}", response_model=PrefixVersionPublic, responses=NOT_FOUND)
def get_prefix(prefix_id: uuid.UUID, tenant: CurrentTenant, session: SessionDep) -> Any:
    return _prefix(session, tenant.id, prefix_id)


@router.get(
    "/{prefix_id}/peft",
    response_class=Response,
    responses={
        **NOT_FOUND,
        200: {"content": {"application/zip": {}}, "description": "the adapter directory, zipped"},
        409: {"description": "an encoder-decoder prefix (PEFT has no equivalent)"},
    },
)
def export_peft_adapter(
    prefix_id: uuid.UUID, tenant: CurrentTenant, session: SessionDep, context: ContextDep
) -> Response:
    """This version as a Hugging Face PEFT prefix-tuning adapter (`adapter_config.json`,
    `adapter_model.safetensors`), zipped: `PeftModel.from_pretrained(model, dir)` loads it
    and generates what prefixd generates. Decoder-only base models only."""
    row = _prefix(session, tenant.id, prefix_id)
    stored = prefix_from_bytes(
        context.blobs.get_bytes(row.object_key), source=f"prefix {prefix_id}"
    )
    model = context.settings.model
    try:
        files = peft_adapter_files(
            stored, base_model_name=EMBEDDED_MODEL_ID if model == EMBEDDED else model
        )
    except IncompatiblePrefixError as error:
        raise ApiError(409, "incompatible_prefix", str(error)) from None
    return Response(
        peft_adapter_zip(files),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="prefix-{prefix_id}-peft.zip"'},
    )


@router.post(
    "/{prefix_id}/activate",
    response_model=PrefixVersionPublic,
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


@router.delete(
    "/{prefix_id}",
    response_model=PrefixDeleted,
    responses={
        **NOT_FOUND,
        202: {"model": PrefixDeleted, "description": "row deleted, data delete pending"},
    },
)
def delete_prefix(
    prefix_id: uuid.UUID,
    tenant: CurrentTenant,
    session: SessionDep,
    context: ContextDep,
    response: Response,
) -> Any:
    """Delete one prefix version: its row, then its blob (every stored version of it).

    If it was the **active** version, the tenant falls back to its highest remaining
    version (`active` in the answer), or to none when it was the last one — then generate
    answers 409 `no_active_prefix` until a job publishes a new version. Other versions keep
    their numbers (versions are never renumbered or reused). Effective from the next
    generate request; the inference replicas drop the cached copy within
    `PREFIXD_PREFIX_CACHE_SWEEP_SECONDS`. **202** with `blob_deleted: false` when the object
    store did not confirm the delete of the data: it is recorded and retried until gone."""
    deleted, active = crud.delete_prefix_version(
        session=session, tenant_id=tenant.id, prefix_id=prefix_id
    )
    gone = delete_blob(context.db, context.blobs, deleted.object_key)
    if not gone:
        response.status_code = 202
    return PrefixDeleted(
        id=deleted.id,
        version=deleted.version,
        active=PrefixVersionPublic.model_validate(active) if active is not None else None,
        blob_deleted=gone,
    )
