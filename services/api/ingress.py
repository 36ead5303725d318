"""The API as a Ray Serve ingress deployment."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve

from common.blobstore import build_blob_store
from common.config import Settings
from common.db.engine import create_db_engine, require_migrated
from services.api.app import create_app
from services.api.context import ApiContext


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
        self.context.validation.warm_up()  # the upload validation processes, likewise

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.context)
