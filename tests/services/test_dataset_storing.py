"""Storing an uploaded dataset when the database connection dies around the commit.

The blob is written first, then the row. If the commit's outcome is unknown, deleting the
blob could leave a visible dataset without its data, so ``store_dataset`` finds out: a
committed row is the upload's result, no row means the blob is deleted, and "cannot tell"
keeps the blob. The failures are real SQLAlchemy errors raised from engine/session events
on the real PostgreSQL; the blob store is S3 over HTTP.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlmodel import Session, select

from common.db.models import Dataset
from services.api.uploads import Spooled, store_dataset
from tests.fixtures.factories import make_tenant


class ConnectionDrops:
    """Raises ``OperationalError`` as a dropped connection would: ``after_commit`` (the row
    is committed, the client never hears), ``on_insert`` (nothing committed), and from then
    on every statement when ``then_unreachable``."""

    def __init__(self, engine: Engine, *, when: str, then_unreachable: bool = False) -> None:
        self.engine, self.when, self.then_unreachable = engine, when, then_unreachable
        self.dropped = False

    def _drop(self) -> None:
        self.dropped = True
        raise OperationalError("COMMIT", {}, ConnectionResetError("server closed the connection"))

    def after_commit(self, session: Session) -> None:
        if self.when == "after_commit" and not self.dropped:
            self._drop()

    def before_cursor_execute(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self.dropped and self.then_unreachable:
            raise OperationalError(statement, {}, ConnectionRefusedError("connection refused"))
        if self.when == "on_insert" and not self.dropped and statement.startswith("INSERT"):
            self._drop()


@contextmanager
def connection_drops(engine: Engine, **kwargs: Any) -> Iterator[ConnectionDrops]:
    drops = ConnectionDrops(engine, **kwargs)
    event.listen(Session, "after_commit", drops.after_commit)
    event.listen(engine, "before_cursor_execute", drops.before_cursor_execute)
    try:
        yield drops
    finally:
        event.remove(Session, "after_commit", drops.after_commit)
        event.remove(engine, "before_cursor_execute", drops.before_cursor_execute)


@pytest.fixture
def upload(tmp_path: Path) -> Spooled:
    path = tmp_path / "upload.jsonl"
    path.write_bytes(b'{"input": "a", "output": "b"}\n')
    return Spooled(
        path=path, size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest()
    )


def _store(engine: Engine, blobs: Any, tenant_id: uuid.UUID, upload: Spooled) -> Dataset:
    return store_dataset(
        engine=engine,
        blobs=blobs,
        tenant_id=tenant_id,
        spooled=upload,
        examples=1,
        quota_bytes=10**9,
    )


def _rows(engine: Engine, tenant_id: uuid.UUID) -> list[Dataset]:
    with Session(engine) as session:
        return list(session.exec(select(Dataset).where(Dataset.tenant_id == tenant_id)))


def _blobs(blobs: Any, tenant_id: uuid.UUID) -> list[str]:
    return [info.key for info in blobs.list_objects(f"tenants/{tenant_id}/")]


def _tenant(engine: Engine) -> uuid.UUID:
    with Session(engine) as session:
        return make_tenant(session).id


def test_a_commit_whose_answer_was_lost_is_the_uploads_result(
    pg_engine: Engine, s3_store: Any, upload: Spooled
) -> None:
    tenant_id = _tenant(pg_engine)
    with connection_drops(pg_engine, when="after_commit") as drops:
        dataset = _store(pg_engine, s3_store, tenant_id, upload)
        assert drops.dropped
    (row,) = _rows(pg_engine, tenant_id)
    assert row.id == dataset.id and row.sha256 == upload.sha256
    assert _blobs(s3_store, tenant_id) == [row.object_key]


def test_a_row_that_was_never_written_takes_its_blob_with_it(
    pg_engine: Engine, s3_store: Any, upload: Spooled
) -> None:
    tenant_id = _tenant(pg_engine)
    with connection_drops(pg_engine, when="on_insert") as drops:
        with pytest.raises(OperationalError):
            _store(pg_engine, s3_store, tenant_id, upload)
        assert drops.dropped
    assert _rows(pg_engine, tenant_id) == []
    assert _blobs(s3_store, tenant_id) == []


def test_an_unknown_outcome_keeps_the_blob(
    pg_engine: Engine, s3_store: Any, upload: Spooled
) -> None:
    """The row was committed but the database is gone before anyone can tell: deleting the
    blob now would leave a dataset without data once the database is back."""
    tenant_id = _tenant(pg_engine)
    with (
        connection_drops(pg_engine, when="after_commit", then_unreachable=True),
        pytest.raises(SQLAlchemyError),  # the upload fails: the client must retry
    ):
        _store(pg_engine, s3_store, tenant_id, upload)
    (row,) = _rows(pg_engine, tenant_id)
    assert _blobs(s3_store, tenant_id) == [row.object_key]
    assert s3_store.get_bytes(row.object_key) == upload.path.read_bytes()
