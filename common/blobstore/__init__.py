"""Blob storage: datasets and prefix files, in S3 (or an S3-compatible server) or a local
directory. ``build_blob_store(settings)`` picks the implementation from
``Settings.resolved_blob_url``; ``keys`` holds the object-key layout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.blobstore.base import (
    BlobInfo,
    BlobIntegrityError,
    BlobNotFoundError,
    BlobStore,
    BlobStoreError,
    BlobStoreUnavailableError,
    BlobVersion,
    BucketNotFoundError,
    IncompleteUpload,
)
from common.blobstore.keys import (
    dataset_key,
    datasets_key_prefix,
    prefix_key,
    prefixes_key_prefix,
    tenant_key_prefix,
    validate_id,
)
from common.blobstore.local import LocalBlobStore
from common.config import Settings
from common.errors import InvalidInputError

if TYPE_CHECKING:
    import boto3

    from common.blobstore.s3 import S3BlobStore


def build_blob_store(
    settings: Settings, *, boto_session: boto3.Session | None = None, **s3_options: Any
) -> BlobStore:
    """The store ``Settings.resolved_blob_url`` names: ``s3://bucket/prefix`` (endpoint from
    ``Settings.s3_endpoint_url``) or a local directory (``file://`` or a plain path)."""
    url = settings.resolved_blob_url
    if url.startswith("s3://"):
        from common.blobstore.s3 import S3BlobStore

        options = {"max_attempts": settings.s3_max_attempts} | s3_options
        return S3BlobStore.from_url(
            url, endpoint_url=settings.s3_endpoint_url, session=boto_session, **options
        )
    if url.startswith("file://"):
        return LocalBlobStore(Path(url[len("file://") :]))
    if "://" in url:
        raise InvalidInputError(
            f"unsupported PREFIXD_BLOB_URL scheme in {url.split('://')[0]!r}://…: use "
            "s3://bucket/prefix or a local directory"
        )
    return LocalBlobStore(Path(url))


def __getattr__(name: str) -> Any:
    if name == "S3BlobStore":  # imported lazily: boto3 is slow to import
        from common.blobstore.s3 import S3BlobStore

        return S3BlobStore
    raise AttributeError(name)


__all__ = [
    "BlobInfo",
    "BlobIntegrityError",
    "BlobNotFoundError",
    "BlobStore",
    "BlobStoreError",
    "BlobStoreUnavailableError",
    "BlobVersion",
    "BucketNotFoundError",
    "IncompleteUpload",
    "LocalBlobStore",
    "S3BlobStore",
    "build_blob_store",
    "dataset_key",
    "datasets_key_prefix",
    "prefix_key",
    "prefixes_key_prefix",
    "tenant_key_prefix",
    "validate_id",
]
