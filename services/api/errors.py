"""Every error leaves the API as ``{"error": {"code": "...", "message": "..."}}`` with the
right status; user errors raised anywhere below (``PrefixdError`` subclasses, also when
they come back from another deployment wrapped in a Ray error) map to 4xx, never 500.

The routes in OpenAI's shape (:data:`OPENAI_ROUTES`) answer in OpenAI's shape instead,
``{"error": {"message", "type", "param", "code"}}``, with the statuses OpenAI uses, so the
official SDKs raise their usual classes: a refused request (prefixd's 422, 413 and 415) is
a 400 ``invalid_request_error`` (``BadRequestError``) naming the parameter in ``param``
where there is one; 401 ``authentication_error``, 403 ``permission_error``, 404, 409 and
410 ``invalid_request_error``, 429 ``rate_limit_error`` (``Retry-After`` kept), 5xx
``server_error``. ``code`` keeps prefixd's code (``unauthorized`` is OpenAI's
``invalid_api_key``, ``rate_limited`` its ``rate_limit_exceeded``). The request id stays in
the ``X-Request-ID`` header, where the SDKs read it (``error.request_id``)."""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import (
    DecodingFailedError,
    IncompatiblePrefixError,
    InvalidInputError,
    PrefixdError,
)

log = logging.getLogger(__name__)

# The error code of each status that Starlette/FastAPI or a middleware raises by itself.
HTTP_ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers
        self.param = param  # the request parameter at fault (OpenAI's ``param``), if one is

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised in an upload validation process (services/api/upload_validation.py) and
        # pickled back: rebuilt with every field, not from ``args`` (the message alone).
        return (
            _rebuild_api_error,
            (self.status, self.code, self.message, self.headers, self.param),
        )


def _rebuild_api_error(
    status: int, code: str, message: str, headers: dict[str, str] | None, param: str | None
) -> ApiError:
    return ApiError(status, code, message, headers=headers, param=param)


# The id of the request being handled (set by RequestIdMiddleware): every error body and
# the X-Request-ID header carry it, and the log lines about the error name it, so an
# operator finds the details a tenant is never shown.
request_id_var: ContextVar[str | None] = ContextVar("prefixd_request_id", default=None)
REQUEST_ID_HEADER = "X-Request-ID"


def error_body(code: str, message: str) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    request_id = request_id_var.get()
    if request_id is not None:
        body["request_id"] = request_id
    return {"error": body}


# The routes in OpenAI's shape: their errors are in OpenAI's shape too (module docstring).
OPENAI_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/files",
    "/v1/fine_tuning",
)
_OPENAI_STATUS = {413: 400, 415: 400, 422: 400}
_OPENAI_CODES = {"unauthorized": "invalid_api_key", "rate_limited": "rate_limit_exceeded"}


def route_path(scope: Any) -> str:
    """The request's path below the app's root path (Serve may mount the app under one)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def is_openai_route(path: str) -> bool:
    return any(path == route or path.startswith(route + "/") for route in OPENAI_ROUTES)


def openai_status(status: int) -> int:
    return _OPENAI_STATUS.get(status, status)


def _openai_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error"
    )


def openai_error_body(
    status: int, code: str, message: str, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body for an error of (prefixd's) ``status`` and ``code``."""
    return {
        "error": {
            "message": message,
            "type": _openai_type(openai_status(status)),
            "param": param,
            "code": _OPENAI_CODES.get(code, code),
        }
    }


def error_response(
    scope: Any,
    status: int,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    """The error answer of a request: OpenAI's shape and status on an OpenAI route,
    prefixd's everywhere else."""
    if is_openai_route(route_path(scope)):
        return JSONResponse(
            openai_error_body(status, code, message, param),
            status_code=openai_status(status),
            headers=headers,
        )
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def stream_error_body(error: ApiError, *, openai: bool) -> dict[str, Any]:
    """The event a stream sends when it fails after its answer began."""
    if openai:
        return openai_error_body(error.status, error.code, error.message, error.param)
    return error_body(error.code, error.message)


# Internal details that must never reach a tenant: URLs (S3 endpoints, database hosts),
# bucket names, lease owners such as ``scheduler@host:pid:…`` and ``worker …@host``.
_INTERNAL = [
    re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE),
    re.compile(r"\bbucket\s+'[^']*'", re.IGNORECASE),
    re.compile(r"\S+@[\w.-]+(?::[\w.-]+)+\S*"),
]


def public_message(text: str) -> str:
    """``text`` with internal details replaced by ``[internal]`` (job errors, blob errors)."""
    for pattern in _INTERNAL:
        text = pattern.sub("[internal]", text)
    return text


def _inside_serve() -> bool:
    try:
        from ray import serve

        serve.get_replica_context()
    except Exception:
        return False
    return True


class RequestIdMiddleware:
    """Gives every request an id (a client's ``X-Request-ID`` of up to 64 safe characters is
    kept, so a trace spans systems), returned in the ``X-Request-ID`` response header."""

    _SAFE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

    def __init__(self, app: Any) -> None:
        self.app = app
        # Ray Serve's proxy sends its request id as X-Request-ID and puts it on the answer
        # itself; echoing it here too would give the client the header twice.
        self.echo_given = not _inside_serve()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next(
            (v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"),
            "",
        )
        request_id = given if self._SAFE.match(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        add_header = request_id != given or self.echo_given

        async def with_header(message: Any) -> None:
            if message["type"] == "http.response.start" and add_header:
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, with_header)
        finally:
            request_id_var.reset(token)


def unwrap(error: BaseException) -> BaseException:
    """The user's exception inside a Ray task/actor error, if that is what it is."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def _status_of(error: PrefixdError) -> tuple[int, str]:
    # Imported here: the storage layer's errors are optional for the error mapping.
    from common.blobstore.base import BlobNotFoundError, BlobStoreUnavailableError
    from common.db.errors import (
        ConflictError,
        DatabaseUnavailableError,
        NotFoundError,
        QuotaExceededError,
        TenantNotActiveError,
    )

    table: list[tuple[type[PrefixdError], int, str]] = [
        (NotFoundError, 404, "not_found"),
        (TenantNotActiveError, 410, "tenant_deleting"),
        # A prefix whose blob was deleted (its version or tenant erased) while in flight.
        (BlobNotFoundError, 404, "not_found"),
        (ConflictError, 409, "conflict"),
        (QuotaExceededError, 429, "quota_exceeded"),
        (IncompatiblePrefixError, 409, "incompatible_prefix"),
        (InvalidInputError, 422, "invalid_input"),
        # One request's decoding failed alone (non-finite scores); its batch went on.
        (DecodingFailedError, 422, "decoding_failed"),
        (DatabaseUnavailableError, 503, "database_unavailable"),
        (BlobStoreUnavailableError, 503, "blob_store_unavailable"),
    ]
    for kind, status, code in table:
        if isinstance(error, kind):
            return status, code
    return 400, "bad_request"


# The answer while the database cannot be reached (restarted, failed over, network): the
# same for every route, with a hint when to try again, and never the driver's text (it names
# hosts and ports).
DATABASE_UNAVAILABLE_MESSAGE = "the database is temporarily unavailable; retry shortly"
DATABASE_RETRY_AFTER_SECONDS = "2"


def is_database_outage(error: BaseException) -> bool:
    """A SQLAlchemy error that means "cannot talk to the database right now" (connection
    refused or dropped, server shutting down, pool exhausted, SQLite busy), as opposed to a
    bug in a query. The pool's pre-ping replaces dropped connections once the server is
    back, so the same request succeeds when retried."""
    from sqlalchemy import exc

    if isinstance(error, exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, exc.OperationalError | exc.InterfaceError | exc.TimeoutError)


def database_unavailable() -> ApiError:
    return ApiError(
        503,
        "database_unavailable",
        DATABASE_UNAVAILABLE_MESSAGE,
        headers={"Retry-After": DATABASE_RETRY_AFTER_SECONDS},
    )


# Errors of the storage layer name buckets, endpoints and S3's own text: a tenant gets one of
# these instead, the details go to the log under the request id.
_GENERIC = {
    "blob_store_unavailable": "the blob store is temporarily unavailable; retry shortly",
    "database_unavailable": DATABASE_UNAVAILABLE_MESSAGE,
}


def _tenant_message(error: PrefixdError, code: str) -> str:
    from common.blobstore.base import BlobNotFoundError, BlobStoreError

    if code in _GENERIC or isinstance(error, BlobStoreError):
        log.warning("request %s: %s: %s", request_id_var.get(), type(error).__name__, error)
        if isinstance(error, BlobNotFoundError):
            return "not found (it was deleted)"
        return _GENERIC.get(code, "the blob store could not complete the request")
    return public_message(str(error))


def to_api_error(error: BaseException) -> ApiError | None:
    inner = unwrap(error)
    if isinstance(inner, ApiError):
        return inner
    if isinstance(inner, PrefixdError):
        status, code = _status_of(inner)
        return ApiError(status, code, _tenant_message(inner, code))
    if is_database_outage(inner):
        return database_unavailable()
    if is_replica_failure(error) or is_replica_failure(inner):
        return ApiError(
            503,
            "inference_unavailable",
            "the inference replica serving this request failed; retry (Serve replaces it)",
            headers={"Retry-After": "1"},
        )
    return None


def is_replica_failure(error: BaseException) -> bool:
    """The inference replica died, or could not be reached, during the call: Serve starts a
    new one, so the client may retry (not a bug of the request)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
    )

    return isinstance(
        error,
        RayActorError | ReplicaUnavailableError | DeploymentUnavailableError | BackPressureError,
    )


# Parts of a pydantic error location that name a union member, not a field:
# ``constrained-str``, ``list[constrained-str]``, ``function-after[…]``, ``str``.
_UNION_MEMBER = re.compile(r"[\[\]-]|^(str|int|float|bool|list|dict|none)$")


def _field_path(location: tuple[str | int, ...]) -> list[str | int]:
    """The fields of a pydantic error location: without where it was (body, query…) and
    without the union member that was tried."""
    return [
        p
        for p in location
        if p not in ("body", "query", "path", "header")
        and not (isinstance(p, str) and _UNION_MEMBER.search(p))
    ]


def _validation_param(location: tuple[str | int, ...]) -> str | None:
    """``("body", "messages", 0, "role")`` → ``messages[0].role`` (OpenAI's ``param``)."""
    parts = _field_path(location)
    param = ""
    for part in parts:
        param += f"[{part}]" if isinstance(part, int) else f"{'.' if param else ''}{part}"
    return param or None


def _validation_code(kind: str) -> str:
    """OpenAI's code for a pydantic error type (``missing``, ``int_type``, ``less_than``…)."""
    if kind == "missing":
        return "missing_required_parameter"
    return "invalid_type" if kind.endswith("_type") else "invalid_value"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(
            request.scope,
            error.status,
            error.code,
            error.message,
            headers=error.headers,
            param=error.param,
        )

    @app.exception_handler(PrefixdError)
    async def user_error(request: Request, error: PrefixdError) -> JSONResponse:
        mapped = to_api_error(error)
        assert mapped is not None
        return error_response(request.scope, mapped.status, mapped.code, mapped.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = tuple(first.get("loc", ()))
        where = ".".join(str(p) for p in _field_path(location))
        message = (
            f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid")
        )
        kind = str(first.get("type", ""))
        if is_openai_route(route_path(request.scope)):
            param = None if kind == "json_invalid" else _validation_param(location)
            return JSONResponse(
                openai_error_body(422, _validation_code(kind), message, param), status_code=400
            )
        return JSONResponse(error_body("invalid_request", message), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(
            request.scope,
            error.status_code,
            HTTP_ERROR_CODES.get(error.status_code, "http_error"),
            str(error.detail),
            headers=getattr(error, "headers", None),
        )

    @app.exception_handler(SQLAlchemyError)
    async def database_error(request: Request, error: SQLAlchemyError) -> JSONResponse:
        # Handled here rather than by the catch-all below, which Starlette runs outermost and
        # then re-raises (a traceback per request while the database is down).
        if not is_database_outage(error):
            return await internal_error(request, error)
        # An outage, not a bug: one line in the log and a 503 the client can retry; the
        # replica keeps serving and recovers with the database (pre-pinged pool).
        log.warning(
            "request %s: database unavailable on %s %s: %s",
            request_id_var.get(),
            request.method,
            request.url.path,
            type(getattr(error, "orig", None) or error).__name__,
        )
        outage = database_unavailable()
        return error_response(
            request.scope, 503, outage.code, outage.message, headers=outage.headers
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        # The traceback goes to the replica's log (no request body, no headers: no secrets);
        # the client learns only that it was our fault.
        log.error(
            "request %s: unhandled %s on %s %s",
            request_id_var.get(),
            type(error).__name__,
            request.method,
            request.url.path,
            exc_info=error,
        )
        return error_response(request.scope, 500, "internal", "internal server error")
