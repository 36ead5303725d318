"""Prefix versions: one immutable row (and blob) per successful training job or imported
PEFT adapter; at most one is the tenant's active prefix, the one generate uses. Activating
an older version is a rollback, effective from the next generate request; deleting a
version removes its row and blob (the active one falls back to the highest remaining
version). A version goes out as a PEFT adapter (``GET …/{id}/peft``) and one comes in
(``POST /v1/prefixes/peft``, ``services/api/prefix_import.py``)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import APIRouter, Query, Request, Response

from common.blob_deletes import delete_blob
from common.db import crud
from common.db.errors import NotFoundError
from common.db.models import PrefixVersion, PrefixVersionPublic
from common.erasure import sweep_if_not_active
from common.errors import IncompatiblePrefixError
from common.model_loading import EMBEDDED, EMBEDDED_MODEL_ID
from common.peft_adapter import peft_adapter_files, peft_adapter_zip
from common.prefix_file import prefix_from_bytes
from services.api.deps import ContextDep, CurrentTenant, SessionDep, take_upload_slot
from services.api.errors import ApiError
from services.api.prefix_import import (
    ARCHIVE_MEDIA_TYPES,
    adapter_archive,
    store_imported_prefix,
    validated_adapter,
)
from services.api.schemas import Page, PrefixDeleted
from services.api.uploads import MULTIPART_FIELD, MULTIPART_MEDIA_TYPE

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/prefixes", tags=["prefixes"])
PEFT_IMPORT_PATH = "/v1/prefixes/peft"

_ARCHIVE = {"schema": {"type": "string", "format": "binary"}}
PEFT_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "A PEFT prefix-tuning adapter directory (`adapter_config.json`, "
        "`adapter_model.safetensors`) as a zip or tar (optionally gzip-compressed), as the "
        "multipart file field `file` or as the body.",
        "content": {
            **{media: _ARCHIVE for media in ARCHIVE_MEDIA_TYPES},
            MULTIPART_MEDIA_TYPE: {
                "schema": {
                    "type": "object",
                    "properties": {MULTIPART_FIELD: {"type": "string", "format": "binary"}},
                    "required": [MULTIPART_FIELD],
                }
            },
        },
    }
}


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
    "/peft",
    status_code=201,
    response_model=PrefixVersionPublic,
    openapi_extra=PEFT_UPLOAD_BODY,
    responses={
        400: {"description": "not an adapter for the served model: the message says why"},
        413: {"description": "over max_peft_adapter_bytes"},
        415: {"description": "neither multipart nor an archive body"},
    },
)
async def import_peft_adapter(
    request: Request,
    tenant: CurrentTenant,
    context: ContextDep,
    activate: bool = Query(default=False, description="make the new version the active one"),
) -> Any:
    """Import a Hugging Face PEFT prefix-tuning adapter as the caller's next prefix version
    (inactive unless `activate=true`). Checked like `prefixd peft import`: a prefix-tuning
    adapter saved without projection for this base model's layers and shapes, finite
    values, at most `max_prefix_length` virtual tokens. A refused upload leaves nothing
    behind. A tenant sends at most `tenant_max_concurrent_uploads` at once."""
    await take_upload_slot(tenant.id, context, "uploads")
    try:
        data = await adapter_archive(request, max_bytes=context.settings.max_peft_adapter_bytes)
        prefix = await context.run_blocking(validated_adapter, data, context)
        row = await context.run_blocking(
            store_imported_prefix,
            engine=context.db,
            blobs=context.blobs,
            tenant_id=tenant.id,
            prefix=prefix,
            activate=activate,
        )
    finally:
        context.open_uploads.release(tenant.id)
        # A tenant erased while its import ran: whatever the import wrote goes again.
        await context.run_blocking(_sweep_if_erased, context, tenant.id)
    log.info("tenant %s imported prefix version %s from a PEFT adapter", tenant.id, row.id)
    return PrefixVersionPublic.model_validate(row)


def _sweep_if_erased(context: Any, tenant_id: uuid.UUID) -> None:
    try:
        sweep_if_not_active(context.db, context.blobs, tenant_id, "a prefix import ended")
    except Exception as error:  # the scheduler's periodic re-sweep catches it
        log.warning("sweep after a prefix import of tenant %s failed: %s", tenant_id, error)


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
