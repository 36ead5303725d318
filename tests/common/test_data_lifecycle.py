"""Data lifecycle (issue 15) on real databases (SQLite and PostgreSQL): prefix version
numbers that only go up, nightly jobs marked by a column (the ``nightly-`` key space
reserved), and activation by compare-and-swap against the version a job started from."""

from __future__ import annotations

import uuid
from datetime import date

import pytest
import sqlalchemy as sa
from sqlmodel import Session, col, select

from common.db import crud
from common.db.models import JobEvent, JobPriority, JobState, NightlyRun, TrainingJob
from common.errors import InvalidInputError
from tests.fixtures.factories import make_dataset, make_job, make_prefix_create, make_tenant
from workers.nightly import run_nightly

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
        session=session, job_id=job.id, owner=owner, prefix_in=make_prefix_create(tenant),
        expected_active_id=started_from.id,
    )  # fmt: skip
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
