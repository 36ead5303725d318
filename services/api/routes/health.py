"""Liveness and readiness."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from common.db.engine import check_connection
from services.api.deps import ContextDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


class ReadinessProbe:
    """The last probe of the database and the blob store, reused for
    ``readyz_cache_seconds``: an unauthenticated route must not cost a database and an S3
    round trip per request. Concurrent callers share one probe."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.result: tuple[bool, dict[str, str]] | None = None
        self.at = 0.0
        self.probes = 0


@router.get("/readyz")
async def readyz(request: Request, context: ContextDep) -> Any:
    """The database and the blob store are reachable (probed at most every
    `readyz_cache_seconds`)."""
    probe: ReadinessProbe = request.app.state.readiness
    async with probe.lock:
        fresh = time.monotonic() - probe.at < context.settings.readyz_cache_seconds
        if probe.result is None or not fresh:
            probe.result = await _probe(context)
            probe.at = time.monotonic()
            probe.probes += 1
        ready, checks = probe.result
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


async def _probe(context: Any) -> tuple[bool, dict[str, str]]:
    checks: dict[str, str] = {}
    for name, check in (
        ("database", lambda: check_connection(context.db)),
        ("blob_store", context.blobs.check),
    ):
        try:
            await context.run_blocking(check)
            checks[name] = "ok"
        except Exception as error:  # report which dependency is down, not a 500
            checks[name] = f"unavailable: {type(error).__name__}"
    return all(v == "ok" for v in checks.values()), checks
