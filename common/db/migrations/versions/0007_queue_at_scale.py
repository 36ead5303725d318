"""The queue and the nightly planner at 100,000 tenants (issue 17).

- ``training_jobs.tenant_last_started_at``: the fair claim's round-robin key, the most
  recent start of any job of the job's tenant (1970-01-01 when none). The claim used to
  compute it per queued job on every claim (a correlated ``max(started_at)``: 1.9 s per
  claim with 60,000 queued jobs); now it is stored and kept current, filled here for every
  job from the jobs that exist.
- ``ix_training_jobs_queued_fair_order``: queued jobs by (priority, that key, created_at,
  id), partial on ``state = 'queued'``: a claim reads the first claimable entries.
- ``ix_training_jobs_nightly_run_date_tenant_id`` replaces ``ix_training_jobs_nightly_run_date``:
  the nightly planner reads a night's jobs for a range of tenant ids at a time.

Revision ID: 0007_queue_at_scale
Revises: 0006_base_prefixes
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from common.db.types import UTCDateTime

revision: str = "0007_queue_at_scale"
down_revision: str | Sequence[str] | None = "0006_base_prefixes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# common.db.models.NEVER_STARTED, as of this revision.
NEVER_STARTED = datetime(1970, 1, 1, tzinfo=UTC)


def upgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(
            sa.Column("tenant_last_started_at", sa.DateTime(timezone=True), nullable=True)
        )
    jobs = sa.table(
        "training_jobs",
        sa.column("tenant_id", sa.Uuid()),
        sa.column("started_at", UTCDateTime()),
        sa.column("tenant_last_started_at", UTCDateTime()),
    )
    sibling = jobs.alias("sibling")
    last_start = (
        sa.select(sa.func.max(sibling.c.started_at))
        .where(sibling.c.tenant_id == jobs.c.tenant_id)
        .scalar_subquery()
    )
    op.get_bind().execute(
        sa.update(jobs).values(
            tenant_last_started_at=sa.func.coalesce(
                last_start, sa.literal(NEVER_STARTED, UTCDateTime())
            )
        )
    )
    with op.batch_alter_table("training_jobs") as batch:
        batch.alter_column(
            "tenant_last_started_at", existing_type=sa.DateTime(timezone=True), nullable=False
        )
    op.create_index(
        "ix_training_jobs_queued_fair_order",
        "training_jobs",
        ["priority", "tenant_last_started_at", "created_at", "id"],
        postgresql_where=sa.text("state = 'queued'"),
        sqlite_where=sa.text("state = 'queued'"),
    )
    op.drop_index("ix_training_jobs_nightly_run_date", table_name="training_jobs")
    op.create_index(
        "ix_training_jobs_nightly_run_date_tenant_id",
        "training_jobs",
        ["nightly_run_date", "tenant_id"],
    )


def downgrade() -> None:
    op.drop_index("ix_training_jobs_nightly_run_date_tenant_id", table_name="training_jobs")
    op.create_index("ix_training_jobs_nightly_run_date", "training_jobs", ["nightly_run_date"])
    op.drop_index("ix_training_jobs_queued_fair_order", table_name="training_jobs")
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("tenant_last_started_at")
