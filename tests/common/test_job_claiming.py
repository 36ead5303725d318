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
from common.db.models import JobPriority, JobState, Prefix, TrainingJobCreate
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
    while (job := crud.claim_next_job(session=session, owner="w", lease_seconds=60)) is not None:
        assert job.state == JobState.running and job.lease_owner == "w" and job.attempts == 1
        assert job.started_at is not None and job.lease_expires_at is not None
        order.append(job.id)
    assert order == [inter_old.id, inter_new.id, batch_old.id, batch_new.id]


def test_heartbeat_extends_only_the_owners_lease(session: Session) -> None:
    make_job(session, make_tenant(session))
    job = crud.claim_next_job(session=session, owner="a", lease_seconds=30, now=T0)
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
    assert crud.claim_next_job(session=session, owner="b", lease_seconds=30, now=at) is None

    crud.cancel_job(session=session, job_id=job.id)  # the owner learns it from its heartbeat
    assert not crud.heartbeat_job(session=session, job_id=job.id, owner="a", lease_seconds=30)


def test_an_expired_lease_is_reclaimed_by_another_worker(session: Session) -> None:
    tenant = make_tenant(session)
    make_job(session, tenant)
    first = crud.claim_next_job(session=session, owner="crashed", lease_seconds=30, now=T0)
    assert first is not None
    later = T0 + timedelta(seconds=31)
    second = crud.claim_next_job(session=session, owner="healthy", lease_seconds=30, now=later)
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
        claimed = crud.claim_next_job(
            session=session, owner=f"w{attempt}", lease_seconds=10, now=at
        )
        assert claimed is not None and claimed.id == job.id and claimed.attempts == attempt
        at += timedelta(seconds=11)
    assert crud.claim_next_job(session=session, owner="w3", lease_seconds=10, now=at) is None
    failed = crud.get_job(session=session, job_id=job.id)
    assert failed is not None and failed.state == JobState.failed
    assert failed.attempts == 2 and failed.lease_owner is None and failed.finished_at == at
    assert "failed after 2 attempt(s)" in (failed.error or "")


def test_reclaim_sweep_runs_on_its_own(session: Session) -> None:
    tenant = make_tenant(session)
    make_job(session, tenant, max_attempts=1)
    make_job(session, tenant, max_attempts=3)
    assert crud.claim_next_job(session=session, owner="a", lease_seconds=5, now=T0)
    assert crud.claim_next_job(session=session, owner="b", lease_seconds=5, now=T0)
    assert crud.reclaim_expired_jobs(session=session, now=T0 + timedelta(seconds=1)) == 0
    assert crud.reclaim_expired_jobs(session=session, now=T0 + timedelta(seconds=6)) == 2
    states = sorted(j.state for j in crud.list_jobs(session=session, tenant_id=tenant.id))
    assert states == [JobState.failed, JobState.queued]


def test_finish_job_with_and_without_retry(session: Session) -> None:
    tenant = make_tenant(session)
    job = make_job(session, tenant, max_attempts=2)
    assert crud.claim_next_job(session=session, owner="w", lease_seconds=60)
    assert crud.finish_job(
        session=session, job_id=job.id, owner="w", state=JobState.failed, error="OOM", retry=True
    )
    session.refresh(job)
    assert job.state == JobState.queued and job.error == "OOM" and job.finished_at is None
    assert crud.claim_next_job(session=session, owner="w2", lease_seconds=60)
    assert crud.finish_job(
        session=session, job_id=job.id, owner="w2", state=JobState.failed, error="OOM", retry=True
    )
    session.refresh(job)
    assert job.state == JobState.failed and job.finished_at is not None  # attempts used up
    with pytest.raises(ValueError):
        crud.finish_job(session=session, job_id=job.id, owner="w2", state=JobState.running)


def test_claim_with_nothing_queued_returns_none(session: Session) -> None:
    assert crud.claim_next_job(session=session, owner="w", lease_seconds=60) is None
    with pytest.raises(ValueError):
        crud.claim_next_job(session=session, owner="", lease_seconds=60)


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
            job := crud.claim_next_job(session=session, owner=f"w{worker}", lease_seconds=60)
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
        lambda s, i: crud.claim_next_job(session=s, owner=f"w{i}", lease_seconds=60),
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
        crud._deactivate_all(session, tenant.id)
        session.commit()

    def insert_active(session: Session, i: int) -> Any:
        session.add(
            Prefix.model_validate(
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
