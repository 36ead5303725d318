"""Bodies of the training-job routes (``/v1/jobs``)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common.db.models import (
    JobEvent,
    JobPriority,
    JobState,
    TrainingJob,
)
from common.hyperparameters import Hyperparameters
from services.api.errors import public_message
from services.api.schemas.fields import IdempotencyKey


class JobSubmit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_ids: list[uuid.UUID] = Field(min_length=1, max_length=100)
    validation_dataset_id: uuid.UUID | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    idempotency_key: IdempotencyKey | None = Field(
        default=None,
        description="Submitting again with a key this tenant already used returns that "
        "job (200) instead of queuing another (201).",
    )


class JobProgress(BaseModel):
    step: int
    total_steps: int | None
    loss: float | None
    val_loss: float | None
    tokens_per_second: float | None
    details: dict[str, Any] | None = None
    at: datetime

    @classmethod
    def of(cls, event: JobEvent) -> JobProgress:
        return cls(
            step=event.step,
            total_steps=event.total_steps,
            loss=event.loss,
            val_loss=event.val_loss,
            tokens_per_second=event.tokens_per_second,
            details=event.details,
            at=event.created_at,
        )


class JobOut(BaseModel):
    id: uuid.UUID
    status: JobState
    priority: JobPriority
    dataset_ids: list[uuid.UUID]
    validation_dataset_id: uuid.UUID | None
    hyperparameters: dict[str, Any]
    idempotency_key: str | None
    attempts: int
    max_attempts: int
    progress: JobProgress | None = Field(description="The latest progress event, if any.")
    prefix_id: uuid.UUID | None = Field(description="The prefix version the job produced.")
    error: str | None
    note: str | None = Field(
        default=None,
        description="Why the job's prefix was published inactive (the nightly quality gate); "
        "null when it was made active.",
    )
    result: dict[str, Any] | None = Field(
        default=None,
        description="Once succeeded: what the prefix bought on the job's validation examples "
        "— loss and token accuracy of the new prefix against the bare model, its base prefix "
        "and the tenant's previous version (`against`), or `status: no_validation_examples`.",
    )
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: TrainingJob, *, event: JobEvent | None, prefix_id: uuid.UUID | None) -> JobOut:
        return cls(
            id=job.id,
            status=job.state,
            priority=job.priority,
            dataset_ids=[uuid.UUID(str(d)) for d in job.dataset_ids],
            validation_dataset_id=job.validation_dataset_id,
            hyperparameters=job.hyperparameters,
            idempotency_key=job.idempotency_key,
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            progress=JobProgress.of(event) if event is not None else None,
            prefix_id=prefix_id,
            # Tenant-safe: lease owners (host, pid), URLs and bucket names are replaced.
            error=None if job.error is None else public_message(job.error),
            note=job.note,
            result=job.result,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )
