"""Base prefixes and their training data: the operator's, never a tenant's.

An operator dataset (``operator_datasets``) and a base prefix (``base_prefixes``) have no
``tenant_id``; an operator job is a ``training_jobs`` row with ``tenant_id`` NULL that names
the base prefix it trains (``base_prefix_name``) and reads operator datasets only. Tenant
lookups filter by tenant id, so none of these is ever visible to, or trainable by, a
tenant, and tenant erasure (which deletes rows by ``tenant_id``) never touches them.

A tenant's prefix version records the base it was trained from (``base_prefix_id``,
``base_mode``). Deleting a base prefix is refused while a tenant's *active* version is
stacked on it, or a queued or running job will use it: its row is locked ``FOR UPDATE``
here and ``FOR SHARE`` by :func:`common.db.crud.prefixes.publish_prefix`, so a stacked
version cannot be published on a base being deleted.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from common.blobstore.keys import OPERATOR_ROOT
from common.db.crud.transaction import commit
from common.db.errors import ConflictError, LeaseLostError, NotFoundError
from common.db.models import (
    TERMINAL_JOB_STATES,
    BasePrefix,
    BasePrefixCreate,
    JobState,
    OperatorDataset,
    PrefixVersion,
    TrainingJob,
)
from common.db.types import utcnow
from common.errors import InvalidInputError

DEFAULT_BASE = "default"
STACK = "stack"
WARM_START = "warm_start"
BASE_MODES = (WARM_START, STACK)


# --- operator datasets ------------------------------------------------------------------------


def add_operator_dataset(*, session: Session, dataset_in: OperatorDataset) -> OperatorDataset:
    """Record an operator dataset whose blob is already written under ``operator/``."""
    if not dataset_in.object_key.startswith(f"{OPERATOR_ROOT}datasets/"):
        raise InvalidInputError(
            f"operator dataset key {dataset_in.object_key!r} is outside operator/datasets/"
        )
    session.add(dataset_in)
    commit(session)
    session.refresh(dataset_in)
    return dataset_in


def get_operator_dataset(*, session: Session, dataset_id: uuid.UUID) -> OperatorDataset | None:
    return session.get(OperatorDataset, dataset_id, populate_existing=True)


def list_operator_datasets(
    *, session: Session, offset: int = 0, limit: int = 100
) -> list[OperatorDataset]:
    stmt = (
        select(OperatorDataset)
        .order_by(col(OperatorDataset.created_at).desc(), col(OperatorDataset.id))
        .offset(offset)
        .limit(limit)
    )
    return list(session.exec(stmt).all())


def delete_operator_dataset(*, session: Session, dataset_id: uuid.UUID) -> OperatorDataset:
    """Delete the row (the caller then deletes the blob); refused while an unfinished
    operator job reads it."""
    try:
        dataset = session.exec(
            select(OperatorDataset)
            .where(col(OperatorDataset.id) == dataset_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).first()
        if dataset is None:
            raise NotFoundError(f"operator dataset {dataset_id} not found")
        for job in _unfinished_operator_jobs(session):
            if str(dataset_id) in job.dataset_ids or job.validation_dataset_id == dataset_id:
                raise ConflictError(
                    f"operator dataset {dataset_id} is used by job {job.id}, which has not "
                    "finished: cancel the job or wait for it"
                )
        deleted = OperatorDataset.model_validate(dataset.model_dump())
        session.delete(dataset)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return deleted


# --- operator jobs --------------------------------------------------------------------------


def _unfinished_operator_jobs(session: Session) -> list[TrainingJob]:
    stmt = select(TrainingJob).where(
        col(TrainingJob.tenant_id).is_(None),
        col(TrainingJob.state).not_in(list(TERMINAL_JOB_STATES)),
    )
    return list(session.exec(stmt).all())


def enqueue_base_prefix_job(
    *,
    session: Session,
    name: str,
    dataset_ids: list[uuid.UUID],
    validation_dataset_id: uuid.UUID | None,
    hyperparameters: dict[str, Any],
) -> TrainingJob:
    """Queue an operator job training the next version of base prefix ``name`` on these
    operator datasets (each must exist: else :class:`NotFoundError` naming them). It goes
    through the same queue and trainers as tenant jobs."""
    if not name or len(name) > 100:
        raise InvalidInputError("a base prefix name must have 1 to 100 characters")
    if hyperparameters.get("base_prefix") is not None:
        raise InvalidInputError("a base prefix cannot itself be trained from a base prefix")
    ids = list(dict.fromkeys(dataset_ids))
    wanted = [*ids, *([validation_dataset_id] if validation_dataset_id else [])]
    found = set(
        session.exec(select(OperatorDataset.id).where(col(OperatorDataset.id).in_(wanted))).all()
    )
    missing = [str(d) for d in dict.fromkeys(wanted) if d not in found]
    if missing:
        session.rollback()
        raise NotFoundError(f"operator dataset(s) not found: {', '.join(missing)}")
    job = TrainingJob(
        tenant_id=None,
        base_prefix_name=name,
        dataset_ids=[str(d) for d in ids],
        validation_dataset_id=validation_dataset_id,
        hyperparameters=hyperparameters,
    )
    session.add(job)
    commit(session)
    session.refresh(job)
    return job


def get_operator_job(*, session: Session, job_id: uuid.UUID) -> TrainingJob | None:
    job = session.get(TrainingJob, job_id, populate_existing=True)
    return job if job is not None and job.tenant_id is None else None


def list_operator_jobs(*, session: Session, offset: int = 0, limit: int = 100) -> list[TrainingJob]:
    stmt = (
        select(TrainingJob)
        .where(col(TrainingJob.tenant_id).is_(None))
        .order_by(col(TrainingJob.created_at).desc(), col(TrainingJob.id))
        .offset(offset)
        .limit(limit)
    )
    return list(session.exec(stmt).all())


def publish_base_prefix(
    *,
    session: Session,
    job_id: uuid.UUID,
    owner: str,
    base_in: BasePrefixCreate,
    result: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> BasePrefix:
    """Make a trained base prefix visible in one transaction: ``owner`` must still hold the
    operator job's lease; the next version of its name is inserted (not the default: the
    operator marks one); the job succeeds. Call it after the blob is written."""
    at = now or utcnow()
    if not base_in.object_key.startswith(f"{OPERATOR_ROOT}base-prefixes/"):
        raise InvalidInputError(f"base prefix key {base_in.object_key!r} is outside operator/")
    try:
        job = session.exec(
            select(TrainingJob)
            .where(col(TrainingJob.id) == job_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).first()
        if job is None or job.tenant_id is not None:
            raise NotFoundError(f"operator job {job_id} not found")
        if (
            job.state != JobState.running
            or job.lease_owner != owner
            or job.lease_expires_at is None
            or job.lease_expires_at <= at
        ):
            raise LeaseLostError(
                f"job {job_id} is no longer leased to {owner} (state {job.state}); "
                "the base prefix was not published"
            )
        latest = session.exec(
            select(func.max(BasePrefix.version)).where(col(BasePrefix.name) == base_in.name)
        ).one()
        base = BasePrefix.model_validate(
            base_in, update={"version": (latest or 0) + 1, "job_id": job_id, "created_at": at}
        )
        session.add(base)
        job.state = JobState.succeeded
        job.lease_owner = None
        job.lease_expires_at = None
        job.error = None
        job.result = result
        job.finished_at = at
        job.updated_at = at
        session.add(job)
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ConflictError(
            f"a concurrent publish of base prefix {base_in.name!r} won; retry"
        ) from None
    except BaseException:
        session.rollback()
        raise
    session.refresh(base)
    return base


# --- base prefixes --------------------------------------------------------------------------


def get_base_prefix(*, session: Session, base_prefix_id: uuid.UUID) -> BasePrefix | None:
    return session.get(BasePrefix, base_prefix_id, populate_existing=True)


def get_default_base_prefix(*, session: Session) -> BasePrefix | None:
    return session.exec(select(BasePrefix).where(col(BasePrefix.is_default).is_(True))).first()


def list_base_prefixes(*, session: Session, name: str | None = None) -> list[BasePrefix]:
    """Every version, by name then version."""
    stmt = select(BasePrefix)
    if name is not None:
        stmt = stmt.where(col(BasePrefix.name) == name)
    return list(session.exec(stmt.order_by(col(BasePrefix.name), col(BasePrefix.version))).all())


def resolve_base_prefix(*, session: Session, ref: str) -> BasePrefix:
    """``ref`` is a base prefix id or ``"default"``; :class:`NotFoundError` naming it."""
    if ref == DEFAULT_BASE:
        base = get_default_base_prefix(session=session)
        if base is None:
            raise NotFoundError(
                "base prefix 'default' not found: the operator has not marked a default base prefix"
            )
        return base
    try:
        base_id = uuid.UUID(ref)
    except ValueError:
        raise InvalidInputError(
            f"base_prefix must be a base prefix id or 'default', got {ref!r}"
        ) from None
    base = get_base_prefix(session=session, base_prefix_id=base_id)
    if base is None:
        raise NotFoundError(f"base prefix {ref} not found")
    return base


def set_default_base_prefix(
    *, session: Session, base_prefix_id: uuid.UUID | None
) -> BasePrefix | None:
    """Make this version the default (``None``: no default any more)."""
    try:
        target = None
        if base_prefix_id is not None:
            target = session.get(BasePrefix, base_prefix_id, populate_existing=True)
            if target is None:
                raise NotFoundError(f"base prefix {base_prefix_id} not found")
        session.exec(
            sa.update(BasePrefix)
            .where(col(BasePrefix.is_default).is_(True))
            .values(is_default=False)
        )
        if target is not None:
            target.is_default = True
            session.add(target)
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ConflictError("a concurrent change of the default base prefix won; retry") from None
    except BaseException:
        session.rollback()
        raise
    if target is not None:
        session.refresh(target)
    return target


def base_prefix_dependents(
    *, session: Session, base_prefix_ids: list[uuid.UUID]
) -> dict[uuid.UUID, int]:
    """Per base prefix, how many tenants' *active* versions are stacked on it (what
    serving needs it for)."""
    if not base_prefix_ids:
        return {}
    stmt = (
        select(PrefixVersion.base_prefix_id, func.count())
        .where(
            col(PrefixVersion.base_prefix_id).in_(base_prefix_ids),
            col(PrefixVersion.base_mode) == STACK,
            col(PrefixVersion.active).is_(True),
        )
        .group_by(col(PrefixVersion.base_prefix_id))
    )
    return {base_id: int(n) for base_id, n in session.exec(stmt).all() if base_id is not None}


def existing_base_prefix_ids(
    *, session: Session, base_prefix_ids: list[uuid.UUID]
) -> set[uuid.UUID]:
    """Which of these ids are base prefixes that still exist (replicas drop the others)."""
    if not base_prefix_ids:
        return set()
    rows = session.exec(select(BasePrefix.id).where(col(BasePrefix.id).in_(base_prefix_ids)))
    return set(rows.all())


def lock_base_prefix(session: Session, base_prefix_id: uuid.UUID) -> BasePrefix | None:
    """The row, shared-locked until the transaction ends (``FOR SHARE`` on PostgreSQL):
    a publish that depends on the base keeps a concurrent deletion waiting."""
    stmt = select(BasePrefix).where(col(BasePrefix.id) == base_prefix_id).with_for_update(read=True)
    return session.exec(stmt).first()


def delete_base_prefix(*, session: Session, base_prefix_id: uuid.UUID) -> BasePrefix:
    """Delete a base prefix's row and return it (the caller then deletes the blob).
    Refused (:class:`ConflictError`, naming the count) while any tenant's active version is
    stacked on it or a queued or running tenant job will use it; a tenant's inactive
    stacked versions stay, and are refused at activation and generation (409)."""
    try:
        base = session.exec(
            select(BasePrefix)
            .where(col(BasePrefix.id) == base_prefix_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).first()
        if base is None:
            raise NotFoundError(f"base prefix {base_prefix_id} not found")
        active = base_prefix_dependents(session=session, base_prefix_ids=[base_prefix_id]).get(
            base_prefix_id, 0
        )
        if active:
            raise ConflictError(
                f"base prefix {base_prefix_id} is in use: {active} tenant(s) serve a prefix "
                "stacked on it; it can be deleted once none does"
            )
        jobs = session.exec(
            select(TrainingJob.id, TrainingJob.hyperparameters).where(
                col(TrainingJob.tenant_id).is_not(None),
                col(TrainingJob.state).not_in(list(TERMINAL_JOB_STATES)),
            )
        ).all()
        waiting = [j for j, params in jobs if (params or {}).get("base_prefix") == str(base.id)]
        if waiting:
            raise ConflictError(
                f"base prefix {base_prefix_id} is in use: {len(waiting)} queued or running "
                "job(s) train on it; cancel them or wait"
            )
        deleted = BasePrefix.model_validate(base.model_dump())
        session.delete(base)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return deleted
