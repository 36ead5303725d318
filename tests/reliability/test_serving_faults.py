"""Faults of the Serve application (``stack``: API ingress + two inference replicas on
PostgreSQL and S3 over HTTP): an inference replica killed while requests flow, the API
replica killed, and the whole application redeployed with the scheduler restarted (what
restarting ``prefixd up`` against the same database does) while jobs are queued."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest
import torch

from common.architectures import prefix_shape
from tests.reliability.checks import assert_nothing_lost_or_duplicated
from tests.reliability.conftest import FAULT_TIMINGS
from tests.workers.conftest import S3_TEST_ENV, examples, wait_for

pytestmark = pytest.mark.slow

QUICK_API = {"prefix_length": 4, "epochs": 2, "batch_size": 4, "learning_rate": 0.01}


def serve_replicas(deployment: str) -> set[str]:
    import ray

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::prefixd#{deployment}#")
    }


def kill_replica(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def deployment_running(deployment: str, replicas: int) -> bool:
    from ray import serve

    app = serve.status().applications.get("prefixd")
    if app is None or deployment not in app.deployments:
        return False
    status = app.deployments[deployment]
    return str(status.status) in ("HEALTHY", "DeploymentStatus.HEALTHY") and (
        status.replica_states.get("RUNNING", 0) == replicas
    )


def test_a_killed_inference_replica_is_replaced_and_requests_succeed_after(stack):
    tenant_id, key = stack.tenant()
    shape = prefix_shape(stack.loaded.model.config)
    stack.publish(
        tenant_id, torch.randn(shape.tensor_shape(3), generator=torch.Generator().manual_seed(4))
    )
    http = httpx.Client(base_url=stack.url, timeout=60, headers={"Authorization": f"Bearer {key}"})
    body = {"input": "alpha beta", "max_new_tokens": 4}
    expected = http.post("/v1/generate", json=body).json()["outputs"]
    before = serve_replicas("inference")
    assert len(before) == 2, before

    answers: list[tuple[int, Any]] = []
    stop = threading.Event()

    def flow() -> None:
        with httpx.Client(base_url=stack.url, timeout=60, headers=http.headers) as client:
            while not stop.is_set():
                response = client.post("/v1/generate", json=body)
                try:
                    answers.append((response.status_code, response.json()))
                except json.JSONDecodeError:
                    answers.append((response.status_code, response.text))
                time.sleep(0.4)  # 3 clients stay under the tenant's generate rate limit (10/s)

    flows = [threading.Thread(target=flow, daemon=True) for _ in range(3)]
    for thread in flows:
        thread.start()
    time.sleep(1.0)
    victim = sorted(before)[0]
    kill_replica(victim)
    try:
        wait_for(
            lambda: (
                victim not in serve_replicas("inference")
                and len(serve_replicas("inference")) == 2
                and deployment_running("inference", 2)
            ),
            timeout=120,
            what="Serve to replace the killed inference replica",
        )
    finally:
        stop.set()
        for thread in flows:
            thread.join(timeout=60)

    # While it was replaced: answers or a 503 to retry, never a 500 or a hang.
    statuses = [status for status, _ in answers]
    print(f"answers while the replica was replaced: {Counter(statuses)}")
    assert set(statuses) <= {200, 503}, [a for a in answers if a[0] not in (200, 503)][:5]
    for status, answer in answers:
        if status == 503:
            assert answer["error"]["code"] == "inference_unavailable", answer
        else:
            assert answer["outputs"] == expected, answer
    after = [http.post("/v1/generate", json=body) for _ in range(10)]
    assert [r.status_code for r in after] == [200] * 10, [r.text for r in after]
    assert all(r.json()["outputs"] == expected for r in after)
    assert len(stack.replica_stats(2)) == 2  # both replicas answer, the new one included
    http.close()


def test_api_killed_and_app_redeployed_while_jobs_are_queued(stack, serve_instance):
    from workers.scheduler import start_scheduler, stop_scheduler, wait_until_ready

    _, key = stack.tenant()
    http = httpx.Client(base_url=stack.url, timeout=60, headers={"Authorization": f"Bearer {key}"})
    data = "".join(json.dumps(e) + "\n" for e in examples(20)).encode()
    upload = http.post("/v1/datasets", content=data, headers={"Content-Type": "application/jsonl"})
    assert upload.status_code == 201, upload.text
    job_ids = []
    for n in range(3):  # one tenant: they run one after the other
        submitted = http.post(
            "/v1/jobs",
            json={
                "dataset_ids": [upload.json()["id"]],
                "hyperparameters": QUICK_API | {"seed": n},
            },
        )
        assert submitted.status_code == 201, submitted.text
        job_ids.append(uuid.UUID(submitted.json()["id"]))

    settings = stack.settings.model_copy(
        update={
            "scheduler_namespace": f"prefixd-faults-{uuid.uuid4().hex[:10]}",
            "trainer_slots": 2,
            **FAULT_TIMINGS,
        }
    )

    def status(job_id: uuid.UUID) -> str:
        response = http.get(f"/v1/jobs/{job_id}")
        return str(response.json()["status"]) if response.status_code == 200 else ""

    scheduler, _ = start_scheduler(settings, runtime_env={"env_vars": S3_TEST_ENV})
    try:
        wait_until_ready(scheduler, timeout=120)
        wait_for(lambda: status(job_ids[0]) == "running", timeout=120, what="the first job")

        # The API replica dies: Serve starts another; the queue never depended on it.
        (api,) = serve_replicas("api")
        kill_replica(api)
        wait_for(
            lambda: serve_replicas("api") not in (set(), {api}) and deployment_running("api", 1),
            timeout=120,
            what="Serve to replace the API replica",
        )
        wait_for(lambda: http.get("/healthz").status_code == 200, timeout=60, what="the new API")

        # `prefixd up` stopped (Ctrl-C: its scheduler releases running jobs, Serve goes
        # away) and started again on the same database and bucket.
        stop_scheduler(scheduler, release=True, timeout=60)
        serve_instance.remove()
        serve_instance.deploy(stack.settings)
        scheduler, _ = start_scheduler(settings, runtime_env={"env_vars": S3_TEST_ENV})
        wait_until_ready(scheduler, timeout=120)
        wait_for(
            lambda: all(status(j) == "succeeded" for j in job_ids),
            timeout=240,
            every=0.5,
            what="every queued job to finish after the restart",
        )
    finally:
        stop_scheduler(scheduler, release=False, timeout=30)
        http.close()
    rows = assert_nothing_lost_or_duplicated(stack.db, stack.blobs, job_ids)
    # A job released by the stopped scheduler does not count the interrupted attempt.
    assert all(row.attempts <= 2 for row in rows.values()), {
        str(j): r.attempts for j, r in rows.items()
    }
