"""Datasets: JSONL of ``{"input": str, "output": str}``, one example a line.

``POST /v1/datasets`` takes the JSONL as the body (``application/jsonl`` or
``application/x-ndjson``) or as a multipart file field ``file``. See ``services/api/uploads.py``
for how it is streamed, validated and stored.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from sqlmodel import Session

from common.blob_deletes import delete_blob
from common.db import crud
from common.db.errors import NotFoundError
from common.erasure import sweep_if_not_active
from services.api.deps import ContextDep, CurrentTenant, SessionDep, take_upload_slot
from services.api.errors import ApiError
from services.api.schemas import DatasetDeletePending, DatasetOut, Page
from services.api.uploads import (
    JSONL_MEDIA_TYPES,
    MULTIPART_FIELD,
    MULTIPART_MEDIA_TYPE,
    MULTIPART_OVERHEAD_BYTES,
    Spooled,
    body_chunks,
    remove_spooled,
    spool,
    store_dataset,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

_JSONL_BODY = {"schema": {"type": "string", "format": "binary"}}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": 'JSONL, one {"input": "...", "output": "..."} object a line (blank '
        "lines are skipped), as the body or as the multipart file field `file`.",
        "content": {
            **{media: _JSONL_BODY for media in JSONL_MEDIA_TYPES},
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


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    openapi_extra=UPLOAD_BODY,
    responses={
        413: {"description": "over max_dataset_bytes, max_dataset_examples or the quota"},
        415: {"description": "not JSONL or multipart"},
        422: {"description": "a bad line: the message names its number"},
    },
)
async def upload_dataset(request: Request, tenant: CurrentTenant, context: ContextDep) -> Any:
    """Upload a dataset. Every line is checked (UTF-8, an object with non-empty `input`
    and `output` strings, within the model's context minus the longest prefix); the first
    bad line's number is in the error, and a rejected upload leaves nothing behind. A tenant
    sends at most `tenant_max_concurrent_uploads` at once (429 beyond, after
    `upload_refusal_delay_seconds`, its body unread)."""
    await take_upload_slot(tenant.id, context, "dataset uploads")
    try:
        return await _upload(request, tenant, context)
    finally:
        context.open_uploads.release(tenant.id)


async def _upload(request: Request, tenant: Any, context: Any) -> Any:
    settings = context.settings
    used = await context.run_blocking(_stored_bytes, context, tenant.id)
    remaining = settings.tenant_dataset_bytes_quota - used

    def over_quota() -> ApiError:
        return ApiError(
            413,
            "quota_exceeded",
            f"dataset storage quota exceeded: {used} bytes stored, tenant_dataset_bytes_quota "
            f"is {settings.tenant_dataset_bytes_quota}",
        )

    def over_size() -> ApiError:
        return ApiError(
            413,
            "payload_too_large",
            f"the dataset is larger than max_dataset_bytes ({settings.max_dataset_bytes} bytes)",
        )

    declared = request.headers.get("content-length", "")
    if remaining <= 0 or (
        declared.isdigit() and int(declared) > remaining + MULTIPART_OVERHEAD_BYTES
    ):
        raise over_quota()
    spooled: Spooled | None = None
    try:
        # Stop reading at whichever comes first: the size limit or the quota left.
        spooled = await spool(
            body_chunks(request),
            max_bytes=min(settings.max_dataset_bytes, remaining),
            too_large=over_size if settings.max_dataset_bytes <= remaining else over_quota,
        )
        # Parsed and tokenized in a validation process: never on this event loop's GIL.
        examples = await context.validation.count_examples(
            spooled.path, max_examples=settings.max_dataset_examples, owner=tenant.id
        )
        dataset = await context.run_blocking(
            store_dataset,
            engine=context.db,
            blobs=context.blobs,
            tenant_id=tenant.id,
            spooled=spooled,
            examples=examples,
            quota_bytes=settings.tenant_dataset_bytes_quota,
        )
    finally:
        remove_spooled(spooled)
        # A tenant erased while its upload ran: whatever the upload wrote goes again.
        await context.run_blocking(_sweep_if_erased, context, tenant.id)
    log.info("tenant %s uploaded dataset %s (%d examples)", tenant.id, dataset.id, examples)
    return DatasetOut.of(dataset)


def _sweep_if_erased(context: Any, tenant_id: uuid.UUID) -> None:
    try:
        sweep_if_not_active(context.db, context.blobs, tenant_id, "an upload ended")
    except Exception as error:  # the scheduler's periodic re-sweep catches it
        log.warning("sweep after an upload of tenant %s failed: %s", tenant_id, error)


def _stored_bytes(context: Any, tenant_id: uuid.UUID) -> int:
    with Session(context.db) as session:
        return crud.tenant_dataset_bytes(session=session, tenant_id=tenant_id)


@router.get("", response_model=Page[DatasetOut])
def list_datasets(
    tenant: CurrentTenant,
    session: SessionDep,
    offset: int = Query(default=0, ge=0, le=1_000_000),
    limit: int = Query(default=100, ge=1, le=1000),
) -> Any:
    """The caller's datasets, newest first."""
    rows = crud.list_datasets(session=session, tenant_id=tenant.id, offset=offset, limit=limit)
    return Page[DatasetOut](data=[DatasetOut.of(d) for d in rows])


@router.get("/{dataset_id}", response_model=DatasetOut, responses={404: {}})
def get_dataset(dataset_id: uuid.UUID, tenant: CurrentTenant, session: SessionDep) -> Any:
    dataset = crud.get_dataset(session=session, tenant_id=tenant.id, dataset_id=dataset_id)
    if dataset is None:
        raise NotFoundError(f"dataset {dataset_id} not found")
    return DatasetOut.of(dataset)


@router.delete(
    "/{dataset_id}",
    status_code=204,
    responses={
        202: {
            "model": DatasetDeletePending,
            "description": "row deleted; the object store did not confirm the delete of the "
            "data yet: recorded and retried until it is gone",
        },
        404: {},
        409: {"description": "a queued or running job reads it"},
    },
)
def delete_dataset(
    dataset_id: uuid.UUID, tenant: CurrentTenant, session: SessionDep, context: ContextDep
) -> Response:
    """Delete a dataset (row, then blob): **204** once its data is gone, **202** when the
    object store did not confirm the delete yet (recorded with the row's deletion and
    retried until it is gone). Refused (409) while an unfinished job reads it."""
    dataset = crud.delete_dataset(session=session, tenant_id=tenant.id, dataset_id=dataset_id)
    if delete_blob(context.db, context.blobs, dataset.object_key):
        return Response(status_code=204)
    pending = DatasetDeletePending(
        id=dataset_id,
        status="blob_delete_pending",
        message="the dataset is deleted; its data could not be removed from object storage "
        "yet and the delete is retried until it is gone",
    )
    return JSONResponse(pending.model_dump(mode="json"), status_code=202)
