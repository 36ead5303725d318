"""Bodies of the prefix-version routes (``/v1/prefixes``)."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, Field

from common.db.models import (
    PrefixVersionPublic,
)


class PrefixDeleted(BaseModel):
    id: uuid.UUID
    version: int
    active: PrefixVersionPublic | None = Field(
        description="The tenant's active version now (the fallback), or null if none is left."
    )
    blob_deleted: bool = Field(
        default=True,
        description="False (with status 202) when the object store did not confirm the "
        "delete of the version's data yet: the delete is recorded and retried until it is gone.",
    )
