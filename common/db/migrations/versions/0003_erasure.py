"""Tenant erasure as a durable, resumable operation.

- ``tenant_erasures``: one row per tenant whose erasure is under way (its own state: the
  step to run next, who runs it under a lease, counts so far, the prefix ids the serving
  replicas must drop, the last error). No foreign key: the row outlives the tenant's rows
  (deleted in the middle of the erasure) and is deleted when the audit record is written.
- ``deletion_audits.tenant_id`` becomes unique: a tenant's erasure writes exactly one audit
  record, however often it runs.

Data: a tenant left ``deleting`` by older code gets an erasure row (so it is resumed); an
unfinished audit record of older code becomes an erasure row (its counts carried over) and
is removed, to be written again on completion; duplicate audit records of one tenant are
reduced to one (the completed one, else the earliest).

Revision ID: 0003
Revises: 0002_job_validation_dataset
Create Date: 2025-01-03 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002_job_validation_dataset"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FIRST_STEP = "cancel_jobs"


def _dt() -> sa.types.TypeEngine[Any]:
    return sa.DateTime(timezone=True)


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _now(bind: sa.Connection) -> datetime:
    now = datetime.now(UTC)
    # SQLite stores naive UTC (see common.db.types.UTCDateTime).
    return now.replace(tzinfo=None) if bind.dialect.name == "sqlite" else now


def upgrade() -> None:
    erasures = op.create_table(
        "tenant_erasures",
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("step", sa.String(length=16), nullable=False),
        sa.Column("requested_at", _dt(), nullable=False),
        sa.Column("updated_at", _dt(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires_at", _dt(), nullable=True),
        sa.Column("jobs_cancelled", sa.Integer(), nullable=False),
        sa.Column("objects_erased", sa.Integer(), nullable=False),
        sa.Column("rows_erased", sa.Integer(), nullable=False),
        sa.Column("prefix_ids", _json(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_tenant_erasures"),
    )

    bind = op.get_bind()
    audits = sa.table(
        "deletion_audits",
        sa.column("id", sa.Uuid()),
        sa.column("tenant_id", sa.Uuid()),
        sa.column("requested_at", _dt()),
        sa.column("completed_at", _dt()),
        sa.column("objects_erased", sa.Integer()),
        sa.column("rows_erased", sa.Integer()),
    )
    tenants = sa.table("tenants", sa.column("id", sa.Uuid()), sa.column("status", sa.String()))
    now = _now(bind)
    started: dict[Any, dict[str, Any]] = {}

    def erasure_row(tenant_id: Any, requested_at: Any, objects: int = 0, rows: int = 0) -> None:
        started.setdefault(
            tenant_id,
            {
                "tenant_id": tenant_id,
                "step": FIRST_STEP,
                "requested_at": requested_at,
                "updated_at": now,
                "runs": 0,
                "jobs_cancelled": 0,
                "objects_erased": objects,
                "rows_erased": rows,
                "prefix_ids": [],
            },
        )

    # Unfinished audit records of the old, non-resumable erasure become erasure rows.
    rows = bind.execute(sa.select(audits).order_by(audits.c.requested_at, audits.c.id)).mappings()
    by_tenant: dict[Any, list[Any]] = {}
    for row in rows:
        by_tenant.setdefault(row["tenant_id"], []).append(dict(row))
    doomed: list[Any] = []
    for tenant_id, records in by_tenant.items():
        done = [r for r in records if r["completed_at"] is not None]
        keep = done[0] if done else None
        for record in records:
            if record is not keep:
                doomed.append(record["id"])
        if keep is None:
            first = records[0]
            erasure_row(
                tenant_id, first["requested_at"], first["objects_erased"], first["rows_erased"]
            )
    for audit_id in doomed:
        bind.execute(sa.delete(audits).where(audits.c.id == audit_id))

    # Tenants left 'deleting' without any erasure state.
    for (tenant_id,) in bind.execute(sa.select(tenants.c.id).where(tenants.c.status == "deleting")):
        erasure_row(tenant_id, now)
    if started:
        op.bulk_insert(erasures, list(started.values()))

    op.drop_index("ix_deletion_audits_tenant_id", table_name="deletion_audits")
    op.create_index("uq_deletion_audits_tenant_id", "deletion_audits", ["tenant_id"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_deletion_audits_tenant_id", table_name="deletion_audits")
    op.create_index("ix_deletion_audits_tenant_id", "deletion_audits", ["tenant_id"])
    op.drop_table("tenant_erasures")
