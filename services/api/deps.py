"""Request dependencies: the context, a database session, the calling tenant, the admin."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from common.db import crud
from common.db.models import Tenant
from services.api.context import ApiContext
from services.api.errors import ApiError

bearer = HTTPBearer(auto_error=False, description="A tenant API key, or the admin token.")


def get_context(request: Request) -> ApiContext:
    return request.app.state.context


ContextDep = Annotated[ApiContext, Depends(get_context)]


def get_session(context: ContextDep) -> Iterator[Session]:
    with Session(context.db) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message)


def current_tenant(session: SessionDep, credentials: Credentials) -> Tenant:
    if credentials is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    tenant = crud.get_tenant_by_api_key(session=session, api_key=credentials.credentials)
    if tenant is None:  # unknown, revoked, or its tenant is being deleted: same answer
        raise _unauthorized("invalid API key")
    return tenant


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]


def is_admin(context: ApiContext, credentials: HTTPAuthorizationCredentials | None) -> bool:
    token = context.settings.admin_token
    if token is None or credentials is None:
        return False
    # Constant-time comparison: no timing hint about how much of the token matched.
    return hmac.compare_digest(credentials.credentials.encode(), token.get_secret_value().encode())


def require_admin(context: ContextDep, credentials: Credentials) -> None:
    if credentials is None:
        raise _unauthorized("missing admin token: send 'Authorization: Bearer <token>'")
    if not is_admin(context, credentials):
        raise ApiError(403, "forbidden", "this route needs the admin token")


AdminDep = Annotated[None, Depends(require_admin)]
