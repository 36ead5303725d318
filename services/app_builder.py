"""Typed builder of the Serve application (API ingress + inference), named by
``deploy/serve_config.yaml`` as ``services.app_builder:build_app``.

    serve run services.app_builder:build_app          # or `prefixd up`
"""

# No `from __future__ import annotations` here: Ray Serve reads build_app's annotation at
# run time to validate `args` into AppArgs; a string annotation would hand it a plain dict.
from typing import Any

from pydantic import BaseModel
from ray.serve import Application

from common.config import Settings
from common.model_holder import get_shared_model
from services.api.ingress import ApiIngress
from services.inference.deployment import InferenceDeployment

# The names `serve run`/`serve deploy`, `prefixd up`, the erasure's replica evictor and the
# tests address the application and its deployments by; deploy/serve_config.yaml repeats
# APP_NAME (tests/deploy/test_manifests.py checks that it does).
APP_NAME = "prefixd"
API_DEPLOYMENT = "api"
INFERENCE_DEPLOYMENT = "inference"


class AppArgs(BaseModel):
    """Overrides on top of the environment's settings (``serve deploy`` args)."""

    settings: dict[str, Any] = {}


def ingress_options(settings: Settings) -> dict[str, Any]:
    """The API ingress sized from settings: Serve's defaults (one replica, 5 requests at
    once) queued every tenant behind five open streams or slow uploads of one."""
    return {
        "name": API_DEPLOYMENT,
        "num_replicas": settings.api_replicas,
        "max_ongoing_requests": settings.api_max_ongoing_requests,
        "max_queued_requests": settings.api_max_queued_requests,
        "ray_actor_options": {"num_cpus": 0},
    }


def build_app_from_settings(settings: Settings) -> Application:
    shared = get_shared_model(settings)
    inference = InferenceDeployment.options(
        name=INFERENCE_DEPLOYMENT,
        num_replicas=settings.inference_replicas,
        max_ongoing_requests=settings.inference_max_ongoing_requests,
        ray_actor_options={
            "num_cpus": settings.inference_num_cpus,
            "num_gpus": settings.inference_num_gpus,
        },
    ).bind(shared, settings)
    return ApiIngress.options(**ingress_options(settings)).bind(  # type: ignore[attr-defined]
        inference, settings, shared.fingerprint
    )


def build_app(args: AppArgs) -> Application:
    return build_app_from_settings(Settings(**args.settings))
