"""``GET /metrics``: Prometheus text format (see ``services/api/metrics.py``)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.api.deps import AdminDep

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
async def metrics(request: Request, _: AdminDep) -> Response:
    """Requests by route and status, request latency, and training jobs by state. Needs the
    admin token (Prometheus: `authorization: {credentials_file: ...}`): the API port is the
    one port published, and the job gauge reads the database on every scrape."""
    registry = request.app.state.metrics.registry
    # The job gauge reads the database.
    body = await request.app.state.context.run_blocking(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
