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
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from common.db import crud
from common.db.errors import LeaseLostError
from common.db.models import JobPriority, JobState, PrefixVersion, TrainingJobCreate
from tests.fixtures.factories import (
    make_dataset,
    make_job,
    make_prefix_create,
    make_published_prefix,
    make_tenant,
)

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


def test_list_all_jobs_filters_by_tenant_and_state(session: Session) -> None:
    a, b = make_tenant(session), make_tenant(session)
    a_job = make_job(session, a, created_at=T0)
    b_job = make_job(session, b, created_at=T0 + timedelta(minutes=1))
    assert [j.id for j in crud.list_all_jobs(session=session)] == [b_job.id, a_job.id]
    assert [j.id for j in crud.list_all_jobs(session=session, tenant_id=a.id)] == [a_job.id]
    crud.cancel_job(session=session, job_id=a_job.id)
    cancelled = crud.list_all_jobs(session=session, state=JobState.cancelled)
    assert [j.id for j in cancelled] == [a_job.id]
