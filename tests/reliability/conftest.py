"""Fixtures of the fault tests: things that can be broken on purpose.

- ``private_postgres``: a PostgreSQL cluster of this test module's own (``pg_createcluster``
  on a free port, trust authentication on loopback), which the test stops, starts and
  restarts; the machine's shared server on 5432 is never touched. Dropped at the end.
- ``s3_proxy``: a TCP proxy in front of the session's moto S3 server that the test switches
  off (connections refused, open ones cut) and on again, so the store is "down" for exactly
  the processes that reach S3 through it — trainers in Ray workers included.
- ``fault_env`` / ``run_scheduler``: the training queue (tests/workers/conftest.py's
  ``WorkerEnv``) on the shared PostgreSQL and S3 through the proxy, with short leases.

Where the machinery for a fault is missing (no ``pg_createcluster``, not root), the test is
skipped with the reason — and fails under CI (``CI=true``), like the other real services.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool

from common.blobstore.s3 import S3BlobStore
from common.config import Settings
from tests.fixtures.services import _service_unavailable, free_port
from tests.workers.conftest import S3_TEST_ENV, WorkerEnv

# --- a PostgreSQL cluster of our own ----------------------------------------------------------


def _run(*command: str, timeout: float = 120) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(command)}` exited with {done.returncode}: "
            f"{(done.stderr + done.stdout).strip()[-1200:]}"
        )
    return done.stdout


def _postgres_version() -> str | None:
    root = Path("/usr/lib/postgresql")
    versions = (
        sorted(
            (p.name for p in root.iterdir() if (p / "bin" / "postgres").exists()),
            key=lambda v: int(v) if v.isdigit() else 0,
        )
        if root.is_dir()
        else []
    )
    return versions[-1] if versions else None


@dataclass
class PrivateCluster:
    """A PostgreSQL cluster only this test module uses."""

    version: str
    name: str
    port: int
    url: URL  # of the migrated ``prefixd`` database on it

    def _ctl(self, action: str) -> None:
        _run("pg_ctlcluster", "--skip-systemctl-redirect", self.version, self.name, action)

    def stop(self) -> None:
        """Fast shutdown: every open connection is terminated, as in a real restart."""
        self._ctl("stop")

    def start(self) -> None:
        self._ctl("start")
        self.wait_accepting()

    def restart(self) -> None:
        self._ctl("restart")
        self.wait_accepting()

    def accepting(self) -> bool:
        engine = sa.create_engine(
            self.url.set(database="postgres"),  # exists before ours is created
            poolclass=NullPool,
            connect_args={"connect_timeout": 2},
        )
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except sa.exc.SQLAlchemyError:
            return False
        finally:
            engine.dispose()

    def wait_accepting(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.accepting():
            if time.monotonic() > deadline:
                raise AssertionError(f"the private PostgreSQL cluster {self.name} did not come up")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PrivateCluster]:
    from common.db.engine import create_db_engine, upgrade_database

    version = _postgres_version()
    tools = all(shutil.which(t) for t in ("pg_createcluster", "pg_ctlcluster", "pg_dropcluster"))
    if version is None or not tools:
        _service_unavailable(
            "the PostgreSQL restart test needs Debian's postgresql-common tools "
            "(pg_createcluster, pg_ctlcluster, pg_dropcluster) and a server under /usr/lib/postgresql"
        )
    assert version is not None
    name = f"prefixd_faults_{uuid.uuid4().hex[:8]}"
    port = free_port()
    try:
        _run(
            "pg_createcluster",
            version,
            name,
            "--port",
            str(port),
            # Nothing to keep: no fsync (the machine does not crash, only the server stops).
            "-o",
            "fsync=off",
            "--",
            "--auth=trust",
        )
    except (RuntimeError, OSError) as error:
        _service_unavailable(f"could not create a private PostgreSQL cluster: {error}")
    cluster = PrivateCluster(
        version,
        name,
        port,
        sa.engine.make_url(f"postgresql+psycopg://postgres@127.0.0.1:{port}/prefixd"),
    )
    try:
        cluster.start()
    except Exception as error:
        with contextlib.suppress(Exception):
            _run("pg_dropcluster", "--stop", version, name)
        _service_unavailable(f"could not start the private PostgreSQL cluster {name}: {error}")
    try:
        admin = sa.create_engine(
            cluster.url.set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.execute(sa.text('CREATE DATABASE "prefixd"'))
        admin.dispose()
        engine = create_db_engine(cluster.url)
        upgrade_database(engine)
        engine.dispose()
        yield cluster
    finally:
        _run("pg_dropcluster", "--stop", version, name)


# --- an S3 endpoint that can go down -------------------------------------------------------


class SwitchableProxy:
    """Forwards TCP connections from a loopback port to ``target``; ``down()`` stops
    listening (new connections are refused) and cuts the open ones, ``up()`` listens on the
    same port again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self.connections = 0
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket()
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(128)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            open_now, self._open = self._open, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            listener.close()
        for sock in open_now:
            self._close(sock)

    @staticmethod
    def _close(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                self._close(client)
                continue
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    self._close(client)
                    self._close(upstream)
                    return
                self._open |= {client, upstream}
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open -= {src, dst}
            self._close(src)
            self._close(dst)


@pytest.fixture
def s3_proxy(s3_endpoint_url: str) -> Iterator[SwitchableProxy]:
    host, port = s3_endpoint_url.removeprefix("http://").rsplit(":", 1)
    proxy = SwitchableProxy((host, int(port)))
    yield proxy
    proxy.down()


# --- the training queue, its store reached through the proxy ---------------------------------

FAULT_TIMINGS: dict[str, Any] = {
    "job_lease_seconds": 6.0,
    "job_heartbeat_seconds": 0.5,
    # A trainer is a fresh process importing torch: on a busy 2-core machine that can take
    # a minute, and a start that runs out of this lease costs the job an attempt.
    "trainer_start_timeout_seconds": 120.0,
    "progress_event_seconds": 0.2,
    "scheduler_poll_seconds": 0.2,
    # An unreachable endpoint is reported after two tries, not after botocore's five
    # (up to ~30 s of backoff per request).
    "s3_max_attempts": 2,
}


@pytest.fixture
def fault_env(
    ray_session: None,
    pg_engine: Engine,
    make_bucket: Callable[..., str],
    s3_proxy: SwitchableProxy,
    boto_session: Any,
    tiny_model_dirs: dict[str, Path],
    worker_home: Path,
) -> WorkerEnv:
    settings = Settings(
        home=worker_home,
        model=str(tiny_model_dirs["llama"]),
        database_url=pg_engine.url.render_as_string(hide_password=False),
        blob_url=f"s3://{make_bucket()}/prefixd",
        s3_endpoint_url=s3_proxy.url,
        scheduler_namespace=f"prefixd-faults-{uuid.uuid4().hex[:10]}",
        trainer_slots=3,
        # No spare trainer kept started: a test runs a job or two, and a spare is one more
        # process start (torch, the model) per scheduler; test_trainer_pool.py asks for them.
        trainer_warm_processes=0,
        **FAULT_TIMINGS,
    )
    # The test's own view of the bucket goes around the proxy: it still sees while S3 is down.
    host_url = f"http://{s3_proxy.target[0]}:{s3_proxy.target[1]}"
    store = S3BlobStore.from_url(
        settings.blob_url or "", endpoint_url=host_url, session=boto_session
    )
    return WorkerEnv(settings, pg_engine, store)


@pytest.fixture
def run_scheduler(fault_env: WorkerEnv) -> Iterator[Callable[..., Any]]:
    """Factory: start the scheduler of this test's namespace and wait until it is ready;
    stopped (its running jobs not released) at the end of the test."""
    from workers.scheduler import find_scheduler, start_scheduler, stop_scheduler, wait_until_ready

    handles: list[Any] = []

    def run(settings: Settings | None = None) -> Any:
        handle, _ = start_scheduler(
            settings or fault_env.settings, runtime_env={"env_vars": S3_TEST_ENV}
        )
        handles.append(handle)
        wait_until_ready(handle, timeout=120)
        return handle

    yield run
    handle = find_scheduler(fault_env.settings)
    if handle is not None:
        stop_scheduler(handle, release=False, timeout=30)
