"""The FastAPI application of the HTTP API (routes under ``/v1``)."""

from __future__ import annotations

from importlib.metadata import version

from fastapi import FastAPI

from services.api.context import ApiContext
from services.api.errors import RequestIdMiddleware, install_error_handlers
from services.api.limits import BodyLimit, BodySizeLimitMiddleware
from services.api.metrics import ApiMetrics, MetricsMiddleware
from services.api.routes import (
    admin,
    base_prefixes,
    chat,
    datasets,
    fine_tuning,
    generate,
    health,
    jobs,
    metrics,
    models,
    prefixes,
    tenants,
)
from services.api.uploads import MULTIPART_OVERHEAD_BYTES, sweep_stale_spool_files


def create_app(context: ApiContext) -> FastAPI:
    """The app of one API replica (built once, when the replica starts)."""
    settings = context.settings
    # Spool files of a replica that was killed mid-upload (old enough not to be another
    # running replica's).
    sweep_stale_spool_files(settings.upload_spool_stale_seconds)
    app = FastAPI(
        title="prefixd",
        version=version("prefixd"),
        description="Per-tenant prefix-tuning on one frozen language model. Authenticate "
        "with `Authorization: Bearer <key>`: a tenant's API key, or the admin token for "
        'tenant management. Every error is `{"error": {"code": "...", "message": "..."}}`, '
        "except on the OpenAI-shaped routes (chat, completions, models, files, fine-tuning), "
        'which answer OpenAI\'s `{"error": {"message", "type", "param", "code"}}`.',
    )
    app.state.context = context
    app.state.metrics = ApiMetrics(context.db)
    app.state.readiness = health.ReadinessProbe()
    install_error_handlers(app)
    # Added innermost first: metrics is outermost, so it also counts the 413s.
    app.add_middleware(
        BodySizeLimitMiddleware,
        default=BodyLimit("max_request_bytes", settings.max_request_bytes),
        per_route={
            ("POST", "/v1/datasets"): BodyLimit(
                "max_dataset_bytes",
                settings.max_dataset_bytes + MULTIPART_OVERHEAD_BYTES,
                framing=MULTIPART_OVERHEAD_BYTES,
            ),
            ("POST", prefixes.PEFT_IMPORT_PATH): BodyLimit(
                "max_peft_adapter_bytes",
                settings.max_peft_adapter_bytes + MULTIPART_OVERHEAD_BYTES,
                framing=MULTIPART_OVERHEAD_BYTES,
            ),
            ("POST", base_prefixes.OPERATOR_DATASETS_PATH): BodyLimit(
                "max_dataset_bytes",
                settings.max_dataset_bytes + MULTIPART_OVERHEAD_BYTES,
                framing=MULTIPART_OVERHEAD_BYTES,
            ),
        },
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer carries the id
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(tenants.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(prefixes.router)
    app.include_router(models.router)
    app.include_router(fine_tuning.router)
    app.include_router(admin.router)
    app.include_router(base_prefixes.router)
    # Admission (rate, cost, concurrency) happens in the generate and chat routes.
    app.include_router(generate.router)
    app.include_router(chat.router)
    return app
