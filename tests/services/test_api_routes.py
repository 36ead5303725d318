"""The HTTP API over HTTP, against the real Serve application (API ingress + inference,
PostgreSQL, S3 over HTTP): tenants, keys, datasets, jobs, prefixes, limits, metrics, and a
fuzz run over the OpenAPI document. One Serve start for the whole module; its limits are
small so that every limit can be hit cheaply."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from common.architectures import prefix_shape
from common.hyperparameters import known_hyperparameters, parse_hyperparameters
from tests.fixtures.factories import examples, jsonl

pytestmark = pytest.mark.slow

LIMITS = dict(
    max_request_bytes=16 * 1024,
    max_dataset_bytes=8 * 1024,
    max_dataset_examples=50,
    max_prefix_length=16,  # tiny model: 128 positions, so examples may have 112 tokens
    tenant_dataset_bytes_quota=12 * 1024,
    tenant_unfinished_jobs_quota=3,
    generate_rate_per_second=0.5,
    generate_burst=4,
)


@pytest.fixture(scope="module")
def service_settings(service_settings, create_postgres_database, make_bucket):
    """The session's settings with small limits, on a database and bucket of this module
    alone (the stack fixture starts the Serve app with these)."""
    from common.db.engine import create_db_engine, upgrade_database

    url = create_postgres_database().render_as_string(hide_password=False)
    engine = create_db_engine(url)
    upgrade_database(engine)
    engine.dispose()
    return service_settings.model_copy(
        update=dict(
            LIMITS,
            database_url=url,
            blob_url=f"s3://{make_bucket(versioned=True)}/prefixd",
            inference_replicas=1,
        )
    )


class Api:
    """A small HTTP client: ``api.post(path, key, json=...)``; ``key=None`` sends no
    Authorization header."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack
        self.admin = stack.settings.admin_token.get_secret_value()
        self.client = httpx.Client(base_url=stack.url, timeout=60)

    def request(self, method: str, path: str, key: str | None, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return self.client.request(method, path, headers=headers, **kwargs)

    def get(self, path: str, key: str | None, **kw: Any) -> httpx.Response:
        return self.request("GET", path, key, **kw)

    def post(self, path: str, key: str | None, **kw: Any) -> httpx.Response:
        return self.request("POST", path, key, **kw)

    def delete(self, path: str, key: str | None, **kw: Any) -> httpx.Response:
        return self.request("DELETE", path, key, **kw)

    def new_tenant(self) -> tuple[str, str]:
        response = self.post("/v1/tenants", self.admin, json={})
        assert response.status_code == 201, response.text
        body = response.json()
        return body["id"], body["api_key"]

    def upload(self, key: str, rows: list[Any] | bytes, media: str = "application/jsonl"):
        content = rows if isinstance(rows, bytes) else jsonl(rows)
        return self.post("/v1/datasets", key, content=content, headers={"content-type": media})

    def dataset(self, key: str, n: int = 8) -> str:
        response = self.upload(key, examples(n))
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def submit(self, key: str, dataset_id: str, **body: Any) -> httpx.Response:
        return self.post("/v1/jobs", key, json={"dataset_ids": [dataset_id], **body})


@pytest.fixture(scope="module")
def api(stack) -> Iterator[Api]:
    client = Api(stack)
    yield client
    client.client.close()


def error(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}, body
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    return response.status_code, body["error"]["code"], body["error"]["message"]


def key_values(stack, length: int, seed: int) -> torch.Tensor:
    shape = prefix_shape(stack.loaded.model.config).tensor_shape(length)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def wait_until(condition, timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


# --- the whole flow -------------------------------------------------------------------------


def test_tenant_upload_job_prefixes_rollback_and_deletion(stack, api):
    from common.blobstore import dataset_key, tenant_key_prefix

    created = api.post("/v1/tenants", api.admin, json={"name": f"acme-{uuid.uuid4().hex[:6]}"})
    assert created.status_code == 201
    tenant_id, key = created.json()["id"], created.json()["api_key"]
    assert api.get(f"/v1/tenants/{tenant_id}", key).json()["status"] == "active"

    # Upload: the answer describes what was stored, byte for byte.
    data = jsonl(examples(12))
    uploaded = api.upload(key, data)
    assert uploaded.status_code == 201, uploaded.text
    dataset = uploaded.json()
    assert dataset["examples"] == 12 and dataset["bytes"] == len(data)
    assert dataset["sha256"] == hashlib.sha256(data).hexdigest()
    assert stack.blobs.get_bytes(dataset_key(tenant_id, dataset["id"])) == data
    assert [d["id"] for d in api.get("/v1/datasets", key).json()["data"]] == [dataset["id"]]
    assert api.get(f"/v1/datasets/{dataset['id']}", key).json() == dataset

    # Submit and poll: no scheduler runs in this module, so the job stays queued (the
    # scheduler's own tests, and test_a_job_runs_when_the_scheduler_does, cover the rest).
    job = api.submit(key, dataset["id"], hyperparameters={"epochs": 2, "prefix_length": 4})
    assert job.status_code == 201, job.text
    assert job.json()["status"] == "queued"
    polled = api.get(f"/v1/jobs/{job.json()['id']}", key).json()
    assert polled["status"] == "queued" and polled["attempts"] == 0
    assert polled["progress"] is None and polled["prefix_id"] is None and polled["error"] is None
    assert polled["hyperparameters"]["epochs"] == 2
    assert api.get(f"/v1/jobs/{polled['id']}/events", key).json() == {"data": []}
    assert [j["id"] for j in api.get("/v1/jobs?status=queued", key).json()["data"]] == [
        polled["id"]
    ]
    # A dataset that an unfinished job reads cannot be deleted.
    assert error(api.delete(f"/v1/datasets/{dataset['id']}", key))[:2] == (409, "conflict")
    cancelled = api.post(f"/v1/jobs/{polled['id']}/cancel", key)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    # Prefix versions, as a trainer publishes them; then a rollback through the API.
    assert api.get("/v1/prefixes", key).json() == {"data": []}
    first = stack.publish(uuid.UUID(tenant_id), key_values(stack, 2, seed=1))
    second = stack.publish(uuid.UUID(tenant_id), key_values(stack, 3, seed=2))
    versions = api.get("/v1/prefixes", key).json()["data"]
    assert [(p["id"], p["version"], p["active"]) for p in versions] == [
        (str(first), 1, False),
        (str(second), 2, True),
    ]
    assert "object_key" not in versions[0]
    generated = api.post("/v1/generate", key, json={"input": "alpha", "max_new_tokens": 2})
    assert generated.status_code == 200 and generated.json()["prefix_id"] == str(second)
    rolled_back = api.post(f"/v1/prefixes/{first}/activate", key)
    assert rolled_back.status_code == 200 and rolled_back.json()["active"] is True
    assert api.get(f"/v1/prefixes/{second}", key).json()["active"] is False
    generated = api.post("/v1/generate", key, json={"input": "alpha", "max_new_tokens": 2})
    assert generated.json()["prefix_id"] == str(first) and generated.json()["prefix_version"] == 1

    # Deletion by the tenant itself: 202 at once, the key stops working, then 404.
    deleted = api.delete(f"/v1/tenants/{tenant_id}", key)
    assert deleted.status_code == 202 and deleted.json() == {"id": tenant_id, "status": "deleting"}
    assert api.get("/v1/datasets", key).status_code == 401
    wait_until(
        lambda: api.get(f"/v1/tenants/{tenant_id}", api.admin).status_code == 404,
        what="the tenant's erasure",
    )
    assert stack.blobs.list_objects(tenant_key_prefix(tenant_id)) == []


def test_multipart_upload_dataset_deletion_and_keys(stack, api):
    from common.blobstore import dataset_key

    tenant_id, key = api.new_tenant()
    data = jsonl(examples(5))
    uploaded = api.post("/v1/datasets", key, files={"file": ("mine.jsonl", data)})
    assert uploaded.status_code == 201, uploaded.text
    dataset_id = uploaded.json()["id"]
    assert uploaded.json()["sha256"] == hashlib.sha256(data).hexdigest()
    # The object key comes from ids only, never from the uploaded file's name.
    assert stack.blobs.exists(dataset_key(tenant_id, dataset_id))
    assert not any("mine" in b.key for b in stack.blobs.list_objects(""))

    deleted = api.delete(f"/v1/datasets/{dataset_id}", key)
    assert deleted.status_code == 204
    assert not stack.blobs.exists(dataset_key(tenant_id, dataset_id))
    assert error(api.get(f"/v1/datasets/{dataset_id}", key))[:2] == (404, "not_found")

    # Keys: a second key works; listing shows no secret; a revoked key stops at once.
    made = api.post(f"/v1/tenants/{tenant_id}/keys", key, json={"name": "ci"})
    assert made.status_code == 201
    second = made.json()
    assert second["key"].startswith("pfx_") and second["name"] == "ci"
    assert api.get("/v1/datasets", second["key"]).status_code == 200
    listed = api.get(f"/v1/tenants/{tenant_id}/keys", key).json()["data"]
    assert {k["id"] for k in listed} >= {second["id"]}
    assert all("key" not in k and "key_hash" not in k for k in listed)
    revoked = api.delete(f"/v1/tenants/{tenant_id}/keys/{second['id']}", api.admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert error(api.get("/v1/datasets", second["key"])) == (401, "unauthorized", "invalid API key")
    assert api.get("/v1/datasets", key).status_code == 200


# --- validation -----------------------------------------------------------------------------


def test_every_bad_upload_is_refused_with_its_line_and_leaves_nothing(stack, api):
    from common.blobstore import datasets_key_prefix

    tenant_id, key = api.new_tenant()
    good = jsonl(examples(3))
    long_input = {"input": " ".join(["alpha"] * 120), "output": "beta"}
    cases: list[tuple[bytes, str, tuple[int, str, str]]] = [
        (
            good + b'{"input": "a", "output": \n',
            "application/jsonl",
            (422, "invalid_input", r"^line 4: invalid JSON"),
        ),
        (
            good + b"[1, 2]\n",
            "application/x-ndjson",
            (422, "invalid_input", r"^line 4: expected an object"),
        ),
        (
            b'{"input": "a"}\n',
            "application/jsonl",
            (422, "invalid_input", r"^line 1: missing field 'output'"),
        ),
        (
            good + b'\n{"input": " ", "output": "b"}\n',
            "application/jsonl",
            (422, "invalid_input", r"^line 5: field 'input' is empty"),
        ),
        (
            good + b'{"input": 3, "output": "b"}\n',
            "application/jsonl",
            (422, "invalid_input", r"^line 4: field 'input' must be a string"),
        ),
        (
            b'{"input": "caf\xe9", "output": "b"}\n',
            "application/jsonl",
            (422, "invalid_input", r"^line 1: not valid UTF-8"),
        ),
        (
            good + jsonl([long_input]),
            "application/jsonl",
            (422, "invalid_input", r"^line 4: the example has 123 tokens; the limit is 112"),
        ),
        (b"", "application/jsonl", (422, "invalid_input", r"^no examples")),
        (b"\n \n", "application/jsonl", (422, "invalid_input", r"^no examples")),
        (good, "text/plain", (415, "unsupported_media_type", r"application/jsonl")),
        (good, "application/json", (415, "unsupported_media_type", r"multipart/form-data")),
        (
            jsonl([{"input": "a", "output": "b"}] * 51),
            "application/jsonl",
            (413, "payload_too_large", r"^line 51: more examples than max_dataset_examples \(50\)"),
        ),
    ]
    for content, media, (status, code, pattern) in cases:
        response = api.upload(key, content, media)
        got = error(response)
        assert got[:2] == (status, code) and re.search(pattern, got[2]), (content[:60], got)

    # Over the size limit: with a Content-Length past it (refused before reading) and
    # chunked without one (counted while streaming).
    big = jsonl([{"input": "alpha beta", "output": "gamma delta " * 8}] * 200)
    assert len(big) > LIMITS["max_dataset_bytes"]
    chunked = api.post(
        "/v1/datasets",
        key,
        content=iter([big[i : i + 1000] for i in range(0, len(big), 1000)]),
        headers={"content-type": "application/jsonl"},
    )
    assert error(chunked) == (
        413,
        "payload_too_large",
        "the dataset is larger than max_dataset_bytes (8192 bytes)",
    )
    huge = b"x" * (LIMITS["max_dataset_bytes"] + 64 * 1024 + 1)
    status, code, message = error(api.upload(key, huge))
    assert (status, code) == (413, "payload_too_large") and "max_dataset_bytes" in message
    no_file = api.post("/v1/datasets", key, files={"other": ("x.jsonl", good)})
    assert error(no_file)[:2] == (422, "invalid_request")

    # Nothing of any rejected upload remains: no row, no blob.
    assert api.get("/v1/datasets", key).json() == {"data": []}
    assert stack.blobs.list_objects(datasets_key_prefix(tenant_id)) == []


def test_job_submission_is_validated(stack, api):
    _, key = api.new_tenant()
    _, other_key = api.new_tenant()
    dataset_id = api.dataset(key)
    foreign = api.dataset(other_key)
    cases: list[tuple[dict[str, Any], tuple[int, str, str]]] = [
        (
            {"epochs": 0},
            (
                422,
                "invalid_hyperparameters",
                r"epochs must be at least 1 \(or unset: automatic\), got 0",
            ),
        ),
        (
            {"learning_rate": -1},
            (422, "invalid_hyperparameters", r"learning rate must be positive"),
        ),
        (
            {"prefix_length": 0},
            (422, "invalid_hyperparameters", r"prefix length must be at least 1"),
        ),
        (
            {"prefix_length": 17},
            (422, "invalid_hyperparameters", r"longest prefix allowed, 16 \(max_prefix_length"),
        ),
        ({"batch_size": 0}, (422, "invalid_hyperparameters", r"batch size must be at least 1")),
        (
            {"init": "zeros"},
            (422, "invalid_hyperparameters", r"init must be 'random' or 'text:WORDS'"),
        ),
        (
            {"init": "text:" + "alpha " * 17},
            (422, "invalid_hyperparameters", r"init text has 17 tokens"),
        ),
        (
            {"epochs": "3"},
            (422, "invalid_request", r"hyperparameters\.epochs: Input should be a valid integer"),
        ),
        ({"epochs": True}, (422, "invalid_request", r"hyperparameters\.epochs")),
        ({"learning_rate": 1e9}, (422, "invalid_request", r"hyperparameters\.learning_rate")),
        ({"mystery": 1}, (422, "invalid_request", r"hyperparameters\.mystery: Extra inputs")),
        (
            {"mid_dim": 5000},
            (
                422,
                "invalid_request",
                r"hyperparameters\.mid_dim: Input should be less than or equal to 4096",
            ),
        ),
        (
            {"warmup_ratio": 1.0},
            (422, "invalid_hyperparameters", r"warmup ratio must be in \[0, 1\)"),
        ),
    ]
    for hyperparameters, (status, code, pattern) in cases:
        got = error(api.submit(key, dataset_id, hyperparameters=hyperparameters))
        assert got[:2] == (status, code) and re.search(pattern, got[2]), (hyperparameters, got)

    # Datasets must be the caller's: another tenant's id reads exactly like a missing one.
    missing = str(uuid.uuid4())
    for other in (foreign, missing):
        status, code, message = error(api.submit(key, other))
        assert (status, code, message) == (404, "not_found", f"dataset(s) not found: {other}")
    status, code, message = error(api.submit(key, dataset_id, validation_dataset_id=foreign))
    assert (status, code, message) == (404, "not_found", f"dataset(s) not found: {foreign}")
    both = api.submit(
        key,
        dataset_id,
        validation_dataset_id=api.dataset(key),
        hyperparameters={"validation_split": 0.2},
    )
    assert error(both)[:2] == (422, "invalid_request")
    same = api.submit(key, dataset_id, validation_dataset_id=dataset_id)
    assert error(same)[:2] == (422, "invalid_request")
    empty = api.post("/v1/jobs", key, json={"dataset_ids": []})
    assert error(empty)[0:2] == (422, "invalid_request") and "dataset_ids" in error(empty)[2]
    not_json = api.post("/v1/jobs", key, content=b"{", headers={"content-type": "application/json"})
    assert error(not_json)[:2] == (422, "invalid_request")
    # With a validation dataset, the job records it.
    validation = api.dataset(key)
    ok = api.submit(key, dataset_id, validation_dataset_id=validation)
    assert ok.status_code == 201 and ok.json()["validation_dataset_id"] == validation


def test_the_api_and_the_workers_share_one_hyperparameter_schema(stack, api):
    # Every training knob the workers take is accepted at submission, and what the API stores
    # is exactly what the trainer parses: one schema (common/hyperparameters.py), not two.
    _, key = api.new_tenant()
    given = {"mid_dim": 16, "warmup_ratio": 0.2, "patience": 2, "validation_split_method": "hash"}
    created = api.submit(key, api.dataset(key), hyperparameters=given)
    assert created.status_code == 201, created.text
    stored = created.json()["hyperparameters"]
    spec = parse_hyperparameters(stored)
    assert (spec.config.mid_dim, spec.config.warmup_ratio, spec.config.patience) == (16, 0.2, 2)
    assert spec.validation_split_method == "hash"
    assert set(stored) == set(known_hyperparameters())


def test_idempotent_job_submission(stack, api):
    _, key = api.new_tenant()
    _, other_key = api.new_tenant()
    dataset_id = api.dataset(key)
    first = api.submit(key, dataset_id, idempotency_key="retry-2025-01-01")
    assert first.status_code == 201
    again = api.submit(key, dataset_id, idempotency_key="retry-2025-01-01")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    fresh = api.submit(key, dataset_id, idempotency_key="retry-2025-01-02")
    assert fresh.status_code == 201 and fresh.json()["id"] != first.json()["id"]
    # Keys are per tenant: another tenant's identical key is its own job.
    theirs = api.submit(other_key, api.dataset(other_key), idempotency_key="retry-2025-01-01")
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]
    assert len(api.get("/v1/jobs", key).json()["data"]) == 2


# --- auth -----------------------------------------------------------------------------------


def test_every_route_checks_who_is_calling(stack, api):
    owner_id, owner = api.new_tenant()
    intruder_id, intruder = api.new_tenant()
    dataset_id = api.dataset(owner)
    job_id = api.submit(owner, dataset_id).json()["id"]
    prefix_id = str(stack.publish(uuid.UUID(owner_id), key_values(stack, 2, seed=5)))
    key_id = api.get(f"/v1/tenants/{owner_id}/keys", owner).json()["data"][0]["id"]
    revoked = api.post(f"/v1/tenants/{intruder_id}/keys", intruder).json()
    api.delete(f"/v1/tenants/{intruder_id}/keys/{revoked['id']}", intruder)

    # (method, path with the owner's ids, body) of every route a tenant key may call.
    tenant_routes = [
        ("GET", f"/v1/tenants/{owner_id}", None),
        ("DELETE", f"/v1/tenants/{owner_id}", None),
        ("GET", f"/v1/tenants/{owner_id}/keys", None),
        ("POST", f"/v1/tenants/{owner_id}/keys", {}),
        ("DELETE", f"/v1/tenants/{owner_id}/keys/{key_id}", None),
        ("GET", f"/v1/datasets/{dataset_id}", None),
        ("DELETE", f"/v1/datasets/{dataset_id}", None),
        ("GET", f"/v1/jobs/{job_id}", None),
        ("GET", f"/v1/jobs/{job_id}/events", None),
        ("POST", f"/v1/jobs/{job_id}/cancel", None),
        ("GET", f"/v1/prefixes/{prefix_id}", None),
        ("POST", f"/v1/prefixes/{prefix_id}/activate", None),
    ]
    owned = [owner_id, dataset_id, job_id, prefix_id, key_id]
    for method, path, body in tenant_routes:
        kwargs = {"json": body} if body is not None else {}
        # No key, an unknown key and a revoked key: 401, whatever the route.
        for key in (None, "pfx_not-a-key", revoked["key"]):
            got = error(api.request(method, path, key, **kwargs))
            assert got[:2] == (401, "unauthorized"), (method, path, key, got)
        # Another tenant's object: exactly the answer for an id that does not exist.
        foreign = api.request(method, path, intruder, **kwargs)
        missing_path = path
        for owned_id in owned:
            missing_path = missing_path.replace(owned_id, str(uuid.UUID(int=0)))
        missing = api.request(method, missing_path, intruder, **kwargs)
        assert foreign.status_code == missing.status_code == 404, (method, path, foreign.text)
        assert error(foreign)[1] == error(missing)[1] == "not_found"
        masked = error(foreign)[2]
        for owned_id in owned:
            masked = masked.replace(owned_id, str(uuid.UUID(int=0)))
        assert masked == error(missing)[2], (method, path)

    # The tenant-scoped collections never show another tenant's rows.
    for path in ("/v1/datasets", "/v1/jobs", "/v1/prefixes"):
        assert api.get(path, intruder).json()["data"] == [] or all(
            row["id"] not in owned for row in api.get(path, intruder).json()["data"]
        )
    # Admin routes: a tenant key is forbidden, no key is unauthorized.
    for method, path in (("POST", "/v1/tenants"), ("GET", "/v1/tenants")):
        assert error(api.request(method, path, owner, json={}))[:2] == (403, "forbidden")
        assert error(api.request(method, path, None, json={}))[:2] == (401, "unauthorized")
    # The admin token is no tenant: tenant routes refuse it.
    assert error(api.get("/v1/datasets", api.admin))[:2] == (401, "unauthorized")
    # Nothing of the owner's was touched by all of this.
    assert api.get(f"/v1/datasets/{dataset_id}", owner).status_code == 200
    assert api.get(f"/v1/jobs/{job_id}", owner).json()["status"] in ("queued", "running")
    assert api.get(f"/v1/tenants/{owner_id}", owner).json()["status"] == "active"


# --- limits and metrics ---------------------------------------------------------------------


def refused_before_the_body(base_url: str, path: str, key: str, length: int) -> bytes:
    """Send a request's head announcing ``length`` bytes and a quarter of its body, never the
    rest. Returns the answer's status line and headers, which must come without the rest
    (a server that waits for the whole body times out here after 10 s)."""
    url = httpx.URL(base_url)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/jsonl\r\nContent-Length: {length}\r\n\r\n"
    )
    with socket.create_connection((url.host, url.port), timeout=10) as connection:
        connection.sendall(head.encode() + b"x" * (length // 4))
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = connection.recv(65536)
            assert chunk, f"closed without an answer: {received!r}"
            received += chunk
    return received.partition(b"\r\n\r\n")[0]


def test_limits_answer_413_and_429_naming_the_limit(stack, api):
    _, key = api.new_tenant()
    # A JSON body over max_request_bytes, refused from its Content-Length.
    padding = "x" * (LIMITS["max_request_bytes"] + 1)
    status, code, message = error(
        api.post("/v1/jobs", key, json={"dataset_ids": [str(uuid.uuid4())], "pad": padding})
    )
    assert (status, code) == (413, "payload_too_large") and "max_request_bytes" in message

    # Queued-job quota: the 4th unfinished job is refused; a replay of an accepted one is not.
    dataset_id = api.dataset(key)
    accepted = [api.submit(key, dataset_id, idempotency_key=f"k{i}") for i in range(3)]
    assert [r.status_code for r in accepted] == [201] * 3
    status, code, message = error(api.submit(key, dataset_id))
    assert (status, code) == (429, "quota_exceeded")
    assert "tenant_unfinished_jobs_quota is 3" in message
    assert api.submit(key, dataset_id, idempotency_key="k0").status_code == 200
    api.post(f"/v1/jobs/{accepted[0].json()['id']}/cancel", key)
    assert api.submit(key, dataset_id).status_code == 201

    # Dataset storage quota (12 KiB): uploads of ~5 KiB each fit twice, not three times.
    _, key = api.new_tenant()
    chunk = jsonl([{"input": "alpha beta", "output": "gamma delta " * 6}] * 50)
    assert 4 * 1024 < len(chunk) < 6 * 1024
    assert [api.upload(key, chunk).status_code for _ in range(2)] == [201, 201]
    status, code, message = error(api.upload(key, chunk))
    assert (status, code) == (413, "quota_exceeded")
    assert "tenant_dataset_bytes_quota" in message
    assert len(api.get("/v1/datasets", key).json()["data"]) == 2
    # Refused before its body was read: the answer comes without the rest of the body. (The
    # ingress then closes the connection; Serve's Python proxy closes it to the client, where
    # HAProxy drains the rest in C instead of Python reading it.)
    limit = LIMITS["max_dataset_bytes"]
    head = refused_before_the_body(stack.url, "/v1/datasets", "not-a-key", limit)
    assert head.startswith(b"HTTP/1.1 401"), head

    # Generate: a token bucket per tenant (burst 4, 0.5/s); one tenant's 429s are its own.
    _, key = api.new_tenant()
    _, other = api.new_tenant()
    statuses = [
        api.post("/v1/generate", key, json={"input": "alpha"}).status_code for _ in range(6)
    ]
    assert statuses[:4] == [409] * 4 and statuses[-1] == 429  # 409: no prefix trained yet
    limited = api.post("/v1/generate", key, json={"input": "alpha"})
    status, code, message = error(limited)
    assert (status, code) == (429, "rate_limited") and "generate_rate_per_second" in message
    assert int(limited.headers["retry-after"]) >= 1
    assert api.post("/v1/completions", key, json={"prompt": "alpha"}).status_code == 429
    assert api.post("/v1/generate", other, json={"input": "alpha"}).status_code == 409


def test_metrics_are_prometheus_text(stack, api):
    _, key = api.new_tenant()
    api.get("/v1/datasets", key)
    api.get(f"/v1/jobs/{uuid.uuid4()}", key)
    # Behind the admin token (issue 16): 401 without it, 403 with a tenant's key.
    assert api.get("/metrics", None).status_code == 401
    assert api.get("/metrics", key).status_code == 403
    response = api.get("/metrics", api.admin)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert re.search(
        r'prefixd_http_requests_total\{method="GET",route="/v1/datasets",status="200"\} \d', text
    )
    # Route templates, never raw ids, label the series.
    assert 'route="/v1/jobs/{job_id}",status="404"' in text
    assert not re.search(r'route="[^"]*[0-9a-f]{8}-[0-9a-f]{4}', text)
    assert "prefixd_http_request_duration_seconds_bucket" in text
    assert re.search(r'prefixd_jobs\{state="queued"\} \d', text)
    assert re.search(r'prefixd_jobs\{state="cancelled"\} \d', text)


# --- fuzzing the OpenAPI document -----------------------------------------------------------


def test_openapi_fuzzing_finds_no_server_error(stack, api):
    """Schemathesis generates valid and invalid requests for every operation in the API's
    OpenAPI document, with a tenant key, the admin token or no credentials: none may get a
    5xx. Bounded and derandomized, so the run is quick and repeatable."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    @schemathesis.serializer("application/jsonl", "application/x-ndjson")
    def _jsonl(context: Any, value: Any) -> bytes:
        if isinstance(value, bytes):
            return value
        return value.encode() if isinstance(value, str) else json.dumps(value).encode()

    _, key = api.new_tenant()
    api.dataset(key)
    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    failures: list[str] = []
    # Tenant key twice as often as the admin token or no credentials.
    identities = st.sampled_from([key, key, api.admin, None])

    def fuzz(operation: Any, mode: GenerationMode) -> None:
        # 8 cases per operation and mode: the in-process fuzzer (tests/security/
        # test_bad_input.py) runs 25 of each on the same schema; this one is for the path
        # through HAProxy and the Serve replicas.
        @settings(
            max_examples=8,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode), token=identities)
        def run(case: Any, token: str | None) -> None:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = case.call(base_url=stack.url, headers=headers, timeout=60)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} ({mode.value}): "
                    f"{response.status_code} {response.text[:200]}"
                )

        try:
            run()
        except Unsatisfiable:
            # Nothing invalid to generate (an operation without parameters or body).
            assert mode == GenerationMode.NEGATIVE, operation.label

    for operation in operations:
        fuzz(operation, GenerationMode.POSITIVE)
        fuzz(operation, GenerationMode.NEGATIVE)
    assert failures == []


# --- with the scheduler: the job really runs (last: it claims whatever is queued) -----------


def test_a_job_runs_when_the_scheduler_does(stack, api):
    """The flow past `queued`: with the scheduler of `workers/` running, a job submitted
    over HTTP trains, reports progress, publishes a prefix version that becomes active,
    and generate uses it."""
    scheduler = pytest.importorskip("workers.scheduler")
    from sqlmodel import Session

    from common.db import crud
    from common.db.models import JobState

    with Session(stack.db) as session:  # earlier tests' leftovers would only cost time
        for job in crud.list_all_jobs(session=session, state=JobState.queued, limit=1000):
            crud.cancel_job(session=session, job_id=job.id)

    tenant_id, key = api.new_tenant()
    dataset_id = api.dataset(key, n=16)
    submitted = api.submit(
        key,
        dataset_id,
        hyperparameters={"prefix_length": 4, "epochs": 2, "batch_size": 4, "learning_rate": 0.01},
    )
    assert submitted.status_code == 201
    job_id = submitted.json()["id"]

    # A second tenant drives the same queue with the official OpenAI SDK, over HTTP.
    import openai

    _, sdk_key = api.new_tenant()
    sdk = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=sdk_key, max_retries=0)

    # OpenAI's chat fine-tuning format: two trained assistant turns a line.
    def chat(first: dict[str, str], second: dict[str, str]) -> dict[str, Any]:
        turns = [("user", "input"), ("assistant", "output")]
        messages = [{"role": "system", "content": "alpha"}]
        for pair in (first, second):
            messages += [{"role": role, "content": pair[field]} for role, field in turns]
        return {"messages": messages}

    chats = [chat(a, b) for a, b in zip(examples(6), examples(12)[6:], strict=True)]
    uploaded = sdk.files.create(file=("train.jsonl", jsonl(chats)), purpose="fine-tune")
    assert (uploaded.object, uploaded.purpose, uploaded.status) == (
        "file",
        "fine-tune",
        "processed",
    )
    with pytest.raises(openai.BadRequestError, match="line 1") as bad_file:
        sdk.files.create(file=("bad.jsonl", b'{"input": "a"}\n'), purpose="fine-tune")
    assert bad_file.value.param == "file"
    ft_job = sdk.fine_tuning.jobs.create(
        model="default",
        training_file=uploaded.id,
        hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 20},
    )
    assert ft_job.status == "queued" and ft_job.fine_tuned_model is None
    assert [j.id for j in sdk.fine_tuning.jobs.list()] == [ft_job.id]

    settings = stack.settings.model_copy(
        update=dict(
            scheduler_namespace=f"prefixd-api-test-{uuid.uuid4().hex[:8]}",
            trainer_slots=1,
            scheduler_poll_seconds=0.2,
            progress_event_seconds=0.0,
            job_heartbeat_seconds=0.5,
        )
    )
    s3_env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    handle, _ = scheduler.start_scheduler(settings, runtime_env={"env_vars": s3_env})
    try:
        scheduler.wait_until_ready(handle, timeout=120)
        job = wait_until(
            lambda: (
                body
                if (body := api.get(f"/v1/jobs/{job_id}", key).json())["status"]
                in ("succeeded", "failed", "cancelled")
                else None
            ),
            timeout=180,
            what="the job to finish",
        )
        finished = wait_until(
            lambda: (
                j
                if (j := sdk.fine_tuning.jobs.retrieve(ft_job.id)).status
                in ("succeeded", "failed", "cancelled")
                else None
            ),
            timeout=180,
            what="the fine-tuning job to finish",
        )
    finally:
        scheduler.stop_scheduler(handle, release=False, timeout=30)

    assert finished.status == "succeeded", finished
    assert finished.hyperparameters.n_epochs == 2
    model = finished.fine_tuned_model
    assert model is not None and model in [m.id for m in sdk.models.list()]
    events = sdk.fine_tuning.jobs.list_events(ft_job.id, limit=2)
    assert len(events.data) == 2 and events.has_more and events.data[0].type == "metrics"
    chat = sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "alpha red"}], max_tokens=3
    )
    assert chat.model == model and chat.choices[0].message.role == "assistant"
    assert sdk.completions.create(model=model, prompt="alpha red", max_tokens=3).model == model
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        sdk.chat.completions.create(
            model="prefix-" + str(uuid.uuid4()), messages=[{"role": "user", "content": "alpha"}]
        )
    assert sdk.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(uploaded.id)

    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1 and job["error"] is None
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 8  # 16/4 × 2 epochs
    events = api.get(f"/v1/jobs/{job_id}/events", key).json()["data"]
    assert events and events[-1]["step"] == 8
    later = api.get(f"/v1/jobs/{job_id}/events?after_id={events[0]['id']}", key).json()["data"]
    assert later == events[1:]
    prefixes = api.get("/v1/prefixes", key).json()["data"]
    assert [(p["id"], p["version"], p["active"], p["job_id"]) for p in prefixes] == [
        (job["prefix_id"], 1, True, job_id)
    ]
    assert prefixes[0]["prefix_length"] == 4
    generated = api.post("/v1/generate", key, json={"input": "alpha red", "max_new_tokens": 3})
    assert generated.status_code == 200 and generated.json()["prefix_id"] == job["prefix_id"]
    assert tenant_id == prefixes[0]["tenant_id"]


def test_admin_lists_the_nightly_runs(stack, api):
    from datetime import date

    from common.db import crud
    from common.db.engine import session_scope

    night = date(2040, 1, 1 + uuid.uuid4().int % 28)
    with session_scope(stack.db) as session:
        crud.start_nightly_run(session=session, run_date=night)
        crud.finish_nightly_planning(
            session=session, run_date=night, tenants_skipped=3, estimated_tokens=1234
        )
    _, key = api.new_tenant()
    assert error(api.get("/v1/admin/nightly/runs", key))[:2] == (403, "forbidden")
    assert error(api.get("/v1/admin/nightly/runs", None))[:2] == (401, "unauthorized")
    response = api.get("/v1/admin/nightly/runs?limit=5", api.admin)
    assert response.status_code == 200, response.text
    (run,) = [r for r in response.json()["data"] if r["run_date"] == night.isoformat()]
    assert (run["planner_runs"], run["tenants_planned"], run["tenants_skipped"]) == (1, 0, 3)
    assert run["estimated_tokens"] == 1234 and run["finished_at"] is not None  # no job: done
    assert run["wall_seconds"] >= 0
