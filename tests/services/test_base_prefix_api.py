"""Base prefixes over HTTP, against the real Serve application (API ingress + inference,
PostgreSQL, S3 over HTTP): the admin routes (operator data, operator jobs, versions, the
default, deletion refused while tenants depend on a base), jobs choosing a base, serving a
stacked prefix behind its base, the 409 when the base is gone, and tenant isolation."""

from __future__ import annotations

import hashlib
import uuid

import pytest
import torch
from sqlmodel import Session

from common.architectures import prefix_shape
from common.base_prefix import key_values_fingerprint, stack_prefixes
from common.blobstore.keys import base_prefix_key, prefix_key
from common.db import crud
from common.db.models import BasePrefix, PrefixVersion
from common.generation import DecodingConfig, generate_texts
from common.prefix_file import Prefix, prefix_to_bytes
from tests.fixtures.factories import examples, jsonl
from tests.services.test_api_routes import Api, error

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service_settings(service_settings, create_postgres_database, make_bucket):
    """The session's settings on a database and bucket of this module alone, one replica."""
    from common.db.engine import create_db_engine, upgrade_database

    url = create_postgres_database().render_as_string(hide_password=False)
    engine = create_db_engine(url)
    upgrade_database(engine)
    engine.dispose()
    return service_settings.model_copy(
        update=dict(
            database_url=url,
            blob_url=f"s3://{make_bucket(versioned=True)}/prefixd",
            inference_replicas=1,
            max_prefix_length=16,
            max_dataset_bytes=8 * 1024,
        )
    )


@pytest.fixture(scope="module")
def api(stack):
    client = Api(stack)
    yield client
    client.client.close()


def random_kv(stack, length: int, seed: int) -> torch.Tensor:
    shape = prefix_shape(stack.loaded.model.config).tensor_shape(length)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def add_base(
    stack, length: int = 3, seed: int = 1, name: str = "task"
) -> tuple[BasePrefix, Prefix]:
    """A base prefix version as an operator job leaves it: blob under operator/, then row."""
    prefix = Prefix(
        random_kv(stack, length, seed), stack.loaded.fingerprint, stack.loaded.architecture
    )
    base_id = uuid.uuid4()
    data = prefix_to_bytes(prefix)
    stack.blobs.put_bytes(base_prefix_key(base_id), data)
    with Session(stack.db) as session:
        latest = max(
            (b.version for b in crud.list_base_prefixes(session=session, name=name)), default=0
        )
        row = BasePrefix(
            id=base_id,
            name=name,
            version=latest + 1,
            base_model_fingerprint=prefix.base_model_fingerprint,
            prefix_length=length,
            dtype="float32",
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            object_key=base_prefix_key(base_id),
        )
        session.add(row)
        session.commit()
        session.refresh(row)
        session.expunge(row)
    return row, prefix


def publish_stacked(stack, tenant_id: uuid.UUID, base: BasePrefix, base_prefix: Prefix, seed: int):
    """A tenant version stacked on ``base``, published the way a trainer does."""
    tenant_part = random_kv(stack, 2, seed)
    prefix = Prefix(
        tenant_part,
        stack.loaded.fingerprint,
        stack.loaded.architecture,
        base_prefix_id=str(base.id),
        base_fingerprint=key_values_fingerprint(base_prefix.key_values),
        base_mode="stack",
    )
    prefix_id = uuid.uuid4()
    data = prefix_to_bytes(prefix)
    stack.blobs.put_bytes(prefix_key(tenant_id, prefix_id), data)
    dataset = jsonl(examples(2))
    from common.blobstore.keys import dataset_key
    from common.db.models import DatasetCreate, PrefixVersionCreate, TrainingJobCreate

    owner = f"test-{uuid.uuid4().hex}"
    with Session(stack.db) as session:
        dataset_id = uuid.uuid4()
        stack.blobs.put_bytes(dataset_key(tenant_id, dataset_id), dataset)
        crud.add_dataset(
            session=session,
            tenant_id=tenant_id,
            dataset_in=DatasetCreate(
                id=dataset_id,
                object_key=dataset_key(tenant_id, dataset_id),
                sha256=hashlib.sha256(dataset).hexdigest(),
                size_bytes=len(dataset),
                example_count=2,
            ),
        )
        job, _ = crud.enqueue_job(
            session=session,
            tenant_id=tenant_id,
            job_in=TrainingJobCreate(dataset_ids=[dataset_id], hyperparameters={}),
        )
        while (
            claimed := crud.claim_oldest_job(session=session, owner=owner, lease_seconds=300)
        ) and claimed.id != job.id:
            pass
        version = crud.publish_prefix(
            session=session,
            job_id=job.id,
            owner=owner,
            prefix_in=PrefixVersionCreate(
                id=prefix_id,
                object_key=prefix_key(tenant_id, prefix_id),
                base_model_fingerprint=prefix.base_model_fingerprint,
                prefix_length=2,
                dtype="float32",
                size_bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                base_prefix_id=base.id,
                base_mode="stack",
            ),
        )
        session.expunge(version)
    return version, tenant_part


def test_admin_routes_refuse_tenants_and_anonymous_callers(api):
    _, key = api.new_tenant()
    some = uuid.uuid4()
    routes = [
        ("POST", "/v1/admin/datasets"),
        ("GET", "/v1/admin/datasets"),
        ("DELETE", f"/v1/admin/datasets/{some}"),
        ("POST", "/v1/admin/base-prefixes/jobs"),
        ("GET", "/v1/admin/base-prefixes/jobs"),
        ("GET", f"/v1/admin/base-prefixes/jobs/{some}"),
        ("GET", f"/v1/admin/base-prefixes/jobs/{some}/events"),
        ("POST", f"/v1/admin/base-prefixes/jobs/{some}/cancel"),
        ("GET", "/v1/admin/base-prefixes"),
        ("GET", f"/v1/admin/base-prefixes/{some}"),
        ("POST", f"/v1/admin/base-prefixes/{some}/default"),
        ("DELETE", "/v1/admin/base-prefixes/default"),
        ("DELETE", f"/v1/admin/base-prefixes/{some}"),
    ]
    for method, path in routes:
        assert error(api.request(method, path, None))[:2] == (401, "unauthorized"), path
        assert error(api.request(method, path, key))[:2] == (403, "forbidden"), path


def test_operator_data_upload_list_delete_and_isolation(api):
    uploaded = api.post(
        "/v1/admin/datasets?name=e2e",
        api.admin,
        content=jsonl(examples(6)),
        headers={"content-type": "application/jsonl"},
    )
    assert uploaded.status_code == 201, uploaded.text
    body = uploaded.json()
    assert body["examples"] == 6 and body["name"] == "e2e"
    listed = api.get("/v1/admin/datasets", api.admin).json()["data"]
    assert body["id"] in [d["id"] for d in listed]

    bad = api.post(
        "/v1/admin/datasets",
        api.admin,
        content=b'{"input": "a", "output": "b"}\nnot json\n',
        headers={"content-type": "application/jsonl"},
    )
    status, _, message = error(bad)
    assert status == 422 and "line 2" in message
    assert (
        error(
            api.post(
                "/v1/admin/datasets",
                api.admin,
                content=b"x",
                headers={"content-type": "text/plain"},
            )
        )[0]
        == 415
    )
    too_big = api.post(
        "/v1/admin/datasets",
        api.admin,
        content=b"x" * (9 * 1024),
        headers={"content-type": "application/jsonl"},
    )
    assert error(too_big)[0] == 413

    # A tenant can neither read, list, nor train on operator data.
    _, key = api.new_tenant()
    assert error(api.get(f"/v1/datasets/{body['id']}", key))[0] == 404
    assert body["id"] not in [d["id"] for d in api.get("/v1/datasets", key).json()["data"]]
    status, _, message = error(api.submit(key, body["id"]))
    assert status == 404 and body["id"] in message

    # An operator job reads only operator data: a tenant's dataset is not found.
    tenant_data = api.dataset(key, 4)
    status, _, message = error(
        api.post(
            "/v1/admin/base-prefixes/jobs",
            api.admin,
            json={"name": "t", "dataset_ids": [tenant_data]},
        )
    )
    assert status == 404 and tenant_data in message

    assert api.delete(f"/v1/admin/datasets/{body['id']}", api.admin).status_code == 204
    assert error(api.delete(f"/v1/admin/datasets/{body['id']}", api.admin))[0] == 404


def test_operator_jobs_are_queued_followed_and_cancelled(api):
    data = api.post(
        "/v1/admin/datasets",
        api.admin,
        content=jsonl(examples(6)),
        headers={"content-type": "application/jsonl"},
    ).json()["id"]
    submitted = api.post(
        "/v1/admin/base-prefixes/jobs",
        api.admin,
        json={"name": "e2e-task", "dataset_ids": [data], "hyperparameters": {"epochs": 1}},
    )
    assert submitted.status_code == 201, submitted.text
    job = submitted.json()
    assert job["name"] == "e2e-task" and job["status"] == "queued" and job["base_prefix_id"] is None
    assert api.get(f"/v1/admin/base-prefixes/jobs/{job['id']}", api.admin).json()["id"] == job["id"]
    assert job["id"] in [
        j["id"] for j in api.get("/v1/admin/base-prefixes/jobs", api.admin).json()["data"]
    ]
    assert api.get(f"/v1/admin/base-prefixes/jobs/{job['id']}/events", api.admin).json() == {
        "data": []
    }
    # Its dataset is in use; a tenant cannot see the job.
    assert error(api.delete(f"/v1/admin/datasets/{data}", api.admin))[0] == 409
    _, key = api.new_tenant()
    assert error(api.get(f"/v1/jobs/{job['id']}", key))[0] == 404
    assert job["id"] not in [j["id"] for j in api.get("/v1/jobs", key).json()["data"]]

    for body, where in [
        ({"name": "x", "dataset_ids": [str(uuid.uuid4())]}, 404),
        ({"name": "x", "dataset_ids": [data], "hyperparameters": {"base_prefix": "default"}}, 422),
        ({"name": "x", "dataset_ids": [data], "hyperparameters": {"epochs": "3"}}, 422),
        ({"name": "", "dataset_ids": [data]}, 422),
        ({"dataset_ids": [data]}, 422),
    ]:
        assert error(api.post("/v1/admin/base-prefixes/jobs", api.admin, json=body))[0] == where, (
            body
        )
    cancelled = api.post(f"/v1/admin/base-prefixes/jobs/{job['id']}/cancel", api.admin)
    assert cancelled.json()["status"] == "cancelled"
    assert (
        error(api.post(f"/v1/admin/base-prefixes/jobs/{uuid.uuid4()}/cancel", api.admin))[0] == 404
    )


def test_versions_default_and_jobs_choosing_a_base(api, stack):
    base, _ = add_base(stack, length=3, seed=11, name="choose")
    listed = api.get("/v1/admin/base-prefixes?name=choose", api.admin).json()["data"]
    assert [(b["id"], b["version"], b["is_default"]) for b in listed] == [(str(base.id), 1, False)]
    marked = api.post(f"/v1/admin/base-prefixes/{base.id}/default", api.admin)
    assert marked.status_code == 200 and marked.json()["is_default"] is True
    assert error(api.post(f"/v1/admin/base-prefixes/{uuid.uuid4()}/default", api.admin))[0] == 404

    _, key = api.new_tenant()
    data = api.dataset(key, 6)
    job = api.submit(key, data, hyperparameters={"base_prefix": "default", "base_mode": "stack"})
    assert job.status_code == 201, job.text
    params = job.json()["hyperparameters"]
    assert (params["base_prefix"], params["base_mode"]) == (str(base.id), "stack")
    # base_mode defaults to a warm start.
    warm = api.submit(key, data, hyperparameters={"base_prefix": str(base.id)}).json()
    assert warm["hyperparameters"]["base_mode"] == "warm_start"
    # Still needed by a queued job: not deleted.
    assert error(api.delete(f"/v1/admin/base-prefixes/{base.id}", api.admin))[0] == 409
    for job_id in (job.json()["id"], warm["id"]):
        api.post(f"/v1/jobs/{job_id}/cancel", key)

    missing = str(uuid.uuid4())
    for hyperparameters, status, named in [
        ({"base_prefix": missing, "base_mode": "stack"}, 404, missing),
        ({"base_prefix": "nope", "base_mode": "stack"}, 422, "nope"),
        ({"base_mode": "stack"}, 422, "base_prefix"),
        ({"base_prefix": str(base.id), "base_mode": "glue"}, 422, "base_mode"),
        (
            {"base_prefix": str(base.id), "base_mode": "stack", "prefix_length": 14},
            422,
            "max_prefix_length",
        ),
        ({"base_prefix": str(base.id), "init": "text:alpha beta"}, 422, "warm start"),
    ]:
        got = error(api.submit(key, data, hyperparameters=hyperparameters))
        assert got[0] == status and named in got[2], (hyperparameters, got)

    assert api.delete("/v1/admin/base-prefixes/default", api.admin).status_code == 204
    got = error(
        api.submit(key, data, hyperparameters={"base_prefix": "default", "base_mode": "stack"})
    )
    assert got[0] == 404 and "'default'" in got[2]


def test_a_stacked_prefix_is_served_behind_its_base_and_never_without_it(api, stack):
    base, base_prefix = add_base(stack, length=3, seed=21, name="serve")
    tenant_id, key = api.new_tenant()
    version, tenant_part = publish_stacked(stack, uuid.UUID(tenant_id), base, base_prefix, seed=22)
    plain_id, plain_key = api.new_tenant()
    stack.publish(uuid.UUID(plain_id), random_kv(stack, 4, seed=23))

    inputs = ["alpha red", "beta green one"]
    generated = api.post("/v1/generate", key, json={"inputs": inputs, "max_new_tokens": 6})
    assert generated.status_code == 200, generated.text
    served = Prefix(
        stack_prefixes(base_prefix.key_values, tenant_part),
        stack.loaded.fingerprint,
        stack.loaded.architecture,
    )
    expected = generate_texts(
        stack.loaded, [(served, t) for t in inputs], DecodingConfig(max_new_tokens=6)
    )
    assert generated.json()["outputs"] == expected
    alone = Prefix(tenant_part, stack.loaded.fingerprint, stack.loaded.architecture)
    assert expected != generate_texts(
        stack.loaded, [(alone, t) for t in inputs], DecodingConfig(max_new_tokens=6)
    )
    assert api.post("/v1/generate", plain_key, json={"input": "alpha"}).status_code == 200

    # The operator cannot delete a base a tenant serves with.
    listed = api.get(f"/v1/admin/base-prefixes/{base.id}", api.admin).json()
    assert listed["stacked_active_prefixes"] == 1
    status, _, message = error(api.delete(f"/v1/admin/base-prefixes/{base.id}", api.admin))
    assert status == 409 and "1 tenant" in message

    # Were the base gone anyway (a row removed behind the API's back), the stacked prefix is
    # refused with a 409, never served without its base; other tenants are unaffected.
    with Session(stack.db) as session:
        session.delete(session.get(BasePrefix, base.id))
        session.commit()
    status, code, message = error(api.post("/v1/generate", key, json={"input": "alpha"}))
    assert (status, code) == (409, "base_prefix_missing") and str(base.id) in message
    completions = api.post("/v1/completions", key, json={"prompt": "alpha"})  # OpenAI's shape
    assert completions.status_code == 409
    assert completions.json()["error"]["code"] == "base_prefix_missing"
    assert api.post("/v1/generate", plain_key, json={"input": "alpha"}).status_code == 200
    with Session(stack.db) as session:
        assert session.get(PrefixVersion, version.id).active


def test_deleting_an_unused_base_removes_its_row_and_blob(api, stack):
    base, _ = add_base(stack, length=2, seed=31, name="unused")
    assert api.delete(f"/v1/admin/base-prefixes/{base.id}", api.admin).status_code == 204
    assert error(api.get(f"/v1/admin/base-prefixes/{base.id}", api.admin))[0] == 404
    assert stack.blobs.list_objects(base.object_key) == []
    assert error(api.delete(f"/v1/admin/base-prefixes/{base.id}", api.admin))[0] == 404
