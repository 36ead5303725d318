"""``prefixd worker`` (run the training scheduler) and ``prefixd jobs …`` (operators' view
of the job queue); registered by prefixd/cli.py.

User errors print one line ``error: …`` on stderr and exit with the error's code (2; 3 for
something that does not exist) — never a traceback.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime
from typing import Annotated, Any

import typer

from common.errors import InvalidInputError
from prefixd.cli_support import (
    StopRequested,
    format_time,
    migrated_database,
    stop_on_signals,
    user_errors,
)


def _job_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise InvalidInputError(f"invalid job id {text!r}: expected a UUID") from None


# --- prefixd worker -------------------------------------------------------------------------


def _print_report(report: dict[str, Any]) -> None:
    detail = f" — {report['error']}" if report.get("error") else ""
    typer.echo(
        f"job {report['job_id']} attempt {report.get('attempt', '?')}: {report['outcome']}{detail}"
    )


@user_errors
def worker(
    poll: Annotated[
        float, typer.Option("--poll", help="Seconds between two looks at the scheduler.")
    ] = 2.0,
    nightly_at: Annotated[
        str | None,
        typer.Option(
            "--nightly-at",
            help="Also run the nightly retraining planner every day at this local time "
            "(HH:MM), as `prefixd nightly` would; at once when started after it.",
        ),
    ] = None,
) -> None:
    """Run the training scheduler on Ray and block until Ctrl-C.

    The scheduler runs on RAY_ADDRESS (or a local Ray) against the configured database and
    blob store. Ctrl-C (or SIGTERM) stops it cleanly: running jobs go back to the queue. If
    a scheduler already runs on the cluster, this command watches it and takes over when it
    goes away. With --nightly-at, this process also plans the nightly retraining (a restart
    the same night enqueues nothing new: the jobs' idempotency keys are per night)."""
    from common.blobstore import build_blob_store
    from common.config import get_settings
    from common.db.engine import masked_url

    settings = get_settings()
    nightly_time = None
    if nightly_at is not None:
        from workers.nightly import parse_time_of_day

        nightly_time = parse_time_of_day(nightly_at)
    with (
        migrated_database() as engine
    ):  # refuse to start on a database that is down or not migrated
        where = masked_url(engine)
    store = build_blob_store(settings)
    store.check()

    import ray
    from ray.exceptions import RayActorError

    from workers.scheduler import (
        find_scheduler,
        scheduler_status,
        start_scheduler,
        stop_scheduler,
        wait_until_ready,
    )

    handle: Any = None
    created = False
    nightly: Any = None
    try:
        with stop_on_signals():
            ray.init(
                # RAY_ADDRESS names a cluster; without it, always a new local Ray (never one that
                # happens to run on this machine, which a bare ray.init() would attach to).
                address=settings.ray_address or "local",
                namespace=settings.scheduler_namespace,
                log_to_driver=False,
                configure_logging=False,
            )
            seen: set[tuple[str, int]] = set()
            last_pool_error: str | None = None
            while True:
                if handle is None:
                    handle, created = start_scheduler(settings)
                    status = wait_until_ready(handle)
                    role = "started" if created else "found running (started by another process)"
                    typer.echo(
                        f"scheduler {role} on {status['host']}: {status['slots']} trainer slot(s), "
                        f"{status['warm_processes']} warm trainer process(es); "
                        f"database {where}; blobs {store.url}; Ctrl-C stops"
                        + ("" if created else " watching")
                    )
                try:
                    status = scheduler_status(handle)
                except RayActorError:
                    time.sleep(poll)
                    current = find_scheduler(settings)
                    if current is not None and current == handle:  # handles compare by actor id
                        continue  # Ray is restarting the same actor (its process died)
                    # The scheduler went away (the process that owned it stopped): take over.
                    typer.echo("the scheduler went away; starting one")
                    handle, created = None, False
                    continue
                for report in status["reports"]:
                    key = (report["job_id"], int(report.get("attempt") or 0))
                    if key not in seen:
                        seen.add(key)
                        _print_report(report)
                pool_error = (status.get("trainer_pool") or {}).get("last_error")
                if pool_error and pool_error != last_pool_error:
                    typer.echo(f"warning: {pool_error}", err=True)
                last_pool_error = pool_error
                if nightly_time is not None and nightly is None:
                    from common.db.engine import create_db_engine
                    from workers.nightly import NightlyRunner

                    nightly = NightlyRunner(
                        create_db_engine(settings),
                        nightly_time,
                        validation_split=settings.nightly_validation_split,
                        max_steps=settings.job_max_steps,
                    )
                    typer.echo(f"nightly retraining planned every day at {nightly_at} (local time)")
                if nightly is not None:
                    for line in nightly.poll(datetime.now()):
                        typer.echo(line)
                time.sleep(poll)
    except StopRequested:
        if handle is not None and created:
            typer.echo("stopping: running jobs go back to the queue…", err=True)
            result = stop_scheduler(handle)
            typer.echo(
                f"scheduler stopped ({result.get('released', 0)} running job(s) requeued)",
                err=True,
            )
        elif handle is not None:
            typer.echo("leaving the other process's scheduler running", err=True)
    finally:
        if nightly is not None:
            nightly.engine.dispose()
        if ray.is_initialized():
            ray.shutdown()


# --- prefixd jobs ---------------------------------------------------------------------------

jobs_app = typer.Typer(
    help="Training jobs of every tenant (operators): list, show, cancel.",
    no_args_is_help=True,
)


def _job_summary(job: Any) -> dict[str, Any]:
    from common.db.models import TrainingJobPublic

    return json.loads(TrainingJobPublic.model_validate(job).model_dump_json())


@jobs_app.command("list")
@user_errors
def list_jobs(
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's jobs.")] = None,
    state: Annotated[
        str | None,
        typer.Option("--state", help="queued, running, succeeded, failed or cancelled."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Jobs, newest first."""
    from common.blobstore.keys import validate_id
    from common.db import crud
    from common.db.engine import session_scope
    from common.db.models import JobState

    job_state = None
    if state is not None:
        try:
            job_state = JobState(state)
        except ValueError:
            raise InvalidInputError(
                f"unknown state {state!r}: use one of {', '.join(s.value for s in JobState)}"
            ) from None
    tenant_id = uuid.UUID(validate_id(tenant, what="tenant id")) if tenant else None
    with migrated_database() as engine, session_scope(engine) as session:
        jobs = crud.list_all_jobs(
            session=session, tenant_id=tenant_id, state=job_state, limit=limit
        )
        rows = [_job_summary(job) for job in jobs]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no jobs")
        return
    typer.echo(f"{'JOB':36}  {'TENANT':36}  {'STATE':9}  {'PRIORITY':11}  {'TRIES':5}  CREATED")
    for job in jobs:
        typer.echo(
            f"{job.id!s:36}  {job.tenant_id or 'operator'!s:36}  {job.state.value:9}  "
            f"{job.priority.value:11}  "
            f"{job.attempts}/{job.max_attempts:<3}  {format_time(job.created_at)}"
        )


def _progress(events: list[Any]) -> dict[str, Any] | None:
    """The newest progress event, with throughput and an ETA derived from the events."""
    if not events:
        return None
    last = events[-1]
    result: dict[str, Any] = {
        "step": last.step,
        "total_steps": last.total_steps,
        "loss": last.loss,
        "val_loss": next((e.val_loss for e in reversed(events) if e.val_loss is not None), None),
        "tokens_per_second": last.tokens_per_second,
        "at": last.created_at.isoformat(),
        "eta_seconds": None,
    }
    first = events[0]
    seconds = (last.created_at - first.created_at).total_seconds()
    if last.total_steps and last.step > first.step and seconds > 0:
        steps_per_second = (last.step - first.step) / seconds
        result["eta_seconds"] = round((last.total_steps - last.step) / steps_per_second, 1)
    return result


@jobs_app.command("show")
@user_errors
def show_job(
    job_id: Annotated[str, typer.Argument(help="The job's id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """A job's state, attempts, error and latest progress."""

    from common.db import crud
    from common.db.engine import session_scope
    from common.db.errors import NotFoundError

    wanted = _job_id(job_id)
    with migrated_database() as engine, session_scope(engine) as session:
        job = crud.get_job(session=session, job_id=wanted)
        if job is None:
            raise NotFoundError(f"job {wanted} not found")
        summary = _job_summary(job)
        recent = crud.recent_job_events(session=session, job_id=wanted, limit=20)
        summary["progress"] = _progress(recent)
        summary["lease_owner"] = job.lease_owner
        summary["lease_expires_at"] = job.lease_expires_at and job.lease_expires_at.isoformat()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for name in (
        "id",
        "tenant_id",
        "state",
        "priority",
        "attempts",
        "max_attempts",
        "dataset_ids",
        "hyperparameters",
        "created_at",
        "started_at",
        "finished_at",
        "lease_owner",
        "lease_expires_at",
        "error",
        "note",
    ):
        value = summary.get(name)
        if name == "attempts":
            value = f"{value} of {summary['max_attempts']}"
        elif name == "max_attempts":
            continue
        elif isinstance(value, list | dict):
            value = json.dumps(value)
        typer.echo(f"{name:17} {'-' if value is None else value}")
    progress = summary["progress"]
    if progress is None:
        typer.echo(f"{'progress':17} -")
    else:
        eta = progress["eta_seconds"]
        val = progress["val_loss"]
        typer.echo(
            f"{'progress':17} step {progress['step']}/{progress['total_steps']}, "
            f"loss {progress['loss']:.4f}"
            + ("" if val is None else f", validation loss {val:.4f}")
            + f", {progress['tokens_per_second']:.0f} tokens/s"
            + ("" if eta is None or summary["state"] != "running" else f", ETA {eta:.0f} s")
        )


@jobs_app.command("cancel")
@user_errors
def cancel_job(job_id: Annotated[str, typer.Argument(help="The job's id.")]) -> None:
    """Cancel a queued or running job (a running trainer stops within a heartbeat)."""
    from common.db import crud
    from common.db.engine import session_scope
    from common.db.models import JobState

    wanted = _job_id(job_id)
    with migrated_database() as engine, session_scope(engine) as session:
        before = crud.get_job(session=session, job_id=wanted)
        previous = before.state if before is not None else None
        job = crud.cancel_job(session=session, job_id=wanted)
        if previous == JobState.cancelled or job.state != JobState.cancelled:
            typer.echo(f"job {job.id} already {job.state.value}; nothing to cancel")
        else:
            typer.echo(f"job {job.id} cancelled (was {previous.value if previous else '?'})")
