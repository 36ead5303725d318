"""The metadata layer on real PostgreSQL and on SQLite: migrations, engines, and the
data-layer functions (tenants, keys, datasets, jobs, events, prefixes, audit)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool
from sqlmodel import Session, SQLModel, select
from typer.testing import CliRunner

from common.blobstore.keys import dataset_key
from common.config import Settings
from common.db import crud
from common.db.engine import (
    check_connection,
    create_db_engine,
    current_revision,
    downgrade_database,
    head_revision,
    masked_url,
    require_migrated,
    upgrade_database,
)
from common.db.errors import (
    ConflictError,
    DatabaseNotMigratedError,
    DatabaseUnavailableError,
    LeaseLostError,
    NotFoundError,
    TenantNotActiveError,
)
from common.db.models import (
    ApiKey,
    Dataset,
    DatasetCreate,
    DeletionAudit,
    JobEvent,
    JobEventCreate,
    JobState,
    PrefixVersion,
    Tenant,
    TenantStatus,
    TrainingJob,
    TrainingJobCreate,
    TrainingJobPublic,
)
from common.errors import InvalidInputError, PrefixdError
from prefixd.cli_db import db_app
from tests.fixtures.factories import (
    make_dataset,
    make_job,
    make_prefix_create,
    make_published_prefix,
    make_tenant,
)

SECRET = "s3cret-pa55word"
DOWN_URL = f"postgresql+psycopg://prefixd:{SECRET}@127.0.0.1:1/prefixd"


# --- migrations and engines -----------------------------------------------------------------


def test_migrations_match_the_models(db_engine: Engine) -> None:
    with db_engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []


def test_every_lookup_has_an_index(db_engine: Engine) -> None:
    inspector = sa.inspect(db_engine)
    jobs = {tuple(ix["column_names"]) for ix in inspector.get_indexes("training_jobs")}
    assert ("state", "priority", "created_at") in jobs
    assert ("tenant_id", "created_at") in jobs
    assert ("state", "lease_expires_at") in jobs
    for table in ("api_keys", "datasets"):
        leading = {ix["column_names"][0] for ix in inspector.get_indexes(table)}
        assert "tenant_id" in leading, table
    unique = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("prefixes")}
    assert ("tenant_id", "version") in unique


def test_require_migrated_refuses_an_unmigrated_database(
    db_backend: str, create_database: Callable[[str], str]
) -> None:
    engine = create_db_engine(create_database(db_backend))
    try:
        with pytest.raises(DatabaseNotMigratedError, match="prefixd db upgrade"):
            require_migrated(engine)
        assert upgrade_database(engine) == head_revision()
        require_migrated(engine)
        downgrade_database(engine, "base")
        assert current_revision(engine) is None
        assert sa.inspect(engine).get_table_names() == ["alembic_version"]
        with pytest.raises(DatabaseNotMigratedError, match="prefixd db upgrade"):
            require_migrated(engine)
        upgrade_database(engine)
        require_migrated(engine)
    finally:
        engine.dispose()


def test_require_migrated_refuses_a_newer_schema(
    db_backend: str, create_database: Callable[[str], str]
) -> None:
    engine = create_db_engine(create_database(db_backend))
    try:
        upgrade_database(engine)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = 'from_the_future'"))
        with pytest.raises(DatabaseNotMigratedError, match="upgrade prefixd"):
            require_migrated(engine)
    finally:
        engine.dispose()


def test_database_down_gives_one_clear_error_without_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    engine = create_db_engine(DOWN_URL, connect_timeout_s=2)
    for call in (check_connection, require_migrated, upgrade_database):
        with pytest.raises(DatabaseUnavailableError) as info:
            call(engine)
        message = str(info.value)
        assert isinstance(info.value, PrefixdError)
        assert "127.0.0.1:1/prefixd" in message and "prefixd:***@" in message
        assert SECRET not in message
        assert info.value.__cause__ is None  # no chained driver error to print
    assert SECRET not in caplog.text
    assert SECRET not in masked_url(DOWN_URL)


def test_default_database_is_a_sqlite_file_in_the_data_dir(tmp_path: Path) -> None:
    engine = create_db_engine(Settings(home=tmp_path / "home"))
    try:
        assert engine.dialect.name == "sqlite"
        assert Path(str(engine.url.database)) == tmp_path / "home" / "prefixd.sqlite3"
        upgrade_database(engine)
        require_migrated(engine)
    finally:
        engine.dispose()


def test_postgres_urls_use_psycopg3_with_a_pre_pinged_pool() -> None:
    engine = create_db_engine("postgresql://u:p@db.example:5432/prefixd")
    assert engine.url.drivername == "postgresql+psycopg"
    assert engine.pool._pre_ping  # type: ignore[attr-defined]
    engine.dispose()
    with pytest.raises(InvalidInputError):
        create_db_engine("mysql://u:p@h/db")


def test_pool_replaces_a_connection_the_server_dropped(pg_engine: Engine) -> None:
    with pg_engine.connect() as conn:
        pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    killer = sa.create_engine(pg_engine.url, poolclass=NullPool)
    with killer.connect() as conn:  # the server drops the idle pooled connection
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    killer.dispose()
    for _ in range(3):  # every pooled connection still works: pre-ping replaced the dead one
        with pg_engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1


# --- CLI ------------------------------------------------------------------------------------


def test_cli_db_upgrade_and_current(
    db_backend: str, create_database: Callable[[str], str], tmp_path: Path
) -> None:
    url = create_database(db_backend)
    env = {"PREFIXD_DATABASE_URL": url, "PREFIXD_HOME": str(tmp_path)}
    runner = CliRunner()
    result = runner.invoke(db_app, ["current"], env=env)
    assert result.exit_code == 0, result.output
    assert "(none)" in result.output and "prefixd db upgrade" in result.output
    result = runner.invoke(db_app, ["upgrade"], env=env)
    assert result.exit_code == 0, result.output
    assert head_revision() in result.output
    result = runner.invoke(db_app, ["current"], env=env)
    assert result.exit_code == 0 and "up to date" in result.output
    engine = create_db_engine(url)
    require_migrated(engine)
    engine.dispose()


def test_cli_db_upgrade_reports_a_down_database(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        db_app, ["upgrade"], env={"PREFIXD_DATABASE_URL": DOWN_URL, "PREFIXD_HOME": str(tmp_path)}
    )
    assert result.exit_code == DatabaseUnavailableError.exit_code
    assert "cannot connect to the database" in result.output
    assert SECRET not in result.output and "Traceback" not in result.output


# --- rows -----------------------------------------------------------------------------------


def test_datetimes_are_timezone_aware_utc(session: Session) -> None:
    tenant = make_tenant(session)
    assert tenant.created_at.tzinfo is not None and tenant.created_at.utcoffset() == timedelta(0)
    job = make_job(
        session, tenant, created_at=datetime(2030, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    )
    session.expire_all()
    loaded = session.get(TrainingJob, job.id)
    assert loaded is not None
    assert loaded.created_at == datetime(2030, 1, 1, 10, tzinfo=UTC)
    assert loaded.created_at.tzinfo is not None
    job.created_at = datetime(2030, 1, 1)  # naive: refused
    session.add(job)
    with pytest.raises(Exception, match="naive datetime"):
        session.commit()
    session.rollback()


def test_tenant_names_are_unique(session: Session) -> None:
    make_tenant(session, name="acme")
    with pytest.raises(ConflictError, match="acme"):
        make_tenant(session, name="acme")


def test_api_keys_store_only_a_hash(session: Session, db_engine: Engine) -> None:
    tenant = make_tenant(session)
    key, plaintext = crud.create_api_key(session=session, tenant_id=tenant.id)
    assert plaintext.startswith(crud.API_KEY_PREFIX) and len(plaintext) > 40
    with db_engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM api_keys")).all()
    assert rows and all(plaintext not in str(value) for row in rows for value in row)
    assert key.key_hash == crud.hash_api_key(plaintext)

    found = crud.get_tenant_by_api_key(session=session, api_key=plaintext)
    assert found is not None and found.id == tenant.id
    assert crud.get_tenant_by_api_key(session=session, api_key=plaintext + "x") is None
    assert crud.get_tenant_by_api_key(session=session, api_key="") is None

    other, other_key = crud.create_api_key(session=session, tenant_id=tenant.id)
    crud.revoke_api_key(session=session, tenant_id=tenant.id, key_id=other.id)
    assert crud.get_tenant_by_api_key(session=session, api_key=other_key) is None
    with pytest.raises(NotFoundError):
        crud.revoke_api_key(session=session, tenant_id=make_tenant(session).id, key_id=key.id)

    crud.mark_tenant_deleting(session=session, tenant_id=tenant.id)
    assert crud.get_tenant_by_api_key(session=session, api_key=plaintext) is None
    with pytest.raises(TenantNotActiveError):
        crud.create_api_key(session=session, tenant_id=tenant.id)


def test_datasets_are_scoped_to_their_tenant(session: Session) -> None:
    alice, bob = make_tenant(session), make_tenant(session)
    a1, a2 = make_dataset(session, alice), make_dataset(session, alice, example_count=3)
    b1 = make_dataset(session, bob)
    assert {d.id for d in crud.list_datasets(session=session, tenant_id=alice.id)} == {a1.id, a2.id}
    assert crud.get_dataset(session=session, tenant_id=alice.id, dataset_id=a2.id) is not None
    assert crud.get_dataset(session=session, tenant_id=alice.id, dataset_id=b1.id) is None

    stolen = DatasetCreate(
        object_key=dataset_key(bob.id, uuid.uuid4()), sha256="0" * 64, size_bytes=1, example_count=1
    )
    with pytest.raises(InvalidInputError, match="outside tenant"):
        crud.add_dataset(session=session, tenant_id=alice.id, dataset_in=stolen)
    nobody = uuid.uuid4()
    with pytest.raises(NotFoundError):
        crud.add_dataset(
            session=session,
            tenant_id=nobody,
            dataset_in=stolen.model_copy(update={"object_key": dataset_key(nobody, a1.id)}),
        )


def test_enqueue_is_idempotent_per_tenant(session: Session) -> None:
    alice, bob = make_tenant(session), make_tenant(session)
    ds = make_dataset(session, alice)
    job_in = TrainingJobCreate(dataset_ids=[ds.id, ds.id], idempotency_key="retry-2030-01-01")
    first, created = crud.enqueue_job(session=session, tenant_id=alice.id, job_in=job_in)
    assert created and first.state == JobState.queued and first.attempts == 0
    assert first.dataset_ids == [str(ds.id)]
    again, created = crud.enqueue_job(session=session, tenant_id=alice.id, job_in=job_in)
    assert not created and again.id == first.id

    bob_job = make_job(session, bob, idempotency_key="retry-2030-01-01")
    assert bob_job.id != first.id
    public = TrainingJobPublic.model_validate(first)
    assert public.dataset_ids == [ds.id] and public.priority == "interactive"

    with pytest.raises(NotFoundError, match="dataset"):  # another tenant's dataset
        crud.enqueue_job(
            session=session,
            tenant_id=bob.id,
            job_in=TrainingJobCreate(dataset_ids=[ds.id]),
        )
    assert [j.id for j in crud.list_jobs(session=session, tenant_id=alice.id)] == [first.id]
    assert crud.get_job(session=session, job_id=first.id, tenant_id=bob.id) is None


def test_job_events_record_progress_in_order(session: Session) -> None:
    job = make_job(session, make_tenant(session))
    for step in range(1, 4):
        crud.record_job_event(
            session=session,
            job_id=job.id,
            event_in=JobEventCreate(
                step=step, total_steps=3, loss=2.0 / step, val_loss=None, tokens_per_second=120.5
            ),
        )
    events = crud.list_job_events(session=session, job_id=job.id)
    assert [e.step for e in events] == [1, 2, 3]
    assert events[0].loss == 2.0 and events[0].tokens_per_second == 120.5
    newer = crud.list_job_events(session=session, job_id=job.id, after_id=events[0].id)
    assert [e.step for e in newer] == [2, 3]


def test_cancel_a_queued_job(session: Session) -> None:
    tenant = make_tenant(session)
    job = make_job(session, tenant)
    with pytest.raises(NotFoundError):
        crud.cancel_job(session=session, job_id=job.id, tenant_id=make_tenant(session).id)
    cancelled = crud.cancel_job(session=session, job_id=job.id, tenant_id=tenant.id)
    assert cancelled.state == JobState.cancelled and cancelled.finished_at is not None
    assert crud.claim_oldest_job(session=session, owner="w", lease_seconds=60) is None


def test_publish_prefix_versions_and_activates(session: Session) -> None:
    tenant = make_tenant(session)
    v1 = make_published_prefix(session, tenant)
    v2 = make_published_prefix(session, tenant)
    assert (v1.version, v2.version) == (1, 2)
    session.refresh(v1)
    assert not v1.active and v2.active
    active = crud.get_active_prefix(session=session, tenant_id=tenant.id)
    assert active is not None and active.id == v2.id
    job = crud.get_job(session=session, job_id=v2.job_id)  # type: ignore[arg-type]
    assert job is not None and job.state == JobState.succeeded and job.lease_owner is None

    rolled_back = crud.activate_prefix(session=session, tenant_id=tenant.id, version=1)
    assert rolled_back.id == v1.id and rolled_back.active
    assert [p.active for p in crud.list_prefixes(session=session, tenant_id=tenant.id)] == [
        True,
        False,
    ]
    with pytest.raises(NotFoundError):
        crud.activate_prefix(session=session, tenant_id=tenant.id, version=7)
    other = make_tenant(session)
    assert crud.get_prefix(session=session, tenant_id=other.id, version=1) is None


def test_publish_refuses_a_lost_lease_and_changes_nothing(session: Session) -> None:
    tenant = make_tenant(session)
    job = make_job(session, tenant)
    claimed = crud.claim_oldest_job(session=session, owner="worker-a", lease_seconds=60)
    assert claimed is not None
    with pytest.raises(LeaseLostError):
        crud.publish_prefix(
            session=session, job_id=job.id, owner="worker-b", prefix_in=make_prefix_create(tenant)
        )
    with pytest.raises(LeaseLostError):  # lease expired (even if nobody reclaimed it yet)
        crud.publish_prefix(
            session=session,
            job_id=job.id,
            owner="worker-a",
            prefix_in=make_prefix_create(tenant),
            now=datetime.now(UTC) + timedelta(seconds=61),
        )
    assert crud.list_prefixes(session=session, tenant_id=tenant.id) == []
    still = crud.get_job(session=session, job_id=job.id)
    assert still is not None and still.state == JobState.running


def test_publish_refuses_a_deleting_tenant(session: Session) -> None:
    tenant = make_tenant(session)
    job = make_job(session, tenant)
    assert crud.claim_oldest_job(session=session, owner="w", lease_seconds=60) is not None
    crud.mark_tenant_deleting(session=session, tenant_id=tenant.id)
    with pytest.raises(TenantNotActiveError):
        crud.publish_prefix(
            session=session, job_id=job.id, owner="w", prefix_in=make_prefix_create(tenant)
        )
    assert crud.list_prefixes(session=session, tenant_id=tenant.id) == []
    with pytest.raises(TenantNotActiveError):
        make_dataset(session, tenant)
    with pytest.raises(TenantNotActiveError):
        crud.enqueue_job(
            session=session,
            tenant_id=tenant.id,
            job_in=TrainingJobCreate(dataset_ids=[uuid.uuid4()]),
        )
    got = crud.get_tenant(session=session, tenant_id=tenant.id)
    assert got is not None and got.status == TenantStatus.deleting


def test_database_allows_one_active_prefix_per_tenant(session: Session) -> None:
    tenant = make_tenant(session)
    v1 = make_published_prefix(session, tenant)
    duplicate = PrefixVersion.model_validate(
        make_prefix_create(tenant),
        update={"tenant_id": tenant.id, "version": v1.version + 1, "active": True},
    )
    session.add(duplicate)
    with pytest.raises(IntegrityError):
        session.commit()
    session.rollback()
    inactive = duplicate.model_copy(update={"id": uuid.uuid4(), "active": False})
    session.add(PrefixVersion.model_validate(inactive))
    session.commit()  # inactive versions are unlimited
    assert len(crud.list_prefixes(session=session, tenant_id=tenant.id)) == 2


def test_deleting_a_tenant_row_cascades(session: Session) -> None:
    tenant, keep = make_tenant(session), make_tenant(session)
    crud.create_api_key(session=session, tenant_id=tenant.id)
    make_published_prefix(session, tenant)
    make_published_prefix(session, keep)
    job = make_job(session, tenant)
    crud.record_job_event(session=session, job_id=job.id, event_in=JobEventCreate(step=1))
    session.delete(tenant)
    session.commit()
    for model in (ApiKey, Dataset, TrainingJob, PrefixVersion):
        rows = session.exec(select(model)).all()
        assert all(r.tenant_id == keep.id for r in rows), model  # type: ignore[attr-defined]
    assert session.exec(select(JobEvent)).all() == []
    assert len(crud.list_prefixes(session=session, tenant_id=keep.id)) == 1


def test_create_models_validate_their_input() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TrainingJobCreate(dataset_ids=[])
    with pytest.raises(ValidationError):
        TrainingJobCreate(dataset_ids=[uuid.uuid4()], max_attempts=0)
    with pytest.raises(ValidationError):
        DatasetCreate(object_key="k", sha256="Z" * 64, size_bytes=1, example_count=1)
    with pytest.raises(ValidationError):
        DatasetCreate(object_key="k", sha256="0" * 64, size_bytes=-1, example_count=1)
    tenant = Tenant(name="t")  # a bare row: nothing hits the database
    with pytest.raises(ValidationError):
        make_prefix_create(tenant, dtype="int8")


def test_deletion_audit_holds_only_ids_times_and_counts() -> None:
    # The one record an erasure keeps (written by common/erasure.py, tested end to end in
    # tests/common/test_erasure.py) must never grow a column that could hold personal data.
    assert set(DeletionAudit.model_fields) == {
        "id",
        "tenant_id",
        "requested_at",
        "completed_at",
        "objects_erased",
        "rows_erased",
    }
