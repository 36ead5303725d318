"""``DELETE /v1/tenants/{id}``'s one call into tenant erasure (issue 7 owns erasure itself:
``common.erasure.erase_tenant``).

:func:`start_tenant_erasure` marks the tenant ``deleting`` before it returns — from that
commit on its keys stop working and nothing can be added to it — and runs the erasure
(blobs, rows, audit record; serving replicas drop its cached prefixes on their next sweep)
on the replica's background threads, so the route answers 202 at once. A failed or
interrupted erasure leaves the tenant ``deleting``; deleting it again resumes it.
"""

from __future__ import annotations

import logging
import uuid

from sqlmodel import Session

from common.db import crud
from common.db.errors import NotFoundError
from common.db.models import Tenant
from common.erasure import erase_tenant
from services.api.context import ApiContext

log = logging.getLogger(__name__)


def start_tenant_erasure(*, context: ApiContext, tenant_id: uuid.UUID) -> Tenant:
    """Mark the tenant deleting (raises :class:`NotFoundError` for an unknown tenant), then
    erase it in the background. Returns the tenant as marked."""
    with Session(context.db) as session:
        tenant = crud.mark_tenant_deleting(session=session, tenant_id=tenant_id)
    context.background.submit(_erase, context, tenant_id)
    return tenant


def _erase(context: ApiContext, tenant_id: uuid.UUID) -> None:
    try:
        audit = erase_tenant(engine=context.db, store=context.blobs, tenant_id=tenant_id)
    except NotFoundError:
        return  # a concurrent erasure finished first
    except Exception:
        log.exception("erasure of tenant %s failed; it stays 'deleting' (delete again)", tenant_id)
        return
    log.info(
        "tenant %s erased: %d object(s), %d row(s)",
        tenant_id,
        audit.objects_erased,
        audit.rows_erased,
    )
