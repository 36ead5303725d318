"""The data-lifecycle answers of the API (issue 15), in process on PostgreSQL and S3 over
HTTP: a delete whose blob the store did not confirm answers 202 (and 204 / 200 once it is
gone), the ``nightly-`` idempotency keys are reserved, the per-job step budget and the
per-tenant daily training tokens are enforced at submission, and an API replica removes
stale upload spool files when it starts."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from common.blobstore.s3 import S3BlobStore
from tests.fixtures.factories import examples, jsonl
from tests.reliability.conftest import SwitchableProxy
from tests.security.conftest import S3_ACCESS_KEY, S3_SECRET, InProc, error


@contextmanager
def settings_changed(inproc: InProc, **update: Any) -> Iterator[None]:
    before = inproc.context.settings
    inproc.context.settings = before.model_copy(update=update)
    try:
        yield
    finally:
        inproc.context.settings = before


@contextmanager
def store_down(inproc: InProc, s3_endpoint_url: str) -> Iterator[None]:
    """The API's blob store reached through a proxy that is switched off."""
    import boto3

    host, port = s3_endpoint_url.removeprefix("http://").rsplit(":", 1)
    proxy = SwitchableProxy((host, int(port)))
    before = inproc.context.blobs
    inproc.context.blobs = S3BlobStore(
        before.bucket,
        before.base,
        endpoint_url=proxy.url,
        session=boto3.session.Session(
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET,
            region_name="us-east-1",
        ),
        max_attempts=1,
        connect_timeout_s=1,
        read_timeout_s=2,
    )
    proxy.down()
    try:
        yield
    finally:
        inproc.context.blobs = before
        proxy.down()


def test_a_delete_whose_blob_is_not_gone_answers_202_and_is_retried(
    inproc: InProc, s3_endpoint_url: str
) -> None:
    from common.blob_deletes import drain_pending_blob_deletes

    tenant_id, key = inproc.new_tenant()
    kept, pending = inproc.dataset(key), inproc.dataset(key)
    prefix_id = inproc.publish(tenant_id)
    with store_down(inproc, s3_endpoint_url):
        answer = inproc.request("DELETE", f"/v1/datasets/{pending}", key)
        assert answer.status_code == 202, answer.text
        assert answer.json()["status"] == "blob_delete_pending"
        assert answer.json()["id"] == pending
        deleted = inproc.request("DELETE", f"/v1/prefixes/{prefix_id}", key)
        assert deleted.status_code == 202 and deleted.json()["blob_deleted"] is False
    # The rows are gone (404), the data not yet: on record, and retried.
    assert inproc.request("GET", f"/v1/datasets/{pending}", key).status_code == 404
    assert any(pending in o for o in inproc.objects(f"tenants/{tenant_id}/datasets/"))
    result = drain_pending_blob_deletes(inproc.db, inproc.blobs)
    assert result.pending == 0 and result.deleted >= 2
    assert inproc.objects(f"tenants/{tenant_id}/prefixes/") == []
    assert [o for o in inproc.objects(f"tenants/{tenant_id}/") if pending in o] == []
    # With the store up: 204, and the data is gone at once.
    assert inproc.request("DELETE", f"/v1/datasets/{kept}", key).status_code == 204
    assert inproc.objects(f"tenants/{tenant_id}/") == []


def test_a_tenant_cannot_use_a_nightly_idempotency_key(inproc: InProc) -> None:
    _, key = inproc.new_tenant()
    dataset = inproc.dataset(key)
    for reserved in ("nightly-2031-05-01", "NIGHTLY-anything"):
        answer = inproc.request(
            "POST", "/v1/jobs", key, json={"dataset_ids": [dataset], "idempotency_key": reserved}
        )
        status, code, message = error(answer)
        assert (status, code) == (422, "invalid_request")
        assert message.startswith("idempotency_key: ") and "reserved for nightly" in message
    assert inproc.request("GET", "/v1/jobs", key).json()["data"] == []


def test_job_budgets_are_enforced_at_submission(inproc: InProc) -> None:
    _, key = inproc.new_tenant()
    dataset = inproc.dataset(key, n=40)
    body = {"dataset_ids": [dataset], "hyperparameters": {"epochs": 10, "batch_size": 4}}
    with settings_changed(inproc, job_max_steps=99):
        status, code, message = error(inproc.request("POST", "/v1/jobs", key, json=body))
    assert (status, code) == (422, "invalid_input")
    assert "about 100 optimizer steps" in message and "job_max_steps (99)" in message

    size = inproc.request("GET", f"/v1/datasets/{dataset}", key).json()["bytes"]
    per_job = round(size / 4) * 10
    with settings_changed(inproc, tenant_training_tokens_per_day=per_job):
        assert inproc.request("POST", "/v1/jobs", key, json=body).status_code == 201
        refused = inproc.request("POST", "/v1/jobs", key, json=body)
        status, code, message = error(refused)
        assert (status, code) == (429, "quota_exceeded")
        assert "tenant_training_tokens_per_day" in message and "resets at " in message
        assert 0 < int(refused.headers["Retry-After"]) <= 24 * 3600
        _, other_key = inproc.new_tenant()  # another tenant's budget is its own
        other = {**body, "dataset_ids": [inproc.dataset(other_key, n=40)]}
        assert inproc.request("POST", "/v1/jobs", other_key, json=other).status_code == 201


def test_an_api_replica_removes_stale_upload_spool_files_at_start(
    inproc: InProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.api.app import create_app

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    stale = tmp_path / "prefixd-upload-killed.jsonl"
    fresh = tmp_path / "prefixd-upload-running.jsonl"
    unrelated = tmp_path / "other-upload-old.jsonl"
    for path in (stale, fresh, unrelated):
        path.write_bytes(jsonl(examples(2)))
    old = time.time() - inproc.settings.upload_spool_stale_seconds - 60
    os.utime(stale, (old, old))
    os.utime(unrelated, (old, old))
    create_app(inproc.context)  # what a replica does when it starts
    assert not stale.exists()
    assert fresh.exists() and unrelated.exists()
