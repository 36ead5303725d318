"""Tenant erasure, minimal version (issue 4 needs it for its tests; issue 7 owns the full
one: API route, serving replicas' caches, resumable runs).

:func:`erase_tenant`, in this order:

1. mark the tenant ``deleting`` — from that commit on nothing can be added to it, and a
   trainer's publish is refused (it then deletes the blob it wrote);
2. record a deletion audit (ids, times and counts only — no personal data);
3. cancel its queued and running jobs (a running trainer learns it from its next heartbeat
   and stops between two steps);
4. delete every blob under ``tenants/<id>/`` (every version on a versioned bucket);
5. delete its rows: the tenant row, and by ``ON DELETE CASCADE`` its keys, datasets, jobs,
   job events and prefixes;
6. complete the audit with the counts.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import col, func, select

from common.blobstore import BlobStore, tenant_prefix
from common.db import crud
from common.db.engine import session_scope
from common.db.models import (
    TERMINAL_JOB_STATES,
    ApiKey,
    Dataset,
    DeletionAudit,
    JobEvent,
    Prefix,
    Tenant,
    TrainingJob,
)


def erase_tenant(*, engine: Engine, store: BlobStore, tenant_id: uuid.UUID) -> DeletionAudit:
    """Erase everything of the tenant (see the module docstring); returns the completed
    audit record. Raises :class:`NotFoundError` for an unknown tenant. Running it again
    after an interruption finishes the job."""
    with session_scope(engine) as session:
        crud.mark_tenant_deleting(session=session, tenant_id=tenant_id)
        audit = crud.start_deletion_audit(session=session, tenant_id=tenant_id)
        audit_id = audit.id
        jobs = session.exec(
            select(TrainingJob.id).where(
                col(TrainingJob.tenant_id) == tenant_id,
                col(TrainingJob.state).not_in(list(TERMINAL_JOB_STATES)),
            )
        ).all()
        for job_id in jobs:
            crud.cancel_job(session=session, job_id=job_id, tenant_id=tenant_id)

    objects = store.delete_prefix(tenant_prefix(tenant_id))

    with session_scope(engine) as session:
        job_ids = select(TrainingJob.id).where(col(TrainingJob.tenant_id) == tenant_id)
        counts = [
            session.exec(
                select(func.count()).select_from(model).where(col(model.tenant_id) == tenant_id)
            ).one()
            for model in (ApiKey, Dataset, TrainingJob, Prefix)
        ]
        events = session.exec(
            select(func.count()).select_from(JobEvent).where(col(JobEvent.job_id).in_(job_ids))
        ).one()
        try:
            deleted = session.exec(sa.delete(Tenant).where(col(Tenant.id) == tenant_id))
            session.commit()
        except BaseException:
            session.rollback()
            raise
        rows = sum(counts) + events + deleted.rowcount
        return crud.complete_deletion_audit(
            session=session, audit_id=audit_id, objects_erased=objects, rows_erased=rows
        )
