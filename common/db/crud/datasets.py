"""Datasets: a tenant's uploaded training data (the blob lives in the blob store)."""

from __future__ import annotations

import uuid

from sqlmodel import Session, col, func, select

from common.blobstore.keys import key_belongs_to_tenant
from common.db.crud.blob_deletes import add_pending_blob_delete
from common.db.crud.tenants import lock_tenant, require_active_tenant
from common.db.crud.transaction import commit
from common.db.errors import (
    ConflictError,
    NotFoundError,
    QuotaExceededError,
)
from common.db.models import (
    TERMINAL_JOB_STATES,
    Dataset,
    DatasetCreate,
    TrainingJob,
)
from common.errors import InvalidInputError


def add_dataset(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    dataset_in: DatasetCreate,
    max_total_bytes: int | None = None,
) -> Dataset:
    """Record a dataset whose blob is already written (under the tenant's key prefix).
    With ``max_total_bytes``, the tenant's datasets including this one must fit in it (checked
    under the tenant's row lock, so concurrent uploads cannot overshoot together); else
    :class:`QuotaExceededError` and nothing is recorded."""
    if not key_belongs_to_tenant(dataset_in.object_key, tenant_id):
        raise InvalidInputError(
            f"dataset object key {dataset_in.object_key!r} is outside tenant {tenant_id}'s prefix"
        )
    try:
        require_active_tenant(session, tenant_id, lock=max_total_bytes is not None)
        if max_total_bytes is not None:
            used = tenant_dataset_bytes(session=session, tenant_id=tenant_id)
            if used + dataset_in.size_bytes > max_total_bytes:
                raise QuotaExceededError(
                    f"dataset storage quota exceeded: {used} bytes stored + "
                    f"{dataset_in.size_bytes} uploaded > tenant_dataset_bytes_quota "
                    f"{max_total_bytes}",
                    limit="tenant_dataset_bytes_quota",
                )
    except BaseException:
        session.rollback()
        raise
    dataset = Dataset.model_validate(dataset_in, update={"tenant_id": tenant_id})
    session.add(dataset)
    commit(session)
    session.refresh(dataset)
    return dataset


def get_dataset(*, session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> Dataset | None:
    dataset = session.get(Dataset, dataset_id)
    return dataset if dataset is not None and dataset.tenant_id == tenant_id else None


def list_datasets(
    *, session: Session, tenant_id: uuid.UUID, offset: int = 0, limit: int = 100
) -> list[Dataset]:
    stmt = (
        select(Dataset)
        .where(col(Dataset.tenant_id) == tenant_id)
        .order_by(col(Dataset.created_at).desc(), col(Dataset.id))
        .offset(offset)
        .limit(limit)
    )
    return list(session.exec(stmt).all())


def tenant_dataset_bytes(*, session: Session, tenant_id: uuid.UUID) -> int:
    """Total size of the tenant's datasets (its storage quota counts these)."""
    stmt = select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(
        col(Dataset.tenant_id) == tenant_id
    )
    return int(session.exec(stmt).one())


def delete_dataset(*, session: Session, tenant_id: uuid.UUID, dataset_id: uuid.UUID) -> Dataset:
    """Delete the dataset's row and return it, recording in the same transaction that its
    blob must go (``pending_blob_deletes``; the caller then deletes the blob). A dataset
    that a queued or running job of the tenant reads is kept: :class:`ConflictError`."""
    try:
        # The tenant's row lock serializes this with job submissions (enqueue_job with a
        # quota takes it too), so no new job can start reading the dataset meanwhile.
        lock_tenant(session, tenant_id)
        dataset = session.get(Dataset, dataset_id, populate_existing=True)
        if dataset is None or dataset.tenant_id != tenant_id:
            raise NotFoundError(f"dataset {dataset_id} not found")
        unfinished = session.exec(
            select(
                TrainingJob.id, TrainingJob.dataset_ids, TrainingJob.validation_dataset_id
            ).where(
                col(TrainingJob.tenant_id) == tenant_id,
                col(TrainingJob.state).not_in(list(TERMINAL_JOB_STATES)),
            )
        ).all()
        for job_id, dataset_ids, validation_id in unfinished:
            if str(dataset_id) in dataset_ids or validation_id == dataset_id:
                raise ConflictError(
                    f"dataset {dataset_id} is used by job {job_id}, which has not finished: "
                    "cancel the job or wait for it"
                )
        session.delete(dataset)
        add_pending_blob_delete(
            session,
            tenant_id=tenant_id,
            kind="dataset",
            item_id=dataset_id,
            object_key=dataset.object_key,
        )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return dataset
