"""Bodies of the dataset routes (``/v1/datasets``)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Self

from pydantic import BaseModel, Field

from common.db.models import Dataset, OperatorDataset


class DatasetOut(BaseModel):
    id: uuid.UUID
    examples: int
    bytes: int
    sha256: str
    created_at: datetime

    @classmethod
    def of(cls, dataset: Dataset | OperatorDataset, **extra: Any) -> Self:
        """The body of a tenant's or the operator's dataset; ``extra`` fills a subclass's
        own fields."""
        return cls(
            id=dataset.id,
            examples=dataset.example_count,
            bytes=dataset.size_bytes,
            sha256=dataset.sha256,
            created_at=dataset.created_at,
            **extra,
        )


class DatasetDeletePending(BaseModel):
    id: uuid.UUID
    status: str = Field(description="`blob_delete_pending`")
    message: str
