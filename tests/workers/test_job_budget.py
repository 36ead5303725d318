"""The per-job budget in the trainer, run in this process on the shared tiny model (real
PostgreSQL, S3 over HTTP, weights through the test session's local Ray): a job over
``job_max_steps`` and an attempt past ``job_max_runtime_seconds`` fail without retry, and
running out of memory fails the job without retry, suggesting half the batch size."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import torch
from sqlmodel import select

from common.db import crud
from common.db.models import JobState, PrefixVersion
from common.shared_weights import share_model
from tests.workers.conftest import QUICK, S3_TEST_ENV, WorkerEnv, long_job
from workers.trainer import run_training_job
from workers.trainer_report import Outcome


@pytest.fixture
def env(worker_env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> WorkerEnv:
    for name, value in S3_TEST_ENV.items():  # the trainer builds its own S3 client
        monkeypatch.setenv(name, value)
    return worker_env


@pytest.fixture
def shared(ray_session: None, tiny_llama: Any) -> Any:
    return share_model(tiny_llama)


def run(env: WorkerEnv, shared: Any, hyperparameters: dict[str, Any], **settings: Any) -> Any:
    job = env.submit(env.tenant().id, hyperparameters, max_attempts=3)
    owner = f"test-trainer-{uuid.uuid4().hex[:8]}"
    with env.session() as session:
        claimed = crud.claim_next_job(session=session, owner=owner, lease_seconds=60)
    assert claimed is not None and claimed.id == job.id
    report = run_training_job(env.settings.model_copy(update=settings), shared, str(job.id), owner)
    row = env.job(job.id)
    with env.session() as session:
        published = session.exec(
            select(PrefixVersion).where(PrefixVersion.tenant_id == job.tenant_id)
        ).all()
    assert published == []  # nothing published by a job over its budget
    assert env.store.list_objects(f"tenants/{job.tenant_id}/prefixes/") == []
    return report, row


def test_a_job_over_the_step_budget_fails_without_retry(env, shared) -> None:
    report, row = run(env, shared, QUICK, job_max_steps=9)  # 20 examples / 4 x 2 epochs = 10
    assert report.outcome == Outcome.FAILED
    assert row.state == JobState.failed and row.attempts == 1
    assert "needs 10 optimizer steps" in row.error and "job_max_steps (9)" in row.error


def test_an_attempt_past_its_runtime_stops_and_fails_without_retry(env, shared) -> None:
    report, row = run(env, shared, long_job(1500), job_max_runtime_seconds=3.0)
    assert report.outcome == Outcome.FAILED
    assert row.state == JobState.failed and row.attempts == 1  # not queued again
    assert "trained past job_max_runtime_seconds (3 s)" in row.error
    assert 0 < report.steps < 1500  # stopped between two steps, mid-way


def test_out_of_memory_fails_without_retry_suggesting_half_the_batch(
    env, shared, monkeypatch
) -> None:
    def out_of_memory(*args: Any, **kwargs: Any) -> Any:  # what a too large batch raises
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("workers.trainer.train_prefix", out_of_memory)
    report, row = run(env, shared, QUICK)
    assert report.outcome == Outcome.FAILED
    assert row.state == JobState.failed and row.attempts == 1
    assert "out of memory while training (OutOfMemoryError); not retried" in row.error
    assert "smaller batch_size (e.g. 2 instead of 4)" in row.error
