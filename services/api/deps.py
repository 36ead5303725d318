"""Request dependencies: the context, a database session, the calling tenant, the admin."""

from __future__ import annotations

import asyncio
import hmac
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from common.db import crud
from common.db.models import Tenant
from services.api.context import ApiContext
from services.api.errors import ApiError
from services.api.limits import retry_after_header

bearer = HTTPBearer(auto_error=False, description="A tenant API key, or the admin token.")


# The dependencies that never block are ``async``: FastAPI runs a plain ``def`` dependency on
# its thread pool, a thread hand-off per dependency per request.
async def get_context(request: Request) -> ApiContext:
    return request.app.state.context


ContextDep = Annotated[ApiContext, Depends(get_context)]


def get_session(context: ContextDep) -> Iterator[Session]:
    with Session(context.db) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message)


async def current_tenant(context: ContextDep, credentials: Credentials) -> Tenant:
    """The key's tenant: from the replica's key cache without leaving the event loop, else
    from the database on the thread pool (in a session of its own)."""
    if credentials is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    key_hash = crud.hash_api_key(credentials.credentials)
    cached = context.api_keys.get(key_hash)
    if isinstance(cached, Tenant):
        return cached
    tenant = await context.run_blocking(_tenant_of_key, context, credentials.credentials)
    if tenant is None:  # unknown, revoked, or its tenant is being deleted: same answer
        raise _unauthorized("invalid API key")
    context.api_keys.put(key_hash, tenant, tenant.id)
    return tenant


def _tenant_of_key(context: ApiContext, api_key: str) -> Tenant | None:
    with Session(context.db) as session:
        tenant = crud.get_tenant_by_api_key(session=session, api_key=api_key)
        if tenant is not None:
            session.expunge(tenant)  # a read-only snapshot, shared by requests until it expires
        return tenant


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]


def is_admin(context: ApiContext, credentials: HTTPAuthorizationCredentials | None) -> bool:
    token = context.settings.admin_token
    if token is None or credentials is None:
        return False
    # Constant-time comparison: no timing hint about how much of the token matched.
    return hmac.compare_digest(credentials.credentials.encode(), token.get_secret_value().encode())


async def require_admin(context: ContextDep, credentials: Credentials) -> None:
    if credentials is None:
        raise _unauthorized("missing admin token: send 'Authorization: Bearer <token>'")
    if not is_admin(context, credentials):
        raise ApiError(403, "forbidden", "this route needs the admin token")


AdminDep = Annotated[None, Depends(require_admin)]


@dataclass(frozen=True)
class Caller:
    """Who calls a route open to the admin and to tenants: ``tenant`` is None for the admin."""

    tenant: Tenant | None

    def may_act_on(self, tenant_id: uuid.UUID) -> bool:
        """The admin acts on every tenant; a tenant's key only on that tenant."""
        return self.tenant is None or self.tenant.id == tenant_id


async def current_caller(context: ContextDep, credentials: Credentials) -> Caller:
    if credentials is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if is_admin(context, credentials):
        return Caller(tenant=None)
    return Caller(tenant=await current_tenant(context, credentials))


CallerDep = Annotated[Caller, Depends(current_caller)]


def too_many_at_once(what: str, setting: str, limit: int) -> ApiError:
    """429 for a per-tenant concurrency cap (the client retries once one of its own ends)."""
    return ApiError(
        429,
        "too_many_concurrent",
        f"too many {what} of this tenant at once: {setting} is {limit}",
        headers=retry_after_header(1),
    )


async def take_upload_slot(tenant_id: uuid.UUID, context: ApiContext, what: str) -> None:
    """One of the tenant's `tenant_max_concurrent_uploads` upload slots (give it back with
    ``context.open_uploads.release``), or a 429 after `upload_refusal_delay_seconds`. The
    delay is a tarpit: the body stays unread meanwhile (flow control stops the client),
    so a client resending at once is slowed to one refusal per delay and slot it holds."""
    if context.open_uploads.try_acquire(tenant_id):
        return
    await asyncio.sleep(context.settings.upload_refusal_delay_seconds)
    raise too_many_at_once(
        what, "tenant_max_concurrent_uploads", context.settings.tenant_max_concurrent_uploads
    )


def enforce_generate_rate(tenant_id: uuid.UUID, context: ApiContext, cost: int) -> None:
    """The per-tenant token bucket of the generate routes, charged by the request's cost
    (429 naming the limit)."""
    units = -(-cost // context.settings.generate_cost_unit)  # ceil
    wait = context.generate_limiter.acquire(tenant_id, float(units))
    if wait > 0:
        settings = context.settings
        raise ApiError(
            429,
            "rate_limited",
            f"generate rate limit exceeded: generate_rate_per_second is "
            f"{settings.generate_rate_per_second}, generate_burst {settings.generate_burst}, "
            f"this request costs {units} (generate_cost_unit {settings.generate_cost_unit}); "
            f"retry in {wait:.1f} s",
            headers=retry_after_header(wait),
        )
