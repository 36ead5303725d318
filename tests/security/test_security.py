"""Security properties of the API, in-process on PostgreSQL and S3 over HTTP
(tests/security/conftest.py): tenant isolation route by route (same answer and same code
path as an id that does not exist), keys hashed at rest, the admin token, secrets kept out
of logs, object keys made of ids only, SQL through bound parameters only, and body limits
enforced before the body is read."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import logging
import re
import statistics
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.security.conftest import (
    ADMIN_TOKEN,
    DB_PASSWORD,
    LIMITS,
    S3_SECRET,
    InProc,
    error,
    examples,
    jsonl,
)

ROOT = Path(__file__).resolve().parents[2]
ZERO = str(uuid.UUID(int=0))


@contextmanager
def observed(inproc: InProc) -> Iterator[dict[str, list[str]]]:
    """The SQL statements the API's engine runs and the S3 requests its blob store sends,
    while the block runs (listeners on the real engine and boto3 client; nothing replaced)."""
    seen: dict[str, list[str]] = {"sql": [], "s3": []}

    def on_sql(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen["sql"].append(statement)

    def on_s3(**kwargs: Any) -> None:
        seen["s3"].append(kwargs.get("event_name", "s3"))

    events = inproc.blobs.client.meta.events
    sa.event.listen(inproc.db, "before_cursor_execute", on_sql)
    events.register("before-send.s3", on_s3)
    try:
        yield seen
    finally:
        sa.event.remove(inproc.db, "before_cursor_execute", on_sql)
        events.unregister("before-send.s3", on_s3)


# --- tenant isolation -----------------------------------------------------------------------


def test_another_tenants_ids_get_exactly_the_answer_of_missing_ids(inproc: InProc) -> None:
    """For every route that takes an id, tenant B's key on tenant A's object answers what it
    answers for an id that does not exist: the same status and body (ids masked), through
    the same SQL statements and without touching the blob store; and, loosely, in the same
    time (a structural check is the real one; timing is measured in bench/)."""
    owner_id, owner = inproc.new_tenant()
    _, intruder = inproc.new_tenant()
    prefix_id = str(inproc.publish(owner_id))  # first: publishing claims queued jobs
    dataset_id = inproc.dataset(owner)
    job = inproc.request("POST", "/v1/jobs", owner, json={"dataset_ids": [dataset_id]})
    job_id = job.json()["id"]
    key_id = inproc.request("GET", f"/v1/tenants/{owner_id}/keys", owner).json()["data"][0]["id"]
    routes: list[tuple[str, str, Any]] = [
        ("GET", f"/v1/tenants/{owner_id}", None),
        ("DELETE", f"/v1/tenants/{owner_id}", None),
        ("GET", f"/v1/tenants/{owner_id}/keys", None),
        ("POST", f"/v1/tenants/{owner_id}/keys", {"name": "x"}),
        ("DELETE", f"/v1/tenants/{owner_id}/keys/{key_id}", None),
        ("GET", f"/v1/datasets/{dataset_id}", None),
        ("DELETE", f"/v1/datasets/{dataset_id}", None),
        ("GET", f"/v1/jobs/{job_id}", None),
        ("GET", f"/v1/jobs/{job_id}/events", None),
        ("POST", f"/v1/jobs/{job_id}/cancel", None),
        ("GET", f"/v1/prefixes/{prefix_id}", None),
        ("POST", f"/v1/prefixes/{prefix_id}/activate", None),
        ("DELETE", f"/v1/prefixes/{prefix_id}", None),
        ("POST", "/v1/jobs", {"dataset_ids": [dataset_id]}),
        (
            "POST",
            "/v1/jobs",
            {"dataset_ids": [str(uuid.UUID(int=1))], "validation_dataset_id": dataset_id},
        ),
    ]
    owned = [owner_id, dataset_id, job_id, prefix_id, key_id]

    def masked(text: str) -> str:
        for value in owned:
            text = text.replace(value, ZERO)
        return text

    def without_request_id(text: str) -> str:  # every request has its own id
        return re.sub(r'"request_id":"[^"]*"', '"request_id":""', text)

    def params_free(statements: list[str]) -> list[str]:
        return [re.sub(r"\s+", " ", s) for s in statements]

    timings: dict[str, list[float]] = {"foreign": [], "missing": []}
    for method, path, body in routes:
        kwargs = {"json": body} if body is not None else {}
        missing_path, missing_body = masked(path), None
        if body is not None:
            missing_body = {"json": json.loads(masked(json.dumps(body)))}  # same body, ids replaced
        for _ in range(3):  # warm both paths (statement caches, connections)
            inproc.request(method, path, intruder, **kwargs)
            inproc.request(method, missing_path, intruder, **(missing_body or {}))
        with observed(inproc) as foreign_seen:
            started = time.perf_counter()
            foreign = inproc.request(method, path, intruder, **kwargs)
            timings["foreign"].append(time.perf_counter() - started)
        with observed(inproc) as missing_seen:
            started = time.perf_counter()
            missing = inproc.request(method, missing_path, intruder, **(missing_body or {}))
            timings["missing"].append(time.perf_counter() - started)
        assert foreign.status_code == missing.status_code == 404, (method, path, foreign.text)
        assert without_request_id(masked(foreign.text)) == without_request_id(missing.text), (
            method,
            path,
        )
        assert set(foreign.headers.keys()) == set(missing.headers.keys())
        assert params_free(foreign_seen["sql"]) == params_free(missing_seen["sql"]), (method, path)
        assert foreign_seen["s3"] == missing_seen["s3"] == [], (method, path)
    # Loose: the same code path cannot differ by much; 5x allows for a busy machine.
    ratio = statistics.median(timings["foreign"]) / statistics.median(timings["missing"])
    assert 0.2 < ratio < 5, ratio
    # None of this touched the owner's objects.
    assert inproc.request("GET", f"/v1/datasets/{dataset_id}", owner).status_code == 200
    assert inproc.request("GET", f"/v1/jobs/{job_id}", owner).json()["status"] == "queued"
    assert inproc.request("GET", f"/v1/prefixes/{prefix_id}", owner).json()["active"] is True
    assert inproc.request("GET", f"/v1/tenants/{owner_id}", owner).json()["status"] == "active"
    for path in ("/v1/datasets", "/v1/jobs", "/v1/prefixes"):
        listed = inproc.request("GET", path, intruder).json()["data"]
        assert not {row["id"] for row in listed} & set(owned)


# --- keys at rest and the admin token --------------------------------------------------------


def all_rows_as_text(inproc: InProc) -> str:
    """Every row of every table as text (PostgreSQL's row_to_json)."""
    with inproc.db.connect() as conn:
        tables = conn.execute(
            sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ).scalars()
        return "\n".join(
            str(row)
            for table in list(tables)
            for row in conn.execute(
                sa.text(f'SELECT row_to_json(t)::text FROM "{table}" t')  # names from pg_tables
            ).scalars()
        )


def test_api_keys_are_stored_only_as_hashes(inproc: InProc) -> None:
    tenant_id, first = inproc.new_tenant()
    second = inproc.request("POST", f"/v1/tenants/{tenant_id}/keys", first, json={"name": "ci"})
    keys = [first, second.json()["key"]]
    assert all(len(k) > 40 for k in keys)
    with inproc.db.connect() as conn:
        hashes = conn.execute(
            sa.text("SELECT key_hash FROM api_keys WHERE tenant_id = :t"),
            {"t": uuid.UUID(tenant_id)},
        ).scalars()
        assert set(hashes) == {hashlib.sha256(k.encode()).hexdigest() for k in keys}
    dump = all_rows_as_text(inproc)
    for secret in [*keys, *(k.split("_", 1)[1] for k in keys), ADMIN_TOKEN]:
        assert secret not in dump
    # Listing keys shows no secret either.
    listed = inproc.request("GET", f"/v1/tenants/{tenant_id}/keys", first).text
    assert not any(k in listed for k in keys) and "key_hash" not in listed


def test_the_admin_token_is_required_and_compared_in_constant_time(
    inproc: InProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hmac

    import services.api.deps as deps

    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(deps.hmac, "compare_digest", recording)
    _, tenant_key = inproc.new_tenant()
    near = ADMIN_TOKEN[:-1] + ("0" if ADMIN_TOKEN[-1] != "0" else "1")  # all but the last char
    for token, status in [
        (None, 401),
        ("", 401),
        (near, 403),
        (ADMIN_TOKEN[:-1], 403),
        (ADMIN_TOKEN + "x", 403),
        (ADMIN_TOKEN.upper(), 403),
        (tenant_key, 403),
        (ADMIN_TOKEN, 200),
    ]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        response = inproc.client.get("/v1/tenants", headers=headers)
        assert response.status_code == status, (token, response.text)
    # Every presented token went through compare_digest, none through ==.
    presented = {a for a, _ in compared}
    assert {near.encode(), ADMIN_TOKEN.encode(), tenant_key.encode()} <= presented
    source = ast.parse(Path(deps.__file__).read_text())
    for node in ast.walk(source):
        if isinstance(node, ast.Compare) and any(
            "admin_token" in ast.unparse(side) or "get_secret_value" in ast.unparse(side)
            for side in (node.left, *node.comparators)
        ):
            assert all(isinstance(op, ast.Is | ast.IsNot) for op in node.ops), ast.unparse(node)
    # Without a configured admin token, no token is the admin.
    monkeypatch.setattr(
        inproc.context, "settings", inproc.settings.model_copy(update={"admin_token": None})
    )
    for token in (ADMIN_TOKEN, "", "None", "null"):
        response = inproc.client.get("/v1/tenants", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code in (401, 403)


# --- secrets in logs ------------------------------------------------------------------------


def test_no_secret_reaches_the_logs(
    inproc_inference: InProc, caplog: pytest.LogCaptureFixture
) -> None:
    """A whole flow with every logger at DEBUG (boto3's and the database's included):
    create a tenant, keys, upload, submit, generate, failing requests, a database outage,
    deletion. No API key, admin token, S3 secret key or database password is in any log
    record or error answer."""
    from common.db.engine import create_db_engine
    from services.api.app import create_app
    from services.api.context import ApiContext
    from tests.fixtures.services import free_port

    inproc = inproc_inference
    caplog.set_level(logging.DEBUG)
    answers: list[str] = []
    tenant_id, key = inproc.new_tenant(name="log-scan")
    second = inproc.request("POST", f"/v1/tenants/{tenant_id}/keys", key, json={}).json()["key"]
    dataset = inproc.upload(key, jsonl(examples(4)))
    answers.append(inproc.upload(key, b'{"input": "a"}\n').text)
    job = inproc.request("POST", "/v1/jobs", key, json={"dataset_ids": [dataset.json()["id"]]})
    inproc.publish(tenant_id)
    generated = inproc.request(
        "POST", "/v1/generate", key, json={"input": "alpha", "max_new_tokens": 2}
    )
    assert (dataset.status_code, job.status_code, generated.status_code) == (201, 201, 200)
    answers.append(inproc.request("GET", "/v1/datasets", "pfx_" + "x" * 40).text)
    answers.append(
        inproc.client.get("/v1/tenants", headers={"Authorization": f"Bearer {key}"}).text
    )
    # A database outage: the engine points at a closed port, with the password in its URL.
    dead_url = sa.engine.make_url(inproc.settings.database_url).set(port=free_port())
    dead_settings = inproc.settings.model_copy(
        update={"database_url": dead_url.render_as_string(hide_password=False)}
    )
    dead_db = create_db_engine(dead_settings)
    dead = ApiContext(dead_settings, dead_db, inproc.blobs, None, inproc.loaded.fingerprint)
    from fastapi.testclient import TestClient

    with TestClient(create_app(dead), raise_server_exceptions=False) as client:
        outage = client.get("/v1/datasets", headers={"Authorization": f"Bearer {key}"})
        assert outage.status_code == 503, outage.text
        answers.append(outage.text)
        answers.append(client.get("/readyz").text)
    dead.background.shutdown()
    dead_db.dispose()
    # Deletion, with its background erasure.
    assert inproc.request("DELETE", f"/v1/tenants/{tenant_id}", key).status_code == 202
    deadline = time.monotonic() + 30
    while inproc.request("GET", f"/v1/tenants/{tenant_id}", inproc.admin).status_code != 404:
        assert time.monotonic() < deadline
        time.sleep(0.2)

    logged = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records
    )
    assert len(caplog.records) > 20  # the capture did capture (boto3, our loggers, …)
    for name, secret in [
        ("API key", key),
        ("second API key", second),
        ("admin token", ADMIN_TOKEN),
        ("S3 secret key", S3_SECRET),
        ("database password", DB_PASSWORD),
    ]:
        assert secret not in logged, f"the {name} is in the logs"
        assert not any(secret in answer for answer in answers), f"the {name} is in an answer"


# --- object keys ----------------------------------------------------------------------------

OBJECT_KEY = re.compile(
    r"^prefixd/tenants/[0-9a-f-]{36}/(datasets/[0-9a-f-]{36}\.jsonl|prefixes/[0-9a-f-]{36}\.safetensors)$"
)


def test_object_keys_are_made_of_ids_only(inproc: InProc, tmp_path: Path) -> None:
    from common.blobstore import LocalBlobStore, dataset_key, prefix_key, tenant_key_prefix
    from common.errors import InvalidInputError

    traversal = [
        "../../x",
        "..",
        "a/../../b",
        "/etc/passwd",
        "tenants/../../y",
        "..\\..\\z",
        "%2e%2e%2f",
    ]
    for name in traversal:
        response = inproc.request("POST", "/v1/tenants", inproc.admin, json={"name": name})
        assert response.status_code == 201, response.text
        tenant_id, key = response.json()["id"], response.json()["api_key"]
        assert inproc.request("GET", f"/v1/tenants/{tenant_id}", key).json()["name"] == name
        assert (
            inproc.request(
                "POST", f"/v1/tenants/{tenant_id}/keys", key, json={"name": name}
            ).status_code
            == 201
        )
        uploaded = inproc.request(
            "POST", "/v1/datasets", key, files={"file": (name, jsonl(examples(2)))}
        )
        assert uploaded.status_code == 201, uploaded.text
        inproc.publish(tenant_id)
    stored = inproc.objects("")
    assert stored and all(OBJECT_KEY.fullmatch(f"prefixd/{k}") for k in stored), stored
    # The key builders take ids only; the stores refuse any key with a '..' component.
    for bad in traversal:
        with pytest.raises(InvalidInputError):
            dataset_key(uuid.uuid4(), bad)
        with pytest.raises(InvalidInputError):
            prefix_key(bad, uuid.uuid4())
        with pytest.raises(InvalidInputError):
            tenant_key_prefix(bad)
    local = LocalBlobStore(tmp_path / "root")
    for bad in ("../outside", "a/../../outside", "/abs", "./x", "a//b"):
        with pytest.raises(InvalidInputError):
            local.put_bytes(bad, b"x")
        with pytest.raises(InvalidInputError):
            inproc.blobs.put_bytes(bad, b"x")
    assert not (tmp_path / "outside").exists()
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


# --- SQL ------------------------------------------------------------------------------------

SQL_CALLS = {"text", "execute", "exec_driver_sql", "exec", "executescript", "executemany"}


def _dynamic_sql(arg: ast.expr) -> bool:
    """An f-string, ``%``/``+`` on a string, or ``.format(...)``: SQL built from values."""
    if isinstance(arg, ast.JoinedStr):
        return any(isinstance(v, ast.FormattedValue) for v in arg.values)
    if isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Mod | ast.Add):
        return any(
            isinstance(s, ast.Constant | ast.JoinedStr) and isinstance(getattr(s, "value", ""), str)
            for s in (arg.left, arg.right)
        )
    if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Attribute):
        return arg.func.attr == "format"
    return False


def test_sql_is_only_built_with_bound_parameters() -> None:
    """No product module passes SQL built from values (f-string, %, +, .format) to
    ``text()``/``execute()``; statements are SQLAlchemy expressions or constant text with
    bound parameters."""
    offenders = []
    files = [
        p
        for folder in ("common", "services", "workers", "prefixd")
        for p in (ROOT / folder).rglob("*.py")
    ]
    assert len(files) > 40
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in SQL_CALLS and _dynamic_sql(node.args[0]):
                offenders.append(
                    f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:100]}"
                )
    assert offenders == []
    # The check itself finds what it looks for.
    sample = ast.parse("conn.execute(text(f\"SELECT * FROM t WHERE name = '{name}'\"))")
    assert any(
        isinstance(n, ast.Call) and _dynamic_sql(n.args[0])
        for n in ast.walk(sample)
        if isinstance(n, ast.Call) and n.args
    )


def test_injection_attempts_are_stored_as_plain_text(inproc: InProc) -> None:
    names = [
        "x'); DROP TABLE tenants; --",
        "' OR '1'='1",
        'robert"; DELETE FROM api_keys; --',
        "\\'; SELECT pg_sleep(10); --",
    ]
    for name in names:
        created = inproc.request("POST", "/v1/tenants", inproc.admin, json={"name": name})
        assert created.status_code == 201, created.text
        tenant_id, key = created.json()["id"], created.json()["api_key"]
        assert inproc.request("GET", f"/v1/tenants/{tenant_id}", key).json()["name"] == name
        dataset_id = inproc.dataset(key, n=2)
        job = inproc.request(
            "POST", "/v1/jobs", key, json={"dataset_ids": [dataset_id], "idempotency_key": name}
        )
        assert job.status_code == 201 and job.json()["idempotency_key"] == name
    # Query parameters are typed: an injection in one is a 422.
    for query in ("status=queued' OR '1'='1", "offset=0;DROP TABLE jobs", "limit=1 OR 1=1"):
        assert inproc.request("GET", f"/v1/jobs?{query}", key).status_code == 422
    # Every table is still there, every tenant too.
    with inproc.db.connect() as conn:
        tables = set(
            conn.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE schemaname='public'")
            ).scalars()
        )
        stored = set(conn.execute(sa.text("SELECT name FROM tenants")).scalars())
    assert {"tenants", "api_keys", "datasets", "training_jobs"} <= tables
    assert set(names) <= stored


# --- body limits before the body is read ----------------------------------------------------


def _asgi(
    inproc: InProc, method: str, path: str, headers: dict[str, str], body: Any
) -> tuple[int, int, bytes]:
    """Call the app as the server does; ``body`` is an iterator of chunks (endless if need
    be). Returns (status, body bytes the app pulled from the client, answer)."""
    app = inproc.client.app
    pulled = 0
    chunks = iter(body)
    sent: dict[str, Any] = {"status": None, "body": b""}

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
        elif message["type"] == "http.response.body":
            sent["body"] += message.get("body", b"")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
        "state": {},
    }
    asyncio.run(app(scope, receive, send))
    return sent["status"], pulled, sent["body"]


def endless(chunk: bytes = b"x" * 65536) -> Iterator[bytes]:
    while True:
        yield chunk


def test_body_limits_are_enforced_before_the_body_is_read(inproc: InProc) -> None:
    _, key = inproc.new_tenant()
    auth = {"authorization": f"Bearer {key}"}
    huge = str(10**12)
    # Content-Length past the limit: refused without pulling a byte.
    for path, media in (
        ("/v1/jobs", "application/json"),
        ("/v1/datasets", "application/jsonl"),
        ("/v1/tenants", "application/json"),
        ("/v1/generate", "application/json"),
    ):
        status, pulled, answer = _asgi(
            inproc, "POST", path, {**auth, "content-type": media, "content-length": huge}, endless()
        )
        assert (status, pulled) == (413, 0), (path, status, pulled, answer)
        assert b"payload_too_large" in answer
    # No Content-Length (chunked), endless: refused once the limit is passed, not later.
    for path, media, limit in (
        ("/v1/jobs", "application/json", LIMITS["max_request_bytes"]),
        ("/v1/datasets", "application/jsonl", LIMITS["max_dataset_bytes"] + 64 * 1024),
    ):
        status, pulled, answer = _asgi(
            inproc, "POST", path, {**auth, "content-type": media}, endless()
        )
        assert status == 413 and pulled <= limit + 65536, (path, status, pulled)
    # An upload without a valid key, or of a refused media type, is not read at all.
    for headers in (
        {"content-type": "application/jsonl"},
        {**auth, "content-type": "text/csv"},
        {**auth, "content-type": "application/jsonl", "content-encoding": "gzip"},
    ):
        status, pulled, _ = _asgi(inproc, "POST", "/v1/datasets", headers, endless())
        assert status in (401, 415) and pulled == 0, (headers, status, pulled)
    # A dataset upload past the tenant's quota left: refused from Content-Length.
    assert error(inproc.upload(key, b"x", headers={"content-length": "1"}))[0] == 422
