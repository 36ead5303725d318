"""Operators' base prefixes (admin token only): operator datasets, operator jobs that train
a base prefix through the same queue as tenants' jobs, versions, the default, deletion.

A base prefix is trained on operator datasets only — never on a tenant's data — and its
objects live under ``operator/``, outside every tenant's key prefix (docs/ARCHITECTURE.md,
"Base prefixes"). A tenant key on any of these routes gets 403.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from sqlmodel import Session

from common.blobstore.keys import operator_dataset_key
from common.db import crud
from common.db.errors import NotFoundError
from common.db.models import BasePrefix, JobEventPublic, OperatorDataset, TrainingJob
from common.db.types import storable_text
from services.api.deps import AdminDep, ContextDep, SessionDep
from services.api.errors import ApiError
from services.api.routes.datasets import UPLOAD_BODY
from services.api.routes.jobs import checked_hyperparameters, job_outs
from services.api.schemas import (
    BasePrefixJobOut,
    BasePrefixJobSubmit,
    BasePrefixOut,
    OperatorDatasetOut,
    Page,
)
from services.api.uploads import (
    Spooled,
    body_chunks,
    remove_spooled,
    spool,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/admin", tags=["admin: base prefixes"])

OPERATOR_DATASETS_PATH = "/v1/admin/datasets"
# The operator's share of the upload validation processes, beside the tenants' (their ids).
OPERATOR = "operator"


def _outs(session: Session, jobs: list[TrainingJob]) -> list[BasePrefixJobOut]:
    published = {
        b.job_id: b.id for b in crud.list_base_prefixes(session=session) if b.job_id is not None
    }
    return [
        BasePrefixJobOut(
            **out.model_dump(exclude={"prefix_id"}),
            prefix_id=None,
            name=job.base_prefix_name,
            base_prefix_id=published.get(job.id),
        )
        for job, out in zip(jobs, job_outs(session, jobs), strict=True)
    ]


def _storable_query(field: str, value: str | None) -> None:
    """Query text that reaches PostgreSQL: refused (422) when it could not be stored."""
    if value is None:
        return
    try:
        storable_text(value)
    except ValueError as error:
        raise ApiError(422, "invalid_request", f"{field}: {error}") from None


# --- operator datasets ------------------------------------------------------------------------


@router.post(
    "/datasets",
    status_code=201,
    response_model=OperatorDatasetOut,
    openapi_extra=UPLOAD_BODY,
    responses={413: {}, 415: {}, 422: {"description": "a bad line: its number is named"}},
)
async def upload_operator_dataset(
    request: Request,
    _: AdminDep,
    context: ContextDep,
    name: str | None = Query(default=None, min_length=1, max_length=100),
) -> Any:
    """Upload operator data for base prefixes (JSONL, checked line by line like a tenant's
    upload; `max_dataset_bytes` and `max_dataset_examples` apply, no tenant quota). Stored
    under `operator/datasets/`; no tenant can list, read or train on it."""
    settings = context.settings

    def over_size() -> ApiError:
        return ApiError(
            413,
            "payload_too_large",
            f"the dataset is larger than max_dataset_bytes ({settings.max_dataset_bytes} bytes)",
        )

    _storable_query("name", name)
    spooled: Spooled | None = None
    try:
        spooled = await spool(
            body_chunks(request), max_bytes=settings.max_dataset_bytes, too_large=over_size
        )
        examples = await context.validation.count_examples(
            spooled.path, max_examples=settings.max_dataset_examples, owner=OPERATOR
        )
        dataset = await context.run_blocking(_store, context, spooled, examples, name)
    finally:
        remove_spooled(spooled)
    log.info("operator uploaded dataset %s (%d examples)", dataset.id, examples)
    return OperatorDatasetOut.of(dataset, name=dataset.name)


def _store(context: Any, spooled: Spooled, examples: int, name: str | None) -> OperatorDataset:
    """Blob first, then the row; the blob is deleted again if the row cannot be added."""
    dataset_id = uuid.uuid4()
    key = operator_dataset_key(dataset_id)
    context.blobs.put_file(key, spooled.path)
    try:
        with Session(context.db) as session:
            return crud.add_operator_dataset(
                session=session,
                dataset_in=OperatorDataset(
                    id=dataset_id,
                    name=name,
                    object_key=key,
                    sha256=spooled.sha256,
                    size_bytes=spooled.size,
                    example_count=examples,
                ),
            )
    except BaseException:
        try:
            context.blobs.delete(key)
        except Exception:
            log.warning("could not delete the blob of rejected operator dataset %s", dataset_id)
        raise


@router.get("/datasets", response_model=Page[OperatorDatasetOut])
def list_operator_datasets(
    _: AdminDep,
    session: SessionDep,
    offset: int = Query(default=0, ge=0, le=1_000_000),
    limit: int = Query(default=100, ge=1, le=1000),
) -> Any:
    """Operator datasets, newest first."""
    rows = crud.list_operator_datasets(session=session, offset=offset, limit=limit)
    return Page[OperatorDatasetOut](data=[OperatorDatasetOut.of(d, name=d.name) for d in rows])


@router.delete("/datasets/{dataset_id}", status_code=204, responses={404: {}, 409: {}})
def delete_operator_dataset(
    dataset_id: uuid.UUID, _: AdminDep, session: SessionDep, context: ContextDep
) -> Response:
    """Delete an operator dataset (row, then blob); 409 while an unfinished operator job
    reads it. Base prefixes trained on it stay."""
    dataset = crud.delete_operator_dataset(session=session, dataset_id=dataset_id)
    try:
        context.blobs.delete(dataset.object_key)
    except Exception:
        log.warning("operator dataset %s: row deleted, blob left behind", dataset_id)
    return Response(status_code=204)


# --- operator jobs ----------------------------------------------------------------------------


@router.post(
    "/base-prefixes/jobs",
    status_code=201,
    response_model=BasePrefixJobOut,
    responses={404: {"description": "an operator dataset does not exist"}, 422: {}},
)
def submit_base_prefix_job(
    body: BasePrefixJobSubmit, _: AdminDep, session: SessionDep, context: ContextDep
) -> Any:
    """Queue a job that trains the next version of base prefix `name` on operator datasets
    (never a tenant's: tenants' dataset ids are not found here). It runs on the same
    scheduler and trainers as tenants' jobs; `GET …/jobs/{id}` follows it."""
    if body.hyperparameters.base_prefix is not None or body.hyperparameters.base_mode:
        raise ApiError(
            422, "invalid_hyperparameters", "a base prefix is not trained from a base prefix"
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
                422, "invalid_request", "validation_dataset_id must not also be one of dataset_ids"
            )
    job = crud.enqueue_base_prefix_job(
        session=session,
        name=body.name,
        dataset_ids=body.dataset_ids,
        validation_dataset_id=body.validation_dataset_id,
        hyperparameters=checked_hyperparameters(body.hyperparameters, context),
    )
    return _outs(session, [job])[0]


@router.get("/base-prefixes/jobs", response_model=Page[BasePrefixJobOut])
def list_base_prefix_jobs(
    _: AdminDep,
    session: SessionDep,
    offset: int = Query(default=0, ge=0, le=1_000_000),
    limit: int = Query(default=100, ge=1, le=1000),
) -> Any:
    """Operator jobs, newest first."""
    jobs = crud.list_operator_jobs(session=session, offset=offset, limit=limit)
    return Page[BasePrefixJobOut](data=_outs(session, jobs))


def _operator_job(session: Session, job_id: uuid.UUID) -> TrainingJob:
    job = crud.get_operator_job(session=session, job_id=job_id)
    if job is None:
        raise NotFoundError(f"operator job {job_id} not found")
    return job


@router.get("/base-prefixes/jobs/{job_id}", response_model=BasePrefixJobOut, responses={404: {}})
def get_base_prefix_job(job_id: uuid.UUID, _: AdminDep, session: SessionDep) -> Any:
    return _outs(session, [_operator_job(session, job_id)])[0]


@router.get(
    "/base-prefixes/jobs/{job_id}/events", response_model=Page[JobEventPublic], responses={404: {}}
)
def list_base_prefix_job_events(
    job_id: uuid.UUID,
    _: AdminDep,
    session: SessionDep,
    after_id: int | None = Query(default=None, ge=0, le=2**62),
) -> Any:
    _operator_job(session, job_id)
    events = crud.list_job_events(session=session, job_id=job_id, after_id=after_id)
    return Page[JobEventPublic](data=[JobEventPublic.model_validate(e) for e in events])


@router.post(
    "/base-prefixes/jobs/{job_id}/cancel", response_model=BasePrefixJobOut, responses={404: {}}
)
def cancel_base_prefix_job(job_id: uuid.UUID, _: AdminDep, session: SessionDep) -> Any:
    _operator_job(session, job_id)
    job = crud.cancel_job(session=session, job_id=job_id)
    return _outs(session, [job])[0]


# --- base prefixes ----------------------------------------------------------------------------


def _base_outs(session: Session, bases: list[BasePrefix]) -> list[BasePrefixOut]:
    counts = crud.base_prefix_dependents(session=session, base_prefix_ids=[b.id for b in bases])
    return [BasePrefixOut.of(b, counts.get(b.id, 0)) for b in bases]


@router.get("/base-prefixes", response_model=Page[BasePrefixOut])
def list_base_prefixes(
    _: AdminDep,
    session: SessionDep,
    name: str | None = Query(default=None, min_length=1, max_length=100),
) -> Any:
    """Every base prefix version (by name, then version), the default marked."""
    _storable_query("name", name)
    return Page[BasePrefixOut](
        data=_base_outs(session, crud.list_base_prefixes(session=session, name=name))
    )


@router.delete("/base-prefixes/default", status_code=204)
def clear_default_base_prefix(_: AdminDep, session: SessionDep) -> Response:
    """No default base prefix any more (jobs asking for `default` then get 404)."""
    crud.set_default_base_prefix(session=session, base_prefix_id=None)
    return Response(status_code=204)


def _base(session: Session, base_prefix_id: uuid.UUID) -> BasePrefix:
    base = crud.get_base_prefix(session=session, base_prefix_id=base_prefix_id)
    if base is None:
        raise NotFoundError(f"base prefix {base_prefix_id} not found")
    return base


@router.get("/base-prefixes/{base_prefix_id}", response_model=BasePrefixOut, responses={404: {}})
def get_base_prefix(base_prefix_id: uuid.UUID, _: AdminDep, session: SessionDep) -> Any:
    return _base_outs(session, [_base(session, base_prefix_id)])[0]


@router.post(
    "/base-prefixes/{base_prefix_id}/default", response_model=BasePrefixOut, responses={404: {}}
)
def set_default_base_prefix(
    base_prefix_id: uuid.UUID, _: AdminDep, session: SessionDep, context: ContextDep
) -> Any:
    """Mark this version the default (what a job's `base_prefix: "default"` resolves to, at
    submission); the previous default is unmarked."""
    base = _base(session, base_prefix_id)
    if base.base_model_fingerprint != context.model_fingerprint:
        raise ApiError(
            409,
            "incompatible_prefix",
            f"base prefix {base_prefix_id} was trained for another base model than the one served",
        )
    crud.set_default_base_prefix(session=session, base_prefix_id=base_prefix_id)
    return _base_outs(session, [_base(session, base_prefix_id)])[0]


@router.delete(
    "/base-prefixes/{base_prefix_id}",
    status_code=204,
    responses={404: {}, 409: {"description": "tenants' active prefixes are stacked on it"}},
)
def delete_base_prefix(
    base_prefix_id: uuid.UUID, _: AdminDep, session: SessionDep, context: ContextDep
) -> Response:
    """Delete a base prefix version (row, then blob). **409** while any tenant's active
    prefix is stacked on it or a queued or running job will train on it. Tenants' prefixes
    warm-started from it stand alone and are unaffected; inactive versions stacked on it
    can no longer be activated or served (409)."""
    base = crud.delete_base_prefix(session=session, base_prefix_id=base_prefix_id)
    try:
        context.blobs.delete(base.object_key)
    except Exception:
        log.warning("base prefix %s: row deleted, blob left behind", base_prefix_id)
    return Response(status_code=204)
