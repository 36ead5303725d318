"""``prefixd tenants …``: erase a tenant everywhere and prove it (operators); registered by
prefixd/cli.py.

    prefixd tenants delete ID           # run the erasure to the end, step by step
    prefixd tenants verify-deleted ID   # list what is left of it (exit 0: nothing)
    prefixd tenants erasures            # erasures under way

User errors print one line ``error: …`` on stderr and exit with the error's code (2; 3 for a
tenant that does not exist) — never a traceback. ``verify-deleted`` exits with 1 when it
finds anything.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer

from prefixd.cli_support import format_time, migrated_storage, user_errors

tenants_app = typer.Typer(
    help="Tenants (operators): erase one everywhere, verify that nothing of it is left.",
    no_args_is_help=True,
)

FOUND_EXIT_CODE = 1


def _tenant_id(text: str) -> uuid.UUID:
    from common.blobstore.keys import validate_id

    return uuid.UUID(validate_id(text.strip().lower(), what="tenant id"))


@contextmanager
def _replica_evictor(settings: Any) -> Iterator[Any]:
    """An evictor for the Serve application's inference replicas when Ray is reachable
    (``RAY_ADDRESS``, or a local cluster such as ``prefixd up``'s), else None."""
    import ray

    from common.erasure import serve_evictor_if_running

    started = False
    if not ray.is_initialized():
        try:
            ray.init(
                address=settings.ray_address or "auto",
                namespace=settings.scheduler_namespace,
                log_to_driver=False,
                configure_logging=False,
            )
            started = True
        except Exception:  # no cluster: no Serve application, no replica to ask
            pass
    try:
        yield serve_evictor_if_running() if ray.is_initialized() else None
    finally:
        if started:
            ray.shutdown()


@tenants_app.command("delete")
@user_errors
def delete_tenant(
    tenant_id: Annotated[str, typer.Argument(help="The tenant's id.")],
) -> None:
    """Erase a tenant everywhere, with progress, until verified.

    Its jobs are cancelled, every object under tenants/<id>/ (every version) and every row
    deleted, the inference replicas drop its prefixes, and a final check finds nothing; an
    audit record (ids, times, counts) is kept. Resumes an erasure that stopped half-way
    (waiting for, or taking over from, a runner elsewhere). For a tenant erased before,
    sweeps its key prefix once more."""
    from common.blobstore import tenant_key_prefix
    from common.db import crud
    from common.db.engine import session_scope
    from common.db.errors import NotFoundError
    from common.erasure import ErasureOptions, erase_tenant, find_tenant_leftovers, runner_name

    wanted = _tenant_id(tenant_id)
    with migrated_storage() as (settings, engine, store):
        with session_scope(engine) as session:
            tenant = crud.get_tenant(session=session, tenant_id=wanted)
            erasure = crud.get_tenant_erasure(session=session, tenant_id=wanted)
            audit = crud.get_deletion_audit(session=session, tenant_id=wanted)
        if tenant is None and erasure is None:
            if audit is None:
                raise NotFoundError(f"tenant {wanted} not found")
            typer.echo(f"tenant {wanted} was erased at {format_time(audit.completed_at)}")
            swept = store.delete_prefix(tenant_key_prefix(wanted))
            if swept:
                typer.echo(f"swept {swept} object(s) left under {tenant_key_prefix(wanted)}")
            _report(wanted, find_tenant_leftovers(engine, store, wanted), audit)
            return
        if erasure is not None:
            typer.echo(
                f"resuming the erasure of tenant {wanted} (requested "
                f"{format_time(erasure.requested_at)}, next step {erasure.step.value}"
                + (f"; last error: {erasure.last_error}" if erasure.last_error else "")
                + ")"
            )
        with _replica_evictor(settings) as evictor:
            typer.echo(
                "inference replicas: asked through the Serve application"
                if evictor is not None
                else "inference replicas: no Serve application reachable; replicas drop "
                "the prefixes by themselves within PREFIXD_PREFIX_CACHE_SWEEP_SECONDS"
            )
            started = time.monotonic()

            def show(step: str) -> None:
                typer.echo(f"[{time.monotonic() - started:6.1f} s] {step}")

            audit = erase_tenant(
                engine=engine,
                store=store,
                tenant_id=wanted,
                evictor=evictor,
                options=ErasureOptions.from_settings(settings),
                owner=runner_name("cli"),
                wait=True,
                on_step=show,
            )
        typer.echo(
            f"tenant {wanted} erased: {audit.objects_erased} object(s), "
            f"{audit.rows_erased} row(s); audit record {audit.id}"
        )


def _report(tenant_id: uuid.UUID, found: list[str], audit: Any, *, as_json: bool = False) -> None:
    from common.blobstore import tenant_key_prefix

    if as_json:
        typer.echo(
            json.dumps(
                {
                    "tenant_id": str(tenant_id),
                    "clean": not found,
                    "found": found,
                    "audit": None
                    if audit is None
                    else {
                        "id": str(audit.id),
                        "requested_at": audit.requested_at.isoformat(),
                        "completed_at": audit.completed_at and audit.completed_at.isoformat(),
                        "objects_erased": audit.objects_erased,
                        "rows_erased": audit.rows_erased,
                    },
                },
                indent=2,
            )
        )
    elif found:
        typer.echo(f"tenant {tenant_id} is NOT erased; found {len(found)} thing(s):")
        for item in found:
            typer.echo(f"  {item}")
    else:
        typer.echo(
            f"tenant {tenant_id}: nothing found (no object version under "
            f"{tenant_key_prefix(tenant_id)}, no row in any table)"
            + (
                ""
                if audit is None
                else f"; erased at {format_time(audit.completed_at)} (audit record {audit.id})"
            )
        )
    if found:
        raise typer.Exit(FOUND_EXIT_CODE)


@tenants_app.command("verify-deleted")
@user_errors
def verify_deleted(
    tenant_id: Annotated[str, typer.Argument(help="The tenant's id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List whatever of a tenant is still stored (exit 0: nothing).

    Every object version and delete marker under tenants/<id>/, its rows in every table,
    an erasure still under way. Exit 0 when nothing is found (the audit record is not a
    leftover), 1 with the list otherwise."""
    from common.db import crud
    from common.db.engine import session_scope
    from common.erasure import find_tenant_leftovers

    wanted = _tenant_id(tenant_id)
    with migrated_storage() as (_settings, engine, store):
        found = find_tenant_leftovers(engine, store, wanted)
        with session_scope(engine) as session:
            audit = crud.get_deletion_audit(session=session, tenant_id=wanted)
    _report(wanted, found, audit, as_json=as_json)


@tenants_app.command("erasures")
@user_errors
def list_erasures(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Tenant erasures under way: step, runs, who holds them, last error."""
    from common.db import crud
    from common.db.engine import session_scope

    with migrated_storage() as (_settings, engine, _store), session_scope(engine) as session:
        rows = [
            {
                "tenant_id": str(e.tenant_id),
                "step": e.step.value,
                "requested_at": e.requested_at.isoformat(),
                "updated_at": e.updated_at.isoformat(),
                "runs": e.runs,
                "lease_owner": e.lease_owner,
                "lease_expires_at": e.lease_expires_at and e.lease_expires_at.isoformat(),
                "last_error": e.last_error,
            }
            for e in crud.list_tenant_erasures(session=session)
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no erasure under way")
        return
    for row in rows:
        typer.echo(
            f"{row['tenant_id']}  step {row['step']:14}  runs {row['runs']}  "
            f"held by {row['lease_owner'] or '-'}"
            + (f"  last error: {row['last_error']}" if row["last_error"] else "")
        )
