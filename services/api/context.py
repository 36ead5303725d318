"""What every request handler needs, built once per ingress replica."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from common.blobstore import BlobStore
from common.config import Settings


@dataclass
class ApiContext:
    settings: Settings
    db: Engine
    blobs: BlobStore
    inference: Any  # DeploymentHandle of services.inference.deployment.InferenceServer
    model_fingerprint: str
