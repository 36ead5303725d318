"""``prefixd jobs list|show|cancel`` on a real database (SQLite and PostgreSQL), and
``prefixd worker`` as a process against the test session's Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session
from typer.testing import CliRunner

from common.db import crud
from common.db.models import JobEventCreate, JobState
from common.db.types import utcnow
from prefixd.cli import app
from tests.fixtures.factories import make_job, make_tenant


@pytest.fixture
def cli(db_engine, monkeypatch) -> CliRunner:
    monkeypatch.setenv("PREFIXD_DATABASE_URL", db_engine.url.render_as_string(hide_password=False))
    return CliRunner()


def test_jobs_list_show_and_cancel(cli, db_engine) -> None:
    with Session(db_engine) as session:
        tenant = make_tenant(session)
        other = make_tenant(session)
        job = make_job(session, tenant)
        other_job = make_job(session, other)
        claimed = crud.claim_oldest_job(session=session, owner="w", lease_seconds=60)
        assert claimed is not None and claimed.id == job.id
        start = utcnow()
        for step, seconds in ((1, 0), (50, 10)):
            crud.record_job_event(
                session=session,
                job_id=job.id,
                event_in=JobEventCreate(
                    step=step, total_steps=100, loss=2.0, val_loss=None, tokens_per_second=50.0
                ),
                now=start + timedelta(seconds=seconds),
            )
        job_id, tenant_id, other_id = job.id, tenant.id, other_job.id

    result = cli.invoke(app, ["jobs", "list"])
    assert result.exit_code == 0, result.output
    assert str(job_id) in result.stdout and str(other_id) in result.stdout
    result = cli.invoke(app, ["jobs", "list", "--tenant", str(tenant_id), "--json"])
    assert [j["id"] for j in json.loads(result.stdout)] == [str(job_id)]
    result = cli.invoke(app, ["jobs", "list", "--state", "queued", "--json"])
    assert [j["id"] for j in json.loads(result.stdout)] == [str(other_id)]

    result = cli.invoke(app, ["jobs", "show", str(job_id)])
    assert result.exit_code == 0, result.output
    assert "running" in result.stdout and "step 50/100" in result.stdout
    assert "ETA 10 s" in result.stdout  # 49 steps in 10 s; 50 steps left take 10.2 s
    shown = json.loads(cli.invoke(app, ["jobs", "show", str(job_id), "--json"]).stdout)
    assert shown["state"] == "running" and shown["progress"]["eta_seconds"] == pytest.approx(10.2)

    result = cli.invoke(app, ["jobs", "cancel", str(job_id)])
    assert result.exit_code == 0 and "cancelled (was running)" in result.stdout
    result = cli.invoke(app, ["jobs", "cancel", str(job_id)])
    assert result.exit_code == 0 and "already cancelled" in result.stdout
    with Session(db_engine) as session:
        cancelled = crud.get_job(session=session, job_id=job_id)
        assert cancelled is not None and cancelled.state == JobState.cancelled


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["jobs", "show", "nope"], 2, "error: invalid job id 'nope': expected a UUID"),
        (["jobs", "show", str(uuid.UUID(int=1))], 3, f"error: job {uuid.UUID(int=1)} not found"),
        (["jobs", "cancel", str(uuid.UUID(int=1))], 3, "not found"),
        (["jobs", "list", "--state", "sleeping"], 2, "error: unknown state 'sleeping'"),
        (["jobs", "list", "--tenant", "x"], 2, "error: invalid tenant id 'x'"),
    ],
)
def test_jobs_user_errors_are_one_line(cli, args, code, message) -> None:
    result = cli.invoke(app, args)
    assert result.exit_code == code
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_worker_refuses_an_unmigrated_database(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PREFIXD_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["worker"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: the database at sqlite:///")
    assert "prefixd db upgrade" in result.stderr and "Traceback" not in result.output


@pytest.mark.slow
def test_worker_runs_jobs_and_stops_cleanly_on_ctrl_c(
    ray_session, pg_engine, tiny_model_dirs, tmp_path
) -> None:
    import ray

    from common.blobstore import LocalBlobStore
    from common.config import Settings
    from tests.workers.conftest import QUICK, WorkerEnv, examples
    from workers.scheduler import find_scheduler

    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "PREFIXD_HOME": str(tmp_path / "home"),
        "PREFIXD_MODEL": str(tiny_model_dirs["llama"]),
        "PREFIXD_DATABASE_URL": pg_engine.url.render_as_string(hide_password=False),
        "PREFIXD_BLOB_URL": str(tmp_path / "blobs"),
        "PREFIXD_SCHEDULER_NAMESPACE": f"prefixd-cli-{uuid.uuid4().hex[:8]}",
        "PREFIXD_TRAINER_SLOTS": "1",
        "PREFIXD_SCHEDULER_POLL_SECONDS": "0.2",
    }
    settings = Settings(
        model=env["PREFIXD_MODEL"],
        database_url=env["PREFIXD_DATABASE_URL"],
        blob_url=env["PREFIXD_BLOB_URL"],
        scheduler_namespace=env["PREFIXD_SCHEDULER_NAMESPACE"],
    )
    jobs = WorkerEnv(settings, pg_engine, LocalBlobStore(Path(env["PREFIXD_BLOB_URL"])))
    job = jobs.submit(jobs.tenant().id, QUICK, data=examples(8))
    executable = shutil.which("prefixd", path=str(Path(sys.executable).parent))
    assert executable, "the prefixd console script is installed with the package"
    process = subprocess.Popen(
        [executable, "worker", "--poll", "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Started as a background job of a non-interactive shell is: SIGINT ignored. Ctrl-C
        # must still stop it (the worker sets its handlers itself).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        lines = []
        deadline = time.monotonic() + 120
        assert process.stdout is not None
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            lines.append(line)
            if f"job {job.id} attempt 1: succeeded" in line or not line:
                break
        assert any("scheduler started" in line for line in lines), lines
        assert f"job {job.id} attempt 1: succeeded" in lines[-1], lines
        assert find_scheduler(settings) is not None
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "scheduler stopped" in stderr and "Traceback" not in stderr
    assert find_scheduler(settings) is None
    assert jobs.job(job.id).state == JobState.succeeded
