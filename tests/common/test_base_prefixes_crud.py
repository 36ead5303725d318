"""The data layer of base prefixes (SQLite and PostgreSQL): operator datasets and jobs on
the shared queue, versions, the one default, deletion refused while tenants depend on a
base, and tenant isolation (no tenant lookup ever finds an operator row)."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from sqlmodel import Session

from common.blobstore.keys import base_prefix_key, operator_dataset_key, prefix_key
from common.db import crud
from common.db.errors import ConflictError, NotFoundError
from common.db.models import BasePrefixCreate, JobState, OperatorDataset, PrefixVersionCreate
from common.errors import InvalidInputError
from tests.fixtures.factories import make_dataset, make_job, make_tenant

SHA = "0" * 64


def operator_dataset(session: Session, examples: int = 5) -> OperatorDataset:
    dataset_id = uuid.uuid4()
    content = f"operator {dataset_id}".encode()
    return crud.add_operator_dataset(
        session=session,
        dataset_in=OperatorDataset(
            id=dataset_id,
            object_key=operator_dataset_key(dataset_id),
            sha256=hashlib.sha256(content).hexdigest(),
            size_bytes=len(content),
            example_count=examples,
        ),
    )


def claim(session: Session, job_id: uuid.UUID, owner: str) -> None:
    """Claim with the fair production claim until this job is ours."""
    for _ in range(20):
        job = crud.claim_next_job(session=session, owner=owner, lease_seconds=300)
        assert job is not None, "nothing claimable"
        if job.id == job_id:
            return
    raise AssertionError(f"job {job_id} was never claimed")


def trained_base(session: Session, name: str = "task") -> uuid.UUID:
    """An operator job claimed by the fair claim and published as a base prefix version."""
    job = crud.enqueue_base_prefix_job(
        session=session,
        name=name,
        dataset_ids=[operator_dataset(session).id],
        validation_dataset_id=None,
        hyperparameters={"prefix_length": 4},
    )
    owner = f"op-{uuid.uuid4().hex}"
    claim(session, job.id, owner)
    base_id = uuid.uuid4()
    base = crud.publish_base_prefix(
        session=session,
        job_id=job.id,
        owner=owner,
        result={"status": "measured"},
        base_in=BasePrefixCreate(
            id=base_id,
            name=name,
            base_model_fingerprint="fp",
            prefix_length=4,
            dtype="float32",
            size_bytes=1,
            sha256=SHA,
            object_key=base_prefix_key(base_id),
        ),
    )
    assert base.id == base_id
    return base_id


def stacked_version(session: Session, tenant, base_id: uuid.UUID, *, mode: str = "stack"):
    job = make_job(session, tenant)
    owner = f"t-{uuid.uuid4().hex}"
    claim(session, job.id, owner)
    prefix_id = uuid.uuid4()
    return crud.publish_prefix(
        session=session,
        job_id=job.id,
        owner=owner,
        result={"status": "no_validation_examples"},
        prefix_in=PrefixVersionCreate(
            id=prefix_id,
            object_key=prefix_key(tenant.id, prefix_id),
            base_model_fingerprint="fp",
            prefix_length=4,
            dtype="float32",
            size_bytes=1,
            sha256=SHA,
            base_prefix_id=base_id,
            base_mode=mode,
        ),
    )


def test_an_operator_job_is_claimed_and_publishes_numbered_versions(session: Session) -> None:
    first, second = trained_base(session, "task"), trained_base(session, "task")
    other = trained_base(session, "other")
    versions = {b.id: (b.name, b.version) for b in crud.list_base_prefixes(session=session)}
    assert versions == {first: ("task", 1), second: ("task", 2), other: ("other", 1)}
    job = crud.list_operator_jobs(session=session)[0]
    assert job.tenant_id is None and job.state == JobState.succeeded
    assert job.result == {"status": "measured"}
    assert crud.get_operator_job(session=session, job_id=job.id) is not None


def test_operator_jobs_run_one_at_a_time_and_never_block_tenants(session: Session) -> None:
    jobs = [
        crud.enqueue_base_prefix_job(
            session=session,
            name="task",
            dataset_ids=[operator_dataset(session).id],
            validation_dataset_id=None,
            hyperparameters={},
        )
        for _ in range(2)
    ]
    tenant = make_tenant(session)
    tenant_job = make_job(session, tenant)
    claimed = [
        crud.claim_next_job(session=session, owner=f"w{i}", lease_seconds=60) for i in range(3)
    ]
    ids = [c.id for c in claimed if c is not None]
    # One operator job and the tenant's job run; the second operator job waits its turn.
    assert len(ids) == 2 and tenant_job.id in ids
    assert len({jobs[0].id, jobs[1].id} & set(ids)) == 1


def test_the_default_is_unique_and_resolves(session: Session) -> None:
    a, b = trained_base(session), trained_base(session)
    with pytest.raises(NotFoundError, match="'default' not found"):
        crud.resolve_base_prefix(session=session, ref="default")
    crud.set_default_base_prefix(session=session, base_prefix_id=a)
    crud.set_default_base_prefix(session=session, base_prefix_id=b)
    assert [x.id for x in crud.list_base_prefixes(session=session) if x.is_default] == [b]
    assert crud.resolve_base_prefix(session=session, ref="default").id == b
    assert crud.resolve_base_prefix(session=session, ref=str(a)).id == a
    missing = uuid.uuid4()
    with pytest.raises(NotFoundError, match=str(missing)):
        crud.resolve_base_prefix(session=session, ref=str(missing))
    with pytest.raises(InvalidInputError, match="'nope'"):
        crud.resolve_base_prefix(session=session, ref="nope")
    with pytest.raises(NotFoundError):
        crud.set_default_base_prefix(session=session, base_prefix_id=missing)
    crud.set_default_base_prefix(session=session, base_prefix_id=None)
    assert crud.get_default_base_prefix(session=session) is None


def test_deleting_a_base_is_refused_while_an_active_prefix_is_stacked_on_it(
    session: Session,
) -> None:
    base_id = trained_base(session)
    tenant = make_tenant(session)
    stacked = stacked_version(session, tenant, base_id)
    assert stacked.base_prefix_id == base_id and stacked.base_mode == "stack"
    assert crud.base_prefix_dependents(session=session, base_prefix_ids=[base_id]) == {base_id: 1}
    with pytest.raises(ConflictError, match="1 tenant"):
        crud.delete_base_prefix(session=session, base_prefix_id=base_id)
    # A warm-started version stands alone: once it is the active one, the base can go.
    stacked_version(session, tenant, base_id, mode="warm_start")
    assert crud.base_prefix_dependents(session=session, base_prefix_ids=[base_id]) == {}
    deleted = crud.delete_base_prefix(session=session, base_prefix_id=base_id)
    assert (
        deleted.id == base_id
        and crud.get_base_prefix(session=session, base_prefix_id=base_id) is None
    )
    # The older stacked version cannot be made active again without its base.
    with pytest.raises(ConflictError, match="deleted"):
        crud.activate_prefix(session=session, tenant_id=tenant.id, version=stacked.version)
    with pytest.raises(NotFoundError):
        crud.delete_base_prefix(session=session, base_prefix_id=base_id)


def test_deleting_a_base_is_refused_while_a_job_will_train_on_it(session: Session) -> None:
    base_id = trained_base(session)
    tenant = make_tenant(session)
    make_job(session, tenant, hyperparameters={"base_prefix": str(base_id), "base_mode": "stack"})
    with pytest.raises(ConflictError, match="queued or running"):
        crud.delete_base_prefix(session=session, base_prefix_id=base_id)


def test_a_stacked_version_is_not_published_on_a_deleted_base(session: Session) -> None:
    tenant = make_tenant(session)
    with pytest.raises(NotFoundError, match="deleted while the job trained"):
        stacked_version(session, tenant, uuid.uuid4())
    assert crud.list_prefixes(session=session, tenant_id=tenant.id) == []


def test_operator_data_is_invisible_to_tenants(session: Session) -> None:
    tenant = make_tenant(session)
    data = operator_dataset(session)
    assert crud.get_dataset(session=session, tenant_id=tenant.id, dataset_id=data.id) is None
    assert crud.list_datasets(session=session, tenant_id=tenant.id) == []
    from common.db.models import TrainingJobCreate

    with pytest.raises(NotFoundError, match=str(data.id)):
        crud.enqueue_job(
            session=session,
            tenant_id=tenant.id,
            job_in=TrainingJobCreate(dataset_ids=[data.id]),
        )
    # … and an operator job never reads a tenant's dataset.
    with pytest.raises(NotFoundError, match="operator dataset"):
        crud.enqueue_base_prefix_job(
            session=session,
            name="task",
            dataset_ids=[make_dataset(session, tenant).id],
            validation_dataset_id=None,
            hyperparameters={},
        )
    trained_base(session)
    assert crud.list_jobs(session=session, tenant_id=tenant.id) == []
    with pytest.raises(InvalidInputError, match="from a base prefix"):
        crud.enqueue_base_prefix_job(
            session=session,
            name="task",
            dataset_ids=[data.id],
            validation_dataset_id=None,
            hyperparameters={"base_prefix": str(uuid.uuid4())},
        )


def test_an_operator_dataset_in_use_is_not_deleted(session: Session) -> None:
    data = operator_dataset(session)
    job = crud.enqueue_base_prefix_job(
        session=session,
        name="task",
        dataset_ids=[data.id],
        validation_dataset_id=None,
        hyperparameters={},
    )
    with pytest.raises(ConflictError, match=str(job.id)):
        crud.delete_operator_dataset(session=session, dataset_id=data.id)
    crud.cancel_job(session=session, job_id=job.id)
    assert crud.delete_operator_dataset(session=session, dataset_id=data.id).id == data.id
    assert crud.list_operator_datasets(session=session) == []


def test_keys_of_operator_objects_are_outside_every_tenant() -> None:
    base_id, tenant_id = uuid.uuid4(), uuid.uuid4()
    assert base_prefix_key(base_id) == f"operator/base-prefixes/{base_id}.safetensors"
    assert not base_prefix_key(base_id).startswith("tenants/")
    assert operator_dataset_key(base_id) == f"operator/datasets/{base_id}.jsonl"
    with pytest.raises(InvalidInputError):
        base_prefix_key("../tenants/" + str(tenant_id))
