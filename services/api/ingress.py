"""The API as a Ray Serve ingress deployment."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from ray import serve

from common.blobstore import build_blob_store
from common.config import Settings
from common.db.engine import create_db_engine, require_migrated
from services.api.app import create_app
from services.api.context import ApiContext

log = logging.getLogger(__name__)

# How long a starting replica waits for its upload validation processes (spawning them on
# a busy machine takes tens of seconds); past it, the first upload waits for them instead.
VALIDATION_WARM_UP_S = 120


@serve.deployment(name="api")
@serve.ingress()
class ApiIngress:
    def __init__(self, inference: Any, settings: Settings, model_fingerprint: str) -> None:
        db = create_db_engine(settings)
        require_migrated(db)  # refuse to serve on an unmigrated database
        self.context = ApiContext(
            settings=settings,
            db=db,
            blobs=build_blob_store(settings),
            inference=inference,
            model_fingerprint=model_fingerprint,
        )
        # The tokenizer (not the weights) validates uploads: load it now, not on first use.
        self.context.example_checker()
        # The upload validation processes, likewise: the replica is ready once they are.
        if not self.context.validation.warm_up(timeout=VALIDATION_WARM_UP_S):
            log.warning(
                "upload validation processes still loading after %d s", VALIDATION_WARM_UP_S
            )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.context)
