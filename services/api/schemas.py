"""Request and response bodies of the API (beyond the database's ``*Public`` models).

Text that reaches the database is refused when PostgreSQL could not store it (a NUL
character, a lone surrogate), so such input is a 422, never a 500.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from common.db.crud.jobs import RESERVED_IDEMPOTENCY_KEY_PREFIX, is_reserved_idempotency_key
from common.db.models import Dataset, JobEvent, JobPriority, JobState, TrainingJob
from common.db.types import storable_text
from common.hyperparameters import Hyperparameters
from services.api.errors import public_message

Name = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(storable_text)]


def _not_reserved(key: str) -> str:
    if is_reserved_idempotency_key(key):
        raise ValueError(
            f"keys starting with {RESERVED_IDEMPOTENCY_KEY_PREFIX!r} are reserved for nightly "
            "retraining jobs; choose another key"
        )
    return key


IdempotencyKey = Annotated[
    str,
    Field(min_length=1, max_length=200),
    AfterValidator(storable_text),
    AfterValidator(_not_reserved),
]


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """A list answer: ``data`` in the route's documented order."""

    data: list[T]


# --- tenants and keys -----------------------------------------------------------------------


class TenantCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name | None = Field(default=None, description="Unique name; default `tenant-<random>`.")


class TenantCreated(BaseModel):
    """The tenant and its first API key — the only time the key is shown."""

    id: uuid.UUID
    name: str
    status: str
    created_at: datetime
    api_key: str
    api_key_id: uuid.UUID


class TenantDeletion(BaseModel):
    id: uuid.UUID
    status: str = Field(description="`deleting` until the tenant is gone (then 404).")


class ErasureProgress(BaseModel):
    """Where a tenant's erasure stands (ids, times and counts only)."""

    step: str = Field(
        description="The step under way or next: cancel_jobs, delete_objects, delete_rows, "
        "evict_replicas, verify (then the audit record is written and the tenant is gone)."
    )
    requested_at: datetime
    updated_at: datetime
    runs: int = Field(description="How many times a runner took the erasure up.")
    jobs_cancelled: int
    objects_erased: int
    rows_erased: int
    last_error: str | None = Field(
        default=None, description="Why the latest run stopped, if it failed (it is resumed)."
    )


class TenantOut(BaseModel):
    id: uuid.UUID
    name: str | None = Field(description="null once the erasure deleted the tenant's row.")
    status: str = Field(description="`active`, or `deleting` until the erasure ends (then 404).")
    created_at: datetime | None
    deletion: ErasureProgress | None = Field(
        default=None, description="The erasure's progress while the tenant is `deleting`."
    )


class ApiKeyCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name | None = None


# --- datasets -------------------------------------------------------------------------------


class DatasetOut(BaseModel):
    id: uuid.UUID
    examples: int
    bytes: int
    sha256: str
    created_at: datetime

    @classmethod
    def of(cls, dataset: Dataset) -> DatasetOut:
        return cls(
            id=dataset.id,
            examples=dataset.example_count,
            bytes=dataset.size_bytes,
            sha256=dataset.sha256,
            created_at=dataset.created_at,
        )


# --- jobs -----------------------------------------------------------------------------------


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
