"""Nightly retraining runs (``workers/nightly.py`` plans them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from common.db.crud.transaction import commit
from common.db.errors import (
    ConflictError,
    NotFoundError,
)
from common.db.models import (
    TERMINAL_JOB_STATES,
    JobState,
    NightlyRun,
    NightlyRunPublic,
    TrainingJob,
)
from common.db.types import utcnow


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
