"""Blob store in a local directory (the embedded default): atomic writes (temporary file,
fsync, rename) and a SHA-256 sidecar per object (``.<name>.sha256``), verified on read."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from common.blobstore.base import (
    CHUNK,
    BlobInfo,
    BlobIntegrityError,
    BlobNotFoundError,
    BlobStore,
    BlobStoreError,
    BlobVersion,
    IncompleteUpload,
    sha256_hex,
    validate_key,
    validate_prefix,
)

_SIDECAR_SUFFIX = ".sha256"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(dest: Path, chunks: Iterator[bytes]) -> tuple[int, str]:
    """Write chunks to ``dest`` through a temporary file and a rename; returns
    (size, sha256)."""
    import hashlib

    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                h.update(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(dest.parent)
    return size, h.hexdigest()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from iter(lambda: f.read(CHUNK), b"")


class LocalBlobStore(BlobStore):
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    # -- paths --

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(f".{path.name}{_SIDECAR_SUFFIX}")

    def _stored_sha256(self, key: str, path: Path) -> str:
        try:
            return self._sidecar(path).read_text().strip()
        except FileNotFoundError:
            raise BlobIntegrityError(
                f"object {key!r} in {self.url} has no stored SHA-256 (incomplete write?)"
            ) from None

    # -- interface --

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-check-")
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise BlobStoreError(f"blob directory {self.url} is not writable: {e}") from None

    def _put(self, key: str, chunks: Iterator[bytes]) -> BlobInfo:
        path = self._path(key)
        size, digest = _atomic_write(path, chunks)
        _atomic_write(self._sidecar(path), iter([digest.encode()]))
        return BlobInfo(key=key, size=size, sha256=digest)

    def put_bytes(self, key: str, data: bytes) -> BlobInfo:
        return self._put(key, iter([bytes(data)]))

    def put_file(self, key: str, path: Path) -> BlobInfo:
        return self._put(key, _file_chunks(Path(path)))

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise BlobNotFoundError(f"object {key!r} not found in {self.url}") from None
        expected = self._stored_sha256(key, path)
        actual = sha256_hex(data)
        if actual != expected:
            raise BlobIntegrityError(
                f"object {key!r} in {self.url} is corrupt: SHA-256 {actual} != stored {expected}"
            )
        return data

    def download_file(self, key: str, dest: Path) -> BlobInfo:
        path = self._path(key)
        if not path.is_file():
            raise BlobNotFoundError(f"object {key!r} not found in {self.url}")
        expected = self._stored_sha256(key, path)
        dest = Path(dest)
        tmp = dest.with_name(f".{dest.name}.part")
        size, actual = _atomic_write(tmp, _file_chunks(path))
        if actual != expected:
            tmp.unlink(missing_ok=True)
            raise BlobIntegrityError(
                f"object {key!r} in {self.url} is corrupt: SHA-256 {actual} != stored {expected}"
            )
        os.replace(tmp, dest)
        return BlobInfo(key=key, size=size, sha256=actual)

    def head(self, key: str) -> BlobInfo | None:
        path = self._path(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        sidecar = self._sidecar(path)
        digest = sidecar.read_text().strip() if sidecar.exists() else None
        return BlobInfo(key=key, size=size, sha256=digest)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        self._sidecar(path).unlink(missing_ok=True)

    def _walk(self, prefix: str) -> Iterator[tuple[str, Path]]:
        validate_prefix(prefix)
        # Start at the deepest directory the prefix names, then filter by the full prefix.
        base_parts = prefix.split("/")[:-1]
        start = self.root.joinpath(*base_parts) if base_parts else self.root
        if not start.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key, full

    def list_objects(self, prefix: str = "") -> list[BlobInfo]:
        out = []
        for key, path in self._walk(prefix):
            sidecar = self._sidecar(path)
            digest = sidecar.read_text().strip() if sidecar.exists() else None
            out.append(BlobInfo(key=key, size=path.stat().st_size, sha256=digest))
        return sorted(out, key=lambda b: b.key)

    def list_versions(self, prefix: str = "") -> list[BlobVersion]:
        return [
            BlobVersion(key=b.key, version_id=None, size=b.size) for b in self.list_objects(prefix)
        ]

    def _hidden_leftovers(self, prefix: str) -> Iterator[tuple[str, Path]]:
        """Hidden files under ``prefix`` that are no object's SHA-256 sidecar: temporary
        files of writes that never finished (``.tmp-*`` of :func:`_atomic_write`, ``.*.part``
        of a download), and sidecars whose object is gone."""
        validate_prefix(prefix)
        base_parts = prefix.split("/")[:-1]
        start = self.root.joinpath(*base_parts) if base_parts else self.root
        if not start.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            for name in sorted(filenames):
                if not name.startswith("."):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                if name.endswith(_SIDECAR_SUFFIX) and not name.startswith(".tmp-"):
                    owner = full.with_name(name[1 : -len(_SIDECAR_SUFFIX)])
                    if owner.is_file():
                        continue
                yield key, full

    def list_incomplete_uploads(self, prefix: str) -> list[IncompleteUpload]:
        return [IncompleteUpload(key=key) for key, _ in self._hidden_leftovers(prefix)]

    def abort_incomplete_uploads(self, prefix: str) -> int:
        validate_prefix(prefix, allow_empty=False)
        found = list(self._hidden_leftovers(prefix))
        for _, path in found:
            path.unlink(missing_ok=True)
        return len(found)

    def delete_prefix(self, prefix: str) -> int:
        validate_prefix(prefix, allow_empty=False)
        if not prefix.endswith("/"):
            raise BlobStoreError(f"delete_prefix needs a prefix ending with '/', got {prefix!r}")
        keys = [key for key, _ in self._walk(prefix)]
        directory = self.root.joinpath(*prefix.rstrip("/").split("/"))
        if directory.is_dir():
            shutil.rmtree(directory)
        return len(keys)
