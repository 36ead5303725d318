"""Training jobs: submit, list, follow, cancel.

A job is ``queued → running → succeeded | failed | cancelled``; the scheduler (``workers/``)
claims it, a trainer writes progress events and, on success, a new prefix version that
becomes the tenant's active one.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Query, Response

from common.db import crud
from common.db.errors import NotFoundError, QuotaExceededError
from common.db.models import JobEventPublic, JobState, TrainingJob, TrainingJobCreate
from common.errors import InvalidInputError
from common.hyperparameters import Hyperparameters
from common.prefix_init import TEXT_INIT
from common.training_config import TrainingConfig
from services.api.context import ApiContext
from services.api.deps import ContextDep, CurrentTenant, SessionDep
from services.api.errors import ApiError
from services.api.schemas import JobOut, JobSubmit, Page

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such job (or not the caller's)"}
}


def _invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_hyperparameters", f"hyperparameters: {message}")


def checked_hyperparameters(params: Hyperparameters, context: ApiContext) -> dict[str, Any]:
    """The hyperparameters as stored with the job, after the training code's own range
    checks (``TrainingConfig.validate``) and the API's limits."""
    values = params.model_dump()
    config = TrainingConfig(
        **{k: v for k, v in values.items() if k in TrainingConfig.__dataclass_fields__}
    )
    try:
        config.validate()
    except InvalidInputError as error:
        raise _invalid(str(error)) from None
    checker = context.example_checker()
    longest = checker.max_prefix_length
    if params.init == "random":
        if params.prefix_length > longest:
            raise _invalid(
                f"prefix_length {params.prefix_length} is more than the longest prefix "
                f"allowed, {longest} (max_prefix_length, at most half the model's context)"
            )
    elif params.init.startswith(TEXT_INIT):
        tokens = checker.text_tokens(params.init.removeprefix(TEXT_INIT))
        if tokens == 0:
            raise _invalid(f"init {params.init!r} has no tokens")
        if tokens > longest:
            raise _invalid(
                f"init text has {tokens} tokens, more than the longest prefix allowed, "
                f"{longest} (max_prefix_length)"
            )
    else:
        raise _invalid(f"init must be 'random' or 'text:WORDS', got {params.init!r}")
    return values


def checked_base(values: dict[str, Any], session: Any, context: ApiContext) -> dict[str, Any]:
    """Resolve ``base_prefix`` (an id or ``default``) to the base prefix's id, check it
    exists (404 naming it), fits the served model, and that the stacked length fits."""
    ref, mode = values.get("base_prefix"), values.get("base_mode")
    if ref is None:
        if mode is not None:
            raise _invalid("base_mode needs base_prefix (a base prefix id or 'default')")
        return values
    try:
        base = crud.resolve_base_prefix(session=session, ref=ref)
    except InvalidInputError as error:
        raise _invalid(str(error)) from None
    if base.base_model_fingerprint != context.model_fingerprint:
        raise _invalid(f"base prefix {base.id} was trained for another base model")
    mode = mode or crud.WARM_START
    if mode == crud.WARM_START and values["init"] != "random":
        raise _invalid(
            "a warm start begins at the base prefix: init must be 'random' (the default) "
            f"with base_mode 'warm_start', got {values['init']!r}"
        )
    checker = context.example_checker()
    if mode == crud.STACK:
        own = values["prefix_length"]
        if values["init"].startswith(TEXT_INIT):
            own = checker.text_tokens(values["init"].removeprefix(TEXT_INIT))
        if base.prefix_length + own > checker.max_prefix_length:
            raise _invalid(
                f"stacked on base prefix {base.id} ({base.prefix_length} tokens), a "
                f"{own}-token prefix makes {base.prefix_length + own}, more than the longest "
                f"prefix allowed, {checker.max_prefix_length} (max_prefix_length)"
            )
    return values | {"base_prefix": str(base.id), "base_mode": mode}


def job_out(session: Any, job: TrainingJob) -> JobOut:
    return job_outs(session, [job])[0]


def job_outs(session: Any, jobs: list[TrainingJob]) -> list[JobOut]:
    ids = [job.id for job in jobs]
    events = crud.latest_job_events(session=session, job_ids=ids)
    prefixes = crud.prefix_ids_of_jobs(session=session, job_ids=ids)
    return [JobOut.of(j, event=events.get(j.id), prefix_id=prefixes.get(j.id)) for j in jobs]


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    responses={
        200: {"model": JobOut, "description": "idempotency key already used: that job"},
        404: {"description": "a dataset is not the caller's, or no such base prefix"},
        422: {"description": "invalid hyperparameters, or more steps than job_max_steps"},
        429: {
            "description": "tenant_unfinished_jobs_quota or tenant_training_tokens_per_day "
            "reached (then Retry-After says when it resets)"
        },
    },
)
def submit_job(
    body: JobSubmit,
    tenant: CurrentTenant,
    session: SessionDep,
    context: ContextDep,
    response: Response,
) -> Any:
    """Queue a training job on the caller's datasets: **201** with the new job, or **200**
    with the existing job when this tenant already used `idempotency_key` (the first
    submission wins; a replay's body is not compared)."""
    hyperparameters = checked_base(
        checked_hyperparameters(body.hyperparameters, context), session, context
    )
    if body.validation_dataset_id is not None:
        if body.hyperparameters.validation_split:  # None (automatic) or 0: none asked for
            raise ApiError(
                422,
                "invalid_request",
                "give either validation_dataset_id or hyperparameters.validation_split, not both",
            )
        if body.validation_dataset_id in body.dataset_ids:
            raise ApiError(
                422,
                "invalid_request",
                "validation_dataset_id must not also be one of dataset_ids",
            )
    try:
        job, created = crud.enqueue_job(
            session=session,
            tenant_id=tenant.id,
            job_in=TrainingJobCreate(
                dataset_ids=body.dataset_ids,
                validation_dataset_id=body.validation_dataset_id,
                hyperparameters=hyperparameters,
                idempotency_key=body.idempotency_key,
            ),
            max_unfinished_jobs=context.settings.tenant_unfinished_jobs_quota,
            max_steps=context.settings.job_max_steps,
            max_tokens_per_day=context.settings.tenant_training_tokens_per_day,
        )
    except QuotaExceededError as error:
        headers = None if error.retry_after is None else {"Retry-After": str(error.retry_after)}
        raise ApiError(429, "quota_exceeded", str(error), headers=headers) from None
    if not created:
        response.status_code = 200
    return job_out(session, job)


@router.get("", response_model=Page[JobOut])
def list_jobs(
    tenant: CurrentTenant,
    session: SessionDep,
    status: JobState | None = None,
    offset: int = Query(default=0, ge=0, le=1_000_000),
    limit: int = Query(default=100, ge=1, le=1000),
) -> Any:
    """The caller's jobs, newest first, optionally of one status."""
    jobs = crud.list_jobs(
        session=session, tenant_id=tenant.id, state=status, offset=offset, limit=limit
    )
    return Page[JobOut](data=job_outs(session, jobs))


def _job(session: Any, tenant_id: uuid.UUID, job_id: uuid.UUID) -> TrainingJob:
    job = crud.get_job(session=session, job_id=job_id, tenant_id=tenant_id)
    if job is None:
        raise NotFoundError(f"job {job_id} not found")
    return job


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND)
def get_job(job_id: uuid.UUID, tenant: CurrentTenant, session: SessionDep) -> Any:
    """Status, attempts, latest progress, the prefix it produced, and the error if it failed."""
    return job_out(session, _job(session, tenant.id, job_id))


@router.get("/{job_id}/events", response_model=Page[JobEventPublic], responses=NOT_FOUND)
def list_job_events(
    job_id: uuid.UUID,
    tenant: CurrentTenant,
    session: SessionDep,
    after_id: int | None = Query(
        default=None, ge=0, le=2**62, description="Only events newer than this id (polling)."
    ),
    limit: int = Query(default=1000, ge=1, le=10_000),
) -> Any:
    """Progress events (step, total steps, loss, validation loss, tokens/s), oldest first."""
    _job(session, tenant.id, job_id)
    events = crud.list_job_events(session=session, job_id=job_id, after_id=after_id, limit=limit)
    return Page[JobEventPublic](data=[JobEventPublic.model_validate(e) for e in events])


@router.post("/{job_id}/cancel", response_model=JobOut, responses=NOT_FOUND)
def cancel_job(job_id: uuid.UUID, tenant: CurrentTenant, session: SessionDep) -> Any:
    """Cancel a queued or running job (a running trainer stops at its next heartbeat). A
    finished job is returned unchanged."""
    job = crud.cancel_job(session=session, job_id=job_id, tenant_id=tenant.id)
    return job_out(session, job)
