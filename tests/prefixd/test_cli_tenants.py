"""``prefixd tenants delete|verify-deleted|erasures`` on a real database (SQLite and
PostgreSQL) and a local blob directory (the Serve path is in
tests/services/test_tenant_erasure.py)."""

from __future__ import annotations

import contextlib
import json
import uuid

import pytest
from sqlmodel import Session
from typer.testing import CliRunner

from common.blobstore import LocalBlobStore, dataset_key, tenant_key_prefix
from common.db import crud
from prefixd import cli_tenants
from prefixd.cli import app
from tests.fixtures.factories import make_dataset, make_job, make_tenant


@pytest.fixture
def store(tmp_path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@pytest.fixture
def cli(db_engine, store, monkeypatch) -> CliRunner:
    monkeypatch.setenv("PREFIXD_DATABASE_URL", db_engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("PREFIXD_BLOB_URL", str(store.root))
    # No Ray here: no Serve application, no replica to ask.
    monkeypatch.setattr(
        cli_tenants, "_replica_evictor", lambda settings: contextlib.nullcontext(None)
    )
    return CliRunner()


def test_delete_erases_with_progress_and_verify_proves_it(cli, db_engine, store) -> None:
    with Session(db_engine) as session:
        tenant, keeper = make_tenant(session), make_tenant(session)
        dataset = make_dataset(session, tenant)
        make_job(session, tenant, datasets=[dataset])
        kept = make_dataset(session, keeper)
        tenant_id, keeper_id, key, kept_key = (
            tenant.id,
            keeper.id,
            dataset.object_key,
            kept.object_key,
        )
    store.put_bytes(key, b"data")
    store.put_bytes(kept_key, b"kept")

    found = cli.invoke(app, ["tenants", "verify-deleted", str(tenant_id)])
    assert found.exit_code == 1, found.output
    assert "is NOT erased" in found.stdout and f"object {key}" in found.stdout
    assert "row in tenants" in found.stdout and "1 row(s) in training_jobs" in found.stdout

    deleted = cli.invoke(app, ["tenants", "delete", str(tenant_id)])
    assert deleted.exit_code == 0, deleted.output
    for step in ("cancel_jobs", "delete_objects", "delete_rows", "evict_replicas", "verify"):
        assert f"] {step}" in deleted.stdout
    assert "no Serve application reachable" in deleted.stdout
    assert f"tenant {tenant_id} erased: 1 object(s), 3 row(s)" in deleted.stdout

    clean = cli.invoke(app, ["tenants", "verify-deleted", str(tenant_id)])
    assert clean.exit_code == 0, clean.output
    assert "nothing found" in clean.stdout and "audit record" in clean.stdout
    report = json.loads(
        cli.invoke(app, ["tenants", "verify-deleted", str(tenant_id), "--json"]).stdout
    )
    assert report["clean"] and report["found"] == [] and report["audit"]["rows_erased"] == 3
    assert store.list_objects(tenant_key_prefix(keeper_id)) != []

    # An orphan written after the erasure (a writer that died before cleaning up) is found,
    # and deleting again sweeps it, without a second audit record.
    orphan = dataset_key(tenant_id, uuid.uuid4())
    store.put_bytes(orphan, b"late")
    assert cli.invoke(app, ["tenants", "verify-deleted", str(tenant_id)]).exit_code == 1
    again = cli.invoke(app, ["tenants", "delete", str(tenant_id)])
    assert again.exit_code == 0, again.output
    assert "was erased at" in again.stdout and "swept 1 object(s)" in again.stdout
    assert cli.invoke(app, ["tenants", "verify-deleted", str(tenant_id)]).exit_code == 0
    with Session(db_engine) as session:
        assert len(crud.list_deletion_audits(session=session, tenant_id=tenant_id)) == 1


def test_errors_and_the_list_of_erasures(cli, db_engine) -> None:
    missing = cli.invoke(app, ["tenants", "delete", str(uuid.uuid4())])
    assert missing.exit_code == 3 and "not found" in missing.output
    bad = cli.invoke(app, ["tenants", "verify-deleted", "nope"])
    assert bad.exit_code == 2 and "invalid tenant id" in bad.output
    assert cli.invoke(app, ["tenants", "erasures"]).stdout.strip() == "no erasure under way"
    with Session(db_engine) as session:
        tenant = make_tenant(session)
        crud.mark_tenant_deleting(session=session, tenant_id=tenant.id)
    listed = cli.invoke(app, ["tenants", "erasures"])
    assert f"{tenant.id}  step cancel_jobs" in listed.stdout
    (row,) = json.loads(cli.invoke(app, ["tenants", "erasures", "--json"]).stdout)
    assert row["tenant_id"] == str(tenant.id) and row["runs"] == 0
    resumed = cli.invoke(app, ["tenants", "delete", str(tenant.id)])
    assert resumed.exit_code == 0 and "resuming the erasure" in resumed.stdout


def test_verify_deleted_reports_temporary_files_and_pending_deletes(cli, db_engine, store) -> None:
    with Session(db_engine) as session:
        tenant = make_tenant(session)
        dataset = make_dataset(session, tenant)
        tenant_id, dataset_id, key = tenant.id, dataset.id, dataset.object_key
        store.put_bytes(key, b"data")
        crud.delete_dataset(session=session, tenant_id=tenant_id, dataset_id=dataset_id)
    (store.root / key).parent.joinpath(".tmp-killed-writer").write_bytes(b"half")

    found = cli.invoke(app, ["tenants", "verify-deleted", str(tenant_id)])
    assert found.exit_code == 1, found.output
    assert f"temporary file {tenant_key_prefix(tenant_id)}datasets/.tmp-killed-writer" in (
        found.stdout
    )
    assert f"pending blob delete of dataset {dataset_id} ({key}; 0 failed" in found.stdout

    assert cli.invoke(app, ["tenants", "delete", str(tenant_id)]).exit_code == 0
    clean = cli.invoke(app, ["tenants", "verify-deleted", str(tenant_id)])
    assert clean.exit_code == 0, clean.output
