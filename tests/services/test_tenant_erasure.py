"""Tenant erasure through the whole service: the Serve application (API ingress + two
inference replicas) on PostgreSQL and a versioned S3 bucket over HTTP, the scheduler with
real trainers on the session's Ray, a tiny model.

- a tenant with datasets, three prefix versions, a running and a queued job is deleted over
  HTTP while generate requests of it and of other tenants are flowing: afterwards nothing of
  it is found anywhere (objects of every version, rows, replica caches), its running job
  never published, the others' objects, rows and outputs are untouched;
- an erasure nobody runs (its runner died right after marking the tenant) is resumed by the
  scheduler; one is run by ``prefixd tenants delete`` from the driver, asking the replicas
  through Serve;
- single prefix version removal falls back to the previous version;
- uploads that race an erasure leave no object (these need no Serve: fast).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from sqlmodel import Session, select
from typer.testing import CliRunner

from common.architectures import prefix_shape
from common.blobstore import prefix_key, tenant_key_prefix
from common.db import crud
from common.db.errors import NotFoundError, TenantNotActiveError
from common.db.models import ApiKey, Dataset, DeletionAudit, PrefixVersion, Tenant, TrainingJob
from common.erasure import (
    ErasureIncompleteError,
    ErasureOptions,
    ReplicaReport,
    erase_tenant,
    find_tenant_leftovers,
)
from tests.fixtures.factories import make_tenant
from tests.workers.conftest import QUICK, S3_TEST_ENV, WorkerEnv, examples, long_job, wait_for

# A tenant marked deleting outside the API replica: its keys stop working within the API's
# key cache interval (api_key_cache_seconds, 2 s by default), plus a margin.
KEY_CACHE_BOUND = 5.0


def random_key_values(stack: Any, length: int, seed: int) -> torch.Tensor:
    shape = prefix_shape(stack.loaded.model.config).tensor_shape(length)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class Client:
    def __init__(self, stack: Any) -> None:
        self.admin = stack.settings.admin_token.get_secret_value()
        self.http = httpx.Client(base_url=stack.url, timeout=60)

    def call(self, method: str, path: str, key: str, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, path, headers={"Authorization": f"Bearer {key}"}, **kwargs)

    def generate(self, key: str, text: str = "alpha beta") -> httpx.Response:
        return self.call("POST", "/v1/generate", key, json={"input": text, "max_new_tokens": 4})


@pytest.fixture
def client(stack) -> Iterator[Client]:
    c = Client(stack)
    yield c
    c.http.close()


@pytest.fixture
def scheduler(stack) -> Iterator[Callable[[], Any]]:
    """Factory: start a scheduler on the stack's database and bucket (after the test
    published what it needs: ``Stack.publish`` claims jobs itself); stopped at the end."""
    from workers.scheduler import start_scheduler, stop_scheduler, wait_until_ready

    handles: list[Any] = []
    settings = stack.settings.model_copy(
        update=dict(
            scheduler_namespace=f"prefixd-test-{uuid.uuid4().hex[:10]}",
            trainer_slots=2,
            job_lease_seconds=6.0,
            job_heartbeat_seconds=0.5,
            trainer_start_timeout_seconds=120.0,
            progress_event_seconds=0.2,
            scheduler_poll_seconds=0.2,
            erasure_lease_seconds=2.0,
        )
    )

    def start() -> Any:
        handle, _ = start_scheduler(settings, runtime_env={"env_vars": S3_TEST_ENV})
        handles.append(handle)
        wait_until_ready(handle, timeout=180)
        return handle

    yield start
    for handle in handles:
        stop_scheduler(handle, release=False, timeout=30)


def stored(stack: Any, tenant_id: uuid.UUID) -> dict[str, Any]:
    """A tenant's object versions and rows, to prove them untouched."""
    with Session(stack.db) as session:
        rows = {
            model.__name__: sorted(
                str(r.id)
                for r in session.exec(select(model).where(model.tenant_id == tenant_id)).all()  # type: ignore[attr-defined]
            )
            for model in (ApiKey, Dataset, TrainingJob, PrefixVersion)
        }
    return {
        "rows": rows,
        "objects": [
            (v.key, v.version_id) for v in stack.blobs.list_versions(tenant_key_prefix(tenant_id))
        ],
    }


def cached_anywhere(stack: Any, prefix_ids: list[str]) -> set[str]:
    return {p for s in stack.replica_stats(2) for p in s["cached_prefixes"] if p in prefix_ids}


def reports(handle: Any, job_id: uuid.UUID) -> list[dict[str, Any]]:
    from workers.scheduler import scheduler_status

    return [r for r in scheduler_status(handle)["reports"] if r["job_id"] == str(job_id)]


@contextlib.contextmanager
def traffic(client: Client, keys: dict[str, str]) -> Iterator[dict[str, list[httpx.Response]]]:
    """Generate requests of these tenants in threads until the block ends."""
    stop = threading.Event()
    seen: dict[str, list[httpx.Response]] = {name: [] for name in keys}

    def loop(name: str, key: str) -> None:
        while not stop.is_set():
            seen[name].append(client.generate(key))
            time.sleep(0.15)

    threads = [threading.Thread(target=loop, args=item, daemon=True) for item in keys.items()]
    for thread in threads:
        thread.start()
    try:
        yield seen
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)


@pytest.mark.slow
def test_tenant_is_erased_everywhere_while_others_are_served(
    stack, client, scheduler, monkeypatch
) -> None:
    env = WorkerEnv(stack.settings, stack.db, stack.blobs)
    # Others, the victim (three prefix versions), one whose runner died after marking it,
    # one erased from the command line. Everything published before the scheduler starts.
    others = {name: stack.tenant() for name in ("a", "b")}
    for i, (tenant_id, _key) in enumerate(others.values()):
        stack.publish(tenant_id, random_key_values(stack, 3, seed=10 + i))
    victim, victim_key = stack.tenant()
    versions = [
        str(stack.publish(victim, random_key_values(stack, 2 + v, seed=v))) for v in range(3)
    ]
    orphaned, orphaned_key = stack.tenant()
    orphaned_prefix = str(stack.publish(orphaned, random_key_values(stack, 2, seed=20)))
    by_cli, by_cli_key = stack.tenant()
    by_cli_prefix = str(stack.publish(by_cli, random_key_values(stack, 2, seed=21)))
    half, half_key = stack.tenant()
    half_prefix = str(stack.publish(half, random_key_values(stack, 2, seed=22)))

    expected = {}
    for name, (_tenant_id, key) in others.items():
        response = client.generate(key)
        assert response.status_code == 200, response.text
        expected[name] = response.json()["outputs"]
    for key in (victim_key, orphaned_key, by_cli_key, half_key):
        assert client.generate(key).status_code == 200  # cached on a replica now
    env.dataset(victim, examples(20))
    running = env.submit(victim, long_job(3000))
    queued = env.submit(victim, QUICK)
    before = {name: stored(stack, tenant_id) for name, (tenant_id, _key) in others.items()}

    # A runner that died right after marking: the admin sees the erasure, key routes 410.
    with Session(stack.db) as session:
        crud.mark_tenant_deleting(session=session, tenant_id=orphaned)
    shown = client.call("GET", f"/v1/tenants/{orphaned}", client.admin).json()
    assert shown["status"] == "deleting" and shown["deletion"]["step"] == "cancel_jobs"
    listed = client.call("GET", "/v1/tenants?limit=1000", client.admin).json()["data"]
    assert [t for t in listed if t["id"] == str(orphaned)] == [shown]  # one shape, both routes
    gone = client.call("POST", f"/v1/tenants/{orphaned}/keys", client.admin, json={})
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "tenant_deleting"
    # Marked out of band (not through this API replica): within api_key_cache_seconds.
    wait_for(lambda: client.generate(orphaned_key).status_code == 401, timeout=KEY_CACHE_BOUND)

    # An erasure that stopped after deleting the rows (a replica kept answering "held"): the
    # admin still sees it with its step and error; deleting again resumes it in the API.
    def always_held(prefix_ids: list[str]) -> ReplicaReport:
        return ReplicaReport(2, frozenset(prefix_ids))

    with pytest.raises(ErasureIncompleteError):
        erase_tenant(
            engine=stack.db,
            store=stack.blobs,
            tenant_id=half,
            evictor=always_held,
            options=ErasureOptions(replica_timeout_seconds=0.1, poll_seconds=0.05),
        )
    shown = client.call("GET", f"/v1/tenants/{half}", client.admin).json()
    assert (shown["name"], shown["created_at"], shown["status"]) == (None, None, "deleting")
    assert shown["deletion"]["step"] == "evict_replicas"
    assert "still held" in shown["deletion"]["last_error"] and shown["deletion"]["rows_erased"] > 0
    wait_for(
        lambda: client.call("GET", f"/v1/tenants/{half}", half_key).status_code == 401,
        timeout=KEY_CACHE_BOUND,
    )
    assert client.call("DELETE", f"/v1/tenants/{half}", client.admin).status_code == 202
    wait_for(
        lambda: client.call("GET", f"/v1/tenants/{half}", client.admin).status_code == 404,
        timeout=60,
        what="the API to resume the erasure",
    )
    assert cached_anywhere(stack, [half_prefix]) == set()
    assert find_tenant_leftovers(stack.db, stack.blobs, half) == []

    handle = scheduler()
    wait_for(lambda: env.events(running.id), timeout=120, what="the victim's job to run")
    # The scheduler resumes the erasure whose runner died (after erasure_lease_seconds).
    wait_for(
        lambda: client.call("GET", f"/v1/tenants/{orphaned}", client.admin).status_code == 404,
        timeout=60,
        what="the scheduler to resume the orphaned erasure",
    )
    assert find_tenant_leftovers(stack.db, stack.blobs, orphaned) == []
    assert cached_anywhere(stack, [orphaned_prefix]) == set()

    forgets = {s["replica"]: s["forget_calls"] for s in stack.replica_stats(2)}
    keys = {name: key for name, (_tenant_id, key) in others.items()} | {"victim": victim_key}
    steps: list[str] = []
    with traffic(client, keys) as seen:
        time.sleep(0.5)
        deleted = client.call("DELETE", f"/v1/tenants/{victim}", client.admin)
        assert deleted.status_code == 202, deleted.text
        while (
            shown := client.call("GET", f"/v1/tenants/{victim}", client.admin)
        ).status_code == 200:
            body = shown.json()
            assert body["status"] == "deleting", body
            steps.append(body["deletion"]["step"])
            assert body["deletion"]["last_error"] is None, body  # the API's run did it all
            time.sleep(0.05)
        assert shown.status_code == 404, shown.text
        time.sleep(0.5)  # requests go on after the erasure

    # Nothing of the victim anywhere: objects (every version), rows, replica caches.
    assert steps and set(steps) <= {
        "cancel_jobs",
        "delete_objects",
        "delete_rows",
        "evict_replicas",
        "verify",
    }
    assert find_tenant_leftovers(stack.db, stack.blobs, victim) == []
    assert stack.blobs.list_versions(tenant_key_prefix(victim)) == []
    assert cached_anywhere(stack, versions) == set()  # right away: the erasure waited for it
    # … having asked every replica itself (not only left it to the replicas' sweepers)
    assert all(s["forget_calls"] > forgets[s["replica"]] for s in stack.replica_stats(2))
    with Session(stack.db) as session:
        (audit,) = crud.list_deletion_audits(session=session, tenant_id=victim)
        assert audit.rows_erased >= 1 + 1 + 4 + 5 + 3 and audit.objects_erased >= 1 + 3
        assert session.get(TrainingJob, queued.id) is None
    # Its running job stopped without publishing (its trainer saw the cancellation).
    (report,) = wait_for(lambda: reports(handle, running.id), timeout=60, what="the trainer")
    assert report["outcome"] in ("cancelled", "erased") and report.get("prefix_id") is None
    assert stack.blobs.list_versions(tenant_key_prefix(victim)) == []
    # Requests: the others were served throughout with their own outputs; the victim's got
    # answers (200 before, 401 after; 404 for one in flight whose prefix went meanwhile),
    # never a server error.
    for name in others:
        assert seen[name] and all(r.status_code == 200 for r in seen[name])
        assert {tuple(r.json()["outputs"]) for r in seen[name]} == {tuple(expected[name])}
    statuses = Counter(r.status_code for r in seen["victim"])
    assert set(statuses) <= {200, 401, 404} and statuses[401] > 0, statuses
    assert seen["victim"][-1].status_code == 401
    # Deleting it again: 404, no error.
    again = client.call("DELETE", f"/v1/tenants/{victim}", client.admin)
    assert again.status_code == 404 and again.json()["error"]["code"] == "not_found"

    # The command line, from the driver: asks the replicas through Serve, then proves it.
    for name, value in {
        "PREFIXD_DATABASE_URL": stack.settings.database_url,
        "PREFIXD_BLOB_URL": stack.settings.blob_url,
        "PREFIXD_S3_ENDPOINT_URL": stack.settings.s3_endpoint_url,
        **S3_TEST_ENV,
    }.items():
        monkeypatch.setenv(name, str(value))
    from prefixd.cli import app

    cli = CliRunner()
    result = cli.invoke(app, ["tenants", "delete", str(by_cli)])
    assert result.exit_code == 0, result.output
    assert "asked through the Serve application" in result.stdout and "] verify" in result.stdout
    assert cached_anywhere(stack, [by_cli_prefix]) == set()
    verified = cli.invoke(app, ["tenants", "verify-deleted", str(by_cli)])
    assert verified.exit_code == 0, verified.output
    assert cli.invoke(app, ["tenants", "verify-deleted", str(victim)]).exit_code == 0

    # The others: objects, rows and outputs untouched.
    for name, (tenant_id, key) in others.items():
        assert stored(stack, tenant_id) == before[name]
        assert client.generate(key).json()["outputs"] == expected[name]


@pytest.mark.slow
def test_deleting_prefix_versions_falls_back_to_the_previous_one(stack, client) -> None:
    tenant_id, key = stack.tenant()
    other_id, other_key = stack.tenant()
    other_prefix = stack.publish(other_id, random_key_values(stack, 2, seed=30))
    v1, v2, v3 = (
        stack.publish(tenant_id, random_key_values(stack, 2, seed=31 + i)) for i in range(3)
    )
    assert client.generate(key).json()["prefix_version"] == 3

    deleted = client.call("DELETE", f"/v1/prefixes/{v3}", key)
    assert deleted.status_code == 200, deleted.text
    body = deleted.json()
    assert body["id"] == str(v3) and body["version"] == 3
    assert body["active"]["id"] == str(v2) and body["active"]["version"] == 2
    assert client.generate(key).json()["prefix_id"] == str(v2)
    assert stack.blobs.list_versions(prefix_key(tenant_id, v3)) == []
    wait_for(lambda: cached_anywhere(stack, [str(v3)]) == set(), timeout=10, what="eviction")

    assert client.call("DELETE", f"/v1/prefixes/{v1}", key).json()["active"]["id"] == str(v2)
    assert client.call("DELETE", f"/v1/prefixes/{other_prefix}", key).status_code == 404
    last = client.call("DELETE", f"/v1/prefixes/{v2}", key)
    assert last.status_code == 200 and last.json()["active"] is None
    refused = client.generate(key)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "no_active_prefix"
    assert client.call("GET", "/v1/prefixes", key).json()["data"] == []
    assert client.call("DELETE", f"/v1/prefixes/{v2}", key).status_code == 404
    assert stack.blobs.list_versions(f"{tenant_key_prefix(tenant_id)}prefixes/") == []
    assert client.generate(other_key).status_code == 200  # the other tenant's is untouched


# --- uploads racing an erasure (no Serve needed) ----------------------------------------------


@pytest.fixture
def spooled() -> Iterator[Any]:
    from services.api.uploads import Spooled

    fd, name = tempfile.mkstemp(suffix=".jsonl")
    os.write(fd, b'{"input": "a", "output": "b"}\n')
    os.close(fd)
    yield Spooled(Path(name), 30, "0" * 64)
    Path(name).unlink(missing_ok=True)


def test_an_upload_finishing_after_the_mark_removes_its_object(
    db_engine, s3_store, spooled
) -> None:
    from services.api.uploads import store_dataset

    with Session(db_engine) as session:
        tenant = make_tenant(session)
        tenant_id = tenant.id
        crud.mark_tenant_deleting(session=session, tenant_id=tenant_id)
    with pytest.raises(TenantNotActiveError):
        store_dataset(
            engine=db_engine,
            blobs=s3_store,
            tenant_id=tenant_id,
            spooled=spooled,
            examples=1,
            quota_bytes=10**9,
        )
    assert s3_store.list_versions(tenant_key_prefix(tenant_id)) == []


def test_an_upload_whose_tenant_is_erased_while_it_writes_leaves_nothing(
    db_engine, s3_store, spooled
) -> None:
    from services.api.uploads import store_dataset

    with Session(db_engine) as session:
        tenant_id = make_tenant(session).id

    class ErasedWhileWriting:
        """The blob store, with the whole erasure running while the object is written."""

        def __getattr__(self, name: str) -> Any:
            return getattr(s3_store, name)

        def put_file(self, key: str, path: Path) -> Any:
            erase_tenant(engine=db_engine, store=s3_store, tenant_id=tenant_id)
            return s3_store.put_file(key, path)

    with pytest.raises(NotFoundError):
        store_dataset(
            engine=db_engine,
            blobs=ErasedWhileWriting(),
            tenant_id=tenant_id,
            spooled=spooled,
            examples=1,
            quota_bytes=10**9,
        )
    assert find_tenant_leftovers(db_engine, s3_store, tenant_id) == []
    with Session(db_engine) as session:
        assert session.get(Tenant, tenant_id) is None
        assert (
            len(
                session.exec(
                    select(DeletionAudit).where(DeletionAudit.tenant_id == tenant_id)
                ).all()
            )
            == 1
        )
