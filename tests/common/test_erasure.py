"""Tenant erasure as a durable, resumable operation (common/erasure.py), on SQLite and
PostgreSQL with a versioned S3 bucket over HTTP: everything of the tenant goes, nothing of
another tenant does, one audit record however often it runs, a crash in any step is resumed,
two runners never work at once, replicas must confirm, late writers are swept; plus the
migration that turns older state into erasures, and single prefix version removal."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from common import erasure as erasure_module
from common.blobstore import prefix_key, tenant_key_prefix
from common.db import crud
from common.db.engine import create_db_engine, upgrade_database
from common.db.errors import NotFoundError, TenantNotActiveError
from common.db.models import (
    ApiKey,
    Dataset,
    DeletionAudit,
    ErasureStep,
    JobEvent,
    JobEventCreate,
    JobState,
    PrefixVersion,
    Tenant,
    TenantErasure,
    TenantStatus,
    TrainingJob,
)
from common.db.types import utcnow
from common.erasure import (
    ErasureBusyError,
    ErasureIncompleteError,
    ErasureLeaseLostError,
    ErasureOptions,
    ReplicaReport,
    erase_tenant,
    find_tenant_leftovers,
    resume_erasure,
    resume_pending_erasures,
)
from tests.fixtures.factories import make_dataset, make_job, make_tenant

FAST = ErasureOptions(lease_seconds=30, replica_timeout_seconds=0.5, poll_seconds=0.01)


@pytest.fixture
def store(make_bucket, s3_endpoint_url, boto_session) -> Any:
    from common.blobstore.s3 import S3BlobStore

    return S3BlobStore(
        make_bucket(versioned=True), "base", endpoint_url=s3_endpoint_url, session=boto_session
    )


class FakeReplicas:
    """Stands in for the inference replicas: each call evicts; ``hold`` calls still hold."""

    def __init__(self, hold: int = 0) -> None:
        self.calls: list[list[str]] = []
        self.hold = hold

    def __call__(self, prefix_ids: list[str]) -> ReplicaReport:
        self.calls.append(list(prefix_ids))
        held = frozenset(prefix_ids) if len(self.calls) <= self.hold else frozenset()
        return ReplicaReport(2, held)


def add_prefix(session: Session, store: Any, tenant_id: uuid.UUID, version: int, active: bool):
    prefix_id = uuid.uuid4()
    key = prefix_key(tenant_id, prefix_id)
    store.put_bytes(key, f"prefix {version}".encode())
    if active:
        session.exec(
            sa.update(PrefixVersion)
            .where(col(PrefixVersion.tenant_id) == tenant_id)
            .values(active=False)
        )
    session.add(
        PrefixVersion(
            id=prefix_id,
            tenant_id=tenant_id,
            version=version,
            object_key=key,
            active=active,
            base_model_fingerprint="f" * 64,
            prefix_length=4,
            dtype="float32",
            size_bytes=8,
            sha256="0" * 64,
            metrics={},
        )
    )
    session.commit()
    return prefix_id


def populate(engine: Engine, store: Any, *, running: bool = True) -> dict[str, Any]:
    """A tenant with a key, two datasets (one stored in two versions), a running job with an
    event, a queued job, three prefix versions, and a delete marker under its prefix."""
    with Session(engine) as session:
        tenant = make_tenant(session)
        crud.create_api_key(session=session, tenant_id=tenant.id)
        first, second = make_dataset(session, tenant), make_dataset(session, tenant)
        store.put_bytes(first.object_key, b"v1")
        store.put_bytes(first.object_key, b"v2")
        store.put_bytes(second.object_key, b"other")
        job = make_job(session, tenant, datasets=[first])
        if running:
            claimed = crud.claim_oldest_job(session=session, owner="trainer-x", lease_seconds=60)
            assert claimed is not None and claimed.id == job.id
        crud.record_job_event(session=session, job_id=job.id, event_in=JobEventCreate(step=1))
        queued = make_job(session, tenant, datasets=[second])
        prefixes = [add_prefix(session, store, tenant.id, v, active=v == 3) for v in (1, 2, 3)]
        stray = f"{tenant_key_prefix(tenant.id)}stray/gone.bin"
        store.put_bytes(stray, b"x")
        store.client.delete_object(Bucket=store.bucket, Key=store._full(stray))  # a marker
        return {
            "id": tenant.id,
            "running": job.id,
            "queued": queued.id,
            "prefixes": [str(p) for p in prefixes],
        }


def snapshot(engine: Engine, store: Any, tenant_id: uuid.UUID) -> dict[str, Any]:
    """Everything stored of a tenant: object versions and rows (to prove it untouched)."""
    with Session(engine) as session:
        rows = {
            model.__name__: sorted(
                str(r.id)
                for r in session.exec(select(model).where(model.tenant_id == tenant_id)).all()  # type: ignore[attr-defined]
            )
            for model in (ApiKey, Dataset, TrainingJob, PrefixVersion)
        }
        rows["events"] = [
            e.id
            for e in session.exec(
                select(JobEvent).join(TrainingJob).where(TrainingJob.tenant_id == tenant_id)
            ).all()
        ]
        rows["tenant"] = [str(session.get(Tenant, tenant_id).status)]  # type: ignore[union-attr]
    versions = [(v.key, v.version_id) for v in store.list_versions(tenant_key_prefix(tenant_id))]
    return {"rows": rows, "objects": versions}


def audits(engine: Engine, tenant_id: uuid.UUID) -> list[DeletionAudit]:
    with Session(engine) as session:
        return list(crud.list_deletion_audits(session=session, tenant_id=tenant_id))


def erasure_row(engine: Engine, tenant_id: uuid.UUID) -> TenantErasure | None:
    with Session(engine) as session:
        return crud.get_tenant_erasure(session=session, tenant_id=tenant_id)


# --- the whole erasure ------------------------------------------------------------------------


def test_erasure_removes_every_version_and_row_and_keeps_one_audit(db_engine, store) -> None:
    victim = populate(db_engine, store)
    keeper = populate(db_engine, store, running=False)
    kept = snapshot(db_engine, store, keeper["id"])
    assert len(store.list_versions(tenant_key_prefix(victim["id"]))) == 2 + 1 + 3 + 2  # + marker
    replicas = FakeReplicas()
    steps: list[str] = []

    audit = erase_tenant(
        engine=db_engine,
        store=store,
        tenant_id=victim["id"],
        evictor=replicas,
        options=FAST,
        on_step=steps.append,
    )

    assert steps == [s.value for s in ErasureStep] + ["done"]
    assert find_tenant_leftovers(db_engine, store, victim["id"]) == []
    assert store.list_versions(tenant_key_prefix(victim["id"])) == []
    assert replicas.calls == [sorted(victim["prefixes"])]
    # rows: tenant, key, 2 datasets, 2 jobs, 1 event, 3 prefixes; objects (keys): 2 datasets,
    # 3 prefixes and the one whose current version is a delete marker
    assert (audit.rows_erased, audit.objects_erased) == (10, 6)
    assert audit.completed_at is not None and audit.completed_at >= audit.requested_at
    assert set(DeletionAudit.model_fields) == {
        "id",
        "tenant_id",
        "requested_at",
        "completed_at",
        "objects_erased",
        "rows_erased",
    }
    assert erasure_row(db_engine, victim["id"]) is None
    assert snapshot(db_engine, store, keeper["id"]) == kept

    with pytest.raises(NotFoundError):  # erased: like a tenant that never existed
        erase_tenant(engine=db_engine, store=store, tenant_id=victim["id"], options=FAST)
    assert [a.id for a in audits(db_engine, victim["id"])] == [audit.id]


def test_marking_a_tenant_deleting_records_its_erasure_and_stops_everything(db_engine) -> None:
    with Session(db_engine) as session:
        tenant = make_tenant(session)
        make_job(session, tenant)
        crud.mark_tenant_deleting(session=session, tenant_id=tenant.id)
        crud.mark_tenant_deleting(session=session, tenant_id=tenant.id)  # idempotent
        erasure = crud.get_tenant_erasure(session=session, tenant_id=tenant.id)
        assert erasure is not None and erasure.step == ErasureStep.cancel_jobs
        assert len(crud.list_tenant_erasures(session=session)) == 1
        # no job of it starts; nothing can be added to it
        assert crud.claim_next_job(session=session, owner="w", lease_seconds=60) is None
        with pytest.raises(TenantNotActiveError):
            make_dataset(session, tenant)


# --- a crash in every step --------------------------------------------------------------------


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("step", list(ErasureStep))
def test_a_crash_in_any_step_is_resumed_by_running_again(
    db_engine, store, monkeypatch, step: ErasureStep, when: str
) -> None:
    victim = populate(db_engine, store)
    keeper = populate(db_engine, store, running=False)
    kept = snapshot(db_engine, store, keeper["id"])
    real = erasure_module.STEPS[step]

    def crash(run: Any, session: Session) -> dict[str, Any]:
        if when == "after":
            real(run, session)  # the work is done, but the process dies before recording it
        raise RuntimeError(f"killed in {step.value}")

    replicas = FakeReplicas()
    monkeypatch.setitem(erasure_module.STEPS, step, crash)
    with pytest.raises(RuntimeError, match="killed"):
        erase_tenant(
            engine=db_engine, store=store, tenant_id=victim["id"], evictor=replicas, options=FAST
        )
    stopped = erasure_row(db_engine, victim["id"])
    assert stopped is not None and stopped.step == step
    assert stopped.last_error is not None and f"killed in {step.value}" in stopped.last_error
    assert stopped.lease_owner is None  # released: running again takes it up at once
    assert audits(db_engine, victim["id"]) == []

    monkeypatch.setitem(erasure_module.STEPS, step, real)
    audit = erase_tenant(
        engine=db_engine, store=store, tenant_id=victim["id"], evictor=replicas, options=FAST
    )
    assert find_tenant_leftovers(db_engine, store, victim["id"]) == []
    assert [a.id for a in audits(db_engine, victim["id"])] == [audit.id]
    assert audit.rows_erased == 10
    # the prefix ids were recorded with the rows, whichever run evicted them
    assert replicas.calls[-1:] == [sorted(victim["prefixes"])]
    assert snapshot(db_engine, store, keeper["id"]) == kept


def test_a_dead_runner_is_resumed_once_its_lease_ran_out(db_engine, store) -> None:
    victim = populate(db_engine, store)
    with Session(db_engine) as session:
        crud.mark_tenant_deleting(session=session, tenant_id=victim["id"])
        # Just marked (its runner is about to start): not resumed before the grace period.
        assert crud.resumable_tenant_erasures(session=session, grace_seconds=30) == []
        later = utcnow() + timedelta(seconds=31)
        assert crud.resumable_tenant_erasures(session=session, grace_seconds=30, now=later) == [
            victim["id"]
        ]
        # A runner took it and died (its lease is not renewed).
        assert crud.claim_tenant_erasure(
            session=session, tenant_id=victim["id"], owner="dead", lease_seconds=30
        )
        assert crud.resumable_tenant_erasures(session=session, grace_seconds=30) == []
        assert crud.resumable_tenant_erasures(session=session, grace_seconds=30, now=later) == [
            victim["id"]
        ]
        session.exec(
            sa.update(TenantErasure).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()

    finished = resume_pending_erasures(
        engine=db_engine, store=store, options=FAST, evictor=FakeReplicas
    )
    assert finished == [victim["id"]]
    assert find_tenant_leftovers(db_engine, store, victim["id"]) == []
    (audit,) = audits(db_engine, victim["id"])
    assert audit.rows_erased == 10
    assert resume_pending_erasures(engine=db_engine, store=store, options=FAST) == []


def test_two_runners_never_work_on_one_erasure_at_once(db_engine, store, monkeypatch) -> None:
    victim = populate(db_engine, store)
    with Session(db_engine) as session:
        crud.mark_tenant_deleting(session=session, tenant_id=victim["id"])
        assert crud.claim_tenant_erasure(
            session=session, tenant_id=victim["id"], owner="first", lease_seconds=30
        )
    with pytest.raises(ErasureBusyError):
        resume_erasure(
            engine=db_engine, store=store, tenant_id=victim["id"], options=FAST, wait=False
        )
    # The second runner takes over once the first one's lease ran out …
    with Session(db_engine) as session:
        session.exec(sa.update(TenantErasure).values(lease_expires_at=utcnow()))
        session.commit()
    real = erasure_module.STEPS[ErasureStep.delete_objects]

    def first_comes_back(run: Any, session: Session) -> dict[str, Any]:
        # … and the first one, still running, can no longer record anything.
        from common.erasure import ErasureRun, _advance

        zombie = ErasureRun(db_engine, store, victim["id"], "first", FAST)
        with Session(db_engine) as other, pytest.raises(ErasureLeaseLostError):
            _advance(zombie, other, ErasureStep.delete_objects, {})
        with pytest.raises(ErasureLeaseLostError):
            zombie.renew()
        return real(run, session)

    monkeypatch.setitem(erasure_module.STEPS, ErasureStep.delete_objects, first_comes_back)
    audit = resume_erasure(engine=db_engine, store=store, tenant_id=victim["id"], options=FAST)
    assert audit.completed_at is not None
    # A runner that waits for another one gets the finished audit.
    assert resume_erasure(engine=db_engine, store=store, tenant_id=victim["id"]).id == audit.id


# --- replicas and late writers ----------------------------------------------------------------


def test_the_erasure_ends_only_when_no_replica_holds_a_prefix(db_engine, store) -> None:
    victim = populate(db_engine, store)
    slow = FakeReplicas(hold=3)  # a load in flight on some replica, three rounds long
    erase_tenant(engine=db_engine, store=store, tenant_id=victim["id"], evictor=slow, options=FAST)
    assert len(slow.calls) == 4

    other = populate(db_engine, store)
    stuck = FakeReplicas(hold=10**9)
    with pytest.raises(ErasureIncompleteError, match="still held by an inference replica"):
        erase_tenant(
            engine=db_engine, store=store, tenant_id=other["id"], evictor=stuck, options=FAST
        )
    stopped = erasure_row(db_engine, other["id"])
    assert stopped is not None and stopped.step == ErasureStep.evict_replicas
    assert sorted(stopped.prefix_ids) == sorted(other["prefixes"])
    assert audits(db_engine, other["id"]) == []
    good = FakeReplicas()
    erase_tenant(engine=db_engine, store=store, tenant_id=other["id"], evictor=good, options=FAST)
    assert good.calls == [sorted(other["prefixes"])]


def test_an_object_written_late_is_swept_before_the_erasure_ends(
    db_engine, store, monkeypatch
) -> None:
    victim = populate(db_engine, store)
    late = f"{tenant_key_prefix(victim['id'])}datasets/{uuid.uuid4()}.jsonl"
    real = erasure_module.STEPS[ErasureStep.delete_rows]

    def upload_lands_meanwhile(run: Any, session: Session) -> dict[str, Any]:
        store.put_bytes(late, b"an upload that was in flight")  # after the object step
        return real(run, session)

    monkeypatch.setitem(erasure_module.STEPS, ErasureStep.delete_rows, upload_lands_meanwhile)
    audit = erase_tenant(engine=db_engine, store=store, tenant_id=victim["id"], options=FAST)
    assert store.list_versions(tenant_key_prefix(victim["id"])) == []
    assert audit.objects_erased == 6 + 1


def test_leftovers_name_every_version_marker_and_row(db_engine, store) -> None:
    victim = populate(db_engine, store)
    found = find_tenant_leftovers(db_engine, store, victim["id"])
    assert sum(f.startswith("object ") for f in found) == 8
    assert sum("delete marker" in f for f in found) == 1
    assert f"row in tenants ({victim['id']})" in found
    for table, count in (
        ("api_keys", 1),
        ("datasets", 2),
        ("training_jobs", 2),
        ("prefixes", 3),
        ("job_events", 1),
    ):
        assert f"{count} row(s) in {table}" in found
    with Session(db_engine) as session:
        crud.mark_tenant_deleting(session=session, tenant_id=victim["id"])
    assert "erasure under way (next step: cancel_jobs)" in find_tenant_leftovers(
        db_engine, store, victim["id"]
    )


def test_cancel_step_cancels_queued_and_running_jobs(db_engine, store, monkeypatch) -> None:
    victim = populate(db_engine, store)
    monkeypatch.setitem(
        erasure_module.STEPS, ErasureStep.delete_objects, lambda run, s: 1 / 0
    )  # stop right after the cancellation
    with pytest.raises(ZeroDivisionError):
        erase_tenant(engine=db_engine, store=store, tenant_id=victim["id"], options=FAST)
    with Session(db_engine) as session:
        for job_id in (victim["running"], victim["queued"]):
            job = crud.get_job(session=session, job_id=job_id)
            assert job is not None and job.state == JobState.cancelled and job.lease_owner is None
        # the running job's trainer can no longer renew its lease, nor publish
        assert not crud.heartbeat_job(
            session=session, job_id=victim["running"], owner="trainer-x", lease_seconds=60
        )
        erasure = crud.get_tenant_erasure(session=session, tenant_id=victim["id"])
        assert erasure is not None and erasure.jobs_cancelled == 2
        tenant = crud.get_tenant(session=session, tenant_id=victim["id"])
        assert tenant is not None and tenant.status == TenantStatus.deleting


# --- single prefix versions -------------------------------------------------------------------


def test_deleting_a_prefix_version_falls_back_to_the_highest_remaining(db_engine, store) -> None:
    victim = populate(db_engine, store)
    tenant_id = victim["id"]
    v1, v2, v3 = (uuid.UUID(p) for p in victim["prefixes"])
    with Session(db_engine) as session:
        other = make_tenant(session)
        with pytest.raises(NotFoundError):  # another tenant's version: as if missing
            crud.delete_prefix_version(session=session, tenant_id=other.id, prefix_id=v1)
        deleted, active = crud.delete_prefix_version(
            session=session, tenant_id=tenant_id, prefix_id=v3
        )
        assert deleted.id == v3 and deleted.version == 3 and deleted.object_key
        assert active is not None and active.id == v2 and active.active
        deleted, active = crud.delete_prefix_version(
            session=session, tenant_id=tenant_id, prefix_id=v1
        )
        assert active is not None and active.id == v2  # an inactive one: no change
        deleted, active = crud.delete_prefix_version(
            session=session, tenant_id=tenant_id, prefix_id=v2
        )
        assert active is None and crud.list_prefixes(session=session, tenant_id=tenant_id) == []
        with pytest.raises(NotFoundError):
            crud.delete_prefix_version(session=session, tenant_id=tenant_id, prefix_id=v2)


# --- the migration -----------------------------------------------------------------------------


def test_migration_turns_older_erasure_state_into_resumable_erasures(
    db_backend, create_database, store
) -> None:
    engine = create_db_engine(create_database(db_backend))
    try:
        upgrade_database(engine, "0002_job_validation_dataset")
        marked, half_done, twice = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        now = utcnow()
        stamp = now.replace(tzinfo=None) if db_backend == "sqlite" else now
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO tenants (id, name, status, created_at) VALUES (:i, 'm', 'deleting', :t)"
                ),
                {"i": marked.hex if db_backend == "sqlite" else marked, "t": stamp},
            )
            for tenant_id, completed in ((half_done, None), (twice, stamp), (twice, None)):
                conn.execute(
                    sa.text(
                        "INSERT INTO deletion_audits (id, tenant_id, requested_at, completed_at,"
                        " objects_erased, rows_erased) VALUES (:i, :t, :r, :c, 2, 3)"
                    ),
                    {
                        "i": uuid.uuid4().hex if db_backend == "sqlite" else uuid.uuid4(),
                        "t": tenant_id.hex if db_backend == "sqlite" else tenant_id,
                        "r": stamp,
                        "c": completed,
                    },
                )
        upgrade_database(engine)
        with Session(engine) as session:
            pending = {e.tenant_id: e for e in crud.list_tenant_erasures(session=session)}
            assert set(pending) == {marked, half_done}
            assert pending[half_done].objects_erased == 2
            assert [
                a.completed_at is not None for a in crud.list_deletion_audits(session=session)
            ] == [True]
        for tenant_id in (marked, half_done):
            resume_erasure(engine=engine, store=store, tenant_id=tenant_id, options=FAST)
        with Session(engine) as session:
            assert crud.list_tenant_erasures(session=session) == []
            done = {a.tenant_id: a for a in crud.list_deletion_audits(session=session)}
            assert set(done) == {marked, half_done, twice}
            assert done[half_done].objects_erased == 2 and done[marked].rows_erased == 1
            duplicate = DeletionAudit(tenant_id=twice)
            session.add(duplicate)
            with pytest.raises(sa.exc.IntegrityError):  # one audit record per tenant
                session.commit()
    finally:
        engine.dispose()


def test_a_waiting_runner_takes_over_when_the_other_stops_renewing(db_engine, store) -> None:
    victim = populate(db_engine, store)
    with Session(db_engine) as session:
        crud.mark_tenant_deleting(session=session, tenant_id=victim["id"])
        assert crud.claim_tenant_erasure(
            session=session, tenant_id=victim["id"], owner="stalled", lease_seconds=0.5
        )
    steps: list[str] = []
    audit = resume_erasure(
        engine=db_engine, store=store, tenant_id=victim["id"], options=FAST, on_step=steps.append
    )
    assert steps[0] == erasure_module.WAITING and steps[-1] == "done"
    assert audit.rows_erased == 10
