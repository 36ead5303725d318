"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from common.db.engine import check_connection
from services.api.deps import ContextDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(context: ContextDep) -> Any:
    """The database and the blob store are reachable."""
    checks: dict[str, str] = {}
    for name, check in (
        ("database", lambda: check_connection(context.db)),
        ("blob_store", context.blobs.check),
    ):
        try:
            await run_in_threadpool(check)
            checks[name] = "ok"
        except Exception as error:  # report which dependency is down, not a 500
            checks[name] = f"unavailable: {type(error).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )
