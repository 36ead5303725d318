"""Blob store on S3 or any S3-compatible server (MinIO, …), through boto3.

- ``s3://bucket/key-prefix``; the endpoint comes from ``Settings.s3_endpoint_url``.
- Transient failures (throttling, 5xx, dropped connections) are retried by botocore's
  ``standard`` retry mode with exponential backoff and jitter, ``max_attempts`` tries per
  request (``Settings.s3_max_attempts``); then :class:`BlobStoreUnavailableError` (a 503).
- Every object carries its full SHA-256 in the ``x-amz-meta-sha256`` metadata, and reads
  verify it (multipart uploads included, where S3's own checksum is per part). Single-part
  writes also send ``ChecksumSHA256`` so the server rejects bytes damaged in transit.
- Large files go up in parts (boto3's managed transfer, ``TransferConfig``).
- Deleting a key prefix removes every version and delete marker on a versioned bucket.

Credentials come from boto3's usual chain (environment, profile, instance role) or from the
``boto3.Session`` handed in; they are never logged or put in a message.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)

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
    sha256_file,
    sha256_hex,
    validate_key,
    validate_prefix,
)
from common.errors import InvalidInputError

META_SHA256 = "sha256"
MB = 1024 * 1024
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_DELETE_BATCH = 1000


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → (``bucket``, ``some/prefix/``)."""
    if not url.startswith("s3://"):
        raise InvalidInputError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not _BUCKET_RE.fullmatch(bucket):
        raise InvalidInputError(
            f"invalid S3 bucket name {bucket!r} in PREFIXD_BLOB_URL (3-63 characters: "
            "lower-case letters, digits, dots, hyphens)"
        )
    prefix = prefix.strip("/")
    if prefix:
        validate_key(prefix)
        prefix += "/"
    return bucket, prefix


class S3BlobStore(BlobStore):
    def __init__(
        self,
        bucket: str,
        base_prefix: str = "",
        *,
        endpoint_url: str | None = None,
        session: boto3.Session | None = None,
        max_attempts: int = 5,
        connect_timeout_s: float = 10,
        read_timeout_s: float = 60,
        multipart_threshold: int = 64 * MB,
        multipart_chunksize: int = 16 * MB,
    ) -> None:
        bucket, base = parse_s3_url(f"s3://{bucket}/{base_prefix}")
        self.bucket = bucket
        self.base = base
        self.endpoint_url = endpoint_url
        self.url = f"s3://{bucket}/{base}"
        where = f" at {endpoint_url}" if endpoint_url else ""
        self._where = where
        config = Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            # Custom endpoints (MinIO, test servers) are reached path-style.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
        )
        session = session or boto3.session.Session()
        self.client: Any = session.client("s3", endpoint_url=endpoint_url, config=config)
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            use_threads=True,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        endpoint_url: str | None = None,
        session: boto3.Session | None = None,
        **kwargs: Any,
    ) -> S3BlobStore:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, endpoint_url=endpoint_url, session=session, **kwargs)

    # -- keys and errors --

    def _full(self, key: str) -> str:
        return self.base + validate_key(key)

    def _rel(self, full_key: str) -> str:
        return full_key[len(self.base) :]

    def _bucket_missing(self) -> BucketNotFoundError:
        return BucketNotFoundError(f"S3 bucket {self.bucket!r} does not exist{self._where}")

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn boto errors into clear PrefixdErrors naming the bucket and the key."""
        try:
            yield
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                raise self._bucket_missing() from None
            if code in ("NoSuchKey", "NoSuchVersion") or (code == "404" and status == 404):
                raise BlobNotFoundError(f"{what}: not found in {self.url}{self._where}") from None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise BlobStoreError(
                    f"{what}: access to S3 bucket {self.bucket!r}{self._where} denied ({code}); "
                    "check the credentials and the bucket policy"
                ) from None
            raise BlobStoreError(
                f"{what}: S3 request to bucket {self.bucket!r}{self._where} failed: "
                f"{code or status} {err.get('Message', '')}".rstrip()
            ) from None
        except NoCredentialsError:
            raise BlobStoreError(
                f"{what}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or an AWS profile or role)"
            ) from None
        except EndpointConnectionError as e:
            raise BlobStoreUnavailableError(
                f"{what}: cannot reach the S3 endpoint {e.kwargs.get('endpoint_url', '')} "
                f"for bucket {self.bucket!r} (after retries)"
            ) from None
        except S3UploadFailedError as e:
            if "NoSuchBucket" in str(e):
                raise self._bucket_missing() from None
            raise BlobStoreError(f"{what}: upload to {self.url}{self._where} failed: {e}") from None
        except BotoCoreError as e:
            raise BlobStoreUnavailableError(
                f"{what}: S3 request to bucket {self.bucket!r}{self._where} failed: {e}"
            ) from None

    def _check_bucket_on_404(self) -> None:
        """HEAD answers a bare 404 for a missing bucket and a missing key alike."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                raise self._bucket_missing() from None

    # -- interface --

    def check(self) -> None:
        try:
            with self._errors("checking the bucket"):
                self.client.head_bucket(Bucket=self.bucket)
        except BlobNotFoundError:
            raise self._bucket_missing() from None

    def put_bytes(self, key: str, data: bytes) -> BlobInfo:
        data = bytes(data)
        digest = sha256_hex(data)
        full = self._full(key)
        with self._errors(f"writing {key!r}"):
            if len(data) >= self.transfer_config.multipart_threshold:
                self._upload(io.BytesIO(data), full, digest)
            else:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=full,
                    Body=data,
                    Metadata={META_SHA256: digest},
                    ChecksumSHA256=base64.b64encode(bytes.fromhex(digest)).decode(),
                )
        return BlobInfo(key=key, size=len(data), sha256=digest)

    def _upload(self, fileobj: Any, full: str, digest: str) -> None:
        self.client.upload_fileobj(
            fileobj,
            self.bucket,
            full,
            ExtraArgs={"Metadata": {META_SHA256: digest}, "ChecksumAlgorithm": "SHA256"},
            Config=self.transfer_config,
        )

    def put_file(self, key: str, path: Path) -> BlobInfo:
        path = Path(path)
        if path.stat().st_size < self.transfer_config.multipart_threshold:
            return self.put_bytes(key, path.read_bytes())
        digest = sha256_file(path)
        full = self._full(key)
        with self._errors(f"writing {key!r}"), open(path, "rb") as f:
            self._upload(f, full, digest)
        return BlobInfo(key=key, size=path.stat().st_size, sha256=digest)

    def _verify(self, key: str, expected: str | None, actual: str) -> None:
        if expected is None:
            raise BlobIntegrityError(
                f"object {key!r} in {self.url} has no stored SHA-256 (not written by prefixd?)"
            )
        if expected != actual:
            raise BlobIntegrityError(
                f"object {key!r} in {self.url} is corrupt: SHA-256 {actual} != stored {expected}"
            )

    def get_bytes(self, key: str) -> bytes:
        full = self._full(key)
        with self._errors(f"reading {key!r}"):
            resp = self.client.get_object(Bucket=self.bucket, Key=full)
            data: bytes = resp["Body"].read()
        self._verify(key, resp.get("Metadata", {}).get(META_SHA256), sha256_hex(data))
        return data

    def download_file(self, key: str, dest: Path) -> BlobInfo:
        full = self._full(key)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(f"reading {key!r}"):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=full)
            except ClientError:
                self._check_bucket_on_404()
                raise
            extra: dict[str, Any] = {}
            if head.get("VersionId") not in (None, "null"):
                extra["VersionId"] = head["VersionId"]  # the very bytes the metadata describes
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.part-")
            try:
                with os.fdopen(fd, "wb") as f:
                    self.client.download_fileobj(
                        self.bucket, full, f, ExtraArgs=extra, Config=self.transfer_config
                    )
                digest = sha256_file(Path(tmp))
                self._verify(key, head.get("Metadata", {}).get(META_SHA256), digest)
                os.replace(tmp, dest)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return BlobInfo(key=key, size=dest.stat().st_size, sha256=digest)

    def head(self, key: str) -> BlobInfo | None:
        full = self._full(key)
        try:
            with self._errors(f"looking up {key!r}"):
                try:
                    resp = self.client.head_object(Bucket=self.bucket, Key=full)
                except ClientError:
                    self._check_bucket_on_404()
                    raise
        except BlobNotFoundError:
            return None
        return BlobInfo(
            key=key,
            size=int(resp["ContentLength"]),
            sha256=resp.get("Metadata", {}).get(META_SHA256),
        )

    def _iter_versions(self, full_prefix: str) -> Iterator[BlobVersion]:
        paginator = self.client.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            for v in page.get("Versions", []):
                yield BlobVersion(
                    key=v["Key"],
                    version_id=v.get("VersionId"),
                    is_latest=bool(v.get("IsLatest", True)),
                    size=int(v.get("Size", 0)),
                )
            for m in page.get("DeleteMarkers", []):
                yield BlobVersion(
                    key=m["Key"],
                    version_id=m.get("VersionId"),
                    is_delete_marker=True,
                    is_latest=bool(m.get("IsLatest", True)),
                )

    def _iter_objects(self, full_prefix: str) -> Iterator[BlobInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            for o in page.get("Contents", []):
                yield BlobInfo(key=o["Key"], size=int(o.get("Size", 0)))

    def list_objects(self, prefix: str = "") -> list[BlobInfo]:
        full_prefix = self.base + validate_prefix(prefix)
        with self._errors(f"listing {prefix!r}"):
            found = [
                BlobInfo(key=self._rel(b.key), size=b.size) for b in self._iter_objects(full_prefix)
            ]
        return sorted(found, key=lambda b: b.key)

    def list_versions(self, prefix: str = "") -> list[BlobVersion]:
        full_prefix = self.base + validate_prefix(prefix)
        with self._errors(f"listing versions under {prefix!r}"):
            found = [
                BlobVersion(
                    key=self._rel(v.key),
                    version_id=v.version_id,
                    is_delete_marker=v.is_delete_marker,
                    is_latest=v.is_latest,
                    size=v.size,
                )
                for v in self._iter_versions(full_prefix)
            ]
        return sorted(found, key=lambda v: (v.key, not v.is_latest))

    def _delete_batch(self, objects: list[dict[str, str]]) -> None:
        for i in range(0, len(objects), _DELETE_BATCH):
            resp = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": objects[i : i + _DELETE_BATCH], "Quiet": True},
            )
            errors = resp.get("Errors", [])
            if errors:
                first = errors[0]
                raise BlobStoreError(
                    f"could not delete {len(errors)} object version(s) in bucket "
                    f"{self.bucket!r}, e.g. {self._rel(first.get('Key', ''))!r}: "
                    f"{first.get('Code')} {first.get('Message', '')}".rstrip()
                )

    def _erase(self, full_prefix: str, *, exact_key: str | None = None) -> int:
        """Delete every version and delete marker (then any current object left, for
        servers without versioning support) under ``full_prefix``."""
        erased: set[str] = set()
        targets: list[dict[str, str]] = []
        try:
            for v in self._iter_versions(full_prefix):
                if exact_key is not None and v.key != exact_key:
                    continue
                target = {"Key": v.key}
                if v.version_id is not None:
                    target["VersionId"] = v.version_id
                targets.append(target)
                if not v.is_delete_marker:
                    erased.add(v.key)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code not in ("NotImplemented", "MethodNotAllowed"):
                raise
        self._delete_batch(targets)
        leftovers = [
            {"Key": o.key}
            for o in self._iter_objects(full_prefix)
            if exact_key is None or o.key == exact_key
        ]
        erased.update(o["Key"] for o in leftovers)
        self._delete_batch(leftovers)
        return len(erased)

    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._errors(f"deleting {key!r}"):
            self._erase(full, exact_key=full)

    def delete_prefix(self, prefix: str) -> int:
        validate_prefix(prefix, allow_empty=False)
        if not prefix.endswith("/"):
            raise BlobStoreError(f"delete_prefix needs a prefix ending with '/', got {prefix!r}")
        with self._errors(f"deleting everything under {prefix!r}"):
            self._abort_uploads(self.base + prefix)  # first: a writer's parts go too
            return self._erase(self.base + prefix)

    def _iter_uploads(self, full_prefix: str) -> Iterator[IncompleteUpload]:
        paginator = self.client.get_paginator("list_multipart_uploads")
        try:
            pages = list(paginator.paginate(Bucket=self.bucket, Prefix=full_prefix))
        except ClientError as e:  # a server without multipart listing has none to show
            if e.response.get("Error", {}).get("Code") in ("NotImplemented", "MethodNotAllowed"):
                return
            raise
        for page in pages:
            for upload in page.get("Uploads", []):
                initiated = upload.get("Initiated")
                yield IncompleteUpload(
                    key=upload["Key"],
                    upload_id=upload["UploadId"],
                    initiated=initiated.isoformat() if initiated is not None else None,
                )

    def _abort_uploads(self, full_prefix: str) -> int:
        aborted = 0
        for upload in list(self._iter_uploads(full_prefix)):
            try:
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=upload.key, UploadId=upload.upload_id
                )
            except ClientError as e:  # finished or aborted meanwhile: gone either way
                if e.response.get("Error", {}).get("Code") != "NoSuchUpload":
                    raise
            aborted += 1
        return aborted

    def list_incomplete_uploads(self, prefix: str) -> list[IncompleteUpload]:
        full_prefix = self.base + validate_prefix(prefix)
        with self._errors(f"listing unfinished uploads under {prefix!r}"):
            return [
                IncompleteUpload(self._rel(u.key), u.upload_id, u.initiated)
                for u in self._iter_uploads(full_prefix)
            ]

    def abort_incomplete_uploads(self, prefix: str) -> int:
        full_prefix = self.base + validate_prefix(prefix, allow_empty=False)
        with self._errors(f"aborting unfinished uploads under {prefix!r}"):
            return self._abort_uploads(full_prefix)
