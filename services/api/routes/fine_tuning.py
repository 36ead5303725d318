"""OpenAI's files and fine-tuning APIs on top of datasets and jobs, so the official SDKs
(``client.files.create``, ``client.fine_tuning.jobs.create``, …) drive prefixd as they are.

A file is a dataset (``purpose`` must be ``fine-tune``; the same validation, limits and
storage as ``POST /v1/datasets``); a fine-tuning job is a training job. Statuses map as
``queued → queued``, ``running → running``, ``succeeded → succeeded``, ``failed → failed``,
``cancelled → cancelled`` (files are validated at upload, so no job is ever
``validating_files``). A succeeded job's ``fine_tuned_model`` is ``prefix-<version id>``, a
name ``model`` accepts on completions and chat. Hyperparameters: ``n_epochs`` (or ``auto``:
the automatic budget), ``batch_size`` (``auto``: prefixd's default), and
``learning_rate_multiplier`` (× prefixd's default learning rate). ``suffix`` is accepted and
not used (versions are named by id); ``seed`` is the job's seed.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Query, Request, Response

from common.db import crud
from common.db.errors import NotFoundError
from common.db.models import JobState, TrainingJob
from common.errors import InvalidInputError
from common.hyperparameters import Hyperparameters
from common.training_config import TrainingConfig
from services.api.deps import ContextDep, CurrentTenant, SessionDep
from services.api.errors import ApiError
from services.api.routes import datasets as dataset_routes
from services.api.routes import jobs as job_routes
from services.api.schemas import (
    DatasetOut,
    FineTuningJobCreate,
    JobOut,
    JobSubmit,
)

router = APIRouter(prefix="/v1", tags=["fine-tuning"])

FINE_TUNE = "fine-tune"
_STATUS = {
    JobState.queued: "queued",
    JobState.running: "running",
    JobState.succeeded: "succeeded",
    JobState.failed: "failed",
    JobState.cancelled: "cancelled",
}


def _file(dataset: DatasetOut) -> dict[str, Any]:
    return {
        "id": str(dataset.id),
        "object": "file",
        "bytes": dataset.bytes,
        "created_at": int(dataset.created_at.timestamp()),
        "filename": f"{dataset.id}.jsonl",
        "purpose": FINE_TUNE,
        "status": "processed",
        "status_details": None,
    }


@router.post("/files", openapi_extra=dataset_routes.UPLOAD_BODY)
async def create_file(request: Request, tenant: CurrentTenant, context: ContextDep) -> Any:
    """Upload a fine-tuning file (multipart: ``file``, ``purpose=fine-tune``)."""
    # Starlette caches the parsed form, so the upload below reads the same one.
    form = await request.form(max_files=1, max_fields=8)
    purpose = form.get("purpose")
    if purpose != FINE_TUNE:
        raise ApiError(
            422,
            "invalid_request",
            f"purpose must be 'fine-tune', got {str(purpose)[:40]!r}",
            param="purpose",
        )
    try:
        dataset = await dataset_routes.upload_dataset(request, tenant, context)
    except InvalidInputError as error:  # a bad line: the file is the parameter at fault
        raise ApiError(422, "invalid_file", str(error), param="file") from None
    return _file(dataset)


@router.get("/files")
def list_files(tenant: CurrentTenant, session: SessionDep) -> Any:
    rows = crud.list_datasets(session=session, tenant_id=tenant.id, offset=0, limit=1000)
    return {"object": "list", "data": [_file(DatasetOut.of(d)) for d in rows], "has_more": False}


@router.get("/files/{file_id}", responses={404: {}})
def retrieve_file(file_id: uuid.UUID, tenant: CurrentTenant, session: SessionDep) -> Any:
    return _file(dataset_routes.get_dataset(file_id, tenant, session))


@router.delete("/files/{file_id}", responses={404: {}, 409: {}})
def delete_file(
    file_id: uuid.UUID, tenant: CurrentTenant, session: SessionDep, context: ContextDep
) -> Any:
    """Delete a file; ``deleted`` is false while its data is not confirmed gone from object
    storage yet (retried until it is)."""
    answer = dataset_routes.delete_dataset(file_id, tenant, session, context)
    return {"id": str(file_id), "object": "file", "deleted": answer.status_code == 204}


def _hyperparameters(body: FineTuningJobCreate) -> Hyperparameters:
    wanted = body.hyperparameters
    values: dict[str, Any] = {}
    if wanted.n_epochs != "auto":
        values["epochs"] = wanted.n_epochs
    if wanted.batch_size != "auto":
        values["batch_size"] = wanted.batch_size
    if wanted.learning_rate_multiplier != "auto":
        values["learning_rate"] = TrainingConfig().learning_rate * wanted.learning_rate_multiplier
    if body.seed is not None:
        values["seed"] = body.seed
    return Hyperparameters(**values)


def _job(out: JobOut, model: str) -> dict[str, Any]:
    (training_file, *_) = out.dataset_ids
    status = _STATUS[out.status]
    hyperparameters = out.hyperparameters
    return {
        "id": str(out.id),
        "object": "fine_tuning.job",
        "created_at": int(out.created_at.timestamp()),
        "finished_at": int(out.finished_at.timestamp()) if out.finished_at else None,
        "model": model,
        "fine_tuned_model": f"prefix-{out.prefix_id}" if out.prefix_id else None,
        "organization_id": "prefixd",
        "result_files": [],
        "status": status,
        "training_file": str(training_file),
        "validation_file": str(out.validation_dataset_id) if out.validation_dataset_id else None,
        "hyperparameters": {
            "n_epochs": hyperparameters.get("epochs") or "auto",
            "batch_size": hyperparameters.get("batch_size") or "auto",
            "learning_rate_multiplier": (
                hyperparameters["learning_rate"] / TrainingConfig().learning_rate
                if hyperparameters.get("learning_rate")
                else "auto"
            ),
        },
        "trained_tokens": None,
        "error": {"code": "training_failed", "message": out.error or "", "param": None}
        if status == "failed"
        else None,
        "seed": hyperparameters.get("seed", 0),
        "estimated_finish": None,
        "integrations": [],
        "method": {"type": "supervised"},
    }


def _event_message(
    step: int, total_steps: int | None, loss: float | None, val_loss: float | None
) -> str:
    """OpenAI's wording (``Step 3/10: training loss=0.52``), naming only the losses measured
    (an evaluation-only event has no training loss)."""
    losses = [
        f"{name}={value:.4f}"
        for name, value in (("training loss", loss), ("validation loss", val_loss))
        if value is not None
    ]
    where = f"Step {step}" if total_steps is None else f"Step {step}/{total_steps}"
    return where + (": " + ", ".join(losses) if losses else "")


def _served_model(context: Any) -> str:
    from services.api.routes.models import served_model_id

    return served_model_id(context)


@router.post("/fine_tuning/jobs")
def create_fine_tuning_job(
    body: FineTuningJobCreate,
    tenant: CurrentTenant,
    session: SessionDep,
    context: ContextDep,
    response: Response,
) -> Any:
    submit = JobSubmit(
        dataset_ids=[body.training_file],
        validation_dataset_id=body.validation_file,
        hyperparameters=_hyperparameters(body),
    )
    try:
        out = job_routes.submit_job(submit, tenant, session, context, response)
    except NotFoundError as error:  # OpenAI: a 400 naming the file parameter
        param = "training_file" if str(body.training_file) in str(error) else "validation_file"
        raise ApiError(400, "invalid_file", f"{param}: {error}", param=param) from None
    response.status_code = 200  # OpenAI answers 200 with the new job
    return _job(out, body.model or _served_model(context))


def _own_job(session: Any, tenant_id: uuid.UUID, job_id: uuid.UUID) -> TrainingJob:
    job = crud.get_job(session=session, job_id=job_id, tenant_id=tenant_id)
    if job is None:
        raise NotFoundError(f"fine-tuning job {job_id} not found")
    return job


@router.get("/fine_tuning/jobs")
def list_fine_tuning_jobs(
    tenant: CurrentTenant,
    session: SessionDep,
    context: ContextDep,
    after: uuid.UUID | None = None,
    limit: int = Query(default=20, ge=1, le=100),
) -> Any:
    """Newest first; ``after`` is the last job id of the previous page."""
    jobs = crud.list_jobs(session=session, tenant_id=tenant.id, offset=0, limit=10_000)
    if after is not None:
        ids = [j.id for j in jobs]
        jobs = jobs[ids.index(after) + 1 :] if after in ids else []
    page = jobs[: limit + 1]
    outs = job_routes.job_outs(session, page[:limit])
    model = _served_model(context)
    return {
        "object": "list",
        "data": [_job(o, model) for o in outs],
        "has_more": len(page) > limit,
    }


@router.get("/fine_tuning/jobs/{job_id}", responses={404: {}})
def retrieve_fine_tuning_job(
    job_id: uuid.UUID, tenant: CurrentTenant, session: SessionDep, context: ContextDep
) -> Any:
    job = _own_job(session, tenant.id, job_id)
    return _job(job_routes.job_out(session, job), _served_model(context))


@router.post("/fine_tuning/jobs/{job_id}/cancel", responses={404: {}})
def cancel_fine_tuning_job(
    job_id: uuid.UUID, tenant: CurrentTenant, session: SessionDep, context: ContextDep
) -> Any:
    job = crud.cancel_job(session=session, job_id=job_id, tenant_id=tenant.id)
    return _job(job_routes.job_out(session, job), _served_model(context))


@router.get("/fine_tuning/jobs/{job_id}/events", responses={404: {}})
def list_fine_tuning_events(
    job_id: uuid.UUID,
    tenant: CurrentTenant,
    session: SessionDep,
    after: str | None = None,
    limit: int = Query(default=20, ge=1, le=100),
) -> Any:
    """Progress events, newest first; ``after`` is the last event id of the previous page."""
    _own_job(session, tenant.id, job_id)
    events = crud.list_job_events(session=session, job_id=job_id, limit=10_000)[::-1]
    if after is not None:
        ids = [str(e.id) for e in events]
        events = events[ids.index(after) + 1 :] if after in ids else []
    page = events[: limit + 1]
    data = []
    for event in page[:limit]:
        metrics = {
            "step": event.step,
            "total_steps": event.total_steps,
            "train_loss": event.loss,
            "valid_loss": event.val_loss,
        }
        data.append(
            {
                "id": str(event.id),
                "object": "fine_tuning.job.event",
                "created_at": int(event.created_at.timestamp()),
                "level": "info",
                "message": _event_message(
                    event.step, event.total_steps, event.loss, event.val_loss
                ),
                "data": metrics,
                "type": "metrics",
            }
        )
    return {"object": "list", "data": data, "has_more": len(page) > limit}
