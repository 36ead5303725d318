"""The API in-process for the bad-input and security tests: ``create_app`` (the same app the
Serve ingress serves) driven through FastAPI's TestClient, on a real PostgreSQL database and
a real S3 endpoint over HTTP (moto's server), with a tiny model's tokenizer. No Ray unless a
test asks for ``inproc_inference`` (generate past the prefix lookup): then a real
``InferenceServer`` runs in this process on weights shared through a local Ray.

Every secret here is distinctive (admin token, S3 secret key, a password in the database
URL) so that a test can scan logs and answers for it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from common.config import Settings
from tests.fixtures.factories import examples, jsonl

# Small limits, so that every limit is cheap to hit.
LIMITS = dict(
    max_request_bytes=64 * 1024,
    max_dataset_bytes=3 * 1024 * 1024,
    max_dataset_examples=200,
    max_prefix_length=16,  # tiny model: 128 positions, so an example may have 112 tokens
    tenant_dataset_bytes_quota=1024 * 1024 * 1024,
    tenant_unfinished_jobs_quota=1000,
    generate_rate_per_second=1000.0,
    generate_burst=1000,
    max_new_tokens_limit=48,  # below the default max_new_tokens (64), which must adapt
    max_peft_adapter_bytes=256 * 1024,  # a tiny model's adapter is a few KiB
)
S3_ACCESS_KEY = "AKIDSECURITYTESTS"
S3_SECRET = "s3-secret-" + uuid.uuid4().hex
DB_PASSWORD = "db-password-" + uuid.uuid4().hex
ADMIN_TOKEN = "admin-token-" + uuid.uuid4().hex


class NoInference:
    """Stands where the inference deployment's handle goes when a test runs without Ray:
    reaching it is a test bug (a tenant without an active prefix never gets that far)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"inference.{name} called in a test without inference")


class LocalHandle:
    """The calls the API makes on a Serve deployment handle (``.method.remote(...)``,
    ``.options(stream=True)``), delivered to a real ``InferenceServer`` in this process."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def options(self, **_: Any) -> LocalHandle:
        return self

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.server, name)
        return SimpleNamespace(remote=method)


@dataclass
class InProc:
    settings: Settings
    context: Any
    client: TestClient
    db: Any
    blobs: Any
    loaded: Any

    @property
    def admin(self) -> str:
        return ADMIN_TOKEN

    def request(self, method: str, path: str, key: str | None, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}))
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return self.client.request(method, path, headers=headers, **kwargs)

    def new_tenant(self, name: str | None = None) -> tuple[str, str]:
        body = {"name": name} if name else {}
        response = self.request("POST", "/v1/tenants", self.admin, json=body)
        assert response.status_code == 201, response.text
        return response.json()["id"], response.json()["api_key"]

    def upload(self, key: str, content: bytes, media: str = "application/jsonl", **kw: Any) -> Any:
        headers = {"content-type": media, **kw.pop("headers", {})}
        return self.request("POST", "/v1/datasets", key, content=content, headers=headers, **kw)

    def dataset(self, key: str, n: int = 4) -> str:
        response = self.upload(key, jsonl(examples(n)))
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def publish(self, tenant_id: str, length: int = 2, seed: int = 0) -> uuid.UUID:
        """A prefix version published the way a trainer does (blob, then the row)."""
        import torch

        from common.architectures import prefix_shape
        from tests.fixtures.stack import Stack

        shape = prefix_shape(self.loaded.model.config).tensor_shape(length)
        values = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        stack = Stack(self.settings, "", self.db, self.blobs, self.loaded)
        return stack.publish(uuid.UUID(tenant_id), values)

    def dataset_rows(self, tenant_id: str) -> int:
        with self.db.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT count(*) FROM datasets WHERE tenant_id = :t"),
                    {"t": uuid.UUID(tenant_id)},
                ).scalar_one()
            )

    def objects(self, prefix: str = "") -> list[str]:
        return [b.key for b in self.blobs.list_objects(prefix)]


def error(response: Any) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}, body
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    return response.status_code, body["error"]["code"], body["error"]["message"]


@pytest.fixture(scope="module")
def security_env() -> Iterator[None]:
    """S3 credentials for the components that build their own boto3 client (the inference
    server), the distinctive secret included."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
        patch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield


@pytest.fixture(scope="module")
def inproc_settings(
    security_env,
    create_postgres_database,
    make_bucket,
    s3_endpoint_url,
    tiny_model_dirs,
    tmp_path_factory,
) -> Settings:
    from common.db.engine import create_db_engine, upgrade_database

    url = create_postgres_database().set(password=DB_PASSWORD)  # trust auth: accepted, unused
    rendered = url.render_as_string(hide_password=False)
    engine = create_db_engine(rendered)
    upgrade_database(engine)
    engine.dispose()
    return Settings(
        home=tmp_path_factory.mktemp("security-home"),
        model=str(tiny_model_dirs["llama"]),
        database_url=rendered,
        blob_url=f"s3://{make_bucket(versioned=True)}/prefixd",
        s3_endpoint_url=s3_endpoint_url,
        admin_token=ADMIN_TOKEN,
        inference_num_cpus=1,
        batch_wait_ms=0,
        upload_validation_processes=1,  # one process start (torch, the tokenizer) less per module
        **LIMITS,
    )


@pytest.fixture(scope="module")
def inproc(inproc_settings: Settings, test_settings: Settings) -> Iterator[InProc]:
    import boto3

    from common.blobstore import build_blob_store
    from common.db.engine import create_db_engine, require_migrated
    from common.model_loading import load_model
    from services.api.app import create_app
    from services.api.context import ApiContext

    loaded = load_model(inproc_settings.model, settings=test_settings)
    db = create_db_engine(inproc_settings)
    require_migrated(db)
    session = boto3.session.Session(
        aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET, region_name="us-east-1"
    )
    blobs = build_blob_store(inproc_settings, boto_session=session)
    context = ApiContext(
        settings=inproc_settings,
        db=db,
        blobs=blobs,
        inference=NoInference(),
        model_fingerprint=loaded.fingerprint,
    )
    context.example_checker()
    with TestClient(create_app(context), raise_server_exceptions=False) as client:
        yield InProc(inproc_settings, context, client, db, blobs, loaded)
    context.background.shutdown(wait=True)
    db.dispose()


@pytest.fixture(scope="module")
def inproc_inference(inproc: InProc, ray_session) -> Iterator[InProc]:
    """``inproc`` with a real inference server in this process (weights shared through
    the test session's local Ray, as in a replica)."""
    from common.shared_weights import share_model
    from services.inference.deployment import InferenceServer

    server = InferenceServer(share_model(inproc.loaded), inproc.settings)
    inproc.context.inference = LocalHandle(server)
    try:
        yield inproc
    finally:
        inproc.context.inference = NoInference()
        server.batcher.close()
