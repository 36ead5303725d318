"""Dataset uploads: the body streams to a temporary file (hashed with SHA-256 on the way,
never held whole in memory, never decompressed), every line is parsed and tokenized
(:class:`ExampleChecker`: an example must fit the context minus the longest prefix a job may
ask for), then the blob is written under ``tenants/<tenant>/datasets/<id>.jsonl`` and the
row added (:func:`store_dataset`, which checks the quota under the tenant's row lock).

A rejected upload leaves nothing behind: no row, its blob deleted, the temporary file always
removed. One exception keeps a row from ever pointing at a missing blob: when the database
cannot say whether the row was committed, the blob is kept (erasure removes it at worst)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session
from starlette.datastructures import UploadFile

from common.architectures import is_encoder_decoder, max_positions
from common.blobstore import dataset_key
from common.config import Settings
from common.data import encode_example, parse_jsonl_line
from common.db import crud
from common.db.errors import QuotaExceededError
from common.db.models import Dataset, DatasetCreate
from common.errors import InvalidInputError
from services.api.errors import ApiError

log = logging.getLogger(__name__)

T = TypeVar("T")

JSONL_MEDIA_TYPES = ("application/jsonl", "application/x-ndjson")
MULTIPART_MEDIA_TYPE = "multipart/form-data"
MULTIPART_FIELD = "file"
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers around the file
MAX_LINE_BYTES = 1024 * 1024  # far beyond any example that fits a model's context
CHUNK = 256 * 1024
SPOOL_FILE_PREFIX = "prefixd-upload-"


class ExampleChecker:
    """The base model's tokenizer, config and context length (no weights), loaded once per
    API replica: an example must fit in the context minus the longest prefix a job may ask
    for."""

    def __init__(
        self,
        tokenizer: Any,
        context_length: int,
        settings: Settings,
        *,
        encoder_decoder: bool = False,
        config: Any = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.config = config  # the base model's config (PEFT imports check shapes against it)
        # Encoder-decoder: input and output sit on different sides, each with its own prefix
        # and context, so an example is as long as its longer side.
        self.encoder_decoder = encoder_decoder
        # At most half the context, so a small model keeps room for examples.
        self.max_prefix_length = max(1, min(settings.max_prefix_length, context_length // 2))
        self.max_example_tokens = context_length - self.max_prefix_length
        self._lock = threading.Lock()  # a fast tokenizer is not safe to share between threads

    @classmethod
    def load(cls, settings: Settings) -> ExampleChecker:
        from transformers import AutoConfig, AutoTokenizer

        from common.errors import ModelNotFoundError
        from common.model_loading import resolve_model_dir

        directory = resolve_model_dir(settings.model, settings)
        try:
            config = AutoConfig.from_pretrained(directory, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(f"Cannot load the tokenizer in {directory}: {error}") from None
        return cls(
            tokenizer,
            max_positions(config),
            settings,
            encoder_decoder=is_encoder_decoder(config),
            config=config,
        )

    def example_tokens(self, example: Any) -> int:
        with self._lock:
            encoded = encode_example(self.tokenizer, example, encoder_decoder=self.encoder_decoder)
        return encoded.longest_side if self.encoder_decoder else len(encoded)

    def text_tokens(self, text: str) -> int:
        with self._lock:
            return len(self.tokenizer.encode(text, add_special_tokens=False))

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The prompt text of a chat (``common/chat_format.py``)."""
        from common.chat_format import render_chat

        with self._lock:
            return render_chat(self.tokenizer, messages)


@dataclass
class Spooled:
    path: Path
    size: int
    sha256: str


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The dataset's bytes: the raw body for JSONL, the ``file`` part for multipart.
    Nothing is ever decompressed (no zip bombs): a compressed body is refused."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"compressed uploads are not accepted (Content-Encoding: {encoding[:40]}); "
            "send the JSONL uncompressed",
        )
    kind = media_type(request)
    if kind in JSONL_MEDIA_TYPES:
        async for chunk in request.stream():
            if chunk:
                yield chunk
        return
    if kind == MULTIPART_MEDIA_TYPE:
        # Starlette spools the part to a temporary file (in memory only up to 1 MiB).
        form = await request.form(max_files=1, max_fields=8)
        try:
            upload = form.get(MULTIPART_FIELD)
            if not isinstance(upload, UploadFile):
                raise ApiError(
                    422,
                    "invalid_request",
                    f"a multipart upload needs the dataset as a file field named "
                    f"{MULTIPART_FIELD!r}",
                )
            while chunk := await upload.read(CHUNK):
                yield chunk
        finally:
            await form.close()
        return
    raise ApiError(
        415,
        "unsupported_media_type",
        f"send the dataset as {' or '.join(JSONL_MEDIA_TYPES)}, or as {MULTIPART_MEDIA_TYPE} "
        f"with a file field named {MULTIPART_FIELD!r} (got {kind or 'no content type'!r})",
    )


async def spool(
    chunks: AsyncIterator[bytes], *, max_bytes: int, too_large: Callable[[], ApiError]
) -> Spooled:
    """Write the chunks to a temporary file, counting and hashing them; ``too_large()`` is
    raised past ``max_bytes`` (the temporary file is removed on any error)."""
    fd, name = tempfile.mkstemp(prefix=SPOOL_FILE_PREFIX, suffix=".jsonl")
    path = Path(name)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise too_large()
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return Spooled(path, size, digest.hexdigest())


def sweep_stale_spool_files(
    max_age_seconds: float, *, directory: Path | None = None, now: float | None = None
) -> int:
    """Remove this user's ``prefixd-upload-*`` spool files older than ``max_age_seconds``
    from the temporary directory: left by an API replica killed mid-upload (a running one
    removes its own). Called when an API replica starts; a younger file may belong to a
    replica that is still running on this machine, so it is left alone. Returns how many
    were removed."""
    import time

    where = directory or Path(tempfile.gettempdir())
    at = time.time() if now is None else now
    removed = 0
    for path in where.glob(f"{SPOOL_FILE_PREFIX}*"):
        try:
            stat = path.lstat()
            if not path.is_file() or path.is_symlink() or stat.st_uid != os.getuid():
                continue
            if at - stat.st_mtime > max_age_seconds:
                path.unlink()
                removed += 1
        except OSError:  # gone meanwhile, or not ours to remove
            continue
    if removed:
        log.info("removed %d stale upload spool file(s) from %s", removed, where)
    return removed


def count_valid_examples(path: Path, checker: ExampleChecker, *, max_examples: int) -> int:
    """Validate every line (UTF-8, a JSON object in one of the shapes of ``common/data.py``,
    each example within the token limit) and count the examples (a chat line has one per
    trained assistant message); the first bad line's number is in the error."""
    count = 0
    with path.open("rb") as lines:
        number = 0
        while raw := lines.readline(MAX_LINE_BYTES + 1):
            number += 1
            if len(raw) > MAX_LINE_BYTES:
                raise InvalidInputError(f"line {number}: longer than {MAX_LINE_BYTES} bytes")
            for example in parse_jsonl_line(raw, where=f"line {number}"):
                where = f"line {number}"
                if example.context is not None:  # a chat: name the assistant message
                    where += f", message {len(example.context) + 1}"
                try:
                    tokens = checker.example_tokens(example)
                except InvalidInputError as error:  # e.g. the chat template refused it
                    raise InvalidInputError(f"{where}: {error}") from None
                if tokens > checker.max_example_tokens:
                    measured = (
                        "its longer side has" if checker.encoder_decoder else "the example has"
                    )
                    raise InvalidInputError(
                        f"{where}: {measured} {tokens} tokens; the limit is "
                        f"{checker.max_example_tokens} (the model's context of "
                        f"{checker.context_length} tokens minus the longest prefix, "
                        f"{checker.max_prefix_length})"
                    )
                count += 1
                if count > max_examples:
                    raise ApiError(
                        413,
                        "payload_too_large",
                        f"line {number}: more examples than max_dataset_examples ({max_examples})",
                    )
    if count == 0:
        raise InvalidInputError(
            'no examples: send one {"input": ..., "output": ...} or {"messages": [...]} a line'
        )
    return count


def store_dataset(
    *,
    engine: Any,
    blobs: Any,
    tenant_id: uuid.UUID,
    spooled: Spooled,
    examples: int,
    quota_bytes: int,
) -> Dataset:
    """Blob first, then the row (which checks the storage quota under the tenant's lock);
    if the row cannot be added, the blob is deleted again."""
    dataset_id = uuid.uuid4()
    key = dataset_key(tenant_id, dataset_id)  # from ids only, never from a user's name
    blobs.put_file(key, spooled.path)
    try:
        return add_row_for_stored_blob(
            engine=engine,
            blobs=blobs,
            key=key,
            what=f"dataset {dataset_id}",
            add_row=lambda session: crud.add_dataset(
                session=session,
                tenant_id=tenant_id,
                dataset_in=DatasetCreate(
                    id=dataset_id,
                    object_key=key,
                    sha256=spooled.sha256,
                    size_bytes=spooled.size,
                    example_count=examples,
                ),
                max_total_bytes=quota_bytes,
            ),
            find_row=lambda session: crud.get_dataset(
                session=session, tenant_id=tenant_id, dataset_id=dataset_id
            ),
        )
    except QuotaExceededError as error:
        raise ApiError(413, "quota_exceeded", str(error)) from None


def add_row_for_stored_blob(
    *,
    engine: Any,
    blobs: Any,
    key: str,
    what: str,
    add_row: Callable[[Session], T],
    find_row: Callable[[Session], T | None],
) -> T:
    """Add the row of a blob already stored at ``key`` (blob first, then the row). If the
    row cannot be added, the blob is deleted again — unless the database cannot say whether
    the commit happened: the row may exist and point at this blob, so the blob is kept (an
    orphan at worst, under the tenant's prefix, which erasure removes). No row ever points
    at a missing blob. The callables run in a session of their own and return rows usable
    after it closes."""
    try:
        with Session(engine) as session:
            return add_row(session)
    except BaseException as error:
        if isinstance(error, SQLAlchemyError):
            # The connection may have died around the commit: find out what happened.
            try:
                with Session(engine) as session:
                    committed = find_row(session)
            except SQLAlchemyError:
                log.warning("%s: outcome unknown (%s); blob kept", what, type(error).__name__)
                raise error from None
            if committed is not None:
                return committed
        try:
            blobs.delete(key)
        except Exception:  # it failed anyway; tenant erasure sweeps the prefix
            log.warning("could not delete the blob of refused %s", what)
        raise


def remove_spooled(spooled: Spooled | None) -> None:
    if spooled is not None:
        with contextlib.suppress(OSError):
            spooled.path.unlink(missing_ok=True)
