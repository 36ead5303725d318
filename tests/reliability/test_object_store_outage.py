"""The S3 endpoint goes down while trainers train and then publish (a TCP proxy in front of
the moto server is switched off; the trainers reach S3 only through it). A job with
attempts left is retried once the endpoint is back and publishes exactly once; a job
without is failed with a message that names the store. While the store is down, and
afterwards, no prefix version is visible whose blob is not completely written."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlmodel import Session, col, select

from common.db.models import JobState, PrefixVersion
from tests.reliability.checks import assert_nothing_lost_or_duplicated, describe
from tests.workers.conftest import WorkerEnv, long_job, wait_for

pytestmark = pytest.mark.slow

UNREACHABLE = "BlobStoreUnavailableError"


def prefix_rows(env: WorkerEnv, tenant_ids: list[uuid.UUID]) -> list[Any]:
    with Session(env.engine) as session:
        return list(
            session.exec(select(PrefixVersion).where(col(PrefixVersion.tenant_id).in_(tenant_ids)))
        )


def test_s3_down_while_trainers_publish(fault_env, run_scheduler, s3_proxy):
    env = fault_env
    retried, failing = env.tenant(), env.tenant()
    retried_job = env.submit(retried.id, long_job(400), max_attempts=4)
    failing_job = env.submit(failing.id, long_job(400), max_attempts=1)
    run_scheduler()
    for job in (retried_job, failing_job):  # both have read their datasets from S3
        # Generous: two trainer processes start on a loaded 2-core machine first.
        wait_for(lambda job=job: env.events(job.id), timeout=300, what=f"progress of job {job.id}")
    s3_proxy.down()
    for job in (retried_job, failing_job):  # else the fault came too late to test anything
        row, events = env.job(job.id), env.events(job.id)
        assert row.state == JobState.running and events[-1].step < events[-1].total_steps, (
            f"job {job.id} finished training before S3 went down; make it longer"
        )
    first_errors: dict[uuid.UUID, str] = {}

    def both_failed_to_publish() -> bool:
        # Nothing may become visible while the blob cannot be written.
        visible = prefix_rows(env, [retried.id, failing.id])
        assert not visible, f"a prefix version appeared while S3 was down: {visible}"
        for job in (retried_job, failing_job):
            error = env.job(job.id).error
            if error and UNREACHABLE in error:
                first_errors.setdefault(job.id, error)
        return len(first_errors) == 2

    try:
        wait_for(both_failed_to_publish, timeout=120, every=0.1, what="both publishes to fail")
    finally:
        s3_proxy.up()

    for job in (retried_job, failing_job):
        # The failure was the publish (the prefix blob's write), and says so.
        assert "writing" in first_errors[job.id] and "/prefixes/" in first_errors[job.id]
        assert "cannot reach the S3 endpoint" in first_errors[job.id], first_errors[job.id]

    done = wait_for(
        lambda: (
            (j := env.job(retried_job.id)).state != JobState.queued
            and j.state != JobState.running
            and j
        ),
        timeout=180,
        what="the retried job",
    )
    assert done.state == JobState.succeeded and 2 <= done.attempts <= 4, describe(done)
    assert_nothing_lost_or_duplicated(env.engine, env.store, [retried_job.id])

    failed = env.job(failing_job.id)
    assert failed.state == JobState.failed and failed.attempts == 1, describe(failed)
    assert UNREACHABLE in (failed.error or "") and "S3 endpoint" in (failed.error or "")
    assert_nothing_lost_or_duplicated(
        env.engine, env.store, [failing_job.id], expect=JobState.failed
    )
