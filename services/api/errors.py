"""Every error leaves the API as ``{"error": {"code": "...", "message": "..."}}`` with the
right status; user errors raised anywhere below (``PrefixdError`` subclasses, also when
they come back from another deployment wrapped in a Ray error) map to 4xx, never 500."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import IncompatiblePrefixError, InvalidInputError, PrefixdError


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def unwrap(error: BaseException) -> BaseException:
    """The user's exception inside a Ray task/actor error, if that is what it is."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def _status_of(error: PrefixdError) -> tuple[int, str]:
    # Imported here: the storage layer's errors are optional for the error mapping.
    from common.blobstore.base import BlobStoreUnavailableError
    from common.db.errors import (
        ConflictError,
        DatabaseUnavailableError,
        NotFoundError,
    )

    table: list[tuple[type[PrefixdError], int, str]] = [
        (NotFoundError, 404, "not_found"),
        (ConflictError, 409, "conflict"),
        (IncompatiblePrefixError, 409, "incompatible_prefix"),
        (InvalidInputError, 422, "invalid_input"),
        (DatabaseUnavailableError, 503, "database_unavailable"),
        (BlobStoreUnavailableError, 503, "blob_store_unavailable"),
    ]
    for kind, status, code in table:
        if isinstance(error, kind):
            return status, code
    return 400, "bad_request"


def to_api_error(error: BaseException) -> ApiError | None:
    inner = unwrap(error)
    if isinstance(inner, ApiError):
        return inner
    if isinstance(inner, PrefixdError):
        status, code = _status_of(inner)
        return ApiError(status, code, str(inner))
    return None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error_body(error.code, error.message), status_code=error.status)

    @app.exception_handler(PrefixdError)
    async def user_error(request: Request, error: PrefixdError) -> JSONResponse:
        mapped = to_api_error(error)
        assert mapped is not None
        return JSONResponse(error_body(mapped.code, mapped.message), status_code=mapped.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = (
            f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid")
        )
        return JSONResponse(error_body("invalid_request", message), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}
        return JSONResponse(
            error_body(code.get(error.status_code, "http_error"), str(error.detail)),
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )
