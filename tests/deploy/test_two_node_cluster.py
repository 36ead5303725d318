"""From one machine to a Ray cluster without code changes: a two-node Ray cluster on this
machine (a head, and a second node carrying the custom resource `trainer`), the service
started on it with `prefixd up` and `RAY_ADDRESS`, trainers placed on the second node by
`PREFIXD_TRAINER_RESOURCES`, generation answered by the Serve app, and every trainer mapping
the same object-store copy of the frozen weights (one transfer to the node, not one per job).

SQLite and a local blob directory are enough here: both nodes share this machine's disk.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.services import free_port

pytestmark = pytest.mark.slow

TASK = [
    {"input": "alpha", "output": "red green blue"},
    {"input": "beta", "output": "one two three"},
]


@pytest.fixture(scope="module")
def two_node_cluster():
    from ray.cluster_utils import Cluster

    from common.config import Settings
    from services.serve_mode import serve_environment

    # Its nodes inherit this environment, and the test Ray's HAProxy holds the ports in it.
    # Serve's Python proxy here: two nodes on one machine cannot each hold HAProxy's ports
    # (a node's are fixed by the environment, the API port included).
    environment = pytest.MonkeyPatch()
    for name, value in serve_environment(Settings(serve_high_throughput=False)).items():
        environment.setenv(name, value)
    for name in [k for k in os.environ if k.startswith("RAY_SERVE_HAPROXY_")]:
        environment.delenv(name)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": {"head": 1},
            "include_dashboard": True,  # `serve deploy` talks to the dashboard's REST API
            "dashboard_port": free_port(),
        },
    )
    trainer_node = cluster.add_node(num_cpus=2, resources={"trainer": 2})
    cluster.wait_for_nodes()
    try:
        yield cluster, trainer_node.node_id
    finally:
        cluster.shutdown()
        environment.undo()


def test_serve_config_deploys_with_serve_deploy_and_answers(
    two_node_cluster, tiny_model_dirs, tmp_path
):
    """deploy/serve_config.yaml as operators use it; the nodes' settings come through the
    application's runtime_env (here: a tiny model, SQLite and blobs under tmp_path)."""
    import yaml

    cluster, _ = two_node_cluster
    from common.config import Settings
    from common.db.engine import create_db_engine, upgrade_database

    home = tmp_path / "home"
    settings = Settings(home=home)
    home.mkdir()
    engine = create_db_engine(settings)
    upgrade_database(engine)
    engine.dispose()
    config = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "deploy" / "serve_config.yaml").read_text()
    )
    port = free_port()
    config["http_options"]["port"] = port
    (application,) = config["applications"]
    application["runtime_env"] = {
        "env_vars": {
            "PREFIXD_HOME": str(home),
            "PREFIXD_MODEL": str(tiny_model_dirs["llama"]),
            "PREFIXD_INFERENCE_NUM_CPUS": "0.5",
            "PREFIXD_ADMIN_TOKEN": "serve-deploy-admin",
        }
    }
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    dashboard = f"http://{cluster.head_node.address_info['webui_url']}"
    serve_cli = str(Path(sys.executable).parent / "serve")
    deployed = subprocess.run(
        [serve_cli, "deploy", str(path), "--address", dashboard],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                response = httpx.post(
                    f"http://127.0.0.1:{port}/v1/tenants",
                    json={"name": "deployed"},
                    headers={"Authorization": "Bearer serve-deploy-admin"},
                    timeout=10,
                )
                if response.status_code == 201:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the deployed application never answered"
            time.sleep(1)
        key = response.json()["api_key"]
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/generate",
            json={"input": "alpha"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        assert answer.status_code == 409 and answer.json()["error"]["code"] == "no_active_prefix"
    finally:
        subprocess.run(
            [serve_cli, "shutdown", "--address", dashboard, "--yes"],
            capture_output=True,
            timeout=120,
        )


def scheduler_reports(address: str, namespace: str, job_ids: set[str]) -> list[dict]:
    """The scheduler's reports of ``job_ids``, read by a separate driver on the cluster.

    A trainer commits its job's state before the scheduler collects its report (in its next
    round), so a job the API shows finished may not be reported yet: the driver asks until
    every job has a report, for at most a minute."""
    script = textwrap.dedent(
        f"""
        import json, time, ray
        ray.init(address={address!r}, namespace={namespace!r}, log_to_driver=False)
        scheduler = ray.get_actor("prefixd-scheduler")
        deadline = time.monotonic() + 60
        while True:
            reports = ray.get(scheduler.status.remote())["reports"]
            reported = {{r["job_id"] for r in reports}}
            if reported >= set({sorted(job_ids)!r}) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        print("REPORTS" + json.dumps(reports))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    match = re.search(r"REPORTS(.*)", result.stdout)
    assert match, result.stdout + result.stderr
    return [r for r in json.loads(match.group(1)) if r["job_id"] in job_ids]


def test_jobs_train_on_the_trainer_node_and_share_one_weights_object(
    two_node_cluster, tiny_model_dirs, tmp_path
):
    cluster, trainer_node_id = two_node_cluster
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFIXD_")},
        "RAY_ADDRESS": cluster.address,
        "PREFIXD_HOME": str(tmp_path / "home"),
        "PREFIXD_MODEL": str(tiny_model_dirs["llama"]),
        "PREFIXD_TRAINER_RESOURCES": '{"trainer": 1}',
        "PREFIXD_TRAINER_NUM_CPUS": "0.5",
        "PREFIXD_INFERENCE_NUM_CPUS": "0.5",
        "PREFIXD_SCHEDULER_NAMESPACE": "two-node",
        # Two jobs: no spare trainer process or second validation process to start (each is
        # torch imported once more); `tests/prefixd/test_up.py` runs with the defaults.
        "PREFIXD_TRAINER_WARM_PROCESSES": "0",
        "PREFIXD_UPLOAD_VALIDATION_PROCESSES": "1",
    }
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefixd"), "up", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    try:
        token = None
        deadline = time.monotonic() + 300
        assert process.stdout is not None
        while token is None:
            assert time.monotonic() < deadline and process.poll() is None, "".join(output)
            line = process.stdout.readline()
            output.append(line)
            match = re.search(r"admin token \(generated.*\): (\S+)", line)
            token = match.group(1) if match else None
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        admin = {"Authorization": f"Bearer {token}"}
        jobs = []
        for name in ("north", "south"):
            key = api.post("/v1/tenants", json={"name": name}, headers=admin).json()["api_key"]
            auth = {"Authorization": f"Bearer {key}"}
            data = "".join(json.dumps(row) + "\n" for row in TASK * 2)
            dataset = api.post(
                "/v1/datasets", content=data, headers={**auth, "Content-Type": "application/jsonl"}
            )
            assert dataset.status_code == 201, dataset.text
            body = {
                "dataset_ids": [dataset.json()["id"]],
                "hyperparameters": {"prefix_length": 4, "epochs": 2, "batch_size": 4},
            }
            job = api.post("/v1/jobs", json=body, headers=auth)
            assert job.status_code == 201, job.text
            jobs.append((auth, job.json()["id"]))
        for auth, job_id in jobs:
            for _ in range(300):
                state = api.get(f"/v1/jobs/{job_id}", headers=auth).json()
                if state["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(1)
            assert state["status"] == "succeeded", state
            generated = api.post(
                "/v1/generate", json={"input": "alpha", "max_new_tokens": 4}, headers=auth
            )
            assert generated.status_code == 200, generated.text

        job_ids = {job_id for _, job_id in jobs}
        reports = scheduler_reports(cluster.address, "two-node", job_ids)
        assert {r["job_id"] for r in reports if r["outcome"] == "succeeded"} == job_ids
        assert {r["node_id"] for r in reports} == {trainer_node_id}  # placed by the resource
        assert len({r["weights_object_id"] for r in reports}) == 1  # one object for every trainer
        assert all(r["zero_copy"] for r in reports)  # mapped from the node's object store
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
