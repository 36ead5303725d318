"""A PEFT prefix-tuning adapter uploaded as a new prefix version (``POST /v1/prefixes/peft``).

The body (a zip or tar of the adapter directory, as the multipart file ``file`` or as the
raw body) is bounded by ``max_peft_adapter_bytes`` before it is read (the body-size
middleware), unpacked with every member's size checked before it is inflated, and validated
as ``prefixd peft import`` validates it (``common/peft_adapter.py``: PEFT configuration,
layers and shapes of the served base model, finite values), then against the longest prefix
a job may train (``max_prefix_length``). Only then is anything written: the blob under
``tenants/<tenant>/prefixes/<id>.safetensors``, then the row (the tenant's next version,
inactive unless asked). A refused upload leaves nothing: no blob, no row.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import Request
from sqlmodel import Session
from starlette.datastructures import UploadFile

from common.blobstore import prefix_key
from common.db import crud
from common.db.models import PrefixVersion, PrefixVersionCreate
from common.errors import IncompatiblePrefixError
from common.peft_adapter import peft_prefix, read_peft_adapter_archive
from common.prefix_file import Prefix, prefix_to_bytes
from services.api.errors import ApiError
from services.api.uploads import (
    MULTIPART_FIELD,
    MULTIPART_MEDIA_TYPE,
    add_row_for_stored_blob,
    media_type,
)

log = logging.getLogger(__name__)

ARCHIVE_MEDIA_TYPES = (
    "application/zip",
    "application/x-zip-compressed",
    "application/x-tar",
    "application/gzip",
    "application/x-gzip",
    "application/octet-stream",
)


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"the adapter archive is larger than max_peft_adapter_bytes ({limit} bytes)",
    )


async def adapter_archive(request: Request, *, max_bytes: int) -> bytes:
    """The uploaded archive's bytes: the multipart file ``file`` or the raw body."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Encoding {encoding[:40]} is not accepted; send the archive itself "
            "(a .tar.gz is fine as the body)",
        )
    kind = media_type(request)
    if kind == MULTIPART_MEDIA_TYPE:
        form = await request.form(max_files=1, max_fields=8)
        try:
            upload = form.get(MULTIPART_FIELD)
            if not isinstance(upload, UploadFile):
                raise ApiError(
                    422,
                    "invalid_request",
                    f"a multipart upload needs the archive as a file field named "
                    f"{MULTIPART_FIELD!r}",
                )
            data = await upload.read(max_bytes + 1)
        finally:
            await form.close()
    elif kind in ARCHIVE_MEDIA_TYPES:
        data = await request.body()
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the adapter directory as a zip or tar: {MULTIPART_MEDIA_TYPE} with a file "
            f"field named {MULTIPART_FIELD!r}, or the body as one of "
            f"{', '.join(ARCHIVE_MEDIA_TYPES)} (got {kind[:60] or 'no content type'!r})",
        )
    if len(data) > max_bytes:
        raise too_large(max_bytes)
    if not data:
        raise ApiError(400, "invalid_adapter", "the adapter archive is empty")
    return data


def validated_adapter(data: bytes, context: Any) -> Prefix:
    """The archive → a prefix for the served base model, every check done; a 400 naming
    the problem otherwise."""
    settings = context.settings
    checker = context.example_checker()
    try:
        files = read_peft_adapter_archive(data, max_member_bytes=settings.max_peft_adapter_bytes)
        prefix = peft_prefix(files, config=checker.config, fingerprint=context.model_fingerprint)
    except IncompatiblePrefixError as error:
        raise ApiError(400, "invalid_adapter", str(error)) from None
    if prefix.prefix_length > checker.max_prefix_length:
        raise ApiError(
            400,
            "invalid_adapter",
            f"PEFT adapter: {prefix.prefix_length} virtual tokens; the limit is "
            f"{checker.max_prefix_length} (max_prefix_length, at most half the model's "
            f"context of {checker.context_length})",
        )
    return prefix


def store_imported_prefix(
    *, engine: Any, blobs: Any, tenant_id: uuid.UUID, prefix: Prefix, activate: bool
) -> PrefixVersion:
    """Blob first, then the row (the tenant's next version), by
    :func:`add_row_for_stored_blob`: no row ever points at a missing blob."""
    prefix_id = uuid.uuid4()
    key = prefix_key(tenant_id, prefix_id)  # from ids only
    info = blobs.put_bytes(key, prefix_to_bytes(prefix))

    def add_row(session: Session) -> PrefixVersion:
        prefix_in = PrefixVersionCreate(
            id=prefix_id,
            object_key=key,
            base_model_fingerprint=prefix.base_model_fingerprint,
            prefix_length=prefix.prefix_length,
            dtype=prefix.dtype_name,
            size_bytes=info.size,
            sha256=info.sha256,
            metrics=prefix.metrics,
        )
        row = crud.add_imported_prefix(
            session=session, tenant_id=tenant_id, prefix_in=prefix_in, activate=activate
        )
        session.expunge(row)
        return row

    def find_row(session: Session) -> PrefixVersion | None:
        row = crud.get_prefix_by_id(session=session, tenant_id=tenant_id, prefix_id=prefix_id)
        if row is not None:
            session.expunge(row)
        return row

    return add_row_for_stored_blob(
        engine=engine,
        blobs=blobs,
        key=key,
        what=f"prefix import {prefix_id}",
        add_row=add_row,
        find_row=find_row,
    )
