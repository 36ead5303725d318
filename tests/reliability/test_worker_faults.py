"""Faults of the training workers on a local Ray, real PostgreSQL and S3 over HTTP: a
trainer killed mid-job, a trainer frozen past its lease, the scheduler actor killed. After
each, every job is checked from the database: it reached a final state, ran the expected
attempts, and published exactly one complete prefix version."""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any

import pytest

from common.db.models import JobState
from tests.reliability.checks import assert_nothing_lost_or_duplicated, describe
from tests.workers.conftest import (
    QUICK,
    WorkerEnv,
    finished,
    long_job,
    reports,
    trainer_pid,
    wait_for,
)
from workers.scheduler import scheduler_status

pytestmark = pytest.mark.slow


def training(env: WorkerEnv, job_id: uuid.UUID) -> bool:
    """The job's trainer is past loading its data and model: progress events exist."""
    return bool(env.events(job_id))


def test_a_killed_trainer_is_retried_and_its_job_succeeds_once(fault_env, run_scheduler):
    env = fault_env
    tenant = env.tenant()
    job = env.submit(tenant.id, long_job(160), max_attempts=3)
    handle = run_scheduler()
    wait_for(lambda: training(env, job.id), what="the first attempt's progress")
    pid = wait_for(lambda: trainer_pid(handle, job.id), what="the trainer's pid")
    os.kill(pid, signal.SIGKILL)

    done = wait_for(lambda: finished(env, job.id), timeout=180, what="the job to finish")
    assert done.state == JobState.succeeded and done.attempts == 2, describe(done)
    first, second = wait_for(
        lambda: len(reports(handle, job.id)) == 2 and reports(handle, job.id),
        what="both attempts' reports",
    )
    assert first["outcome"] == "retrying" and "process died" in first["error"], first
    assert second["outcome"] == "succeeded" and second["pid"] != pid, second
    assert_nothing_lost_or_duplicated(env.engine, env.store, [job.id])


def test_a_trainer_frozen_past_its_lease_loses_the_job_and_never_publishes(
    fault_env, run_scheduler
):
    env = fault_env
    tenant = env.tenant()
    job = env.submit(tenant.id, long_job(160), max_attempts=3)
    handle = run_scheduler()
    wait_for(lambda: training(env, job.id), what="the first attempt's progress")
    frozen = wait_for(lambda: trainer_pid(handle, job.id), what="the trainer's pid")
    os.kill(frozen, signal.SIGSTOP)  # alive to Ray, silent to the database
    try:
        # Its lease (6 s) runs out, the scheduler puts the job back and a new trainer claims it.
        wait_for(
            lambda: (j := env.job(job.id)).attempts == 2 and j.state == JobState.running,
            timeout=60,
            what="the job to be reclaimed and claimed again",
        )
        wait_for(
            lambda: (pid := trainer_pid_other_than(handle, job.id, frozen)) and pid,
            what="the second attempt's trainer",
        )
    finally:
        os.kill(frozen, signal.SIGCONT)  # it wakes up holding a job that is no longer its own

    done = wait_for(lambda: finished(env, job.id), timeout=180, what="the job to finish")
    assert done.state == JobState.succeeded and done.attempts == 2, describe(done)
    stale = wait_for(
        lambda: [r for r in reports(handle, job.id) if r["pid"] == frozen],
        timeout=60,
        what="the frozen trainer's report",
    )
    assert [r["outcome"] for r in stale] == ["lease_lost"], stale
    assert_nothing_lost_or_duplicated(env.engine, env.store, [job.id])


def trainer_pid_other_than(handle: Any, job_id: uuid.UUID, pid: int) -> int | None:
    for entry in scheduler_status(handle)["running"]:
        if entry["job_id"] == str(job_id) and entry["pid"] and entry["pid"] != pid:
            return int(entry["pid"])
    return None


def test_a_killed_scheduler_is_restarted_and_resumes_the_queue(fault_env, run_scheduler):
    import ray

    env = fault_env
    tenant = env.tenant()
    running = [env.submit(tenant.id, long_job(200))]
    queued = env.submit(tenant.id, QUICK)  # waits: one running job per tenant
    handle = run_scheduler()
    before = scheduler_status(handle)["incarnation"]
    for job in running:
        wait_for(lambda job=job: training(env, job.id), what=f"progress of job {job.id}")
    assert env.job(queued.id).state == JobState.queued
    ray.kill(handle, no_restart=False)  # the actor's process dies; Ray starts it again

    jobs = [*running, queued]
    for job in jobs:
        wait_for(lambda job=job: finished(env, job.id), timeout=240, what=f"job {job.id}")
    after = scheduler_status(handle)["incarnation"]
    assert after != before, "the scheduler was not restarted (same incarnation)"
    rows = assert_nothing_lost_or_duplicated(env.engine, env.store, [j.id for j in jobs])
    # The trainers died with the scheduler: their attempts were retried once; the queued
    # job ran once, after the restart.
    assert [rows[j.id].attempts for j in running] == [2], [describe(rows[j.id]) for j in running]
    assert rows[queued.id].attempts == 1, describe(rows[queued.id])
