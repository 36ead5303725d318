"""Faults around an erasure and the runtime limit, with the real scheduler and trainer
processes (PostgreSQL, S3 over HTTP):

- a trainer stalled (SIGSTOP) while its tenant is erased, then killed: the erasure completed
  and wrote its audit record while a late write (the blob a trainer keeps when its publish
  outcome is unknown, an unfinished multipart upload) sat under the tenant's prefix; when
  the trainer ends, the scheduler sweeps the prefix again — with the periodic re-sweep off,
  so that only the trainer's end can be what removed it; the scheduler's loop also drains
  a pending blob delete;
- a trainer stalled past ``job_max_runtime_seconds``: the scheduler force-stops it and fails
  the job without retry."""

from __future__ import annotations

import os
import signal
import uuid

import pytest
from sqlmodel import Session

from common.blobstore import dataset_key, prefix_key
from common.db import crud
from common.db.models import JobState
from common.erasure import ErasureOptions, erase_tenant, find_tenant_leftovers
from tests.workers.conftest import finished, long_job, process_gone, trainer_pid, wait_for

pytestmark = pytest.mark.slow

FAST = ErasureOptions(lease_seconds=30, replica_timeout_seconds=0.5, poll_seconds=0.05)


def test_a_late_write_is_swept_when_the_stalled_trainer_of_an_erased_tenant_ends(
    fault_env, run_scheduler
) -> None:
    env = fault_env
    settings = env.settings.model_copy(
        update={"erasure_resweep_window_seconds": 0.0, "storage_sweep_seconds": 1.0}
    )
    tenant = env.tenant()
    job = env.submit(tenant.id, long_job(3000))
    handle = run_scheduler(settings)
    wait_for(lambda: env.events(job.id), what="the trainer's first progress")
    pid = wait_for(lambda: trainer_pid(handle, job.id), what="the trainer's pid")
    os.kill(pid, signal.SIGSTOP)  # alive to Ray, silent to the database

    erase_tenant(engine=env.engine, store=env.store, tenant_id=tenant.id, options=FAST)
    with Session(env.engine) as session:
        audit = crud.get_deletion_audit(session=session, tenant_id=tenant.id)
    assert audit is not None and audit.completed_at is not None  # "erased"
    late = prefix_key(tenant.id, uuid.uuid4())
    env.store.put_bytes(late, b"a prefix whose publish outcome was unknown")
    full = env.store._full(dataset_key(tenant.id, uuid.uuid4()))
    env.store.client.create_multipart_upload(Bucket=env.store.bucket, Key=full)
    assert len(find_tenant_leftovers(env.engine, env.store, tenant.id)) == 2

    # Meanwhile another tenant's dataset is deleted while its blob delete is pending.
    other = env.tenant()
    kept = env.dataset(other.id, b'{"input": "a", "output": "b"}\n')
    with Session(env.engine) as session:
        crud.delete_dataset(session=session, tenant_id=other.id, dataset_id=kept.id)

    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: find_tenant_leftovers(env.engine, env.store, tenant.id) == [],
        timeout=60,
        what="the sweep after the trainer ended",
    )

    def retried() -> bool:  # the blob goes first, then its pending row: wait for both
        with Session(env.engine) as session:
            pending = crud.list_pending_blob_deletes(session=session)
        return not env.store.exists(kept.object_key) and pending == []

    wait_for(retried, timeout=60, what="the retry to delete the blob and its pending row")


def test_a_trainer_stalled_past_its_runtime_is_stopped_and_the_job_failed(
    fault_env, run_scheduler
) -> None:
    env = fault_env
    # A lease longer than limit + grace (10 s + 2 s + 3 heartbeats): the frozen trainer keeps
    # its job, as a trainer stuck inside one step while its heartbeat thread runs does. The
    # limit leaves room for the first step on a loaded machine (a step may take seconds): a
    # trainer still running at the limit stops itself, which is another test's path. The
    # grace is short because a frozen trainer cannot use it (the default waits 30 s).
    settings = env.settings.model_copy(
        update={
            "job_max_runtime_seconds": 10.0,
            "job_lease_seconds": 300.0,
            "trainer_stop_grace_seconds": 2.0,
        }
    )
    job = env.submit(env.tenant().id, long_job(3000), max_attempts=3)
    handle = run_scheduler(settings)
    wait_for(lambda: env.events(job.id), what="the trainer's first progress")
    pid = wait_for(lambda: trainer_pid(handle, job.id), what="the trainer's pid")
    os.kill(pid, signal.SIGSTOP)  # stuck: it can no longer stop itself at the limit
    done = wait_for(lambda: finished(env, job.id), timeout=120, what="the job to end")
    assert done.state == JobState.failed and done.attempts == 1, done
    assert "ran past job_max_runtime_seconds (10 s)" in (done.error or "")
    # Force-stopped: the frozen process itself is gone, not just its job failed.
    wait_for(lambda: process_gone(pid), timeout=60, what="the frozen trainer to be killed")
