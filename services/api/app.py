"""The FastAPI application of the HTTP API (routes under ``/v1``)."""

from __future__ import annotations

from fastapi import FastAPI

import prefixd
from services.api.context import ApiContext
from services.api.errors import install_error_handlers
from services.api.routes import generate, health


def create_app(context: ApiContext) -> FastAPI:
    app = FastAPI(
        title="prefixd",
        version=prefixd.__version__,
        description="Per-tenant prefix-tuning on one frozen language model.",
    )
    app.state.context = context
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(generate.router)
    return app
