"""Data lifecycle (issue 15) on real databases (SQLite and PostgreSQL) and S3 over HTTP:
prefix version numbers that only go up, nightly jobs marked by a column (the ``nightly-`` key
space reserved), activation by compare-and-swap against the version a job started from,
erasure that stays true after it completed (late writes, unfinished multipart uploads,
local temporary files), and the per-job step budget and per-tenant daily tokens."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlmodel import Session, col, select

from common.blobstore import LocalBlobStore, dataset_key, prefix_key, tenant_key_prefix
from common.db import crud
from common.db.errors import QuotaExceededError
from common.db.models import (
    DeletionAudit,
    JobEvent,
    JobPriority,
    JobState,
    NightlyRun,
    TrainingJob,
    TrainingJobCreate,
)
from common.db.types import utcnow
from common.erasure import (
    ErasureOptions,
    erase_tenant,
    find_tenant_leftovers,
    resweep_recently_erased,
    sweep_if_not_active,
)
from common.errors import InvalidInputError
from tests.fixtures.factories import make_dataset, make_job, make_prefix_create, make_tenant
from workers.nightly import run_nightly

FAST = ErasureOptions(lease_seconds=30, replica_timeout_seconds=0.5, poll_seconds=0.01)

NIGHT = date(2031, 5, 1)


def publish(session: Session, tenant, **kw):
    job = make_job(session, tenant)
    owner = f"w-{uuid.uuid4().hex}"
    claimed = crud.claim_oldest_job(session=session, owner=owner, lease_seconds=60)
    assert claimed is not None and claimed.id == job.id
    return crud.publish_prefix(
        session=session, job_id=job.id, owner=owner, prefix_in=make_prefix_create(tenant), **kw
    )


# --- 1. version numbers only go up -------------------------------------------------------------


def test_a_deleted_newest_version_number_is_never_given_again(session: Session) -> None:
    tenant = make_tenant(session)
    v1, v2 = publish(session, tenant), publish(session, tenant)
    assert (v1.version, v2.version) == (1, 2)
    crud.delete_prefix_version(session=session, tenant_id=tenant.id, prefix_id=v2.id)
    v3 = publish(session, tenant)
    assert v3.version == 3  # not 2 again: a client that saw version 2 never sees another
    crud.delete_prefix_version(session=session, tenant_id=tenant.id, prefix_id=v3.id)
    crud.delete_prefix_version(session=session, tenant_id=tenant.id, prefix_id=v1.id)
    assert publish(session, tenant).version == 4  # not 1 with no version left either
    other = make_tenant(session)
    assert publish(session, other).version == 1  # the counter is per tenant


# --- 2. nightly jobs are marked by a column ---------------------------------------------------


def test_a_tenant_cannot_take_a_nightly_idempotency_key(session: Session) -> None:
    tenant = make_tenant(session)
    for key in ("nightly-2031-05-01", "Nightly-x"):
        with pytest.raises(InvalidInputError, match=r"^idempotency_key: .*reserved for nightly"):
            make_job(session, tenant, idempotency_key=key)
    assert session.exec(select(TrainingJob)).all() == []
    assert make_job(session, tenant, idempotency_key="my-nightly-run").id  # elsewhere: fine


def test_the_nightly_report_counts_only_jobs_marked_nightly(db_engine) -> None:
    with Session(db_engine) as session:
        squatter, regular = make_tenant(session), make_tenant(session)
        make_dataset(session, squatter), make_dataset(session, regular)
        # A job a tenant submitted with tonight's key before the key space was reserved.
        own = make_job(session, squatter, priority=JobPriority.batch, idempotency_key="old-key")
        session.exec(
            sa.update(TrainingJob)
            .where(col(TrainingJob.id) == own.id)
            .values(idempotency_key=crud.nightly_idempotency_key(NIGHT))
        )
        session.commit()
        crud.cancel_job(session=session, job_id=own.id, tenant_id=squatter.id)
        squatter_id, regular_id, own_id = squatter.id, regular.id, own.id
    outcome = run_nightly(db_engine, run_date=NIGHT, validation_split=0.1)
    assert [t.tenant_id for t in outcome.plan.tenants] == [regular_id]
    reasons = {s.tenant_id: s.reason for s in outcome.plan.skipped}
    assert f"the tenant's own job {own_id} holds" in reasons[squatter_id]
    with Session(db_engine) as session:
        (run,) = session.exec(select(NightlyRun)).all()
        marked = session.exec(
            select(TrainingJob).where(col(TrainingJob.nightly_run_date) == NIGHT)
        ).all()
    assert [j.tenant_id for j in marked] == [regular_id]
    # The tenant's own (cancelled) job is not one of the night's jobs.
    assert (run.tenants_planned, run.jobs_cancelled) == (1, 0)


# --- 3. activation by compare-and-swap --------------------------------------------------------


def test_a_publish_does_not_undo_a_rollback_made_while_the_job_ran(session: Session) -> None:
    tenant = make_tenant(session)
    v1, v2 = publish(session, tenant), publish(session, tenant)
    job = make_job(session, tenant, priority=JobPriority.batch)
    owner = "nightly-trainer"
    assert crud.claim_oldest_job(session=session, owner=owner, lease_seconds=60) is not None
    started_from = crud.get_active_prefix(session=session, tenant_id=tenant.id)
    assert started_from is not None and started_from.id == v2.id
    crud.activate_prefix(session=session, tenant_id=tenant.id, version=1)  # the rollback

    new = crud.publish_prefix(
        session=session,
        job_id=job.id,
        owner=owner,
        prefix_in=make_prefix_create(tenant),
        expected_active_id=started_from.id,
    )
    assert new.version == 3 and not new.active
    assert new.metrics["activation"] == "kept_inactive_active_changed"
    active = crud.get_active_prefix(session=session, tenant_id=tenant.id)
    assert active is not None and active.id == v1.id  # the rollback stands
    done = session.get(TrainingJob, job.id, populate_existing=True)
    assert done is not None and done.state == JobState.succeeded
    assert done.note is not None and "version 2 when the job started" in done.note
    assert "it is now version 1" in done.note
    (event,) = session.exec(select(JobEvent).where(col(JobEvent.job_id) == job.id)).all()
    assert event.message == done.note


def test_a_publish_activates_when_the_active_version_is_unchanged(session: Session) -> None:
    tenant = make_tenant(session)
    assert publish(session, tenant, expected_active_id=None).active  # none before, none now
    v2 = publish(session, tenant)
    v3 = publish(session, tenant, expected_active_id=v2.id)
    assert v3.active and "activation" not in v3.metrics
    # Another publish in between (expected v2, but v3 is active now): kept inactive.
    v4 = publish(session, tenant, expected_active_id=v2.id)
    assert not v4.active
    # The version it started from was deleted and none is active: nothing to protect.
    crud.delete_prefix_version(session=session, tenant_id=tenant.id, prefix_id=v3.id)
    active = crud.get_active_prefix(session=session, tenant_id=tenant.id)
    assert active is not None  # fell back to v4
    for prefix in crud.list_prefixes(session=session, tenant_id=tenant.id):
        crud.delete_prefix_version(session=session, tenant_id=tenant.id, prefix_id=prefix.id)
    assert publish(session, tenant, expected_active_id=v3.id).active


# --- 5. erasure that stays true after it completes --------------------------------------------


@pytest.fixture
def versioned_store(make_bucket, s3_endpoint_url, boto_session):
    from common.blobstore.s3 import S3BlobStore

    return S3BlobStore(
        make_bucket(versioned=True), "base", endpoint_url=s3_endpoint_url, session=boto_session
    )


def start_multipart(store, key: str) -> str:
    """A multipart upload with one part, never completed (a replica killed mid-upload)."""
    full = store._full(key)
    upload = store.client.create_multipart_upload(Bucket=store.bucket, Key=full)
    store.client.upload_part(
        Bucket=store.bucket,
        Key=full,
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=b"x" * 1024,
    )
    return str(upload["UploadId"])


def test_unfinished_multipart_uploads_are_reported_and_aborted_by_the_erasure(
    db_engine, versioned_store
) -> None:
    store = versioned_store
    with Session(db_engine) as session:
        tenant, other = make_tenant(session), make_tenant(session)
        tenant_id, other_id = tenant.id, other.id
    key = dataset_key(tenant_id, uuid.uuid4())
    upload_id = start_multipart(store, key)
    theirs = start_multipart(store, dataset_key(other_id, uuid.uuid4()))
    assert store.list_objects(tenant_key_prefix(tenant_id)) == []  # invisible as objects
    found = find_tenant_leftovers(db_engine, store, tenant_id)
    assert f"unfinished multipart upload of {key} (upload {upload_id}" in "\n".join(found)

    erase_tenant(engine=db_engine, store=store, tenant_id=tenant_id, options=FAST)
    assert find_tenant_leftovers(db_engine, store, tenant_id) == []
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    assert [u["UploadId"] for u in uploads] == [theirs]  # another tenant's is left alone


def test_a_late_write_after_a_completed_erasure_is_swept_again(db_engine, versioned_store) -> None:
    store = versioned_store
    with Session(db_engine) as session:
        tenant, alive = make_tenant(session), make_tenant(session)
        tenant_id, alive_id = tenant.id, alive.id
    erase_tenant(engine=db_engine, store=store, tenant_id=tenant_id, options=FAST)
    # A trainer whose publish outcome was unknown kept its blob; it ends after the audit.
    late = prefix_key(tenant_id, uuid.uuid4())
    store.put_bytes(late, b"late prefix")
    start_multipart(store, dataset_key(tenant_id, uuid.uuid4()))
    kept = prefix_key(alive_id, uuid.uuid4())
    store.put_bytes(kept, b"an active tenant's prefix")
    assert len(find_tenant_leftovers(db_engine, store, tenant_id)) == 2

    assert sweep_if_not_active(db_engine, store, tenant_id, "a trainer ended") == 2
    assert find_tenant_leftovers(db_engine, store, tenant_id) == []
    assert sweep_if_not_active(db_engine, store, alive_id, "a trainer ended") == 0
    assert store.exists(kept)  # an active tenant's data is never swept

    # The periodic re-sweep: within the window after completion, not after it.
    store.put_bytes(late, b"later still")
    assert resweep_recently_erased(db_engine, store, window_seconds=0) == {}
    assert resweep_recently_erased(db_engine, store, window_seconds=3600) == {tenant_id: 1}
    assert find_tenant_leftovers(db_engine, store, tenant_id) == []
    with Session(db_engine) as session:
        session.exec(
            sa.update(DeletionAudit)
            .where(col(DeletionAudit.tenant_id) == tenant_id)
            .values(completed_at=utcnow() - timedelta(hours=2))
        )
        session.commit()
    store.put_bytes(late, b"long after")
    assert resweep_recently_erased(db_engine, store, window_seconds=3600) == {}


def test_local_temporary_files_are_leftovers_and_erased(db_engine, tmp_path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    with Session(db_engine) as session:
        tenant_id = make_tenant(session).id
    key = dataset_key(tenant_id, uuid.uuid4())
    store.put_bytes(key, b"data")
    directory = (tmp_path / "blobs" / key).parent
    (directory / ".tmp-abandoned").write_bytes(b"half a write")  # a killed writer's temp file
    found = find_tenant_leftovers(db_engine, store, tenant_id)
    assert any(f.startswith("temporary file ") and ".tmp-abandoned" in f for f in found), found
    erase_tenant(engine=db_engine, store=store, tenant_id=tenant_id, options=FAST)
    assert find_tenant_leftovers(db_engine, store, tenant_id) == []
    # A temp file written after the erasure is found and swept too.
    directory.mkdir(parents=True)
    (directory / ".tmp-late").write_bytes(b"late")
    assert find_tenant_leftovers(db_engine, store, tenant_id) == [
        f"temporary file {tenant_key_prefix(tenant_id)}datasets/.tmp-late"
    ]
    assert sweep_if_not_active(db_engine, store, tenant_id, "an upload ended") == 1
    assert find_tenant_leftovers(db_engine, store, tenant_id) == []


# --- 7. per-job budget and per-tenant daily tokens --------------------------------------------


def test_a_job_over_the_step_budget_is_refused(session: Session) -> None:
    tenant = make_tenant(session)
    dataset = make_dataset(session, tenant, example_count=100)
    job_in = TrainingJobCreate(
        dataset_ids=[dataset.id], hyperparameters={"epochs": 10, "batch_size": 4}
    )
    with pytest.raises(
        InvalidInputError, match=r"about 250 optimizer steps .* job_max_steps \(249\)"
    ):
        crud.enqueue_job(session=session, tenant_id=tenant.id, job_in=job_in, max_steps=249)
    job, _ = crud.enqueue_job(session=session, tenant_id=tenant.id, job_in=job_in, max_steps=250)
    assert job.id


def test_a_tenant_over_its_daily_training_tokens_is_refused_until_midnight(
    session: Session,
) -> None:
    tenant, other = make_tenant(session), make_tenant(session)
    dataset = make_dataset(session, tenant)  # make_dataset content: ~45 bytes
    size = dataset.size_bytes
    per_job = round(size / 4) * 2
    job_in = TrainingJobCreate(dataset_ids=[dataset.id], hyperparameters={"epochs": 2})
    noon = datetime(2031, 5, 1, 12, 0, tzinfo=UTC)
    limit = per_job * 2

    def submit(at: datetime, tenant_id: uuid.UUID = tenant.id, **kw):
        return crud.enqueue_job(
            session=session,
            tenant_id=tenant_id,
            job_in=job_in,
            max_tokens_per_day=limit,
            now=at,
            **kw,
        )

    first, _ = submit(noon)
    first.created_at = noon
    session.add(first)
    session.commit()
    assert first.estimated_tokens == per_job
    second, _ = submit(noon)
    second.created_at = noon
    session.add(second)
    session.commit()
    with pytest.raises(QuotaExceededError) as caught:
        submit(noon)
    error = caught.value
    assert error.limit == "tenant_training_tokens_per_day" and error.retry_after == 12 * 3600
    assert f"{2 * per_job} token(s) submitted today + {per_job}" in str(error)
    assert "resets at 2031-05-02T00:00:00Z (in 43200 s)" in str(error)
    # Another tenant has its own budget; the next UTC day starts again.
    other_set = make_dataset(session, other)
    crud.enqueue_job(
        session=session,
        tenant_id=other.id,
        max_tokens_per_day=limit,
        now=noon,
        job_in=TrainingJobCreate(dataset_ids=[other_set.id], hyperparameters={"epochs": 2}),
    )
    tomorrow, _ = submit(noon + timedelta(days=1))
    assert tomorrow.id


def test_a_nightly_job_over_the_step_budget_is_skipped_with_the_reason(db_engine) -> None:
    with Session(db_engine) as session:
        big, small = make_tenant(session), make_tenant(session)
        make_dataset(session, big, example_count=10_000), make_dataset(session, small)
        big_id, small_id = big.id, small.id
    outcome = run_nightly(db_engine, run_date=NIGHT, validation_split=0.1, max_steps=1000)
    assert [t.tenant_id for t in outcome.plan.tenants] == [small_id]
    reasons = {s.tenant_id: s.reason for s in outcome.plan.skipped}
    assert reasons[big_id].startswith("not enqueued: hyperparameters: the job needs about")
    assert "job_max_steps (1000)" in reasons[big_id]


# --- the migration ---------------------------------------------------------------------------


def test_the_migration_fills_the_counter_and_marks_earlier_nightly_jobs(
    db_backend, create_database
) -> None:
    from common.db.engine import create_db_engine, upgrade_database

    engine = create_db_engine(create_database(db_backend))
    try:
        upgrade_database(engine, "0004")
        tenant_id, nightly_id, own_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        now = utcnow()
        tenants = sa.table(
            "tenants",
            sa.column("id", sa.Uuid()),
            sa.column("name", sa.String()),
            sa.column("status", sa.String()),
            sa.column("created_at", sa.DateTime(timezone=True)),
        )
        jobs = sa.table(
            "training_jobs",
            *(sa.column(c, sa.Uuid()) for c in ("id", "tenant_id")),
            sa.column("dataset_ids", sa.JSON()),
            sa.column("hyperparameters", sa.JSON()),
            *(sa.column(c, sa.String()) for c in ("idempotency_key", "state", "priority")),
            *(sa.column(c, sa.Integer()) for c in ("attempts", "max_attempts")),
            *(sa.column(c, sa.DateTime(timezone=True)) for c in ("created_at", "updated_at")),
        )
        prefixes = sa.table(
            "prefixes",
            *(sa.column(c, sa.Uuid()) for c in ("id", "tenant_id")),
            *(sa.column(c, sa.Integer()) for c in ("version", "prefix_length", "size_bytes")),
            *(
                sa.column(c, sa.String())
                for c in ("object_key", "base_model_fingerprint", "dtype", "sha256")
            ),
            sa.column("active", sa.Boolean()),
            sa.column("metrics", sa.JSON()),
            sa.column("created_at", sa.DateTime(timezone=True)),
        )
        with engine.begin() as conn:
            conn.execute(
                sa.insert(tenants).values(id=tenant_id, name="t", status="active", created_at=now)
            )
            for job_id, priority in ((nightly_id, "batch"), (own_id, "interactive")):
                conn.execute(
                    sa.insert(jobs).values(
                        id=job_id,
                        tenant_id=tenant_id,
                        dataset_ids=[],
                        hyperparameters={},
                        idempotency_key="nightly-2031-05-01"
                        if priority == "batch"
                        else "nightly-2031-05-02",
                        state="succeeded",
                        priority=priority,
                        attempts=1,
                        max_attempts=3,
                        created_at=now,
                        updated_at=now,
                    )
                )
            for version in (1, 3):  # version 2 was deleted
                prefix_id = uuid.uuid4()
                conn.execute(
                    sa.insert(prefixes).values(
                        id=prefix_id,
                        tenant_id=tenant_id,
                        version=version,
                        prefix_length=4,
                        size_bytes=1,
                        object_key=prefix_key(tenant_id, prefix_id),
                        base_model_fingerprint="f" * 64,
                        dtype="float32",
                        sha256="0" * 64,
                        active=version == 3,
                        metrics={},
                        created_at=now,
                    )
                )
        upgrade_database(engine)
        with Session(engine) as session:
            tenant = crud.get_tenant(session=session, tenant_id=tenant_id)
            assert tenant is not None and tenant.last_prefix_version == 3
            marked = {j.id: j.nightly_run_date for j in session.exec(select(TrainingJob))}
            assert marked == {nightly_id: date(2031, 5, 1), own_id: None}
            assert all(j.estimated_tokens == 0 for j in session.exec(select(TrainingJob)))
            assert publish(session, tenant).version == 4
    finally:
        engine.dispose()
