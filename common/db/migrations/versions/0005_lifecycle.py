"""Data lifecycle (issue 15).

- ``tenants.last_prefix_version``: the highest prefix version number ever given to the
  tenant, so numbers only go up (never reused after deleting the newest); filled from the
  versions that exist.
- ``training_jobs.nightly_run_date``: marks a nightly job (and its night) instead of its
  idempotency key, which a tenant could choose; filled for the existing ``batch`` jobs with
  a ``nightly-<date>`` key. Index on it replaces the index on ``idempotency_key``.
- ``training_jobs.estimated_tokens``: training tokens estimated at submission (the
  per-tenant daily limit sums them); 0 for older jobs.
- ``job_events.message``: a note that is not progress (why a new prefix stayed inactive).
- ``pending_blob_deletes``: blobs whose row is gone but whose delete is not confirmed yet.

Revision ID: 0005_lifecycle
Revises: 0004
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

import sqlalchemy as sa
from alembic import op

revision: str = "0005_lifecycle"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(
            sa.Column("last_prefix_version", sa.Integer(), nullable=False, server_default="0")
        )
    op.execute(
        "UPDATE tenants SET last_prefix_version = COALESCE("
        "(SELECT MAX(prefixes.version) FROM prefixes WHERE prefixes.tenant_id = tenants.id), 0)"
    )
    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(sa.Column("nightly_run_date", sa.Date(), nullable=True))
        batch.add_column(
            sa.Column("estimated_tokens", sa.BigInteger(), nullable=False, server_default="0")
        )
    jobs = sa.table(
        "training_jobs",
        sa.column("id", sa.Uuid()),
        sa.column("priority", sa.String()),
        sa.column("idempotency_key", sa.String()),
        sa.column("nightly_run_date", sa.Date()),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(jobs.c.id, jobs.c.idempotency_key).where(
            jobs.c.priority == "batch", jobs.c.idempotency_key.like("nightly-%")
        )
    ).all()
    for job_id, key in rows:
        try:
            night = date.fromisoformat(str(key).removeprefix("nightly-"))
        except ValueError:
            continue
        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(nightly_run_date=night))
    op.drop_index("ix_training_jobs_idempotency_key", table_name="training_jobs")
    op.create_index("ix_training_jobs_nightly_run_date", "training_jobs", ["nightly_run_date"])
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("message", sa.Text(), nullable=True))
    op.create_table(
        "pending_blob_deletes",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("item_id", sa.Uuid(), nullable=False),
        sa.Column("object_key", sa.String(length=1024), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_pending_blob_deletes"),
        sa.UniqueConstraint("object_key", name="uq_pending_blob_deletes_object_key"),
    )
    op.create_index("ix_pending_blob_deletes_tenant_id", "pending_blob_deletes", ["tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_pending_blob_deletes_tenant_id", table_name="pending_blob_deletes")
    op.drop_table("pending_blob_deletes")
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("message")
    op.drop_index("ix_training_jobs_nightly_run_date", table_name="training_jobs")
    op.create_index("ix_training_jobs_idempotency_key", "training_jobs", ["idempotency_key"])
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("estimated_tokens")
        batch.drop_column("nightly_run_date")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("last_prefix_version")
