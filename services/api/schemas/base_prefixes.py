"""Bodies of the operator's base-prefix routes (``/v1/admin``, admin token only)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from common.db.models import (
    BasePrefix,
)
from common.hyperparameters import Hyperparameters
from services.api.schemas.datasets import DatasetOut
from services.api.schemas.fields import Name
from services.api.schemas.jobs import JobOut


class OperatorDatasetOut(DatasetOut):
    """An operator dataset: a tenant dataset's body plus the name the operator gave it."""

    name: str | None


class BasePrefixOut(BaseModel):
    id: uuid.UUID
    name: str
    version: int
    is_default: bool
    job_id: uuid.UUID | None
    prefix_length: int
    dtype: str
    size_bytes: int
    sha256: str
    metrics: dict[str, Any]
    created_at: datetime
    stacked_active_prefixes: int = Field(
        description="Tenants whose active prefix is stacked on this version (deletion is "
        "refused while any is)."
    )

    @classmethod
    def of(cls, base: BasePrefix, dependents: int) -> BasePrefixOut:
        return cls(
            id=base.id,
            name=base.name,
            version=base.version,
            is_default=base.is_default,
            job_id=base.job_id,
            prefix_length=base.prefix_length,
            dtype=base.dtype,
            size_bytes=base.size_bytes,
            sha256=base.sha256,
            metrics=base.metrics,
            created_at=base.created_at,
            stacked_active_prefixes=dependents,
        )


class BasePrefixJobSubmit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name = Field(description="The base prefix this job trains a new version of.")
    dataset_ids: list[uuid.UUID] = Field(min_length=1, max_length=100)
    validation_dataset_id: uuid.UUID | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class BasePrefixJobOut(JobOut):
    name: str | None = Field(description="The base prefix the job trains.")
    base_prefix_id: uuid.UUID | None = Field(description="The version the job published.")
