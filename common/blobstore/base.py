"""The blob-store interface: a small abstract class with two implementations, S3 (any
S3-compatible server, through boto3) and a local directory.

Every object is written with its SHA-256 and verified when read back: a mismatch raises
:class:`BlobIntegrityError` rather than handing corrupt bytes to the caller.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from common.errors import InvalidInputError, PrefixdError

CHUNK = 1024 * 1024


class BlobStoreError(PrefixdError):
    """Object storage failed; the message names the store (never a credential)."""


class BlobStoreUnavailableError(BlobStoreError):
    """The object store cannot be reached (after retries)."""


class BucketNotFoundError(BlobStoreError):
    """The configured bucket does not exist; the message names it."""


class BlobNotFoundError(BlobStoreError):
    """No object under that key."""

    exit_code = 3


class BlobIntegrityError(BlobStoreError):
    """The bytes read back do not match the SHA-256 stored when they were written."""


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    sha256: str | None = None  # hex; None where a listing does not know it


@dataclass(frozen=True)
class BlobVersion:
    key: str
    version_id: str | None
    is_delete_marker: bool = False
    is_latest: bool = True
    size: int | None = None


@dataclass(frozen=True)
class IncompleteUpload:
    """A write that never finished: an S3 multipart upload neither completed nor aborted
    (its parts are stored, and billed, but no object shows them), or a local temporary
    file. Erasure aborts them; ``verify-deleted`` reports them."""

    key: str
    upload_id: str | None = None  # S3's multipart upload id; None for a local file
    initiated: str | None = None  # ISO time, where the store knows it

    def describe(self) -> str:
        if self.upload_id is not None:
            when = f", started {self.initiated}" if self.initiated else ""
            return f"unfinished multipart upload of {self.key} (upload {self.upload_id}{when})"
        return f"temporary file {self.key}"


_KEY_RE = re.compile(r"^[A-Za-z0-9_=+-][A-Za-z0-9._=+-]*$")


def validate_key(key: str) -> str:
    """Keys are relative, ``/``-separated, of plain components (no ``.``/``..``, no leading
    dot, no empty component); the layout helpers in ``keys`` only make such keys."""
    if not isinstance(key, str) or not key or len(key) > 1024:
        raise InvalidInputError(f"invalid object key {key!r}")
    for part in key.split("/"):
        if not _KEY_RE.fullmatch(part):
            raise InvalidInputError(f"invalid object key {key!r} (component {part!r})")
    return key


def validate_prefix(prefix: str, *, allow_empty: bool = True) -> str:
    """A listing prefix: empty (everything) or a valid key, optionally ending with ``/``."""
    if prefix == "":
        if not allow_empty:
            raise InvalidInputError("refusing an empty key prefix (it would match every object)")
        return prefix
    validate_key(prefix.removesuffix("/"))
    return prefix


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class BlobStore(ABC):
    """Keys are relative to the store's root (a bucket plus key prefix, or a directory)."""

    url: str

    @abstractmethod
    def check(self) -> None:
        """Verify the store is usable (bucket exists, directory writable) or raise."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> BlobInfo:
        """Write (or replace) an object; returns its size and SHA-256."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> BlobInfo:
        """Write a local file (multipart for large files on S3)."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read an object, verifying its SHA-256."""

    @abstractmethod
    def download_file(self, key: str, dest: Path) -> BlobInfo:
        """Copy an object to ``dest`` (atomically), verifying its SHA-256."""

    @abstractmethod
    def head(self, key: str) -> BlobInfo | None:
        """Size and SHA-256 of an object, or None when it does not exist."""

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object (every version of it on a versioned bucket). Missing is fine."""

    @abstractmethod
    def list_objects(self, prefix: str = "") -> list[BlobInfo]:
        """Current objects whose key starts with ``prefix``, sorted by key."""

    @abstractmethod
    def list_versions(self, prefix: str = "") -> list[BlobVersion]:
        """Every stored version and delete marker under ``prefix`` (a store without
        versioning lists its current objects)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Erase everything under ``prefix`` (which must end with ``/``), on a versioned
        bucket every version and delete marker too, and abort every unfinished upload under
        it (:meth:`abort_incomplete_uploads`). Returns the number of keys erased."""

    @abstractmethod
    def list_incomplete_uploads(self, prefix: str) -> list[IncompleteUpload]:
        """Writes under ``prefix`` that never finished (S3 multipart uploads, local
        temporary files); listings of objects and versions do not show them."""

    @abstractmethod
    def abort_incomplete_uploads(self, prefix: str) -> int:
        """Abort (delete) every unfinished write under ``prefix``; returns how many. A writer
        still running then fails (its parts are gone)."""
