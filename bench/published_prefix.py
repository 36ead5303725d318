"""A prefix version put in place the way a trainer publishes one, without training.

For benchmarks that need tenants with active prefixes (or an earlier night's version) but
measure something else: the blob is stored, then a job over the tenant's datasets is
enqueued, claimed and published through ``common.db.crud`` — the same rows and checks a
trainer's publish goes through.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from common.blobstore import prefix_key
from common.blobstore.base import sha256_hex
from common.db import crud
from common.db.engine import session_scope
from common.db.models import PrefixVersionCreate, TrainingJobCreate
from common.prefix_file import Prefix, prefix_to_bytes


def publish_prefix_as_trainer(
    *,
    engine: Any,
    blobs: Any,
    tenant_id: uuid.UUID,
    prefix: Prefix,
    dataset_ids: Sequence[uuid.UUID],
    hyperparameters: dict[str, Any],
) -> uuid.UUID:
    """Store ``prefix`` and publish it (active) as the result of a job over ``dataset_ids``."""
    prefix_id = uuid.uuid4()
    data = prefix_to_bytes(prefix)
    info = blobs.put_bytes(prefix_key(tenant_id, prefix_id), data)
    owner = f"bench-{uuid.uuid4().hex}"
    with session_scope(engine) as session:
        job, _ = crud.enqueue_job(
            session=session,
            tenant_id=tenant_id,
            job_in=TrainingJobCreate(
                dataset_ids=list(dataset_ids), hyperparameters=hyperparameters
            ),
        )
        claimed = crud.claim_oldest_job(session=session, owner=owner, lease_seconds=300)
        assert claimed is not None and claimed.id == job.id
        crud.publish_prefix(
            session=session,
            job_id=job.id,
            owner=owner,
            prefix_in=PrefixVersionCreate(
                id=prefix_id,
                object_key=prefix_key(tenant_id, prefix_id),
                base_model_fingerprint=prefix.base_model_fingerprint,
                prefix_length=prefix.prefix_length,
                dtype=prefix.dtype_name,
                size_bytes=info.size,
                sha256=info.sha256 or sha256_hex(data),
                metrics={},
            ),
        )
    return prefix_id
