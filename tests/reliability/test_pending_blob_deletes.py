"""S3 fails during a delete: deleting a dataset or a prefix version removes the row and
records the blob's delete in the same transaction; when the store does not confirm, the
record stays (with the error) and is retried until the blob is gone — by the scheduler's
loop in production, by :func:`drain_pending_blob_deletes` here. On PostgreSQL and SQLite,
with the store reached through a TCP proxy that the test switches off."""

from __future__ import annotations

from sqlmodel import Session

from common.blob_deletes import delete_blob, drain_pending_blob_deletes
from common.blobstore import tenant_key_prefix
from common.blobstore.s3 import S3BlobStore
from common.db import crud
from common.erasure import find_tenant_leftovers
from tests.fixtures.factories import make_dataset, make_published_prefix, make_tenant


def test_a_failed_blob_delete_is_recorded_and_retried_until_the_blob_is_gone(
    db_engine, make_bucket, s3_proxy, boto_session
) -> None:
    bucket = make_bucket(versioned=True)
    direct_url = f"http://{s3_proxy.target[0]}:{s3_proxy.target[1]}"
    direct = S3BlobStore(bucket, "p", endpoint_url=direct_url, session=boto_session)
    proxied = S3BlobStore(
        bucket,
        "p",
        endpoint_url=s3_proxy.url,
        session=boto_session,
        max_attempts=1,
        connect_timeout_s=1,
        read_timeout_s=2,
    )
    with Session(db_engine) as session:
        tenant = make_tenant(session)
        dataset = make_dataset(session, tenant)
        prefix = make_published_prefix(session, tenant)
        tenant_id, dataset_id = tenant.id, dataset.id
        dataset_blob, prefix_id, prefix_blob = dataset.object_key, prefix.id, prefix.object_key
    direct.put_bytes(dataset_blob, b"the tenant's data")
    direct.put_bytes(dataset_blob, b"a second version of it")
    direct.put_bytes(prefix_blob, b"a prefix")

    s3_proxy.down()
    with Session(db_engine) as session:
        crud.delete_dataset(session=session, tenant_id=tenant_id, dataset_id=dataset_id)
    assert delete_blob(db_engine, proxied, dataset_blob) is False  # the route answers 202
    with Session(db_engine) as session:
        (pending,) = crud.list_pending_blob_deletes(session=session, tenant_id=tenant_id)
    assert (pending.kind, pending.item_id, pending.attempts) == ("dataset", dataset_id, 1)
    assert pending.last_error and "BlobStoreUnavailableError" in pending.last_error
    assert direct.exists(dataset_blob)  # the data is still there, and that is on record
    leftovers = find_tenant_leftovers(db_engine, direct, tenant_id)
    assert any(
        f.startswith(f"pending blob delete of dataset {dataset_id} ({dataset_blob}; 1 failed")
        for f in leftovers
    ), leftovers

    # A replica that died between the row's commit and the blob delete leaves the record.
    with Session(db_engine) as session:
        crud.delete_prefix_version(session=session, tenant_id=tenant_id, prefix_id=prefix_id)

    assert drain_pending_blob_deletes(db_engine, proxied).pending == 2  # still down
    s3_proxy.up()
    result = drain_pending_blob_deletes(db_engine, proxied)
    assert (result.deleted, result.pending) == (2, 0)
    assert direct.list_versions(tenant_key_prefix(tenant_id)) == []  # every version gone
    with Session(db_engine) as session:
        assert crud.list_pending_blob_deletes(session=session) == []
    assert not any("pending" in f for f in find_tenant_leftovers(db_engine, direct, tenant_id))
