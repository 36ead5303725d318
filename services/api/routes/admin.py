"""Operators' routes (admin token): the nightly retraining runs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from common.db import crud
from common.db.models import NightlyRunPublic
from services.api.deps import AdminDep, SessionDep
from services.api.schemas import Page

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/nightly/runs", response_model=Page[NightlyRunPublic])
def list_nightly_runs(
    _: AdminDep,
    session: SessionDep,
    offset: int = Query(default=0, ge=0, le=1_000_000),
    limit: int = Query(default=30, ge=1, le=1000),
) -> Any:
    """Nightly retraining runs, newest night first (admin token): tenants planned and
    skipped, jobs succeeded, failed, cancelled and kept inactive by the quality gate,
    estimated tokens, wall time. A night whose jobs are not all final shows their counts
    as they are now (`finished_at` null)."""
    runs = crud.list_nightly_runs(session=session, offset=offset, limit=limit)
    return Page[NightlyRunPublic](data=runs)
