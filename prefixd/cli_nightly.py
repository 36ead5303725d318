"""``prefixd nightly``: plan tonight's batch retraining and enqueue it (``workers/nightly.py``);
``--dry-run`` prints the plan only, ``--report`` the nightly runs. Registered by
prefixd/cli.py. Runs anywhere the database is reachable: by hand, as a Ray job
(``ray job submit -- prefixd nightly``), from the KubeRay CronJob
(deploy/kuberay/nightly-cronjob.yaml); ``prefixd worker --nightly-at HH:MM`` runs the same
pass on a schedule.
"""

from __future__ import annotations

import json
import logging
from datetime import date, datetime
from typing import Annotated, Any

import typer

from common.errors import InvalidInputError
from prefixd.cli_support import format_time, migrated_database, user_errors


def plan_rows(plan: Any) -> dict[str, Any]:
    """The plan as JSON-ready data."""
    return {
        "run_date": plan.run_date.isoformat(),
        "idempotency_key": plan.idempotency_key,
        "since": plan.since.isoformat() if plan.since else None,
        "tenants": [
            {
                "tenant_id": str(t.tenant_id),
                "tenant": t.tenant_name,
                "reason": t.reason,
                "datasets": len(t.dataset_ids),
                "new_datasets": t.new_datasets,
                "examples": t.examples,
                "bytes": t.size_bytes,
                "estimated_tokens": t.estimated_tokens,
                "trained_version": t.trained_version,
                "hyperparameters": t.hyperparameters,
                "job_id": str(t.job_id) if t.job_id else None,
                "created": t.created,
            }
            for t in plan.tenants
        ],
        "skipped": [
            {"tenant_id": str(s.tenant_id), "tenant": s.tenant_name, "reason": s.reason}
            for s in plan.skipped
        ],
        "examples": plan.examples,
        "estimated_tokens": plan.estimated_tokens,
        "created": plan.created,
    }


def print_plan(plan: Any, *, dry_run: bool) -> None:
    typer.echo(
        f"nightly {plan.run_date} (idempotency key {plan.idempotency_key})"
        + (f", data since {plan.since.isoformat()}" if plan.since else "")
    )
    if plan.tenants:
        typer.echo(
            f"{'TENANT':28}  {'REASON':24}  {'DATASETS':>9}  {'EXAMPLES':>8}  "
            f"{'EST. TOKENS':>11}  JOB"
        )
        for t in plan.tenants:
            if t.job_id is None:
                job = "(dry run)" if dry_run else "-"
            else:
                job = f"{t.job_id} ({'new' if t.created else 'existing'})"
            datasets = f"{len(t.dataset_ids)}" + (
                f" ({t.new_datasets} new)" if t.new_datasets else ""
            )
            typer.echo(
                f"{t.tenant_name[:28]:28}  {t.reason[:24]:24}  {datasets:>9}  {t.examples:>8}  "
                f"{t.estimated_tokens:>11}  {job}"
            )
    else:
        typer.echo("no tenant to retrain")
    if plan.skipped:
        typer.echo(f"skipped {len(plan.skipped)} tenant(s):")
        for s in plan.skipped:
            typer.echo(f"  {s.tenant_name[:28]:28}  {s.reason}")
    summary = (
        f"{len(plan.tenants)} tenant(s), {plan.examples} examples, ~{plan.estimated_tokens} "
        f"training tokens (estimated: bytes / 4 x epochs); {len(plan.skipped)} skipped"
    )
    if dry_run:
        typer.echo(f"{summary}; dry run: nothing was enqueued")
    else:
        existing = len(plan.tenants) - plan.created
        typer.echo(f"{summary}; {plan.created} job(s) enqueued, {existing} already enqueued")


def run_rows(runs: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(run.model_dump_json()) for run in runs]


def print_runs(runs: list[Any]) -> None:
    if not runs:
        typer.echo("no nightly runs yet")
        return
    typer.echo(
        f"{'NIGHT':10}  {'STARTED':19}  {'FINISHED':19}  {'PASSES':>6}  {'PLANNED':>7}  "
        f"{'OK':>4}  {'FAILED':>6}  {'CANCEL':>6}  {'INACTIVE':>8}  {'SKIPPED':>7}  "
        f"{'EST.TOKENS':>10}  WALL"
    )
    for r in runs:
        wall = "-" if r.wall_seconds is None else f"{r.wall_seconds:.0f} s"
        typer.echo(
            f"{r.run_date.isoformat():10}  {format_time(r.started_at):19}  {format_time(r.finished_at):19}  "
            f"{r.planner_runs:>6}  {r.tenants_planned:>7}  {r.jobs_succeeded:>4}  "
            f"{r.jobs_failed:>6}  {r.jobs_cancelled:>6}  {r.prefixes_kept_inactive:>8}  "
            f"{r.tenants_skipped:>7}  {r.estimated_tokens:>10}  {wall}"
        )


def _run_date(text: str | None) -> date:
    if text is None:
        return date.today()
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidInputError(f"invalid date {text!r}: expected YYYY-MM-DD") from None


@user_errors
def nightly(
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only data uploaded at or after this ISO 8601 time."),
    ] = None,
    changed_since: Annotated[
        str | None,
        typer.Option(
            "--changed-since", help="Only data uploaded within this long (e.g. 24h, 90m, 2d)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; enqueue and record nothing.")
    ] = False,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=0, help="At most this many tenants tonight (stalest first)."),
    ] = None,
    run_date: Annotated[
        str | None,
        typer.Option(
            "--date", help="The night (YYYY-MM-DD) whose key the jobs get; default today."
        ),
    ] = None,
    report: Annotated[
        bool,
        typer.Option("--report", help="Update and print the nightly runs instead of planning."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Retrain every tenant whose data changed: one low-priority (batch) job per tenant,
    once per night (idempotency key nightly-<date>: running it again enqueues nothing new).
    New prefixes become active only if they pass the quality gate."""
    from common.config import get_settings
    from common.db import crud
    from common.db.engine import session_scope
    from workers.nightly import (
        parse_changed_since,
        parse_since,
        refresh_runs,
        run_nightly,
    )

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if report:
        if since or changed_since or dry_run or limit is not None or run_date:
            raise InvalidInputError("--report takes no planning options")
        with migrated_database() as engine:
            refresh_runs(engine)
            with session_scope(engine) as session:
                runs = crud.list_nightly_runs(session=session, limit=30)
        if as_json:
            typer.echo(json.dumps(run_rows(runs), indent=2))
        else:
            print_runs(runs)
        return
    if since and changed_since:
        raise InvalidInputError("give --since or --changed-since, not both")
    after = None
    if since:
        after = parse_since(since)
    elif changed_since:
        after = parse_changed_since(changed_since, now=datetime.now().astimezone())
    night = _run_date(run_date)
    settings = get_settings()
    with migrated_database() as engine:
        outcome = run_nightly(
            engine,
            run_date=night,
            since=after,
            limit=limit,
            validation_split=settings.nightly_validation_split,
            dry_run=dry_run,
            max_steps=settings.job_max_steps,
        )
    if as_json:
        typer.echo(json.dumps(plan_rows(outcome.plan) | {"dry_run": dry_run}, indent=2))
    else:
        print_plan(outcome.plan, dry_run=dry_run)
