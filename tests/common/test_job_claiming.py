"""The durable job queue: claim order, leases, heartbeats, reclaiming expired leases,
attempts, and what parallel claimers and activators do on real PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from common.db import crud
from common.db.engine import create_db_engine, upgrade_database
from common.db.errors import LeaseLostError
from common.db.models import (
    NEVER_STARTED,
    JobPriority,
    JobState,
    PrefixVersion,
    TrainingJobCreate,
)
from common.db.types import UTCDateTime
from tests.fixtures.factories import (
    make_dataset,
    make_job,
    make_prefix_create,
    make_published_prefix,
    make_tenant,
)
from tests.workers.conftest import wait_for

T = TypeVar("T")
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def in_parallel(engine: Engine, n: int, work: Callable[[Session, int], T]) -> list[T]:
    """Run ``work`` in ``n`` threads, each with its own session, released together."""
    barrier = threading.Barrier(n)

    def run(i: int) -> T:
        with Session(engine) as session:
            barrier.wait(timeout=30)
            return work(session, i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(run, range(n)))


def test_claims_interactive_before_batch_then_oldest_first(session: Session) -> None:
    tenant = make_tenant(session)
    batch_old = make_job(session, tenant, priority=JobPriority.batch, created_at=T0)
    inter_new = make_job(session, tenant, created_at=T0 + timedelta(minutes=2))
    inter_old = make_job(session, tenant, created_at=T0 + timedelta(minutes=1))
    batch_new = make_job(
        session, tenant, priority=JobPriority.batch, created_at=T0 + timedelta(minutes=3)
    )
    order = []
    while (job := crud.claim_oldest_job(session=session, owner="w", lease_seconds=60)) is not None:
        assert job.state == JobState.running and job.lease_owner == "w" and job.attempts == 1
        assert job.started_at is not None and job.lease_expires_at is not None
        order.append(job.id)
    assert order == [inter_old.id, inter_new.id, batch_old.id, batch_new.id]


def test_heartbeat_extends_only_the_owners_lease(session: Session) -> None:
    make_job(session, make_tenant(session))
    job = crud.claim_oldest_job(session=session, owner="a", lease_seconds=30, now=T0)
    assert job is not None and job.lease_expires_at == T0 + timedelta(seconds=30)
    later = T0 + timedelta(seconds=20)
    assert crud.heartbeat_job(
        session=session, job_id=job.id, owner="a", lease_seconds=30, now=later
    )
    assert not crud.heartbeat_job(session=session, job_id=job.id, owner="b", lease_seconds=30)
    session.refresh(job)
    assert job.lease_expires_at == later + timedelta(seconds=30) and job.heartbeat_at == later
    # Not reclaimable before the extended lease runs out.
    at = T0 + timedelta(seconds=45)
    assert crud.claim_oldest_job(session=session, owner="b", lease_seconds=30, now=at) is None

    crud.cancel_job(session=session, job_id=job.id)  # the owner learns it from its heartbeat
    assert not crud.heartbeat_job(session=session, job_id=job.id, owner="a", lease_seconds=30)


def test_an_expired_lease_is_reclaimed_by_another_worker(session: Session) -> None:
    tenant = make_tenant(session)
    make_job(session, tenant)
    first = crud.claim_oldest_job(session=session, owner="crashed", lease_seconds=30, now=T0)
    assert first is not None
    later = T0 + timedelta(seconds=31)
    second = crud.claim_oldest_job(session=session, owner="healthy", lease_seconds=30, now=later)
    assert second is not None and second.id == first.id
    assert second.lease_owner == "healthy" and second.attempts == 2
    assert second.started_at == T0  # when the job first started
    assert "lost its lease" in (second.error or "")
    # The old owner can neither keep the lease nor publish nor finish.
    assert not crud.heartbeat_job(
        session=session, job_id=first.id, owner="crashed", lease_seconds=30
    )
    with pytest.raises(LeaseLostError):
        crud.publish_prefix(
            session=session,
            job_id=first.id,
            owner="crashed",
            prefix_in=make_prefix_create(tenant),
            now=later,
        )
    assert not crud.finish_job(
        session=session, job_id=first.id, owner="crashed", state=JobState.failed
    )
    prefix = crud.publish_prefix(
        session=session,
        job_id=first.id,
        owner="healthy",
        prefix_in=make_prefix_create(tenant),
        now=later,
    )
    assert prefix.version == 1 and prefix.active


def test_attempts_beyond_max_attempts_fail_the_job_with_a_reason(session: Session) -> None:
    job = make_job(session, make_tenant(session), max_attempts=2)
    at = T0
    for attempt in (1, 2):
        claimed = crud.claim_oldest_job(
            session=session, owner=f"w{attempt}", lease_seconds=10, now=at
        )
        assert claimed is not None and claimed.id == job.id and claimed.attempts == attempt
        at += timedelta(seconds=11)
    assert crud.claim_oldest_job(session=session, owner="w3", lease_seconds=10, now=at) is None
    failed = crud.get_job(session=session, job_id=job.id)
    assert failed is not None and failed.state == JobState.failed
    assert failed.attempts == 2 and failed.lease_owner is None and failed.finished_at == at
    assert "failed after 2 attempt(s)" in (failed.error or "")


def test_reclaim_sweep_runs_on_its_own(session: Session) -> None:
    tenant = make_tenant(session)
    make_job(session, tenant, max_attempts=1)
    make_job(session, tenant, max_attempts=3)
    assert crud.claim_oldest_job(session=session, owner="a", lease_seconds=5, now=T0)
    assert crud.claim_oldest_job(session=session, owner="b", lease_seconds=5, now=T0)
    assert crud.reclaim_expired_jobs(session=session, now=T0 + timedelta(seconds=1)) == 0
    assert crud.reclaim_expired_jobs(session=session, now=T0 + timedelta(seconds=6)) == 2
    states = sorted(j.state for j in crud.list_jobs(session=session, tenant_id=tenant.id))
    assert states == [JobState.failed, JobState.queued]


def test_finish_job_with_and_without_retry(session: Session) -> None:
    tenant = make_tenant(session)
    job = make_job(session, tenant, max_attempts=2)
    assert crud.claim_oldest_job(session=session, owner="w", lease_seconds=60)
    assert crud.finish_job(
        session=session, job_id=job.id, owner="w", state=JobState.failed, error="OOM", retry=True
    )
    session.refresh(job)
    assert job.state == JobState.queued and job.error == "OOM" and job.finished_at is None
    assert crud.claim_oldest_job(session=session, owner="w2", lease_seconds=60)
    assert crud.finish_job(
        session=session, job_id=job.id, owner="w2", state=JobState.failed, error="OOM", retry=True
    )
    session.refresh(job)
    assert job.state == JobState.failed and job.finished_at is not None  # attempts used up
    with pytest.raises(ValueError):
        crud.finish_job(session=session, job_id=job.id, owner="w2", state=JobState.running)


def test_claim_with_nothing_queued_returns_none(session: Session) -> None:
    assert crud.claim_oldest_job(session=session, owner="w", lease_seconds=60) is None
    with pytest.raises(ValueError):
        crud.claim_oldest_job(session=session, owner="", lease_seconds=60)


# --- parallel claimers and activators -------------------------------------------------------


def test_parallel_claimers_never_take_the_same_job(db_engine: Engine) -> None:
    engine = db_engine
    with Session(engine) as session:
        tenants = [make_tenant(session) for _ in range(3)]
        jobs = {
            make_job(session, tenants[i % 3], priority=list(JobPriority)[i % 2]).id
            for i in range(24)
        }

    def claim_all(session: Session, worker: int) -> list[uuid.UUID]:
        got = []
        while (
            job := crud.claim_oldest_job(session=session, owner=f"w{worker}", lease_seconds=60)
        ) is not None:
            got.append(job.id)
        return got

    claimed = in_parallel(engine, 6, claim_all)
    flat = [job_id for got in claimed for job_id in got]
    assert len(flat) == len(set(flat)) == len(jobs)
    assert set(flat) == jobs
    if (
        engine.dialect.name == "postgresql"
    ):  # SKIP LOCKED: nobody waits for another, so work spreads out
        assert sum(1 for got in claimed if got) >= 2


def test_two_claimers_with_one_job_one_gets_it(pg_engine: Engine) -> None:
    with Session(pg_engine) as session:
        job = make_job(session, make_tenant(session))
    results = in_parallel(
        pg_engine,
        2,
        lambda s, i: crud.claim_oldest_job(session=s, owner=f"w{i}", lease_seconds=60),
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and winners[0].id == job.id


def test_parallel_resubmissions_make_one_job(pg_engine: Engine) -> None:
    with Session(pg_engine) as session:
        tenant = make_tenant(session)
        tenant_id, dataset_id = tenant.id, make_dataset(session, tenant).id
    job_in = TrainingJobCreate(dataset_ids=[dataset_id], idempotency_key="once")
    results = in_parallel(
        pg_engine, 4, lambda s, i: crud.enqueue_job(session=s, tenant_id=tenant_id, job_in=job_in)
    )
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1


def test_one_active_prefix_holds_under_concurrent_activation(pg_engine: Engine) -> None:
    with Session(pg_engine) as session:
        tenant = make_tenant(session)
        for _ in range(4):
            make_published_prefix(session, tenant, owner=f"w{uuid.uuid4()}")
        session.refresh(tenant)

    def activate(session: Session, i: int) -> int:
        for round_ in range(5):
            crud.activate_prefix(session=session, tenant_id=tenant.id, version=1 + (i + round_) % 4)
        return i

    in_parallel(pg_engine, 4, activate)
    with Session(pg_engine) as session:
        assert sum(p.active for p in crud.list_prefixes(session=session, tenant_id=tenant.id)) == 1

    # Two writers that bypass activate_prefix each add an active version to a tenant with
    # none active: the database itself refuses the second active row.
    with Session(pg_engine) as session:
        crud.deactivate_all(session, tenant.id)
        session.commit()

    def insert_active(session: Session, i: int) -> Any:
        session.add(
            PrefixVersion.model_validate(
                make_prefix_create(tenant),
                update={"tenant_id": tenant.id, "version": 10 + i, "active": True},
            )
        )
        try:
            session.commit()
        except IntegrityError as e:
            session.rollback()
            return e
        return None

    outcomes = in_parallel(pg_engine, 2, insert_active)
    assert sum(isinstance(o, IntegrityError) for o in outcomes) == 1
    with Session(pg_engine) as session:
        assert sum(p.active for p in crud.list_prefixes(session=session, tenant_id=tenant.id)) == 1


# --- the scheduler's fair claim (claim_next_job) --------------------------------------


def fair_claim(session: Session, owner: str, at: datetime) -> Any:
    return crud.claim_next_job(session=session, owner=owner, lease_seconds=600, now=at)


def test_fair_claim_runs_at_most_one_job_per_tenant(session: Session) -> None:
    a, b = make_tenant(session), make_tenant(session)
    for minute in range(3):
        make_job(session, a, created_at=T0 + timedelta(minutes=minute))
    make_job(session, b, created_at=T0 + timedelta(minutes=10))
    first = fair_claim(session, "w1", T0 + timedelta(hours=1))
    second = fair_claim(session, "w2", T0 + timedelta(hours=1))
    assert first is not None and first.tenant_id == a.id
    assert second is not None and second.tenant_id == b.id  # a is busy, so b's newer job
    assert fair_claim(session, "w3", T0 + timedelta(hours=1)) is None  # both tenants busy
    assert crud.finish_job(session=session, job_id=first.id, owner="w1", state=JobState.failed)
    third = fair_claim(session, "w3", T0 + timedelta(hours=2))
    assert third is not None and third.tenant_id == a.id


def test_fair_claim_round_robins_across_tenants(session: Session) -> None:
    """A tenant with ten queued jobs and one with a single, later job: the single job runs
    right after the first job of the busy tenant, not after all ten."""
    a, b, c = make_tenant(session), make_tenant(session), make_tenant(session)
    a_jobs = [make_job(session, a, created_at=T0 + timedelta(seconds=i)) for i in range(10)]
    b_job = make_job(session, b, created_at=T0 + timedelta(minutes=5))
    c_jobs = [make_job(session, c, created_at=T0 + timedelta(minutes=6 + i)) for i in range(2)]
    order: list[uuid.UUID] = []
    at = T0 + timedelta(hours=1)
    while (job := fair_claim(session, "w", at)) is not None:  # one slot: claim, finish, repeat
        order.append(job.id)
        assert crud.finish_job(session=session, job_id=job.id, owner="w", state=JobState.failed)
        at += timedelta(seconds=1)
    expected = [a_jobs[0].id, b_job.id, c_jobs[0].id, a_jobs[1].id, c_jobs[1].id]
    expected += [j.id for j in a_jobs[2:]]
    assert order == expected


def test_fair_claim_puts_interactive_before_batch_of_any_tenant(session: Session) -> None:
    a, b = make_tenant(session), make_tenant(session)
    old = make_job(session, a, created_at=T0)  # a has started a job before
    assert fair_claim(session, "w", T0) is not None
    crud.finish_job(session=session, job_id=old.id, owner="w", state=JobState.failed)
    batch = make_job(session, b, priority=JobPriority.batch, created_at=T0)
    interactive = make_job(session, a, created_at=T0 + timedelta(minutes=1))
    got = fair_claim(session, "w", T0 + timedelta(minutes=2))
    assert got is not None and got.id == interactive.id
    got = fair_claim(session, "w", T0 + timedelta(minutes=2))
    assert got is not None and got.id == batch.id


def test_fair_claim_skips_tenants_being_deleted(session: Session) -> None:
    gone, kept = make_tenant(session), make_tenant(session)
    make_job(session, gone, created_at=T0)
    kept_job = make_job(session, kept, created_at=T0 + timedelta(minutes=1))
    crud.mark_tenant_deleting(session=session, tenant_id=gone.id)
    got = fair_claim(session, "w", T0 + timedelta(hours=1))
    assert got is not None and got.id == kept_job.id
    assert fair_claim(session, "w2", T0 + timedelta(hours=1)) is None


def test_fair_claim_reclaims_expired_leases_and_counts_attempts(session: Session) -> None:
    job = make_job(session, make_tenant(session), max_attempts=2)
    first = crud.claim_next_job(session=session, owner="dead", lease_seconds=10, now=T0)
    assert first is not None and first.attempts == 1
    # While the lease holds the tenant is busy; once it expires the job is claimable again.
    assert fair_claim(session, "w", T0 + timedelta(seconds=5)) is None
    second = fair_claim(session, "w", T0 + timedelta(seconds=11))
    assert second is not None and second.id == job.id and second.attempts == 2


def test_parallel_fair_claimers_keep_one_running_job_per_tenant(db_engine: Engine) -> None:
    with Session(db_engine) as session:
        tenants = [make_tenant(session) for _ in range(4)]
        tenant_ids = [t.id for t in tenants]
        for i in range(16):
            make_job(session, tenants[i % 4])

    def claim_all(session: Session, worker: int) -> list[uuid.UUID]:
        got = []
        while (
            job := crud.claim_next_job(session=session, owner=f"w{worker}", lease_seconds=60)
        ) is not None:
            got.append(job.tenant_id)
        return got

    claimed = [t for got in in_parallel(db_engine, 6, claim_all) for t in got]
    assert sorted(claimed) == sorted(tenant_ids)  # one job per tenant, no more


def test_release_job_requeues_without_counting_the_attempt(session: Session) -> None:
    job = make_job(session, make_tenant(session), max_attempts=1)
    assert fair_claim(session, "w", T0) is not None
    assert not crud.release_job(session=session, job_id=job.id, owner="other", reason="x")
    assert crud.release_job(session=session, job_id=job.id, owner="w", reason="shutdown")
    session.refresh(job)
    assert job.state == JobState.queued and job.attempts == 0 and job.lease_owner is None
    assert job.error == "shutdown"
    again = fair_claim(session, "w2", T0 + timedelta(seconds=1))
    assert again is not None and again.attempts == 1  # max_attempts=1 still allows this one


def _give_back(session: Session, job: Any, how: str, at: datetime) -> Any:
    """Start ``job`` at ``at`` and put it back in the queue ``how``; returns when the next
    claim may run."""
    lease = 10 if how == "expired lease" else 600
    claimed = crud.claim_next_job(session=session, owner="w1", lease_seconds=lease, now=at)
    assert claimed is not None and claimed.id == job.id
    if how == "release":
        assert crud.release_job(session=session, job_id=job.id, owner="w1", reason="shutdown")
    elif how == "retry":
        assert crud.finish_job(
            session=session, job_id=job.id, owner="w1", state=JobState.failed, retry=True
        )
    return at + timedelta(seconds=lease + 1)  # an expired lease is reclaimed by that claim


@pytest.mark.parametrize("how", ["release", "retry", "expired lease"])
def test_a_job_given_back_to_the_queue_waits_behind_tenants_that_started_less_recently(
    session: Session, how: str
) -> None:
    """Its tenant just started it: every tenant whose last start is older goes first (the
    round-robin key stored on the job is renewed when the job is queued again)."""
    a, b = make_tenant(session), make_tenant(session)
    b_first = make_job(session, b, created_at=T0)
    started = fair_claim(session, "w0", T0)  # b starts at T0
    assert started is not None and started.id == b_first.id
    assert crud.finish_job(session=session, job_id=b_first.id, owner="w0", state=JobState.failed)
    a_job = make_job(session, a, created_at=T0 + timedelta(minutes=1))  # a never started
    b_second = make_job(session, b, created_at=T0 + timedelta(minutes=2))
    later = _give_back(session, a_job, how, T0 + timedelta(hours=1))  # a starts, then back

    following = fair_claim(session, "w2", later)
    assert following is not None and following.id == b_second.id  # b last started at T0
    last = fair_claim(session, "w3", later)
    assert last is not None and last.id == a_job.id


def test_a_start_by_the_fifo_claim_also_counts_for_the_fair_claim(session: Session) -> None:
    a, b = make_tenant(session), make_tenant(session)
    a_jobs = [make_job(session, a, created_at=T0 + timedelta(seconds=i)) for i in range(2)]
    b_job = make_job(session, b, created_at=T0 + timedelta(minutes=1))
    first = crud.claim_oldest_job(session=session, owner="w", lease_seconds=60, now=T0)
    assert first is not None and first.id == a_jobs[0].id
    assert crud.finish_job(session=session, job_id=first.id, owner="w", state=JobState.failed)
    following = fair_claim(session, "w2", T0 + timedelta(minutes=2))
    assert following is not None and following.id == b_job.id  # b never started; a did


def test_the_migration_stores_each_queued_jobs_round_robin_key(
    db_backend: str, create_database: Callable[[str], str]
) -> None:
    """Jobs queued before migration 0007 get their tenant's last start (none: 1970), so
    the fair claim orders them as it did when it computed the key per claim."""
    engine = create_db_engine(create_database(db_backend))
    try:
        upgrade_database(engine, "0006_base_prefixes")
        tenants = sa.table(
            "tenants",
            sa.column("id", sa.Uuid()),
            sa.column("name", sa.String()),
            sa.column("status", sa.String()),
            sa.column("created_at", UTCDateTime()),
            sa.column("last_prefix_version", sa.Integer()),
        )
        jobs = sa.table(
            "training_jobs",
            *(sa.column(c, sa.Uuid()) for c in ("id", "tenant_id")),
            *(sa.column(c, sa.JSON()) for c in ("dataset_ids", "hyperparameters")),
            *(sa.column(c, sa.String()) for c in ("state", "priority")),
            *(sa.column(c, sa.Integer()) for c in ("attempts", "max_attempts")),
            *(sa.column(c, UTCDateTime()) for c in ("created_at", "updated_at", "started_at")),
        )
        trained, fresh = uuid.uuid4(), uuid.uuid4()
        started = T0 - timedelta(days=1)
        queued = {trained: uuid.uuid4(), fresh: uuid.uuid4(), None: uuid.uuid4()}
        with engine.begin() as conn:
            for tenant_id in (trained, fresh):
                conn.execute(
                    sa.insert(tenants).values(
                        id=tenant_id,
                        name=f"t-{tenant_id.hex[:8]}",
                        status="active",
                        created_at=T0,
                        last_prefix_version=0,
                    )
                )
            rows = [(uuid.uuid4(), trained, "succeeded", started)]  # trained's last start
            rows += [(job, tenant, "queued", None) for tenant, job in queued.items()]
            for job_id, tenant_id, state, started_at in rows:
                conn.execute(
                    sa.insert(jobs).values(
                        id=job_id,
                        tenant_id=tenant_id,
                        dataset_ids=[],
                        hyperparameters={},
                        state=state,
                        priority="batch",
                        attempts=0,
                        max_attempts=3,
                        created_at=T0,
                        updated_at=T0,
                        started_at=started_at,
                    )
                )
        upgrade_database(engine)
        with Session(engine) as session:
            keys = {
                job.tenant_id: job.tenant_last_started_at
                for job in crud.list_all_jobs(session=session, state=JobState.queued)
            }
            assert keys == {trained: started, fresh: NEVER_STARTED, None: NEVER_STARTED}
            order = [fair_claim(session, f"w{i}", T0) for i in range(3)]
            # Never started first (the operator job, then the fresh tenant's: by id on a
            # tie of created_at), the tenant that started a job last.
            assert order[-1] is not None and order[-1].id == queued[trained]
    finally:
        engine.dispose()


def test_list_all_jobs_filters_by_tenant_and_state(session: Session) -> None:
    a, b = make_tenant(session), make_tenant(session)
    a_job = make_job(session, a, created_at=T0)
    b_job = make_job(session, b, created_at=T0 + timedelta(minutes=1))
    assert [j.id for j in crud.list_all_jobs(session=session)] == [b_job.id, a_job.id]
    assert [j.id for j in crud.list_all_jobs(session=session, tenant_id=a.id)] == [a_job.id]
    crud.cancel_job(session=session, job_id=a_job.id)
    cancelled = crud.list_all_jobs(session=session, state=JobState.cancelled)
    assert [j.id for j in cancelled] == [a_job.id]


def test_a_trainer_frozen_inside_a_transaction_loses_its_job_once_its_lease_ends(
    pg_engine: Engine,
) -> None:
    """A trainer frozen (SIGSTOP, a paused VM) between two statements of a transaction keeps
    its job row locked; the sweep skips locked rows, so without the server ending that
    session the job would never go back to the queue. The trainer's engine asks PostgreSQL
    to end a session idle in a transaction for as long as a lease."""
    from common.db.models import JobEvent

    with Session(pg_engine) as session:
        job = make_job(session, make_tenant(session))
        assert crud.claim_oldest_job(session=session, owner="frozen", lease_seconds=1)
    trainer_engine = create_db_engine(pg_engine.url, idle_in_transaction_timeout_s=1.0)
    frozen = Session(trainer_engine)
    try:
        # Mid-transaction: a progress event holds a lock on the job row; no commit comes.
        frozen.add(JobEvent(job_id=job.id, step=1, total_steps=10, loss=1.0, tokens_per_second=1))
        frozen.flush()

        def reclaim() -> int:
            with Session(pg_engine) as session:
                return crud.reclaim_expired_jobs(session=session)

        reclaimed = wait_for(
            reclaim, timeout=20, every=0.1, what="the job locked by the frozen trainer's session"
        )
        assert reclaimed == 1
        with Session(pg_engine) as session:
            back = crud.get_job(session=session, job_id=job.id)
            assert back is not None and back.state == JobState.queued
    finally:
        with pytest.raises(sa.exc.DBAPIError):  # the server ended the frozen session
            frozen.commit()
        frozen.close()
        trainer_engine.dispose()
