"""The training queue on a local Ray, real PostgreSQL and S3 over HTTP, with a tiny model:
jobs of several tenants, trainer crashes, cancellation, tenant erasure, fairness, the
shared frozen weights, and scheduler restarts."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from typing import Any

import pytest
import ray
from sqlmodel import select

from common.architectures import prefix_shape
from common.blobstore import prefixes_key_prefix, tenant_key_prefix
from common.db import crud
from common.db.models import (
    ApiKey,
    Dataset,
    DeletionAudit,
    JobEvent,
    JobState,
    PrefixVersion,
    Tenant,
    TrainingJob,
)
from common.erasure import erase_tenant
from common.model_loading import load_model
from common.prefix_file import prefix_from_bytes
from tests.workers.conftest import (
    QUICK,
    WorkerEnv,
    examples,
    finished,
    long_job,
    reports,
    trainer_pid,
    wait_for,
)
from workers.scheduler import scheduler_status

pytestmark = pytest.mark.slow


def assert_blobs_match_rows(env: WorkerEnv, tenant_id: uuid.UUID) -> None:
    """Every prefix row has its blob and every prefix blob has its row."""
    with env.session() as session:
        rows = {p.object_key for p in crud.list_prefixes(session=session, tenant_id=tenant_id)}
    blobs = {b.key for b in env.store.list_objects(prefixes_key_prefix(tenant_id))}
    assert rows == blobs


def test_jobs_of_three_tenants_each_publish_their_own_prefix(
    worker_env, run_scheduler, tiny_model_dirs, test_settings
):
    env = worker_env
    tenants = [env.tenant() for _ in range(3)]
    jobs = [  # validation: a dataset of its own, or a split of the training data
        env.submit(tenants[0].id, QUICK, data=examples(20), validation=examples(4, seed=5)),
        *(
            env.submit(t.id, QUICK | {"validation_split": 0.25}, data=examples(20, seed=i))
            for i, t in enumerate(tenants[1:], start=1)
        ),
    ]
    total_steps = [10, 8, 8]  # 20 or 15 training examples, batches of 4, 2 epochs
    handle = run_scheduler()
    for job in jobs:
        done = wait_for(lambda job=job: finished(env, job.id), what=f"job {job.id}")
        assert done.state == JobState.succeeded, done.error
        assert done.attempts == 1 and done.finished_at is not None

    tiny = load_model(str(tiny_model_dirs["llama"]), settings=test_settings)
    object_keys = set()
    for tenant, job, total in zip(tenants, jobs, total_steps, strict=True):
        with env.session() as session:
            active = crud.get_active_prefix(session=session, tenant_id=tenant.id)
        assert active is not None and active.job_id == job.id and active.version == 1
        assert active.object_key.startswith(prefixes_key_prefix(tenant.id))
        object_keys.add(active.object_key)
        prefix = prefix_from_bytes(
            env.store.get_bytes(active.object_key),
            expected_fingerprint=tiny.fingerprint,
            expected_shape=prefix_shape(tiny.model.config),
        )
        assert prefix.prefix_length == 4 and active.base_model_fingerprint == tiny.fingerprint
        assert_blobs_match_rows(env, tenant.id)

        events = [e for e in env.events(job.id) if e.details is None]  # progress, not the report
        steps = [e.step for e in events]
        assert steps == sorted(set(steps)) and steps[0] == 1
        assert events[-1].step == events[-1].total_steps == total
        assert all(e.loss is not None and e.tokens_per_second for e in events)
        assert any(e.val_loss is not None for e in events)
    assert len(object_keys) == 3

    # The frozen weights: one object-store object, mapped zero-copy by every trainer.
    def succeeded() -> list[dict[str, Any]] | None:
        got = [r for r in scheduler_status(handle)["reports"] if r["outcome"] == "succeeded"]
        return got if len(got) == 3 else None

    done_reports = wait_for(succeeded, what="the trainers' reports")
    status = scheduler_status(handle)
    assert {r["weights_object_id"] for r in done_reports} == {status["weights_object_id"]}
    assert all(r["zero_copy"] for r in done_reports)
    assert len({r["node_id"] for r in done_reports}) == 1  # one node here
    assert len({r["pid"] for r in done_reports}) == 3  # a process of its own per job
    # The scheduler handed its trainers a reference and never trains: no torch in it.
    heavy = ray.get(
        handle.__ray_call__.remote(lambda _: {"torch", "transformers"} & set(sys.modules))
    )
    assert heavy == set()


def test_bad_hyperparameters_bad_data_and_foreign_datasets_fail_without_retry(
    worker_env, run_scheduler
):
    env = worker_env
    t1, t2, t3 = env.tenant(), env.tenant(), env.tenant()
    bad_hyperparameters = env.submit(t1.id, {"epochs": 0, "prefix_length": 4})
    unknown = env.submit(t1.id, QUICK | {"learning_rat": 0.1})
    bad_data = env.submit(t2.id, data=b'{"input": "alpha", "output": "red"}\nnot json\n')
    # A job that names another tenant's dataset (the API refuses that at submission; here
    # the row is altered behind its back): the trainer looks datasets up with the job's
    # tenant, so it never reads the other tenant's data.
    foreign = env.submit(t3.id, QUICK)
    with env.session() as session:
        row = session.get(TrainingJob, foreign.id)
        assert row is not None
        row.dataset_ids = [str(bad_hyperparameters.dataset_ids[0])]
        session.add(row)
        session.commit()
    run_scheduler()
    expected = {
        bad_hyperparameters.id: "invalid hyperparameters: epochs must be at least 1 (or unset: automatic), got 0",
        unknown.id: "unknown hyperparameter 'learning_rat'",
        bad_data.id: f"dataset {bad_data.dataset_ids[0]}:2: invalid JSON",
        foreign.id: f"dataset {bad_hyperparameters.dataset_ids[0]} of the job no longer exists",
    }
    for job_id, message in expected.items():
        done = wait_for(lambda job_id=job_id: finished(env, job_id), what=f"job {job_id}")
        assert done.state == JobState.failed and done.attempts == 1  # a user error: no retry
        assert message in (done.error or "")
    with env.session() as session:
        assert session.exec(select(PrefixVersion)).all() == []


def test_killed_trainers_are_retried_or_failed_and_other_tenants_are_unaffected(
    worker_env, run_scheduler
):
    env = worker_env
    retried, failing, bystander = env.tenant(), env.tenant(), env.tenant()
    retried_job = env.submit(retried.id, long_job(600), max_attempts=3)
    failing_job = env.submit(failing.id, long_job(3000), max_attempts=1)
    handle = run_scheduler()
    for job in (retried_job, failing_job):
        wait_for(lambda job=job: env.events(job.id), what=f"progress of job {job.id}")
        pid = wait_for(lambda job=job: trainer_pid(handle, job.id), what="the trainer's pid")
        os.kill(pid, signal.SIGKILL)
    bystander_job = env.submit(bystander.id, QUICK)

    done = wait_for(lambda: finished(env, retried_job.id), timeout=180)
    assert done.state == JobState.succeeded and done.attempts == 2, done.error
    first, second = wait_for(
        lambda: len(reports(handle, retried_job.id)) == 2 and reports(handle, retried_job.id)
    )
    assert first["outcome"] == "retrying" and "process died" in first["error"]
    assert second["outcome"] == "succeeded" and second["pid"] != first["pid"]

    failed = wait_for(lambda: finished(env, failing_job.id))
    assert failed.state == JobState.failed and failed.attempts == 1
    assert "attempt 1: the trainer process died" in (failed.error or "")

    assert wait_for(lambda: finished(env, bystander_job.id)).state == JobState.succeeded
    for tenant in (retried, failing, bystander):
        assert_blobs_match_rows(env, tenant.id)
    with env.session() as session:
        assert len(crud.list_prefixes(session=session, tenant_id=retried.id)) == 1
        assert crud.list_prefixes(session=session, tenant_id=failing.id) == []


def test_cancelling_a_running_job_stops_it_within_a_few_steps(worker_env, run_scheduler):
    env = worker_env
    tenant = env.tenant()
    job = env.submit(tenant.id, long_job(3000))
    handle = run_scheduler()
    wait_for(lambda: env.events(job.id), what="progress")
    with env.session() as session:
        crud.cancel_job(session=session, job_id=job.id)
    step_at_cancel = env.events(job.id)[-1].step
    (report,) = wait_for(lambda: reports(handle, job.id), timeout=15, what="the trainer to stop")
    assert report["outcome"] == "cancelled"
    # The trainer learns of the cancellation from its next heartbeat (every 0.5 s here) and
    # stops between two steps: a few dozen tiny steps at most, far from the 3000.
    assert step_at_cancel <= report["steps"] < step_at_cancel + 300 < report["total_steps"]
    done = env.job(job.id)
    assert done.state == JobState.cancelled and done.attempts == 1
    with env.session() as session:
        assert crud.list_prefixes(session=session, tenant_id=tenant.id) == []
    assert env.store.list_objects(prefixes_key_prefix(tenant.id)) == []


def test_erasing_a_tenant_while_its_job_runs_leaves_nothing_of_it(worker_env, run_scheduler):
    env = worker_env
    tenant, other = env.tenant(), env.tenant()
    with env.session() as session:
        crud.create_api_key(session=session, tenant_id=tenant.id)
    job = env.submit(tenant.id, long_job(3000))
    handle = run_scheduler()
    wait_for(lambda: env.events(job.id), what="progress")
    other_job = env.submit(other.id, QUICK)

    audit = erase_tenant(engine=env.engine, store=env.store, tenant_id=tenant.id)
    (report,) = wait_for(lambda: reports(handle, job.id), timeout=15, what="the trainer to stop")
    assert report["outcome"] in ("cancelled", "erased")

    with env.session() as session:
        assert session.get(Tenant, tenant.id) is None
        for model in (ApiKey, Dataset, TrainingJob, PrefixVersion):
            assert session.exec(select(model).where(model.tenant_id == tenant.id)).all() == []
        assert session.exec(select(JobEvent).where(JobEvent.job_id == job.id)).all() == []
        (kept,) = session.exec(select(DeletionAudit)).all()
    assert env.store.list_versions(tenant_key_prefix(tenant.id)) == []
    assert kept.id == audit.id and kept.tenant_id == tenant.id and kept.completed_at is not None
    assert audit.objects_erased == 1 and audit.rows_erased >= 4  # dataset blob; rows

    assert wait_for(lambda: finished(env, other_job.id)).state == JobState.succeeded


def test_a_tenant_with_many_queued_jobs_does_not_starve_another(worker_env, run_scheduler):
    env = worker_env
    busy, quiet = env.tenant(), env.tenant()
    busy_jobs = [env.submit(busy.id, QUICK) for _ in range(10)]
    quiet_job = env.submit(quiet.id, QUICK)  # queued after all ten
    run_scheduler(env.settings.model_copy(update={"trainer_slots": 1}))
    quiet_done = wait_for(lambda: finished(env, quiet_job.id), timeout=120)
    assert quiet_done.state == JobState.succeeded
    busy_started = sorted(
        (j for j in map(env.job, (j.id for j in busy_jobs)) if j.started_at is not None),
        key=lambda j: j.started_at,
    )
    assert busy_started[0].state == JobState.succeeded
    assert busy_started[0].started_at < quiet_done.started_at
    # The busy tenant's second job had not even started before the quiet tenant's began.
    second = busy_started[1] if len(busy_started) > 1 else None
    assert second is None or quiet_done.started_at < second.started_at


def test_a_restarted_scheduler_retries_the_running_job_and_a_second_start_finds_it(
    worker_env, run_scheduler
):
    import ray

    from tests.workers.conftest import S3_TEST_ENV
    from workers.scheduler import start_scheduler

    env = worker_env
    tenant = env.tenant()
    job = env.submit(tenant.id, long_job(600))
    handle = run_scheduler()
    before = scheduler_status(handle)["incarnation"]
    wait_for(lambda: env.events(job.id), what="progress")
    ray.kill(handle, no_restart=False)  # the actor's process dies; Ray starts it again

    done = wait_for(lambda: finished(env, job.id), timeout=180)
    assert done.state == JobState.succeeded and done.attempts == 2, done.error
    again, created = start_scheduler(env.settings, runtime_env={"env_vars": S3_TEST_ENV})
    assert not created
    assert again._actor_id == handle._actor_id
    assert scheduler_status(again)["incarnation"] != before  # a new process, the same actor
    assert_blobs_match_rows(env, tenant.id)
