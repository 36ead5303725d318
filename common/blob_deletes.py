"""Deleting a blob whose row is already gone, until it is gone.

``crud.delete_dataset`` and ``crud.delete_prefix_version`` record a pending delete in the
transaction that deletes the row. :func:`delete_blob` then tries the blob store once: on
success the record goes (the API answers 204 / 200), on failure it stays with the error
(202: the data is not gone yet) and :func:`drain_pending_blob_deletes` — run by the
scheduler's loop every ``storage_sweep_seconds`` — tries again until the store confirms.
A record whose process died between the row's commit and the blob delete is retried the
same way. ``prefixd tenants verify-deleted`` lists the tenant's pending ones.

A blob that never had a row (an attempt died between writing its prefix and publishing it) is
swept by :func:`delete_orphan_prefix_blobs`, under the job's lease.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from common.blobstore import BlobStore
from common.blobstore.keys import base_prefixes_key_prefix, prefixes_key_prefix
from common.db import crud
from common.db.engine import session_scope

log = logging.getLogger(__name__)


def delete_blob(engine: Engine, store: BlobStore, object_key: str) -> bool:
    """Delete the blob of a recorded pending delete; True once it is gone (record
    dropped), False when the store failed (the record keeps the error for the retry)."""
    try:
        store.delete(object_key)
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        log.warning("blob %s not deleted yet (retried later): %s", object_key, message)
        try:
            with session_scope(engine) as session:
                crud.fail_pending_blob_delete(session=session, object_key=object_key, error=message)
        except SQLAlchemyError as db_error:  # the record stays as it was: still retried
            log.warning("could not record the failed delete of %s: %s", object_key, db_error)
        return False
    try:
        with session_scope(engine) as session:
            crud.finish_pending_blob_delete(session=session, object_key=object_key)
    except SQLAlchemyError as db_error:  # the blob is gone; the retry finds nothing to delete
        log.warning("blob %s deleted, its record not dropped yet: %s", object_key, db_error)
    return True


@dataclass(frozen=True)
class DrainResult:
    deleted: int
    pending: int


def drain_pending_blob_deletes(engine: Engine, store: BlobStore, limit: int = 1000) -> DrainResult:
    """Try every pending blob delete once (least recently tried first, up to ``limit``)."""
    with session_scope(engine) as session:
        keys = [r.object_key for r in crud.list_pending_blob_deletes(session=session, limit=limit)]
    deleted = sum(delete_blob(engine, store, key) for key in keys)
    if keys:
        log.info("pending blob deletes: %d done, %d still pending", deleted, len(keys) - deleted)
    return DrainResult(deleted, len(keys) - deleted)


def delete_orphan_prefix_blobs(
    engine: Engine, store: BlobStore, tenant_id: uuid.UUID | None
) -> int:
    """Delete prefix blobs of the tenant that have no prefix row: left by an attempt that
    died between writing its blob and publishing it. Safe only while the caller holds the
    lease of the tenant's job, because the scheduler runs at most one job per tenant.
    ``tenant_id`` None: the operator's base-prefix blobs (at most one operator job runs)."""
    where = prefixes_key_prefix(tenant_id) if tenant_id is not None else base_prefixes_key_prefix()
    blobs = store.list_objects(where)  # listed before the rows
    if not blobs:
        return 0
    with session_scope(engine) as session:
        if tenant_id is None:
            known = {b.object_key for b in crud.list_base_prefixes(session=session)}
        else:
            rows = crud.list_prefixes(session=session, tenant_id=tenant_id)
            known = {p.object_key for p in rows}
    orphans = [b.key for b in blobs if b.key not in known]
    for key in orphans:
        store.delete(key)
    if orphans:
        log.info("deleted %d orphan prefix blob(s) of tenant %s", len(orphans), tenant_id)
    return len(orphans)
