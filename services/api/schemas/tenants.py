"""Bodies of the tenant and API-key routes (``/v1/tenants``)."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from services.api.schemas.fields import Name


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
