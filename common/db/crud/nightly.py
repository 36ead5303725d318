"""Nightly retraining runs (``workers/nightly.py`` plans them)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from common.db.crud.jobs import check_job_steps, estimate_job_tokens
from common.db.crud.queue import tenant_last_starts
from common.db.crud.transaction import commit, id_in
from common.db.errors import (
    ConflictError,
    NotFoundError,
)
from common.db.models import (
    MAX_JOB_DATASETS,
    TERMINAL_JOB_STATES,
    Dataset,
    JobPriority,
    JobState,
    NightlyRun,
    NightlyRunPublic,
    PrefixVersion,
    Tenant,
    TenantStatus,
    TrainingJob,
    TrainingJobCreate,
)
from common.db.types import utcnow
from common.errors import InvalidInputError


def nightly_idempotency_key(run_date: date) -> str:
    """The idempotency key of every nightly job of that night (one job per tenant)."""
    return f"nightly-{run_date.isoformat()}"


@dataclass
class NightlyJobCounts:
    """The jobs of one night by state, from the jobs themselves."""

    total: int = 0
    unfinished: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    kept_inactive: int = 0  # succeeded, prefix published inactive (the job has a note)
    last_finished_at: datetime | None = None


def nightly_job_counts(
    *, session: Session, run_dates: Sequence[date]
) -> dict[date, NightlyJobCounts]:
    """Count the nightly jobs of these nights (every date present, zeros included): jobs
    marked with the night (``nightly_run_date``), never by their idempotency key."""
    counts = {d: NightlyJobCounts() for d in run_dates}
    if not counts:
        return counts
    stmt = (
        sa.select(
            col(TrainingJob.nightly_run_date),
            col(TrainingJob.state),
            func.count(),
            func.count(col(TrainingJob.note)),
            func.max(col(TrainingJob.finished_at)),
        )
        .where(col(TrainingJob.nightly_run_date).in_(list(counts)))
        .group_by(col(TrainingJob.nightly_run_date), col(TrainingJob.state))
    )
    for night, state, number, notes, last in session.execute(stmt).all():
        entry = counts[night]
        entry.total += number
        if state == JobState.succeeded:
            entry.succeeded += number
            entry.kept_inactive += notes
        elif state == JobState.failed:
            entry.failed += number
        elif state == JobState.cancelled:
            entry.cancelled += number
        else:
            entry.unfinished += number
        if state in TERMINAL_JOB_STATES and last is not None:
            known = entry.last_finished_at
            entry.last_finished_at = last if known is None else max(known, last)
    return counts


def _apply_nightly_counts(run: NightlyRun | NightlyRunPublic, counts: NightlyJobCounts) -> None:
    """Job counts onto a run row (or its public copy); a planned night whose jobs are all
    final gets ``finished_at`` and ``wall_seconds``."""
    run.tenants_planned = counts.total
    run.jobs_succeeded = counts.succeeded
    run.jobs_failed = counts.failed
    run.jobs_cancelled = counts.cancelled
    run.prefixes_kept_inactive = counts.kept_inactive
    if run.planned_at is not None and counts.unfinished == 0:
        candidates = [run.planned_at, counts.last_finished_at]
        run.finished_at = max(t for t in candidates if t is not None)
        run.wall_seconds = (run.finished_at - run.started_at).total_seconds()
    else:
        run.finished_at = None
        run.wall_seconds = None


def get_nightly_run(*, session: Session, run_date: date) -> NightlyRun | None:
    stmt = select(NightlyRun).where(col(NightlyRun.run_date) == run_date)
    return session.exec(stmt.execution_options(populate_existing=True)).first()


def start_nightly_run(
    *, session: Session, run_date: date, now: datetime | None = None
) -> NightlyRun:
    """The night's row, made by its first planning pass (which sets ``started_at``); each
    call counts one more pass (``planner_runs``) and marks the night unfinished again."""
    at = now or utcnow()
    for _ in range(3):
        try:
            run = session.exec(
                select(NightlyRun)
                .where(col(NightlyRun.run_date) == run_date)
                .with_for_update()
                .execution_options(populate_existing=True)
            ).first()
            if run is None:
                run = NightlyRun(run_date=run_date, started_at=at, planner_runs=1)
            else:
                run.planner_runs += 1
                run.finished_at = None
                run.wall_seconds = None
            session.add(run)
            session.commit()
        except IntegrityError:  # a concurrent first pass made the row: count on it
            session.rollback()
            continue
        except BaseException:
            session.rollback()
            raise
        session.refresh(run)
        return run
    raise ConflictError(f"could not record the nightly run of {run_date}; try again")


def finish_nightly_planning(
    *,
    session: Session,
    run_date: date,
    tenants_skipped: int,
    estimated_tokens: int,
    now: datetime | None = None,
) -> NightlyRun:
    """Record the end of a planning pass (``planned_at``, skipped tenants, estimated
    tokens) and the night's job counts as they stand."""
    at = now or utcnow()
    run = get_nightly_run(session=session, run_date=run_date)
    if run is None:
        raise NotFoundError(f"nightly run of {run_date} not found")
    run.planned_at = at
    run.tenants_skipped = tenants_skipped
    run.estimated_tokens = estimated_tokens
    _apply_nightly_counts(run, nightly_job_counts(session=session, run_dates=[run_date])[run_date])
    session.add(run)
    commit(session)
    session.refresh(run)
    return run


def refresh_nightly_runs(
    *, session: Session, run_dates: Sequence[date] | None = None
) -> list[NightlyRun]:
    """Store the job counts of these nights (default: every night not finished yet);
    a night whose jobs are all final gets ``finished_at`` and ``wall_seconds``."""
    stmt = select(NightlyRun).execution_options(populate_existing=True)
    if run_dates is None:
        stmt = stmt.where(col(NightlyRun.finished_at).is_(None))
    else:
        stmt = stmt.where(col(NightlyRun.run_date).in_(list(run_dates)))
    runs = list(session.exec(stmt.order_by(col(NightlyRun.run_date))).all())
    counts = nightly_job_counts(session=session, run_dates=[r.run_date for r in runs])
    for run in runs:
        _apply_nightly_counts(run, counts[run.run_date])
        session.add(run)
    commit(session)
    for run in runs:
        session.refresh(run)
    return runs


def list_nightly_runs(
    *, session: Session, offset: int = 0, limit: int = 100
) -> list[NightlyRunPublic]:
    """Nightly runs, newest night first. The job counts of a night not finished yet are
    read from its jobs now (read only; :func:`refresh_nightly_runs` stores them)."""
    stmt = select(NightlyRun).order_by(col(NightlyRun.run_date).desc())
    runs = list(session.exec(stmt.offset(offset).limit(limit)).all())
    open_dates = [r.run_date for r in runs if r.finished_at is None]
    counts = nightly_job_counts(session=session, run_dates=open_dates)
    result = []
    for run in runs:
        public = NightlyRunPublic.model_validate(run)
        if run.finished_at is None:
            _apply_nightly_counts(public, counts[run.run_date])
        result.append(public)
    return result


# --- planning at scale: what the planner reads, a batch of tenants at a time ---------------


@dataclass(frozen=True, slots=True)
class PlanningTenant:
    id: uuid.UUID
    name: str
    status: TenantStatus
    created_at: datetime


@dataclass(frozen=True, slots=True)
class PlanningDataset:
    id: uuid.UUID
    created_at: datetime
    size_bytes: int
    example_count: int


@dataclass(frozen=True, slots=True)
class PlanningJob:
    """A job the planner looks at: the night's job of a tenant, or the job that trained a
    tenant's newest version (then without hyperparameters: they are read for the tenants
    planned only, see :func:`last_hyperparameters`)."""

    id: uuid.UUID
    created_at: datetime
    dataset_ids: list[str]
    validation_dataset_id: uuid.UUID | None
    hyperparameters: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class PlanningVersion:
    """A tenant's newest prefix version and the job that trained it (None: unknown)."""

    version: int
    created_at: datetime
    job: PlanningJob | None


@dataclass
class PlanningBatch:
    """What the planner needs to know about a page of tenants, read in four queries."""

    datasets: dict[uuid.UUID, list[PlanningDataset]]  # oldest first
    tonight: dict[uuid.UUID, PlanningJob]  # the night's job of the tenant, if any
    busy: set[uuid.UUID]  # tenants with a queued or running job
    newest: dict[uuid.UUID, PlanningVersion]


def tenant_page(*, session: Session, after: uuid.UUID | None, limit: int) -> list[PlanningTenant]:
    """Up to ``limit`` tenants in id order, those after the id ``after``: the planner's
    pages (keyset pagination on the primary key)."""
    stmt = sa.select(
        col(Tenant.id), col(Tenant.name), col(Tenant.status), col(Tenant.created_at)
    ).order_by(col(Tenant.id))
    if after is not None:
        stmt = stmt.where(col(Tenant.id) > after)
    return [PlanningTenant(*row) for row in _rows(session, stmt.limit(limit))]


def _rows(session: Session, stmt: sa.Executable) -> list[Any]:
    """The rows of a read, executed by Core: plain rows, without the ORM's per-row work
    (which costs more than the queries themselves at 100,000 tenants)."""
    return list(session.connection().execute(stmt).all())


def planning_batch(
    *, session: Session, page: Sequence[PlanningTenant], run_date: date
) -> PlanningBatch:
    """The datasets, tonight's jobs, busy flags and newest versions of a page of tenants
    (from :func:`tenant_page`): four queries, each one range scan of an index that starts
    with the tenant id (the page is a range of tenant ids)."""
    batch = PlanningBatch(datasets={}, tonight={}, busy=set(), newest={})
    if not page:
        return batch
    first, last = page[0].id, page[-1].id

    def in_page(column: Any) -> sa.ColumnElement[bool]:
        return sa.and_(column >= first, column <= last)

    datasets = (
        sa.select(
            col(Dataset.tenant_id),
            col(Dataset.id),
            col(Dataset.created_at),
            col(Dataset.size_bytes),
            col(Dataset.example_count),
        )
        .where(in_page(col(Dataset.tenant_id)))
        .order_by(col(Dataset.tenant_id), col(Dataset.created_at), col(Dataset.id))
    )
    for tenant_id, dataset_id, created_at, size, examples in _rows(session, datasets):
        entry = PlanningDataset(dataset_id, created_at, size, examples)
        batch.datasets.setdefault(tenant_id, []).append(entry)

    tonight = sa.select(
        col(TrainingJob.tenant_id),
        col(TrainingJob.id),
        col(TrainingJob.created_at),
        col(TrainingJob.dataset_ids),
        col(TrainingJob.validation_dataset_id),
        col(TrainingJob.hyperparameters),
    ).where(col(TrainingJob.nightly_run_date) == run_date, in_page(col(TrainingJob.tenant_id)))
    for tenant_id, job_id, created_at, dataset_ids, validation_id, params in _rows(
        session, tonight
    ):
        batch.tonight[tenant_id] = PlanningJob(
            job_id, created_at, list(dataset_ids), validation_id, dict(params or {})
        )

    busy = (
        sa.select(col(TrainingJob.tenant_id))
        .where(
            in_page(col(TrainingJob.tenant_id)),
            col(TrainingJob.state).not_in(list(TERMINAL_JOB_STATES)),
        )
        .distinct()
    )
    batch.busy = {tenant_id for (tenant_id,) in _rows(session, busy)}

    newest_version = (
        sa.select(
            col(PrefixVersion.tenant_id).label("tenant_id"),
            func.max(col(PrefixVersion.version)).label("version"),
        )
        .where(in_page(col(PrefixVersion.tenant_id)))
        .group_by(col(PrefixVersion.tenant_id))
        .subquery()
    )
    newest = (
        sa.select(
            col(PrefixVersion.tenant_id),
            col(PrefixVersion.version),
            col(PrefixVersion.created_at),
            col(TrainingJob.id),
            col(TrainingJob.created_at),
            col(TrainingJob.dataset_ids),
            col(TrainingJob.validation_dataset_id),
        )
        .join(
            newest_version,
            (col(PrefixVersion.tenant_id) == newest_version.c.tenant_id)
            & (col(PrefixVersion.version) == newest_version.c.version),
        )
        .outerjoin(TrainingJob, col(TrainingJob.id) == col(PrefixVersion.job_id))
    )
    for tenant_id, version, created_at, job_id, job_at, dataset_ids, validation_id in _rows(
        session, newest
    ):
        trained = (
            None
            if job_id is None
            else PlanningJob(job_id, job_at, list(dataset_ids), validation_id, None)
        )
        batch.newest[tenant_id] = PlanningVersion(version, created_at, trained)
    return batch


def last_hyperparameters(
    *, session: Session, tenants: dict[uuid.UUID, uuid.UUID | None]
) -> dict[uuid.UUID, dict[str, Any]]:
    """The hyperparameters each tenant was last trained with: those of the job that trained
    its active version, else those of ``tenants[tenant]``, the job of its newest version.
    Tenants with neither are left out. One query, two when a tenant has no active version
    with a job."""
    if not tenants:
        return {}
    active = (
        sa.select(col(PrefixVersion.tenant_id), col(TrainingJob.hyperparameters))
        .join(TrainingJob, col(TrainingJob.id) == col(PrefixVersion.job_id))
        .where(
            col(PrefixVersion.active).is_(True),
            id_in(session, col(PrefixVersion.tenant_id), list(tenants)),
        )
    )
    found = {tenant_id: dict(params or {}) for tenant_id, params in _rows(session, active)}
    fallback = {job: t for t, job in tenants.items() if t not in found and job is not None}
    if fallback:
        newest = sa.select(col(TrainingJob.id), col(TrainingJob.hyperparameters)).where(
            id_in(session, col(TrainingJob.id), list(fallback))
        )
        for job_id, params in _rows(session, newest):
            found[fallback[job_id]] = dict(params or {})
    return found


# --- enqueueing a batch of nightly jobs ------------------------------------------------------


@dataclass(frozen=True)
class NightlyJobRequest:
    tenant_id: uuid.UUID
    dataset_ids: list[uuid.UUID]
    hyperparameters: dict[str, Any]


@dataclass(frozen=True)
class NightlyJobResult:
    """One request's outcome: its job (``created``: by this call), or why there is none."""

    tenant_id: uuid.UUID
    job_id: uuid.UUID | None = None
    created: bool = False
    error: str | None = None


def enqueue_nightly_jobs(
    *,
    session: Session,
    run_date: date,
    requests: Sequence[NightlyJobRequest],
    max_attempts: int = 3,
    max_steps: int | None = None,
    now: datetime | None = None,
) -> list[NightlyJobResult]:
    """Queue one ``batch`` job per request for the night ``run_date`` (key
    ``nightly-<date>``, ``nightly_run_date`` set): what :func:`~common.db.crud.jobs.
    enqueue_job` does for one job, for a batch of tenants in one transaction and five
    statements (one INSERT executed with every row). A tenant that already holds the night's key keeps
    its job (``created=False``); a request that cannot be queued — its tenant is gone or
    being deleted, a dataset is gone, too many datasets, more optimizer steps than
    ``max_steps``, the key held by the tenant's own job — gets an ``error`` and no job.
    Results come in the order of ``requests``, one per tenant (a tenant may appear once).
    Raises ``IntegrityError`` (having rolled back) when a tenant row went away during the
    call; the caller can then enqueue the batch one job at a time."""
    at = now or utcnow()
    key = nightly_idempotency_key(run_date)
    results = {r.tenant_id: NightlyJobResult(r.tenant_id) for r in requests}
    if len(results) != len(requests):
        raise ValueError("enqueue_nightly_jobs: a tenant appears twice in one batch")
    if not results:
        return []
    # What every job of the batch shares, validated once (a bad max_attempts is the
    # caller's error: ValidationError; the dataset id is a placeholder); per job only what
    # differs is checked, in _nightly_job_row.
    TrainingJobCreate(
        dataset_ids=[uuid.uuid4()],
        priority=JobPriority.batch,
        idempotency_key=key,
        max_attempts=max_attempts,
        nightly_run_date=run_date,
    )
    ids = list(results)
    try:
        active_tenants = sa.select(col(Tenant.id)).where(
            id_in(session, col(Tenant.id), ids), col(Tenant.status) == TenantStatus.active
        )
        active = {tenant_id for (tenant_id,) in _rows(session, active_tenants)}
        their_datasets = sa.select(
            col(Dataset.id),
            col(Dataset.tenant_id),
            col(Dataset.size_bytes),
            col(Dataset.example_count),
        ).where(id_in(session, col(Dataset.tenant_id), ids))
        found = {row[0]: row for row in _rows(session, their_datasets)}
        last_starts = tenant_last_starts(
            session=session, tenant_ids=[i for i in ids if i in active]
        )
        rows: list[dict[str, Any]] = []
        new_ids: dict[uuid.UUID, uuid.UUID] = {}
        for request in requests:
            tenant_id = request.tenant_id
            if tenant_id not in active:
                results[tenant_id] = NightlyJobResult(
                    tenant_id, error=f"tenant {tenant_id} is not active (being deleted or gone)"
                )
                continue
            # Created a microsecond apart, in the order asked: the queue takes the jobs of
            # tenants that tie otherwise (never trained) in the planner's order.
            row = _nightly_job_row(
                request,
                found,
                key=key,
                run_date=run_date,
                max_attempts=max_attempts,
                max_steps=max_steps,
                last_start=last_starts[tenant_id],
                created_at=at + timedelta(microseconds=len(rows)),
            )
            if isinstance(row, str):
                results[tenant_id] = NightlyJobResult(tenant_id, error=row)
                continue
            rows.append(row)
            new_ids[tenant_id] = row["id"]
        if rows:
            session.connection().execute(_insert_ignoring_conflicts(session), rows)
            held = sa.select(
                col(TrainingJob.tenant_id), col(TrainingJob.id), col(TrainingJob.nightly_run_date)
            ).where(
                id_in(session, col(TrainingJob.tenant_id), list(new_ids)),
                col(TrainingJob.idempotency_key) == key,
            )
            for tenant_id, job_id, night in _rows(session, held):
                if night != run_date:
                    # A job of the tenant's own took the key before the key space was
                    # reserved (migration 0005): it is not tonight's nightly job.
                    taken = f"the tenant's own job {job_id} holds {key!r}"
                    results[tenant_id] = NightlyJobResult(tenant_id, error=taken)
                else:
                    created = job_id == new_ids[tenant_id]
                    results[tenant_id] = NightlyJobResult(tenant_id, job_id, created)
    except BaseException:
        session.rollback()
        raise
    commit(session)
    return [results[r.tenant_id] for r in requests]


def _nightly_job_row(
    request: NightlyJobRequest,
    datasets: dict[uuid.UUID, Any],
    *,
    key: str,
    run_date: date,
    max_attempts: int,
    max_steps: int | None,
    last_start: datetime,
    created_at: datetime,
) -> dict[str, Any] | str:
    """The columns of the request's job, or why it cannot be queued (as ``enqueue_job``
    would have refused it)."""
    tenant_id = request.tenant_id
    dataset_ids = list(dict.fromkeys(request.dataset_ids))
    missing = [str(d) for d in dataset_ids if d not in datasets or datasets[d][1] != tenant_id]
    if missing:
        return f"dataset(s) not found: {', '.join(missing)}"
    if not dataset_ids:
        return "no datasets"
    if len(dataset_ids) > MAX_JOB_DATASETS:
        return f"{len(dataset_ids)} datasets: a job reads at most {MAX_JOB_DATASETS}"
    examples = sum(int(datasets[d][3]) for d in dataset_ids)
    try:
        check_job_steps(examples, request.hyperparameters, max_steps)
    except InvalidInputError as error:
        return str(error)
    size = sum(int(datasets[d][2]) for d in dataset_ids)
    return {
        "id": uuid.uuid4(),
        "tenant_id": tenant_id,
        "priority": JobPriority.batch,
        "hyperparameters": request.hyperparameters,
        "max_attempts": max_attempts,
        "dataset_ids": [str(d) for d in dataset_ids],
        "idempotency_key": key,
        "state": JobState.queued,
        "attempts": 0,
        "created_at": created_at,
        "updated_at": created_at,
        "nightly_run_date": run_date,
        "estimated_tokens": estimate_job_tokens(size, request.hyperparameters),
        "tenant_last_started_at": last_start,
    }


def _insert_ignoring_conflicts(session: Session) -> Any:
    """The INSERT of a job row, executed with every row of a batch at once (executemany: one
    statement, its rows sent together); a row whose (tenant, key) exists already is left out
    (a concurrent pass of the planner queued it first). Rows as parameters, not a multi-row
    VALUES: building and parsing a statement of 14,000 parameters costs seconds."""
    conflict = ["tenant_id", "idempotency_key"]
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(TrainingJob).on_conflict_do_nothing(index_elements=conflict)
    return sqlite.insert(TrainingJob).on_conflict_do_nothing(index_elements=conflict)
