"""Training jobs as rows: enqueue (idempotent per key), read, cancel, and their progress events."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, time, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from common.db.crud.queue import tenant_last_starts
from common.db.crud.tenants import require_active_tenant
from common.db.crud.transaction import commit
from common.db.errors import (
    NotFoundError,
    QuotaExceededError,
)
from common.db.models import (
    TERMINAL_JOB_STATES,
    Dataset,
    JobEvent,
    JobEventCreate,
    JobState,
    TrainingJob,
    TrainingJobCreate,
)
from common.db.types import utcnow
from common.errors import InvalidInputError
from common.training_budget import AUTOMATIC_EPOCHS, DEFAULT_BATCH_SIZE, plan_budget

# Idempotency keys of this prefix belong to the nightly planner (``nightly-<date>``, one
# nightly job per tenant and night); a tenant's own job may not take one.
RESERVED_IDEMPOTENCY_KEY_PREFIX = "nightly-"


def is_reserved_idempotency_key(key: str) -> bool:
    return key.lower().startswith(RESERVED_IDEMPOTENCY_KEY_PREFIX)


BYTES_PER_TOKEN = 4  # a rough average of English text in a BPE vocabulary


def estimate_job_tokens(size_bytes: int, hyperparameters: dict[str, Any]) -> int:
    """Training tokens of a job: its data's bytes / ``BYTES_PER_TOKEN``, less the held-out
    part, times the epochs."""
    # Epochs unset: the automatic budget, at most AUTOMATIC_EPOCHS passes over the data.
    epochs = int(hyperparameters.get("epochs") or AUTOMATIC_EPOCHS)
    held_out = float(hyperparameters.get("validation_split") or 0.0)
    return round(size_bytes * (1.0 - held_out) / BYTES_PER_TOKEN) * epochs


def estimate_job_steps(examples: int, hyperparameters: dict[str, Any]) -> int:
    """Optimizer steps of a job: batches per epoch (after the held-out part) x epochs."""
    epochs = hyperparameters.get("epochs")
    batch = int(hyperparameters.get("batch_size") or DEFAULT_BATCH_SIZE)
    held_out = float(hyperparameters.get("validation_split") or 0.0)
    train = max(1, examples - round(examples * held_out))
    budget = plan_budget(
        train, batch, epochs=int(epochs) if epochs else None, has_validation=held_out > 0
    )
    return budget.total_steps


def check_job_steps(examples: int, hyperparameters: dict[str, Any], max_steps: int | None) -> None:
    """:class:`InvalidInputError` when the job needs more optimizer steps than ``max_steps``
    (None: no limit)."""
    if max_steps is None:
        return
    steps = estimate_job_steps(examples, hyperparameters)
    if steps > max_steps:
        raise InvalidInputError(
            f"hyperparameters: the job needs about {steps} optimizer steps (epochs x "
            f"batches of {examples} example(s)), more than job_max_steps "
            f"({max_steps}); use fewer epochs, a larger batch_size or less data"
        )


def next_utc_midnight(now: datetime) -> datetime:
    return datetime.combine(now.date() + timedelta(days=1), time(), tzinfo=UTC)


def tenant_tokens_today(*, session: Session, tenant_id: uuid.UUID, now: datetime) -> int:
    """Estimated training tokens of the jobs the tenant submitted this UTC day (nightly
    jobs and jobs cancelled before they started do not count)."""
    midnight = datetime.combine(now.date(), time(), tzinfo=UTC)
    stmt = select(func.coalesce(func.sum(TrainingJob.estimated_tokens), 0)).where(
        col(TrainingJob.tenant_id) == tenant_id,
        col(TrainingJob.created_at) >= midnight,
        col(TrainingJob.nightly_run_date).is_(None),
        sa.not_(
            sa.and_(
                col(TrainingJob.state) == JobState.cancelled,
                col(TrainingJob.started_at).is_(None),
            )
        ),
    )
    return int(session.exec(stmt).one())


def _job_by_idempotency_key(session: Session, tenant_id: uuid.UUID, key: str) -> TrainingJob | None:
    stmt = select(TrainingJob).where(
        col(TrainingJob.tenant_id) == tenant_id, col(TrainingJob.idempotency_key) == key
    )
    return session.exec(stmt).first()


def enqueue_job(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    job_in: TrainingJobCreate,
    max_unfinished_jobs: int | None = None,
    max_steps: int | None = None,
    max_tokens_per_day: int | None = None,
    now: datetime | None = None,
) -> tuple[TrainingJob, bool]:
    """Queue a training job. Returns ``(job, created)``: a resubmission with an idempotency
    key the tenant already used returns the existing job and ``created=False``. Every
    dataset (and the validation dataset) must be the tenant's, else :class:`NotFoundError`.
    With ``max_unfinished_jobs``, a tenant that already has that many queued or running jobs
    gets :class:`QuotaExceededError` (checked under the tenant's row lock).
    An idempotency key starting with ``nightly-`` is reserved for nightly jobs
    (``nightly_run_date`` set): :class:`InvalidInputError` for any other job.

    The job's training tokens are estimated from its datasets and stored with it. With
    ``max_steps``, a job needing more optimizer steps is refused (:class:`InvalidInputError`);
    with ``max_tokens_per_day``, a tenant whose jobs of this UTC day would together exceed
    it gets :class:`QuotaExceededError` with the seconds until midnight UTC (under the
    tenant's row lock)."""
    at = now or utcnow()
    if (
        job_in.idempotency_key is not None
        and job_in.nightly_run_date is None
        and is_reserved_idempotency_key(job_in.idempotency_key)
    ):
        raise InvalidInputError(
            f"idempotency_key: keys starting with {RESERVED_IDEMPOTENCY_KEY_PREFIX!r} are "
            "reserved for nightly retraining jobs; choose another key"
        )
    if job_in.idempotency_key is not None:
        existing = _job_by_idempotency_key(session, tenant_id, job_in.idempotency_key)
        if existing is not None:
            return existing, False
    try:
        locked = max_unfinished_jobs is not None or max_tokens_per_day is not None
        require_active_tenant(session, tenant_id, lock=locked)
        dataset_ids = list(dict.fromkeys(job_in.dataset_ids))
        wanted = [*dataset_ids]
        if job_in.validation_dataset_id is not None:
            wanted.append(job_in.validation_dataset_id)
        rows = session.exec(
            select(Dataset.id, Dataset.size_bytes, Dataset.example_count).where(
                col(Dataset.tenant_id) == tenant_id, col(Dataset.id).in_(wanted)
            )
        ).all()
        found = {row[0]: row for row in rows}
        missing = [str(d) for d in dict.fromkeys(wanted) if d not in found]
        if missing:
            raise NotFoundError(f"dataset(s) not found: {', '.join(missing)}")
        size = sum(int(found[d][1]) for d in dataset_ids)
        examples = sum(int(found[d][2]) for d in dataset_ids)
        params = dict(job_in.hyperparameters or {})
        tokens = estimate_job_tokens(size, params)
        check_job_steps(examples, params, max_steps)
        if max_tokens_per_day is not None:
            used = tenant_tokens_today(session=session, tenant_id=tenant_id, now=at)
            if used + tokens > max_tokens_per_day:
                resets = next_utc_midnight(at)
                wait = max(1, math.ceil((resets - at).total_seconds()))
                raise QuotaExceededError(
                    f"training token limit reached: {used} token(s) submitted today + {tokens} "
                    f"for this job > tenant_training_tokens_per_day {max_tokens_per_day}; "
                    f"it resets at {resets.isoformat().replace('+00:00', 'Z')} (in {wait} s)",
                    limit="tenant_training_tokens_per_day",
                    retry_after=wait,
                )
        if max_unfinished_jobs is not None:
            unfinished = count_unfinished_jobs(session=session, tenant_id=tenant_id)
            if unfinished >= max_unfinished_jobs:
                raise QuotaExceededError(
                    f"job quota exceeded: {unfinished} queued or running job(s), "
                    f"tenant_unfinished_jobs_quota is {max_unfinished_jobs}; wait for one to "
                    "finish or cancel one",
                    limit="tenant_unfinished_jobs_quota",
                )
        last_start = tenant_last_starts(session=session, tenant_ids=[tenant_id])[tenant_id]
    except BaseException:
        session.rollback()
        raise
    job = TrainingJob.model_validate(
        job_in,
        update={
            "tenant_id": tenant_id,
            "dataset_ids": [str(d) for d in dataset_ids],
            "estimated_tokens": tokens,
            "tenant_last_started_at": last_start,
        },
    )
    session.add(job)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent submission with the same idempotency key won the race.
        session.rollback()
        if job_in.idempotency_key is not None:
            existing = _job_by_idempotency_key(session, tenant_id, job_in.idempotency_key)
            if existing is not None:
                return existing, False
        raise
    session.refresh(job)
    return job, True


def count_unfinished_jobs(*, session: Session, tenant_id: uuid.UUID) -> int:
    """The tenant's queued and running jobs."""
    stmt = select(func.count()).where(
        col(TrainingJob.tenant_id) == tenant_id,
        col(TrainingJob.state).not_in(list(TERMINAL_JOB_STATES)),
    )
    return int(session.exec(stmt).one())


def count_jobs_by_state(*, session: Session) -> dict[JobState, int]:
    """Jobs of every tenant per state (every state present, zeros included)."""
    stmt = select(TrainingJob.state, func.count()).group_by(col(TrainingJob.state))
    counts = {state: 0 for state in JobState}
    for state, count in session.exec(stmt).all():
        counts[JobState(state)] = int(count)
    return counts


def get_job(
    *, session: Session, job_id: uuid.UUID, tenant_id: uuid.UUID | None = None
) -> TrainingJob | None:
    """A job by id; with ``tenant_id``, only if it belongs to that tenant."""
    job = session.get(TrainingJob, job_id, populate_existing=True)
    if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
        return None
    return job


def list_jobs(
    *,
    session: Session,
    tenant_id: uuid.UUID,
    state: JobState | None = None,
    offset: int = 0,
    limit: int = 100,
) -> list[TrainingJob]:
    stmt = select(TrainingJob).where(col(TrainingJob.tenant_id) == tenant_id)
    if state is not None:
        stmt = stmt.where(col(TrainingJob.state) == state)
    stmt = stmt.order_by(col(TrainingJob.created_at).desc(), col(TrainingJob.id))
    return list(session.exec(stmt.offset(offset).limit(limit)).all())


def cancel_job(
    *, session: Session, job_id: uuid.UUID, tenant_id: uuid.UUID | None = None
) -> TrainingJob:
    """Cancel a queued or running job (a running job's owner learns it from its next
    heartbeat, which returns False). A finished job is returned unchanged."""
    now = utcnow()
    stmt = select(TrainingJob).where(col(TrainingJob.id) == job_id).with_for_update()
    job = session.exec(stmt.execution_options(populate_existing=True)).first()
    if job is None or (tenant_id is not None and job.tenant_id != tenant_id):
        session.rollback()
        raise NotFoundError(f"job {job_id} not found")
    if job.state not in TERMINAL_JOB_STATES:
        job.state = JobState.cancelled
        job.lease_owner = None
        job.lease_expires_at = None
        job.finished_at = now
        job.updated_at = now
        session.add(job)
        commit(session)
        session.refresh(job)
    else:
        session.rollback()
    return job


def list_all_jobs(
    *,
    session: Session,
    tenant_id: uuid.UUID | None = None,
    state: JobState | None = None,
    offset: int = 0,
    limit: int = 100,
) -> list[TrainingJob]:
    """Jobs of every tenant, newest first (operators only: ``prefixd jobs list``; tenant
    requests go through :func:`list_jobs`, which requires the tenant)."""
    stmt = select(TrainingJob)
    if tenant_id is not None:
        stmt = stmt.where(col(TrainingJob.tenant_id) == tenant_id)
    if state is not None:
        stmt = stmt.where(col(TrainingJob.state) == state)
    stmt = stmt.order_by(col(TrainingJob.created_at).desc(), col(TrainingJob.id))
    return list(session.exec(stmt.offset(offset).limit(limit)).all())


def record_job_event(
    *, session: Session, job_id: uuid.UUID, event_in: JobEventCreate, now: datetime | None = None
) -> JobEvent:
    """Append a progress row (step, total steps, loss, validation loss, tokens/s)."""
    event = JobEvent.model_validate(
        event_in, update={"job_id": job_id, "created_at": now or utcnow()}
    )
    session.add(event)
    commit(session)
    session.refresh(event)
    return event


def list_job_events(
    *, session: Session, job_id: uuid.UUID, after_id: int | None = None, limit: int = 1000
) -> list[JobEvent]:
    """Progress rows of a job in order; ``after_id`` returns only newer rows (polling)."""
    stmt = select(JobEvent).where(col(JobEvent.job_id) == job_id)
    if after_id is not None:
        stmt = stmt.where(col(JobEvent.id) > after_id)
    return list(session.exec(stmt.order_by(col(JobEvent.id)).limit(limit)).all())


def recent_job_events(*, session: Session, job_id: uuid.UUID, limit: int = 20) -> list[JobEvent]:
    """The last ``limit`` progress rows of a job, oldest first (``prefixd jobs show``)."""
    stmt = select(JobEvent).where(col(JobEvent.job_id) == job_id)
    newest = session.exec(stmt.order_by(col(JobEvent.id).desc()).limit(limit)).all()
    return list(newest)[::-1]


def latest_job_events(
    *, session: Session, job_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, JobEvent]:
    """The newest progress row of each of these jobs (jobs without one are left out)."""
    if not job_ids:
        return {}
    newest = (
        select(func.max(JobEvent.id))
        .where(col(JobEvent.job_id).in_(list(job_ids)))
        .group_by(col(JobEvent.job_id))
    )
    rows = session.exec(select(JobEvent).where(col(JobEvent.id).in_(newest))).all()
    return {row.job_id: row for row in rows}
