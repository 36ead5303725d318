"""``prefixd up``: the whole service on one machine, or onto an existing Ray cluster.

Starts (or joins, with ``RAY_ADDRESS``) Ray, deploys the Serve application (API +
inference), starts the training scheduler, prints the URL and the admin token, and stops
cleanly on Ctrl-C. On the embedded default it needs no setup at all: a SQLite database
(migrated on the spot), a local blob directory and the embedded model under
``PREFIXD_HOME``.
"""

from __future__ import annotations

import os
import secrets
import time
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr

from common.config import Settings, get_settings
from prefixd.cli_support import StopRequested, stop_on_signals

ADMIN_TOKEN_FILE = "admin-token"


def admin_token(settings: Settings) -> tuple[str, bool]:
    """PREFIXD_ADMIN_TOKEN, or one generated once and kept in PREFIXD_HOME (mode 0600).
    Returns the token and whether it was just generated."""
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value(), False
    path = settings.home_dir / ADMIN_TOKEN_FILE
    if path.is_file():
        return path.read_text().strip(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token + "\n")
    return token, True


def prepare_database(settings: Settings) -> str:
    """SQLite (the embedded default) is migrated on the spot; a shared PostgreSQL must have
    been migrated by an operator (`prefixd db upgrade`), and is refused otherwise."""
    from common.db.engine import (
        check_connection,
        create_db_engine,
        masked_url,
        require_migrated,
        upgrade_database,
    )

    engine = create_db_engine(settings)
    try:
        check_connection(engine)
        if engine.dialect.name == "sqlite":
            Path(settings.home_dir).mkdir(parents=True, exist_ok=True)
            upgrade_database(engine)
        else:
            require_migrated(engine)
        return masked_url(engine)
    finally:
        engine.dispose()


def _wait_ready(url: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the API at {url} did not become ready in {timeout:.0f} s")
        time.sleep(0.5)


def up(
    host: Annotated[
        str, typer.Option("--host", help="Address the HTTP API listens on.")
    ] = "127.0.0.1",
    port: Annotated[
        int | None, typer.Option("--port", help="HTTP port (default: PREFIXD_HTTP_PORT).")
    ] = None,
    detach: Annotated[
        bool,
        typer.Option(
            "--detach",
            help="With RAY_ADDRESS: deploy the Serve app and exit, leaving it running "
            "(run the scheduler with `prefixd worker`).",
        ),
    ] = False,
) -> None:
    """Start the service: Ray, the HTTP API and inference (Ray Serve), the scheduler."""
    from common.blobstore import build_blob_store

    settings = get_settings()
    if detach and not settings.ray_address:
        raise typer.BadParameter("--detach needs RAY_ADDRESS (an existing cluster)")
    token, generated = admin_token(settings)
    settings = settings.model_copy(
        update={"admin_token": SecretStr(token), "http_port": port or settings.http_port}
    )
    database = prepare_database(settings)
    store = build_blob_store(settings)
    store.check()

    if not settings.ray_address:
        # Read by Ray Serve when its processes import it: set before `ray` starts them, and
        # before this process imports Serve.
        from services.serve_mode import serve_environment

        os.environ.update(serve_environment(settings))

    import ray
    from ray import serve

    from services.app_builder import APP_NAME, build_app_from_settings
    from workers.scheduler import start_scheduler, stop_scheduler, wait_until_ready

    scheduler: Any = None
    created = False
    try:
        with stop_on_signals():
            where = settings.ray_address or "a local Ray"
            typer.echo(f"starting on {where}; database {database}; blobs {store.url}", err=True)
            ray.init(
                # RAY_ADDRESS names a cluster; without it, always a new local Ray (never one that
                # happens to run on this machine, which a bare ray.init() would attach to).
                address=settings.ray_address or "local",
                namespace=settings.scheduler_namespace,
                log_to_driver=False,
                configure_logging=False,
            )
            serve.start(http_options={"host": host, "port": settings.http_port})
            typer.echo("deploying the API and inference replicas (loads the model once)…", err=True)
            serve.run(build_app_from_settings(settings), name=APP_NAME, route_prefix="/")
            url = f"http://{host}:{settings.http_port}"
            _wait_ready(url)
            if detach:
                typer.echo(f"prefixd is deployed: {url}")
                return
            scheduler, created = start_scheduler(settings)
            status = wait_until_ready(scheduler)
            typer.echo(f"prefixd is up: {url}  (OpenAPI: {url}/docs)")
            typer.echo(
                f"scheduler: {status['slots']} trainer slot(s), "
                f"{status['warm_processes']} warm trainer process(es)"
            )
            if generated:
                typer.echo(
                    f"admin token (generated, kept in {settings.home_dir / ADMIN_TOKEN_FILE}): {token}"
                )
            else:
                typer.echo(
                    "admin token: PREFIXD_ADMIN_TOKEN, or the one in PREFIXD_HOME/admin-token"
                )
            typer.echo("Ctrl-C stops.")
            while True:
                time.sleep(3600)
    except StopRequested:
        typer.echo("stopping…", err=True)
    finally:
        if scheduler is not None and created:
            stop_scheduler(scheduler)
        if ray.is_initialized():
            if not detach:
                serve.shutdown()
            ray.shutdown()
        typer.echo("stopped", err=True)
