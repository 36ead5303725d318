"""The BASELINE of bench/nightly_planning.py: the nightly planner and the claim queries as
they were before planning at scale (issue 17), kept here only to measure them in the same
run as today's code. Never used by the product.

- :func:`baseline_plan_nightly` reads every tenant, dataset, version and job as ORM objects
  in one pass; :func:`baseline_enqueue_plan` enqueues one job per tenant through
  ``crud.enqueue_job`` (a transaction of its own each; today's ``enqueue_job``, which also
  reads the tenant's last job start: one SELECT per job more than before);
- :func:`baseline_fair_claim_query` / :func:`baseline_oldest_claim_query` are the claims'
  candidate queries (the fair claim computed ``max(started_at)`` of the tenant for every
  queued job; both sorted by a CASE expression, which no index can serve).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, func, select

from common.db import crud
from common.db.models import (
    TERMINAL_JOB_STATES,
    Dataset,
    JobPriority,
    JobState,
    PrefixVersion,
    Tenant,
    TenantStatus,
    TrainingJob,
    TrainingJobCreate,
)
from common.errors import InvalidInputError, PrefixdError
from workers.nightly import (
    MIN_EXAMPLES,
    NightlyPlan,
    SkippedTenant,
    TenantPlan,
    estimate_tokens,
    nightly_hyperparameters,
)

_PRIORITY_RANK = sa.case((col(TrainingJob.priority) == JobPriority.interactive, 0), else_=1)


def _newest_versions(session: Session) -> dict[uuid.UUID, tuple[PrefixVersion, TrainingJob | None]]:
    newest = (
        select(
            col(PrefixVersion.tenant_id).label("tenant_id"),
            func.max(PrefixVersion.version).label("version"),
        )
        .group_by(col(PrefixVersion.tenant_id))
        .subquery()
    )
    stmt = (
        select(PrefixVersion, TrainingJob)
        .join(
            newest,
            (col(PrefixVersion.tenant_id) == newest.c.tenant_id)
            & (col(PrefixVersion.version) == newest.c.version),
        )
        .outerjoin(TrainingJob, col(TrainingJob.id) == col(PrefixVersion.job_id))
    )
    return {prefix.tenant_id: (prefix, job) for prefix, job in session.exec(stmt).all()}


def _active_jobs(session: Session) -> dict[uuid.UUID, TrainingJob]:
    stmt = (
        select(PrefixVersion.tenant_id, TrainingJob)
        .join(TrainingJob, col(TrainingJob.id) == col(PrefixVersion.job_id))
        .where(col(PrefixVersion.active).is_(True))
    )
    return dict(session.exec(stmt).all())


def _new_datasets(
    datasets: Sequence[Dataset], prefix: PrefixVersion, job: TrainingJob | None
) -> list[Dataset]:
    if job is None:
        return [d for d in datasets if d.created_at > prefix.created_at]
    read = {str(d) for d in job.dataset_ids}
    if job.validation_dataset_id is not None:
        read.add(str(job.validation_dataset_id))
    return [d for d in datasets if d.created_at > job.created_at and str(d.id) not in read]


def baseline_plan_nightly(
    *,
    session: Session,
    run_date: date,
    since: datetime | None = None,
    limit: int | None = None,
    validation_split: float = 0.1,
    defaults: dict[str, Any] | None = None,
) -> NightlyPlan:
    """The planner before issue 17 (workers/nightly.py at 7a864a6), unchanged but for
    formatting."""
    if limit is not None and limit < 0:
        raise InvalidInputError(f"limit must be at least 0, got {limit}")
    key = crud.nightly_idempotency_key(run_date)
    tenants = session.exec(select(Tenant).order_by(col(Tenant.created_at), col(Tenant.id))).all()
    datasets: dict[uuid.UUID, list[Dataset]] = defaultdict(list)
    for dataset in session.exec(
        select(Dataset).order_by(col(Dataset.created_at), col(Dataset.id))
    ).all():
        datasets[dataset.tenant_id].append(dataset)
    tonight = {
        job.tenant_id: job
        for job in session.exec(
            select(TrainingJob).where(col(TrainingJob.nightly_run_date) == run_date)
        )
    }
    busy = set(
        session.exec(
            select(TrainingJob.tenant_id).where(
                col(TrainingJob.state).not_in(list(TERMINAL_JOB_STATES))
            )
        ).all()
    )
    newest = _newest_versions(session)
    active_jobs = _active_jobs(session)

    existing: list[TenantPlan] = []
    candidates: list[tuple[tuple[int, datetime], TenantPlan]] = []
    skipped: list[SkippedTenant] = []
    for tenant in tenants:

        def skip(reason: str, tenant: Tenant = tenant) -> None:
            skipped.append(SkippedTenant(tenant.id, tenant.name, reason))

        own = datasets.get(tenant.id, [])
        by_id = {d.id: d for d in own}
        job = tonight.get(tenant.id)
        if job is not None:
            used = [by_id[uuid.UUID(str(d))] for d in job.dataset_ids if uuid.UUID(str(d)) in by_id]
            size = sum(d.size_bytes for d in used)
            existing.append(
                TenantPlan(
                    tenant.id,
                    tenant.name,
                    "already enqueued tonight",
                    [uuid.UUID(str(d)) for d in job.dataset_ids],
                    0,
                    sum(d.example_count for d in used),
                    size,
                    estimate_tokens(size, job.hyperparameters),
                    job.hyperparameters,
                    newest[tenant.id][0].version if tenant.id in newest else None,
                    job_id=job.id,
                )
            )
            continue
        if tenant.status != TenantStatus.active:
            skip("being deleted")
            continue
        if not own:
            skip("no datasets")
            continue
        version = newest.get(tenant.id)
        if version is None:
            reason, fresh = "never trained", own
            last_trained = own[0].created_at
        else:
            prefix, version_job = version
            reason, fresh = "new data", _new_datasets(own, prefix, version_job)
            last_trained = version_job.created_at if version_job else prefix.created_at
        if since is not None:
            fresh = [d for d in fresh if d.created_at >= since]
        if not fresh:
            if version is None:
                skip(f"no dataset since {since.isoformat() if since else '-'}")
            else:
                skip(f"no new data since version {version[0].version}")
            continue
        if tenant.id in busy:
            skip("has a queued or running job; left for the next night")
            continue
        examples = sum(d.example_count for d in own)
        if examples < MIN_EXAMPLES:
            skip(f"{examples} example(s): a nightly job needs {MIN_EXAMPLES} (it holds some out)")
            continue
        active_job = active_jobs.get(tenant.id)
        last = active_job or (version[1] if version else None)
        params = nightly_hyperparameters(
            last.hyperparameters if last is not None else defaults, validation_split
        )
        size = sum(d.size_bytes for d in own)
        plan = TenantPlan(
            tenant.id,
            tenant.name,
            reason,
            [d.id for d in own],
            len(fresh),
            examples,
            size,
            estimate_tokens(size, params),
            params,
            version[0].version if version else None,
        )
        candidates.append(((0 if version is None else 1, last_trained), plan))

    candidates.sort(key=lambda item: item[0])
    room = None if limit is None else max(limit - len(existing), 0)
    planned = [plan for _, plan in candidates]
    if room is not None and len(planned) > room:
        for plan in planned[room:]:
            skipped.append(
                SkippedTenant(plan.tenant_id, plan.tenant_name, f"over the limit of {limit}")
            )
        planned = planned[:room]
    return NightlyPlan(run_date, key, since, existing + planned, skipped)


def baseline_enqueue_plan(
    *, session: Session, plan: NightlyPlan, max_attempts: int = 3, max_steps: int | None = None
) -> NightlyPlan:
    """One ``crud.enqueue_job`` per planned tenant, as before issue 17."""
    tenants: list[TenantPlan] = []
    skipped = list(plan.skipped)
    for item in plan.tenants:
        if item.job_id is not None:
            tenants.append(item)
            continue
        try:
            job, created = crud.enqueue_job(
                session=session,
                tenant_id=item.tenant_id,
                job_in=TrainingJobCreate(
                    dataset_ids=item.dataset_ids,
                    hyperparameters=item.hyperparameters,
                    priority=JobPriority.batch,
                    idempotency_key=plan.idempotency_key,
                    max_attempts=max_attempts,
                    nightly_run_date=plan.run_date,
                ),
                max_steps=max_steps,
            )
        except (PrefixdError, ValidationError) as error:
            reason = f"not enqueued: {str(error).splitlines()[0]}"
            skipped.append(SkippedTenant(item.tenant_id, item.tenant_name, reason))
            continue
        if job.nightly_run_date != plan.run_date:
            reason = f"not enqueued: the tenant's own job {job.id} holds {plan.idempotency_key!r}"
            skipped.append(SkippedTenant(item.tenant_id, item.tenant_name, reason))
            continue
        tenants.append(replace(item, job_id=job.id, created=created))
    return replace(plan, tenants=tenants, skipped=skipped)


def baseline_fair_claim_query() -> Any:
    """claim_next_job's candidate query before issue 17."""
    sibling = aliased(TrainingJob)
    tenant_busy = (
        sa.exists()
        .where(
            col(sibling.tenant_id).is_not_distinct_from(col(TrainingJob.tenant_id)),
            col(sibling.state) == JobState.running,
        )
        .correlate(TrainingJob)
    )
    last_start = (
        select(func.max(sibling.started_at))
        .where(col(sibling.tenant_id) == col(TrainingJob.tenant_id))
        .correlate(TrainingJob)
        .scalar_subquery()
    )
    return (
        sa.select(col(TrainingJob.id), col(TrainingJob.tenant_id))
        .join(Tenant, col(Tenant.id) == col(TrainingJob.tenant_id), isouter=True)
        .where(
            col(TrainingJob.state) == JobState.queued,
            sa.or_(col(Tenant.status) == TenantStatus.active, col(TrainingJob.tenant_id).is_(None)),
            ~tenant_busy,
        )
        .order_by(
            _PRIORITY_RANK,
            last_start.asc().nulls_first(),
            col(TrainingJob.created_at),
            col(TrainingJob.id),
        )
        .limit(1)
    )


def baseline_oldest_claim_query() -> Any:
    """claim_oldest_job's candidate query before issue 17."""
    return (
        sa.select(col(TrainingJob.id))
        .where(col(TrainingJob.state) == JobState.queued)
        .order_by(_PRIORITY_RANK, col(TrainingJob.created_at), col(TrainingJob.id))
        .limit(1)
        .with_for_update(skip_locked=True)
    )


def baseline_run_nightly(engine: Any, *, run_date: date, dry_run: bool) -> NightlyPlan:
    """``run_nightly`` with the baseline planner and enqueue (the nightly_runs bookkeeping
    is today's, unchanged by issue 17)."""
    from common.db.engine import session_scope
    from workers.nightly import refresh_runs

    if dry_run:
        with session_scope(engine) as session:
            return baseline_plan_nightly(session=session, run_date=run_date)
    refresh_runs(engine)
    with session_scope(engine) as session:
        crud.start_nightly_run(session=session, run_date=run_date)
        plan = baseline_plan_nightly(session=session, run_date=run_date)
        plan = baseline_enqueue_plan(session=session, plan=plan)
        crud.finish_nightly_planning(
            session=session,
            run_date=run_date,
            tenants_skipped=len(plan.skipped),
            estimated_tokens=plan.estimated_tokens,
        )
    return plan
