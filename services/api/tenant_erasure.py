"""``DELETE /v1/tenants/{id}``'s one call into tenant erasure (``common/erasure.py``).

:func:`start_tenant_erasure` marks the tenant ``deleting`` and records its erasure before it
returns — from that commit on its keys stop working and nothing can be added to it — and runs
the erasure on the replica's background threads, so the route answers 202 at once. The
erasure evicts the tenant's prefixes from every inference replica through this replica's
handle to the inference deployment. A failed or interrupted erasure stays recorded: the
scheduler resumes it after ``erasure_lease_seconds``, and deleting again resumes it at once.
"""

from __future__ import annotations

import logging
import uuid

from sqlmodel import Session

from common.db import crud
from common.db.errors import NotFoundError
from common.db.models import TenantErasure
from common.erasure import (
    ErasureBusyError,
    ErasureLeaseLostError,
    ErasureOptions,
    ReplicaEvictor,
    ServeReplicaEvictor,
    resume_erasure,
    runner_name,
)
from services.api.context import ApiContext

log = logging.getLogger(__name__)


def start_tenant_erasure(*, context: ApiContext, tenant_id: uuid.UUID) -> TenantErasure:
    """Mark the tenant deleting (raises :class:`NotFoundError` for an unknown tenant or one
    erased completely), then erase it in the background. Returns the erasure's state."""
    with Session(context.db) as session:
        erasure = crud.begin_tenant_erasure(session=session, tenant_id=tenant_id)
    context.background.submit(_erase, context, tenant_id)
    return erasure


def replica_evictor(context: ApiContext) -> ReplicaEvictor | None:
    """The inference replicas, through this ingress replica's handle (None outside Serve:
    then no replica exists that could hold a prefix)."""
    try:
        from ray import serve

        app_name = serve.get_replica_context().app_name
    except Exception:
        return None
    return ServeReplicaEvictor(context.inference, app_name=app_name)


def _erase(context: ApiContext, tenant_id: uuid.UUID) -> None:
    try:
        audit = resume_erasure(
            engine=context.db,
            store=context.blobs,
            tenant_id=tenant_id,
            evictor=replica_evictor(context),
            options=ErasureOptions.from_settings(context.settings),
            owner=runner_name("api"),
            wait=False,
        )
    except (ErasureBusyError, ErasureLeaseLostError, NotFoundError):
        return  # another runner has it, or finished it
    except Exception:
        log.exception(
            "erasure of tenant %s failed; it stays recorded and is resumed (scheduler, or "
            "delete again)",
            tenant_id,
        )
        return
    log.info(
        "tenant %s erased: %d object(s), %d row(s)",
        tenant_id,
        audit.objects_erased,
        audit.rows_erased,
    )
