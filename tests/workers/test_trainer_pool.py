"""The warm trainer pool (workers/trainer_pool.py) on the session's local Ray, real
PostgreSQL and S3 over HTTP, with a tiny model: one job per process and nothing of a job
left for the next, a warm process that dies while it waits, a process that fails to start,
the scheduler without warm processes, and force-stopping a frozen trainer."""

from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any

import pytest
import ray

from common.db import crud
from common.db.models import JobState
from common.shared_weights import share_model
from tests.workers.conftest import (
    QUICK,
    WorkerEnv,
    finished,
    long_job,
    process_gone,
    reports,
    trainer_pid,
    wait_for,
)
from tests.workers.isolation_probe import canary, probing_job
from workers.scheduler import scheduler_status, stop_scheduler
from workers.trainer_pool import PooledProcess, TrainerPool

pytestmark = pytest.mark.slow

START = 300.0  # seconds a trainer process may take to start on a busy 2-core machine


@pytest.fixture
def shared(ray_session: None, tiny_llama: Any) -> Any:
    return share_model(tiny_llama)


def ready_process(pool: TrainerPool) -> PooledProcess:
    def ready() -> PooledProcess | None:
        pool.maintain()
        return pool.take()

    process = wait_for(ready, timeout=START, every=0.2, what="a warm trainer process")
    assert isinstance(process, PooledProcess)
    return process


def run_in_pool(env: WorkerEnv, pool: TrainerPool, job_id: uuid.UUID) -> tuple[Any, Any]:
    """Claim the job for a ready process of the pool and run it there, refilling the pool
    meanwhile; the process is retired afterwards, as the scheduler does."""
    process = ready_process(pool)
    owner = f"test-pool-{uuid.uuid4().hex[:8]}"
    with env.session() as session:
        claimed = crud.claim_next_job(session=session, owner=owner, lease_seconds=60)
    assert claimed is not None and claimed.id == job_id
    ref = process.run(str(job_id), owner, None)
    pool.maintain()  # the replacement starts while this job runs
    result = ray.get(ref, timeout=START)
    result["finished"] = time.monotonic()
    pool.retire(process)
    return process, result


def test_a_second_job_in_the_pool_finds_nothing_of_the_first(worker_env, shared) -> None:
    env = worker_env
    first, second = env.tenant(), env.tenant()
    tokens = {t.id: canary(t.id.hex) for t in (first, second)}
    jobs = [
        env.submit(
            t.id,
            QUICK,
            data=[{"input": f"alpha {tokens[t.id]} {i}", "output": "red green"} for i in range(20)],
        )
        for t in (first, second)
    ]
    pool = TrainerPool(
        env.settings.model_copy(update={"trainer_warm_processes": 1}), shared, entry=probing_job
    )
    try:
        first_process, first_run = run_in_pool(env, pool, jobs[0].id)
        second_process, second_run = run_in_pool(env, pool, jobs[1].id)
    finally:
        pool.shutdown()

    for run in (first_run, second_run):
        assert run["report"]["outcome"] == "succeeded", run["report"]
        assert run["report"]["warm"] is True  # prepared before its job was claimed
    # The first job's process saw its own data once it had read it (the probe works) ...
    assert first_run["before"] == {"module_state": [], "gc": []}
    assert tokens[first.id] in first_run["after"]["module_state"]
    assert tokens[first.id] in first_run["after"]["gc"]
    # ... and the second job ran in another process, started while the first job ran, in
    # which none of the first job's data can be found, before or after its own job.
    assert second_run["pid"] != first_run["pid"] == first_process.pid
    assert second_process.created < first_run["finished"]
    assert second_run["before"] == {"module_state": [], "gc": []}
    for where in ("module_state", "gc"):
        assert second_run["after"][where] == [tokens[second.id]]
    wait_for(lambda: process_gone(first_run["pid"]), timeout=60, what="the first process to end")
    wait_for(lambda: process_gone(second_run["pid"]), timeout=60, what="the second to end")


def test_a_process_that_fails_to_start_is_reported_and_replaced(worker_env, shared) -> None:
    settings = worker_env.settings.model_copy(
        update={"trainer_warm_processes": 1, "blob_url": "ftp://nowhere/prefixd"}
    )
    pool = TrainerPool(settings, shared)
    try:
        pool.maintain()

        def failed() -> bool:
            pool.maintain()
            return pool.counts["start_failed"] >= 1

        wait_for(failed, timeout=START, every=0.2, what="the failed start")
        assert not pool.has_ready() and not pool.failing  # one failure: no fallback yet
        assert "a trainer process failed to start" in (pool.last_error or "")
        assert "unsupported PREFIXD_BLOB_URL scheme" in (pool.last_error or "")
        # After the backoff (1 s) another process is started in its place.
        wait_for(
            lambda: (pool.maintain(), pool.counts["started"] >= 2)[1],
            timeout=30,
            what="the replacement's start",
        )
    finally:
        pool.shutdown()


def test_a_warm_process_that_dies_while_waiting_is_replaced(worker_env, run_scheduler) -> None:
    env = worker_env
    handle = run_scheduler(
        env.settings.model_copy(update={"trainer_slots": 1, "trainer_warm_processes": 1})
    )

    def ready_pids() -> list[int]:
        return [p["pid"] for p in scheduler_status(handle)["trainer_pool"]["ready"]]

    (waiting,) = wait_for(ready_pids, timeout=START, what="a warm trainer process")
    os.kill(waiting, signal.SIGKILL)
    pool = wait_for(
        lambda: (s := scheduler_status(handle)["trainer_pool"])["died_idle"] == 1 and s,
        what="the dead process to be noticed",
    )
    assert f"trainer process {waiting} died while waiting for a job" in pool["last_error"]
    (replacement,) = wait_for(
        lambda: [p for p in ready_pids() if p != waiting], timeout=START, what="its replacement"
    )

    job = env.submit(env.tenant().id, QUICK)
    done = wait_for(lambda: finished(env, job.id), timeout=120, what="the job")
    assert done.state == JobState.succeeded and done.attempts == 1, done.error  # no attempt lost
    (report,) = wait_for(lambda: reports(handle, job.id), what="the job's report")
    assert report["pid"] == replacement and report["warm"] is True
    assert "prepare" not in report["phases"]  # the process was prepared before the claim
    wait_for(lambda: process_gone(replacement), timeout=60, what="the process to end after it")


def test_without_warm_processes_each_job_starts_a_process_of_its_own(
    worker_env, run_scheduler
) -> None:
    env = worker_env
    jobs = [env.submit(env.tenant().id, QUICK) for _ in range(2)]
    handle = run_scheduler(
        env.settings.model_copy(update={"trainer_slots": 1, "trainer_warm_processes": 0})
    )
    for job in jobs:
        done = wait_for(lambda job=job: finished(env, job.id), timeout=START, what="a job")
        assert done.state == JobState.succeeded and done.attempts == 1, done.error
    got = [wait_for(lambda job=job: reports(handle, job.id))[0] for job in jobs]
    assert [r["warm"] for r in got] == [False, False]
    assert all(r["phases"]["prepare"] > 0 for r in got)  # its start is in the job's time
    assert got[0]["pid"] != got[1]["pid"]
    for report in got:
        wait_for(lambda report=report: process_gone(report["pid"]), timeout=60)
    pool = scheduler_status(handle)["trainer_pool"]
    assert pool["ready"] == [] and pool["starting"] == 0  # nothing waits between jobs


def test_stopping_the_scheduler_kills_a_frozen_trainer_and_requeues_its_job(
    worker_env, run_scheduler
) -> None:
    env = worker_env
    job = env.submit(env.tenant().id, long_job(3000))
    handle = run_scheduler(
        env.settings.model_copy(update={"trainer_slots": 1, "trainer_warm_processes": 1})
    )
    wait_for(lambda: env.events(job.id), timeout=START, what="the trainer's progress")
    frozen = wait_for(lambda: trainer_pid(handle, job.id), what="the trainer's pid")
    waiting = [p["pid"] for p in scheduler_status(handle)["trainer_pool"]["ready"]]
    os.kill(frozen, signal.SIGSTOP)  # it can no longer stop by itself

    result = stop_scheduler(handle, release=True, timeout=30)
    assert result == {"stopped": 1, "released": 1}
    row = env.job(job.id)
    assert row.state == JobState.queued and row.attempts == 0  # the attempt is not counted
    for pid in (frozen, *waiting):
        wait_for(lambda pid=pid: process_gone(pid), timeout=60, what=f"process {pid} to end")
