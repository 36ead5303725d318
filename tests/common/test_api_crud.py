"""The data-layer functions the HTTP API adds (quotas, dataset deletion, job summaries,
prefix lookup by id), on SQLite and on PostgreSQL."""

from __future__ import annotations

import uuid

import pytest
from sqlmodel import Session

from common.blobstore.keys import dataset_key
from common.db import crud
from common.db.errors import ConflictError, NotFoundError, QuotaExceededError
from common.db.models import DatasetCreate, JobEventCreate, JobState, TrainingJobCreate
from tests.fixtures.factories import make_dataset, make_job, make_published_prefix, make_tenant


def dataset_in(tenant_id: uuid.UUID, size: int) -> DatasetCreate:
    dataset_id = uuid.uuid4()
    return DatasetCreate(
        id=dataset_id,
        object_key=dataset_key(tenant_id, dataset_id),
        sha256="a" * 64,
        size_bytes=size,
        example_count=1,
    )


def test_dataset_storage_quota(session: Session) -> None:
    tenant, other = make_tenant(session), make_tenant(session)
    crud.add_dataset(session=session, tenant_id=tenant.id, dataset_in=dataset_in(tenant.id, 600))
    crud.add_dataset(session=session, tenant_id=other.id, dataset_in=dataset_in(other.id, 900))
    assert crud.tenant_dataset_bytes(session=session, tenant_id=tenant.id) == 600
    crud.add_dataset(
        session=session,
        tenant_id=tenant.id,
        dataset_in=dataset_in(tenant.id, 400),
        max_total_bytes=1000,
    )
    with pytest.raises(QuotaExceededError, match="tenant_dataset_bytes_quota 1000") as raised:
        crud.add_dataset(
            session=session,
            tenant_id=tenant.id,
            dataset_in=dataset_in(tenant.id, 1),
            max_total_bytes=1000,
        )
    assert raised.value.limit == "tenant_dataset_bytes_quota"
    assert len(crud.list_datasets(session=session, tenant_id=tenant.id)) == 2


def test_unfinished_jobs_quota_and_validation_dataset(session: Session) -> None:
    tenant = make_tenant(session)
    train, validation = make_dataset(session, tenant), make_dataset(session, tenant)
    foreign = make_dataset(session, make_tenant(session))

    def submit(**fields: object) -> tuple[object, bool]:
        return crud.enqueue_job(
            session=session,
            tenant_id=tenant.id,
            job_in=TrainingJobCreate(dataset_ids=[train.id], **fields),  # type: ignore[arg-type]
            max_unfinished_jobs=2,
        )

    job, created = submit(validation_dataset_id=validation.id, idempotency_key="a")
    assert created and job.validation_dataset_id == validation.id  # type: ignore[attr-defined]
    with pytest.raises(NotFoundError, match=str(foreign.id)):
        submit(validation_dataset_id=foreign.id)
    submit()
    assert crud.count_unfinished_jobs(session=session, tenant_id=tenant.id) == 2
    with pytest.raises(QuotaExceededError, match="tenant_unfinished_jobs_quota is 2"):
        submit()
    assert submit(idempotency_key="a")[1] is False  # a replay is never refused
    counts = crud.count_jobs_by_state(session=session)
    assert counts[JobState.queued] == 2 and counts[JobState.failed] == 0


def test_delete_dataset_refuses_while_a_job_reads_it(session: Session) -> None:
    tenant, other = make_tenant(session), make_tenant(session)
    used, free = make_dataset(session, tenant), make_dataset(session, tenant)
    job = make_job(session, tenant, datasets=[used])
    with pytest.raises(ConflictError, match=str(job.id)):
        crud.delete_dataset(session=session, tenant_id=tenant.id, dataset_id=used.id)
    with pytest.raises(NotFoundError):  # another tenant's dataset reads as missing
        crud.delete_dataset(session=session, tenant_id=other.id, dataset_id=free.id)
    crud.delete_dataset(session=session, tenant_id=tenant.id, dataset_id=free.id)
    crud.cancel_job(session=session, job_id=job.id)
    crud.delete_dataset(session=session, tenant_id=tenant.id, dataset_id=used.id)
    assert crud.list_datasets(session=session, tenant_id=tenant.id) == []


def test_job_summaries_and_prefix_by_id(session: Session) -> None:
    tenant, other = make_tenant(session), make_tenant(session)
    prefix = make_published_prefix(session, tenant)
    quiet = make_job(session, tenant)
    for step in (1, 2, 3):
        crud.record_job_event(
            session=session,
            job_id=prefix.job_id,
            event_in=JobEventCreate(step=step, total_steps=3, loss=1.0 / step),
        )
    events = crud.latest_job_events(session=session, job_ids=[prefix.job_id, quiet.id])
    assert list(events) == [prefix.job_id] and events[prefix.job_id].step == 3
    assert crud.prefix_ids_of_jobs(session=session, job_ids=[prefix.job_id, quiet.id]) == {
        prefix.job_id: prefix.id
    }
    assert crud.latest_job_events(session=session, job_ids=[]) == {}
    found = crud.get_prefix_by_id(session=session, tenant_id=tenant.id, prefix_id=prefix.id)
    assert found is not None and found.version == 1
    assert crud.get_prefix_by_id(session=session, tenant_id=other.id, prefix_id=prefix.id) is None
