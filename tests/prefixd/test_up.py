"""`prefixd up` end to end, as a user runs it: the embedded-default layout (SQLite, a local
blob directory under PREFIXD_HOME) with a tiny model, then the whole flow over HTTP —
tenant, upload, training job, generate — and a clean stop on Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
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


def test_up_serves_trains_and_stops_cleanly(tiny_model_dirs, tmp_path):
    port = free_port()
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PREFIXD_") and k != "RAY_ADDRESS"
        },
        "PREFIXD_HOME": str(tmp_path / "home"),
        "PREFIXD_MODEL": str(tiny_model_dirs["llama"]),
        "PREFIXD_INFERENCE_NUM_CPUS": "0.5",
        "PREFIXD_TRAINER_NUM_CPUS": "0.5",
    }
    executable = Path(sys.executable).parent / "prefixd"
    process = subprocess.Popen(
        [str(executable), "up", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    try:
        token = None
        deadline = time.monotonic() + 240
        assert process.stdout is not None
        while token is None:
            assert time.monotonic() < deadline, "".join(output)
            line = process.stdout.readline()
            assert line or process.poll() is None, "".join(output)
            output.append(line)
            match = re.search(r"admin token \(generated.*\): (\S+)", line)
            if match:
                token = match.group(1)
        assert f"http://127.0.0.1:{port}" in "".join(output)
        assert (tmp_path / "home" / "admin-token").stat().st_mode & 0o777 == 0o600

        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        created = api.post(
            "/v1/tenants", json={"name": "acme"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert created.status_code == 201, created.text
        auth = {"Authorization": f"Bearer {created.json()['api_key']}"}
        data = "".join(json.dumps(row) + "\n" for row in TASK * 4)
        dataset = api.post(
            "/v1/datasets", content=data, headers={**auth, "Content-Type": "application/jsonl"}
        )
        assert dataset.status_code == 201, dataset.text
        hyperparameters = {"prefix_length": 6, "epochs": 40, "learning_rate": 0.03, "batch_size": 8}
        job = api.post(
            "/v1/jobs",
            json={"dataset_ids": [dataset.json()["id"]], "hyperparameters": hyperparameters},
            headers=auth,
        )
        assert job.status_code == 201, job.text
        for _ in range(240):
            state = api.get(f"/v1/jobs/{job.json()['id']}", headers=auth).json()
            if state["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1)
        assert state["status"] == "succeeded", state
        generated = api.post("/v1/generate", json={"inputs": ["alpha", "beta"]}, headers=auth)
        assert generated.status_code == 200, generated.text
        assert len(generated.json()["outputs"]) == 2

        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=120)
        output.append(rest)
        assert process.returncode == 0, "".join(output)
        assert "stopped" in rest
        assert token not in rest  # the token is printed once, at start, and never again
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
