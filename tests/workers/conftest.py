"""Fixtures of the training-queue tests: a real PostgreSQL database, an S3 bucket on the
moto server over HTTP, the session's local Ray, a tiny model, and schedulers started in a
namespace of their own per test (so a test never finds another test's scheduler)."""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from common.blobstore import BlobStore, dataset_key
from common.blobstore.s3 import S3BlobStore
from common.config import Settings
from common.db import crud
from common.db.models import (
    Dataset,
    DatasetCreate,
    JobPriority,
    JobState,
    Tenant,
    TrainingJob,
    TrainingJobCreate,
)
from tests.fixtures.factories import make_tenant
from workers.scheduler import scheduler_status

# The workers reach the S3 test server with the same dummy credentials as the tests; they
# get them through Ray's runtime environment (the test process's environment is left alone).
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

WORDS = "red green blue one two three four five six seven eight nine ten".split()

# A quick job: a handful of steps.
QUICK = {"prefix_length": 4, "mid_dim": 16, "epochs": 2, "batch_size": 4, "learning_rate": 0.01}


def long_job(steps: int = 1500) -> dict[str, Any]:
    """Many tiny steps (batch size 1): slow enough to kill or cancel mid-way, with no sleep
    anywhere in product code. ``examples(20)`` × epochs = steps."""
    return QUICK | {"batch_size": 1, "epochs": max(1, steps // 20)}


def examples(n: int, seed: int = 0) -> list[dict[str, str]]:
    return [
        {"input": f"alpha {WORDS[(i + seed) % 13]}", "output": " ".join(WORDS[i % 5 : i % 5 + 4])}
        for i in range(n)
    ]


@dataclass
class WorkerEnv:
    settings: Settings
    engine: Engine
    store: BlobStore

    def session(self) -> Session:
        return Session(self.engine)

    def tenant(self) -> Tenant:
        with self.session() as session:
            tenant = make_tenant(session)
            session.expunge(tenant)
            return tenant

    def dataset(self, tenant_id: uuid.UUID, content: bytes | list[dict[str, str]]) -> Dataset:
        if isinstance(content, list):
            content = "".join(json.dumps(r) + "\n" for r in content).encode()
        dataset_id = uuid.uuid4()
        key = dataset_key(tenant_id, dataset_id)
        self.store.put_bytes(key, content)
        with self.session() as session:
            dataset = crud.add_dataset(
                session=session,
                tenant_id=tenant_id,
                dataset_in=DatasetCreate(
                    id=dataset_id,
                    object_key=key,
                    sha256=hashlib.sha256(content).hexdigest(),
                    size_bytes=len(content),
                    example_count=content.count(b"\n"),
                ),
            )
            session.expunge(dataset)
            return dataset

    def submit(
        self,
        tenant_id: uuid.UUID,
        hyperparameters: dict[str, Any] | None = None,
        *,
        data: bytes | list[dict[str, str]] | None = None,
        validation: list[dict[str, str]] | None = None,
        max_attempts: int = 3,
        priority: JobPriority = JobPriority.interactive,
    ) -> TrainingJob:
        dataset = self.dataset(tenant_id, data if data is not None else examples(20))
        validation_id = self.dataset(tenant_id, validation).id if validation else None
        with self.session() as session:
            job, _ = crud.enqueue_job(
                session=session,
                tenant_id=tenant_id,
                job_in=TrainingJobCreate(
                    dataset_ids=[dataset.id],
                    validation_dataset_id=validation_id,
                    hyperparameters=hyperparameters if hyperparameters is not None else QUICK,
                    max_attempts=max_attempts,
                    priority=priority,
                ),
            )
            session.expunge(job)
            return job

    def job(self, job_id: uuid.UUID) -> TrainingJob:
        with self.session() as session:
            job = crud.get_job(session=session, job_id=job_id)
            assert job is not None
            session.expunge(job)
            return job

    def events(self, job_id: uuid.UUID) -> list[Any]:
        with self.session() as session:
            return crud.list_job_events(session=session, job_id=job_id)


def wait_for(
    condition: Callable[[], Any], *, timeout: float = 90.0, every: float = 0.2, what: str = ""
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(every)


def finished(env: WorkerEnv, job_id: uuid.UUID) -> Any:
    job = env.job(job_id)
    return job if job.state in (JobState.succeeded, JobState.failed, JobState.cancelled) else None


def reports(handle: Any, job_id: uuid.UUID) -> list[dict[str, Any]]:
    return [r for r in scheduler_status(handle)["reports"] if r["job_id"] == str(job_id)]


def trainer_pid(handle: Any, job_id: uuid.UUID) -> int | None:
    """The process id of the trainer running ``job_id``, once it has reported one."""
    for entry in scheduler_status(handle)["running"]:
        if entry["job_id"] == str(job_id) and entry["pid"]:
            return int(entry["pid"])
    return None


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie not reaped yet counts as gone: it holds nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def worker_env(
    ray_session: None,
    pg_engine: Engine,
    make_bucket: Callable[..., str],
    s3_endpoint_url: str,
    boto_session: Any,
    tiny_model_dirs: dict[str, Path],
    worker_home: Path,
) -> WorkerEnv:
    bucket = make_bucket()
    settings = Settings(
        home=worker_home,
        model=str(tiny_model_dirs["llama"]),
        database_url=pg_engine.url.render_as_string(hide_password=False),
        blob_url=f"s3://{bucket}/prefixd",
        s3_endpoint_url=s3_endpoint_url,
        scheduler_namespace=f"prefixd-test-{uuid.uuid4().hex[:10]}",
        trainer_slots=3,
        # No spare trainer kept started: a test runs a job or two, and a spare is one more
        # process start (torch, the model) per scheduler; test_trainer_pool.py asks for them.
        trainer_warm_processes=0,
        job_lease_seconds=6.0,
        job_heartbeat_seconds=0.5,
        trainer_start_timeout_seconds=120.0,
        progress_event_seconds=0.2,
        scheduler_poll_seconds=0.2,
    )
    store = S3BlobStore.from_url(
        settings.blob_url or "", endpoint_url=s3_endpoint_url, session=boto_session
    )
    return WorkerEnv(settings, pg_engine, store)


@pytest.fixture
def run_scheduler(worker_env: WorkerEnv) -> Iterator[Callable[..., Any]]:
    """Factory: start (or find) the scheduler of this test's namespace and wait until it is
    ready; every scheduler is stopped at the end of the test."""
    from workers.scheduler import find_scheduler, start_scheduler, stop_scheduler, wait_until_ready

    handles: list[Any] = []  # the actor lives while a handle does (as under `prefixd worker`)

    def run(settings: Settings | None = None) -> Any:
        handle, _ = start_scheduler(
            settings or worker_env.settings, runtime_env={"env_vars": S3_TEST_ENV}
        )
        handles.append(handle)
        wait_until_ready(handle, timeout=120)
        return handle

    yield run
    handle = find_scheduler(worker_env.settings)
    if handle is not None:
        stop_scheduler(handle, release=False, timeout=30)
