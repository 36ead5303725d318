"""The one settings object. Every component reads configuration from a ``Settings``
instance handed to it; nothing else in the code base reads the environment.

Settings come from environment variables (``PREFIXD_*``, plus ``RAY_ADDRESS``); defaults
describe the embedded single-machine mode (SQLite and a blob directory under
``PREFIXD_HOME``, the embedded SmolLM2 model, a local Ray).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFIXD_", extra="ignore")

    home: Path = Field(
        default=Path("~/.prefixd"),
        description="Data directory of the embedded default (SQLite file, blobs, model cache).",
    )
    model: str = Field(
        default="embedded",
        description="Base model: a Hugging Face model directory, or `embedded` (SmolLM2-135M-Instruct).",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL (`postgresql+psycopg://…` or `sqlite:///…`); default a SQLite file in PREFIXD_HOME.",
    )
    blob_url: str | None = Field(
        default=None,
        description="`s3://bucket/key-prefix` or a local directory; default PREFIXD_HOME/blobs.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible server (MinIO, …); default the AWS endpoint.",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token of the admin routes; generated and printed by `prefixd up` when unset.",
    )
    http_port: int = Field(default=8000, ge=1, le=65535, description="Port of the HTTP API.")
    ray_address: str | None = Field(
        default=None,
        validation_alias=AliasChoices("RAY_ADDRESS", "PREFIXD_RAY_ADDRESS"),
        description="Address of an existing Ray cluster; default a local Ray.",
    )

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def model_cache_dir(self) -> Path:
        """Where the embedded model is converted to safetensors once."""
        return self.home_dir / "models"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'prefixd.sqlite3'}"

    @property
    def resolved_blob_url(self) -> str:
        return self.blob_url or str(self.home_dir / "blobs")


def get_settings() -> Settings:
    """Read the settings from the environment now (not at import time)."""
    return Settings()
