"""Base prefixes, owned by the operator (issue 20).

- ``operator_datasets``: training data the operator uploaded for base prefixes (blobs under
  ``operator/datasets/``); no ``tenant_id`` column, so tenant erasure never touches it.
- ``base_prefixes``: immutable versions of base prefixes (``name``, ``version``), at most
  one ``is_default`` (partial unique index); blobs under ``operator/base-prefixes/``.
- ``training_jobs.tenant_id`` becomes nullable: NULL marks an operator job training the base
  prefix ``training_jobs.base_prefix_name``; ``training_jobs.result``: what a succeeded job's
  prefix bought on its validation examples; ``job_events.details``: that report as an event.
- ``prefixes.base_prefix_id`` / ``base_mode``: the base a tenant's version was trained from
  (``warm_start`` or ``stack``); no foreign key, a version outlives a deleted base.

Revision ID: 0006_base_prefixes
Revises: 0005_lifecycle
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006_base_prefixes"
down_revision: str | Sequence[str] | None = "0005_lifecycle"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "operator_datasets",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("example_count", sa.Integer(), nullable=False),
        sa.Column("object_key", sa.String(length=1024), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_operator_datasets"),
    )
    op.create_index("ix_operator_datasets_created_at", "operator_datasets", ["created_at"])
    with op.batch_alter_table("training_jobs") as batch:
        batch.alter_column("tenant_id", existing_type=sa.Uuid(), nullable=True)
        batch.add_column(sa.Column("base_prefix_name", sa.String(length=100), nullable=True))
        batch.add_column(sa.Column("result", _json(), nullable=True))
    op.create_table(
        "base_prefixes",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Uuid(), nullable=True),
        sa.Column("base_model_fingerprint", sa.String(length=128), nullable=False),
        sa.Column("prefix_length", sa.Integer(), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("object_key", sa.String(length=1024), nullable=False),
        sa.Column("metrics", _json(), nullable=False),
        sa.Column("is_default", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["training_jobs.id"],
            name="fk_base_prefixes_job_id_training_jobs",
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_base_prefixes"),
        sa.UniqueConstraint("name", "version", name="uq_base_prefixes_name_version"),
    )
    op.create_index(
        "uq_base_prefixes_one_default",
        "base_prefixes",
        ["is_default"],
        unique=True,
        postgresql_where=sa.text("is_default"),
        sqlite_where=sa.text("is_default"),
    )
    with op.batch_alter_table("job_events") as batch:
        batch.add_column(sa.Column("details", _json(), nullable=True))
    with op.batch_alter_table("prefixes") as batch:
        batch.add_column(sa.Column("base_prefix_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("base_mode", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("prefixes") as batch:
        batch.drop_column("base_mode")
        batch.drop_column("base_prefix_id")
    with op.batch_alter_table("job_events") as batch:
        batch.drop_column("details")
    op.drop_index("uq_base_prefixes_one_default", table_name="base_prefixes")
    op.drop_table("base_prefixes")
    # Operator jobs have no tenant: they go before the column is NOT NULL again.
    op.execute(
        "DELETE FROM job_events WHERE job_id IN "
        "(SELECT id FROM training_jobs WHERE tenant_id IS NULL)"
    )
    op.execute("DELETE FROM training_jobs WHERE tenant_id IS NULL")
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("result")
        batch.drop_column("base_prefix_name")
        batch.alter_column("tenant_id", existing_type=sa.Uuid(), nullable=False)
    op.drop_index("ix_operator_datasets_created_at", table_name="operator_datasets")
    op.drop_table("operator_datasets")
