"""PostgreSQL restarted while training jobs run and requests flow.

The whole service (Serve app: API ingress + inference replica; the scheduler with real
trainers) runs on a PostgreSQL cluster of this module's own (``private_postgres``), which
the test stops for longer than a job's lease, starts again, and later restarts
(``pg_ctlcluster … restart``). Checked:

- during the outage every API request answers 503 ``database_unavailable`` as JSON with
  ``Retry-After`` (never a 500 or a traceback); ``/readyz`` says the database is down,
  ``/healthz`` stays up; a job submitted then is refused, not half-accepted;
- afterwards the same ingress replica answers again (no restart), and the refused job,
  resubmitted with its idempotency key, is queued once;
- every job reaches ``succeeded``, each published exactly one complete prefix version, no
  version or blob is orphaned (read from the database and the bucket).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch

from common.architectures import prefix_shape
from common.config import Settings
from common.db.models import JobState
from tests.fixtures.stack import ServeInstance, Stack, _boto_session
from tests.reliability.checks import assert_nothing_lost_or_duplicated, describe
from tests.reliability.conftest import FAULT_TIMINGS, PrivateCluster
from tests.workers.conftest import S3_TEST_ENV, examples, wait_for

pytestmark = pytest.mark.slow

# 20 examples × 8 epochs, batch 1: 160 tiny steps, long enough to be cut mid-way.
LONG = {"prefix_length": 4, "epochs": 8, "batch_size": 1, "learning_rate": 0.01}


@pytest.fixture(scope="module")
def db_stack(
    serve_instance: ServeInstance,
    service_settings: Settings,
    private_postgres: PrivateCluster,
    make_bucket,
) -> Iterator[Stack]:
    from common.blobstore import build_blob_store
    from common.db.engine import create_db_engine
    from common.model_loading import load_model

    # The session's home (and so the model holder every stack shares) on this module's
    # PostgreSQL cluster and bucket.
    settings = service_settings.model_copy(
        update=dict(
            database_url=private_postgres.url.render_as_string(hide_password=False),
            blob_url=f"s3://{make_bucket(versioned=True)}/prefixd",
            inference_replicas=1,
            batch_wait_ms=20,
            scheduler_namespace=f"prefixd-faults-{uuid.uuid4().hex[:10]}",
            trainer_slots=2,
            **FAULT_TIMINGS,
        )
    )
    serve_instance.deploy(settings)
    db = create_db_engine(settings)
    blobs = build_blob_store(settings, boto_session=_boto_session())
    loaded = load_model(settings.model, settings=settings)
    try:
        yield Stack(settings, serve_instance.url, db, blobs, loaded)
    finally:
        serve_instance.remove()  # its database goes away with this module
        db.dispose()


def serve_replicas(deployment: str) -> set[str]:
    """Names of the running Serve replica actors of a deployment of the app."""
    import ray

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::prefixd#{deployment}#")
    }


@dataclass
class Answer:
    started: float
    ended: float
    route: str
    status: int
    body: Any  # the parsed JSON, or the raw text when it was not JSON
    retry_after: str | None


class Traffic:
    """Requests of two tenants in a loop on a thread, every answer recorded."""

    def __init__(self, url: str, calls: list[tuple[str, str, str, dict | None]]) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)
        self.calls = calls
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for method, path, key, body in self.calls:
                started = time.monotonic()
                try:
                    response = self.http.request(
                        method, path, json=body, headers={"Authorization": f"Bearer {key}"}
                    )
                except httpx.HTTPError as error:
                    self.answers.append(
                        Answer(started, time.monotonic(), path, 0, repr(error), None)
                    )
                    continue
                try:
                    parsed = response.json()
                except json.JSONDecodeError:
                    parsed = response.text
                self.answers.append(
                    Answer(
                        started,
                        time.monotonic(),
                        f"{method} {path}",
                        response.status_code,
                        parsed,
                        response.headers.get("retry-after"),
                    )
                )
            time.sleep(0.05)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self.http.close()


def test_postgres_restart_gives_503_then_recovers_and_loses_no_job(
    db_stack: Stack, private_postgres: PrivateCluster
):
    from workers.scheduler import start_scheduler, stop_scheduler, wait_until_ready

    stack = db_stack
    http = httpx.Client(base_url=stack.url, timeout=120)
    shape = prefix_shape(stack.loaded.model.config)
    tenants = []
    for seed in (1, 2):
        tenant_id, key = stack.tenant()
        kv = torch.randn(shape.tensor_shape(3), generator=torch.Generator().manual_seed(seed))
        stack.publish(tenant_id, kv)  # an active version to generate with
        tenants.append((tenant_id, key))
    auth = [{"Authorization": f"Bearer {key}"} for _, key in tenants]

    job_ids: list[uuid.UUID] = []
    for headers in auth:
        body = "".join(json.dumps(e) + "\n" for e in examples(20)).encode()
        upload = http.post(
            "/v1/datasets", content=body, headers=headers | {"Content-Type": "application/jsonl"}
        )
        assert upload.status_code == 201, upload.text
        for n in range(2):  # one runs, one waits (one running job per tenant)
            submitted = http.post(
                "/v1/jobs",
                headers=headers,
                json={
                    "dataset_ids": [upload.json()["id"]],
                    "hyperparameters": LONG,
                    "idempotency_key": f"before-{n}",
                },
            )
            assert submitted.status_code == 201, submitted.text
            job_ids.append(uuid.UUID(submitted.json()["id"]))

    settings = stack.settings
    scheduler, _ = start_scheduler(settings, runtime_env={"env_vars": S3_TEST_ENV})
    try:
        wait_until_ready(scheduler, timeout=120)
        first_ids = [uuid.UUID(str(i)) for i in (job_ids[0], job_ids[2])]
        for job_id, headers in zip(first_ids, auth, strict=True):
            wait_for(
                lambda job_id=job_id, headers=headers: http.get(
                    f"/v1/jobs/{job_id}", headers=headers
                ).json()["progress"],
                timeout=120,
                what=f"job {job_id} to train",
            )
        api_before = serve_replicas("api")
        assert api_before, "no API replica found"
        calls = [
            ("POST", "/v1/generate", tenants[0][1], {"input": "alpha beta", "max_new_tokens": 2}),
            ("GET", f"/v1/jobs/{job_ids[0]}", tenants[0][1], None),
            ("GET", "/v1/prefixes", tenants[1][1], None),
            ("GET", "/v1/jobs", tenants[1][1], None),
        ]
        with Traffic(stack.url, calls) as traffic:
            time.sleep(1.0)
            private_postgres.stop()
            down_at = time.monotonic()
            # Longer than a lease (6 s): the running jobs' leases expire during the outage.
            outage_job = {
                "dataset_ids": [str(uuid.uuid4())],
                "hyperparameters": LONG,
                "idempotency_key": "during-outage",
            }
            refused = http.post("/v1/jobs", headers=auth[0], json=outage_job)
            ready = http.get("/readyz")
            healthy = http.get("/healthz")
            time.sleep(8.0)
            up_at = time.monotonic()
            private_postgres.start()
            recovered = wait_for(
                lambda: (
                    http.post(
                        "/v1/generate",
                        headers=auth[0],
                        json={"input": "alpha", "max_new_tokens": 2},
                    ).status_code
                    == 200
                ),
                timeout=30,
                what="the API to answer again after the database came back",
            )
            recovered_at = time.monotonic()
            time.sleep(1.0)
        assert recovered
        assert serve_replicas("api") == api_before, "the API replica was restarted"

        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "database_unavailable", refused.text
        assert refused.headers.get("retry-after"), refused.headers
        assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok", ready.text
        assert healthy.status_code == 200, healthy.text

        answers = traffic.answers
        during = [a for a in answers if a.started > down_at and a.ended < up_at]
        assert len(during) >= 4, f"too few requests during the outage: {len(during)}"
        wrong = [
            a
            for a in during
            if a.status != 503
            or not isinstance(a.body, dict)
            or a.body.get("error", {}).get("code") != "database_unavailable"
            or not a.retry_after
        ]
        assert not wrong, (
            f"answers during the outage other than 503 database_unavailable: {wrong[:5]}"
        )
        broken = [
            a
            for a in answers
            if (a.status >= 500 and a.status != 503)
            or a.status == 0
            or not isinstance(a.body, dict)
        ]
        assert not broken, f"5xx other than 503, or non-JSON answers: {broken[:5]}"
        after = [a for a in answers if a.started > recovered_at]
        assert after and all(a.status == 200 for a in after), [a for a in after if a.status != 200]

        # The refused submission was not half-accepted: resubmitted, it is queued once.
        outage_job["dataset_ids"] = [
            http.get("/v1/datasets", headers=auth[0]).json()["data"][0]["id"]
        ]
        again = http.post("/v1/jobs", headers=auth[0], json=outage_job)
        assert again.status_code == 201, again.text
        replay = http.post("/v1/jobs", headers=auth[0], json=outage_job)
        assert replay.status_code == 200 and replay.json()["id"] == again.json()["id"]
        job_ids.append(uuid.UUID(again.json()["id"]))

        # A plain restart (`pg_ctlcluster … restart`) while the later jobs run.
        wait_for(
            lambda: any(
                http.get(f"/v1/jobs/{j}", headers=auth[0]).json()["status"] == "running"
                for j in job_ids[1:2] + job_ids[4:]
            ),
            timeout=120,
            what="a later job of the first tenant to run",
        )
        private_postgres.restart()

        def all_final() -> bool:
            states = [
                http.get(f"/v1/jobs/{j}", headers=h).json().get("status")
                for j, h in zip(job_ids, [auth[0], auth[0], auth[1], auth[1], auth[0]], strict=True)
            ]
            return all(s in ("succeeded", "failed", "cancelled") for s in states)

        wait_for(all_final, timeout=300, every=0.5, what="every job to finish")
    finally:
        stop_scheduler(scheduler, release=False, timeout=30)
        http.close()

    rows = assert_nothing_lost_or_duplicated(stack.db, stack.blobs, job_ids)
    for headers, (tenant_id, _) in zip(auth, tenants, strict=True):
        listed = {j["id"] for j in http_jobs(stack.url, headers)}
        mine = {str(j) for j, row in rows.items() if row.tenant_id == tenant_id}
        assert mine <= listed, f"jobs missing from GET /v1/jobs: {mine - listed}"
    assert all(row.state == JobState.succeeded for row in rows.values()), [
        describe(r) for r in rows.values()
    ]


def http_jobs(url: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    with httpx.Client(base_url=url, timeout=30) as http:
        return list(http.get("/v1/jobs", headers=headers).json()["data"])
