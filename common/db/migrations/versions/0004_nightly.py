"""Nightly retraining.

- ``nightly_runs``: one row per night (``run_date`` unique) summarizing the nightly
  planner's passes and the night's jobs (workers/nightly.py).
- ``training_jobs.note``: why a succeeded job's prefix was published inactive (the nightly
  quality gate); null otherwise.
- ``ix_training_jobs_idempotency_key``: a night's jobs across tenants (key
  ``nightly-<date>``).

Revision ID: 0004
Revises: 0003
Create Date: 2025-01-04 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _dt() -> sa.types.TypeEngine[Any]:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "nightly_runs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("run_date", sa.Date(), nullable=False),
        sa.Column("started_at", _dt(), nullable=False),
        sa.Column("planned_at", _dt(), nullable=True),
        sa.Column("finished_at", _dt(), nullable=True),
        sa.Column("planner_runs", sa.Integer(), nullable=False),
        sa.Column("tenants_planned", sa.Integer(), nullable=False),
        sa.Column("tenants_skipped", sa.Integer(), nullable=False),
        sa.Column("jobs_succeeded", sa.Integer(), nullable=False),
        sa.Column("jobs_failed", sa.Integer(), nullable=False),
        sa.Column("jobs_cancelled", sa.Integer(), nullable=False),
        sa.Column("prefixes_kept_inactive", sa.Integer(), nullable=False),
        sa.Column("estimated_tokens", sa.BigInteger(), nullable=False),
        sa.Column("wall_seconds", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_nightly_runs"),
        sa.UniqueConstraint("run_date", name="uq_nightly_runs_run_date"),
    )
    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(sa.Column("note", sa.Text(), nullable=True))
    op.create_index("ix_training_jobs_idempotency_key", "training_jobs", ["idempotency_key"])


def downgrade() -> None:
    op.drop_index("ix_training_jobs_idempotency_key", table_name="training_jobs")
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("note")
    op.drop_table("nightly_runs")
