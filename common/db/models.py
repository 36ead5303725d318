"""The tables, as SQLModel model families (``FooBase`` → ``FooCreate`` / ``Foo`` (the table) /
``FooPublic``), in the style of fastapi/full-stack-fastapi-template.

Every lookup the API and the scheduler make has an index; the schema itself lives in the
Alembic migrations (``common/db/migrations``), and a test proves the two agree.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, cast

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from common.db.types import UTCDateTime, big_int_pk_type, json_type, utcnow

# Stable constraint names on every backend, so migrations can name what they alter.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class TenantStatus(StrEnum):
    active = "active"
    deleting = "deleting"


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


TERMINAL_JOB_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})


class JobPriority(StrEnum):
    """``interactive`` jobs are always claimed before ``batch`` (nightly) jobs."""

    interactive = "interactive"
    batch = "batch"


# The claim order of priorities: interactive first.
CLAIM_ORDER = (JobPriority.interactive, JobPriority.batch)

# ``training_jobs.tenant_last_started_at`` of a job whose tenant never started a job (and of
# operator jobs): before every real start. A value, not NULL, because the fair claim's index
# must sort it first on both backends and SQLite indexes cannot say NULLS FIRST.
NEVER_STARTED = datetime(1970, 1, 1, tzinfo=UTC)


def _enum(cls: type[StrEnum]) -> type[Any]:
    # Stored as VARCHAR (no native PostgreSQL enum type: adding a value needs no migration
    # dance); SQLAlchemy converts to and from the Python enum.
    return cast(
        type[Any],
        sa.Enum(
            cls,
            native_enum=False,
            create_constraint=False,
            length=16,
            validate_strings=True,
            values_callable=lambda e: [m.value for m in e],
        ),
    )


def _t(type_: sa.types.TypeEngine[Any]) -> type[Any]:
    return cast(type[Any], type_)


_DT = _t(UTCDateTime())
_JSON = _t(json_type())
_BIGINT = _t(sa.BigInteger())

SHA256_PATTERN = r"^[0-9a-f]{64}$"


# --- tenants ------------------------------------------------------------------------------


class TenantBase(SQLModel):
    name: str = Field(min_length=1, max_length=100)


class TenantCreate(TenantBase):
    pass


class Tenant(TenantBase, table=True):
    __tablename__ = "tenants"
    __table_args__ = (sa.UniqueConstraint("name", name="uq_tenants_name"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    status: TenantStatus = Field(default=TenantStatus.active, sa_type=_enum(TenantStatus))
    created_at: datetime = Field(default_factory=utcnow, sa_type=_DT)
    # The highest prefix version number ever given to this tenant; only goes up, so a
    # version number is never reused after the newest version is deleted.
    last_prefix_version: int = Field(default=0, ge=0)


# --- API keys (only a SHA-256 hash of the key is stored) -------------------------------------


class ApiKeyBase(SQLModel):
    name: str | None = Field(default=None, max_length=100)


class ApiKeyCreate(ApiKeyBase):
    pass


class ApiKey(ApiKeyBase, table=True):
    __tablename__ = "api_keys"
    __table_args__ = (
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
        sa.Index("ix_api_keys_tenant_id", "tenant_id"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    tenant_id: uuid.UUID = Field(foreign_key="tenants.id", ondelete="CASCADE")
    key_hash: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_DT)
    revoked_at: datetime | None = Field(default=None, sa_type=_DT)


class ApiKeyPublic(ApiKeyBase):
    id: uuid.UUID
    tenant_id: uuid.UUID
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyPublic):
    """Returned once, when the key is made: the only time the plaintext key is shown."""

    key: str


# --- datasets ------------------------------------------------------------------------------


class DatasetBase(SQLModel):
    sha256: str = Field(min_length=64, max_length=64, schema_extra={"pattern": SHA256_PATTERN})
    size_bytes: int = Field(ge=0, sa_type=_BIGINT)
    example_count: int = Field(ge=0)


class DatasetCreate(DatasetBase):
    """The blob is written first (at ``dataset_key(tenant_id, id)``), then the row added."""

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    object_key: str = Field(min_length=1, max_length=1024)


class Dataset(DatasetBase, table=True):
    __tablename__ = "datasets"
    __table_args__ = (sa.Index("ix_datasets_tenant_id_created_at", "tenant_id", "created_at"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    tenant_id: uuid.UUID = Field(foreign_key="tenants.id", ondelete="CASCADE")
    object_key: str = Field(max_length=1024)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_DT)


# --- training jobs -------------------------------------------------------------------------


class TrainingJobBase(SQLModel):
    priority: JobPriority = Field(default=JobPriority.interactive, sa_type=_enum(JobPriority))
    hyperparameters: dict[str, Any] = Field(default_factory=dict, sa_type=_JSON)
    max_attempts: int = Field(default=3, ge=1, le=100)
    # A dataset of the same tenant whose examples are the validation set (validation loss,
    # early stopping) instead of a split of the training data; None: no such dataset.
    validation_dataset_id: uuid.UUID | None = Field(default=None)


MAX_JOB_DATASETS = 1000  # datasets one job may read


class TrainingJobCreate(TrainingJobBase):
    dataset_ids: list[uuid.UUID] = Field(min_length=1, max_length=MAX_JOB_DATASETS)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    # Set by the nightly planner only (the API never takes it from a request).
    nightly_run_date: date | None = None


class TrainingJob(TrainingJobBase, table=True):
    __tablename__ = "training_jobs"
    __table_args__ = (
        # Resubmitting with the same key returns the existing job (NULL keys never collide).
        sa.UniqueConstraint(
            "tenant_id", "idempotency_key", name="uq_training_jobs_tenant_id_idempotency_key"
        ),
        sa.Index("ix_training_jobs_tenant_id_created_at", "tenant_id", "created_at"),
        # The scheduler's claim: queued jobs by priority, oldest first.
        sa.Index("ix_training_jobs_state_priority_created_at", "state", "priority", "created_at"),
        # Reclaiming expired leases: running jobs by lease expiry.
        sa.Index("ix_training_jobs_state_lease_expires_at", "state", "lease_expires_at"),
        # A night's nightly jobs, across tenants and by range of tenants (workers/nightly.py).
        sa.Index("ix_training_jobs_nightly_run_date_tenant_id", "nightly_run_date", "tenant_id"),
        # The fair claim (crud/queue.py): queued jobs of a priority in round-robin order, so
        # a claim reads the first claimable entries instead of sorting every queued job.
        sa.Index(
            "ix_training_jobs_queued_fair_order",
            "priority",
            "tenant_last_started_at",
            "created_at",
            "id",
            postgresql_where=sa.text("state = 'queued'"),
            sqlite_where=sa.text("state = 'queued'"),
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    # NULL: an operator job that trains a base prefix (``base_prefix_name``) on operator
    # datasets only; tenant routes filter by tenant id, so they never see one.
    tenant_id: uuid.UUID | None = Field(
        default=None, foreign_key="tenants.id", ondelete="CASCADE", nullable=True
    )
    base_prefix_name: str | None = Field(default=None, max_length=100)
    dataset_ids: list[str] = Field(default_factory=list, sa_type=_JSON)
    idempotency_key: str | None = Field(default=None, max_length=200)
    state: JobState = Field(default=JobState.queued, sa_type=_enum(JobState))
    attempts: int = Field(default=0)
    lease_owner: str | None = Field(default=None, max_length=200)
    lease_expires_at: datetime | None = Field(default=None, sa_type=_DT)
    heartbeat_at: datetime | None = Field(default=None, sa_type=_DT)
    error: str | None = Field(default=None, sa_type=_t(sa.Text()))
    created_at: datetime = Field(default_factory=utcnow, sa_type=_DT)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=_DT)
    started_at: datetime | None = Field(default=None, sa_type=_DT)
    finished_at: datetime | None = Field(default=None, sa_type=_DT)
    # Why a succeeded job's prefix was published but NOT made active (the nightly quality
    # gate, workers/quality_gate.py); None when it was activated or the job made no prefix.
    note: str | None = Field(default=None, sa_type=_t(sa.Text()))
    # The night of a nightly job (the planner sets it; a tenant cannot): what marks a job
    # as nightly, never its idempotency key. None for every other job.
    nightly_run_date: date | None = Field(default=None, sa_type=_t(sa.Date()))
    # Training tokens the job was estimated to cost at submission (bytes / 4 x epochs);
    # the tenant's daily limit (tenant_training_tokens_per_day) sums them.
    estimated_tokens: int = Field(default=0, ge=0, sa_type=_BIGINT)
    # What the job's prefix bought, on its validation examples (workers/job_report.py):
    # loss and token accuracy against the bare model, the base and the previous version.
    result: dict[str, Any] | None = Field(default=None, sa_type=_JSON)
    # The fair claim's round-robin key while the job is queued: the most recent start of any
    # job of its tenant (NEVER_STARTED if none; always for operator jobs). Set when the job
    # is queued (enqueued or given back) and on each start of a sibling (crud/queue.py).
    tenant_last_started_at: datetime = Field(default=NEVER_STARTED, sa_type=_DT)


class TrainingJobPublic(TrainingJobBase):
    id: uuid.UUID
    tenant_id: uuid.UUID | None
    dataset_ids: list[uuid.UUID]
    idempotency_key: str | None
    state: JobState
    attempts: int
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    note: str | None = None


# --- job events (progress) -----------------------------------------------------------------


class JobEventBase(SQLModel):
    step: int = Field(ge=0)
    total_steps: int | None = Field(default=None, ge=0)
    loss: float | None = None
    val_loss: float | None = None
    tokens_per_second: float | None = Field(default=None, ge=0)
    # Something a user should know that is not progress (e.g. why the new prefix was kept
    # inactive); None for progress events.
    message: str | None = Field(default=None, sa_type=_t(sa.Text()))
    # An evaluation event (workers/job_report.py): what the new prefix bought.
    details: dict[str, Any] | None = Field(default=None, sa_type=_JSON)


class JobEventCreate(JobEventBase):
    pass


class JobEvent(JobEventBase, table=True):
    __tablename__ = "job_events"
    __table_args__ = (sa.Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=_t(big_int_pk_type()))
    job_id: uuid.UUID = Field(foreign_key="training_jobs.id", ondelete="CASCADE")
    created_at: datetime = Field(default_factory=utcnow, sa_type=_DT)


class JobEventPublic(JobEventBase):
    id: int
    job_id: uuid.UUID
    created_at: datetime


# --- prefixes (one row per immutable prefix version) ---------------------------------------


class PrefixVersionBase(SQLModel):
    base_model_fingerprint: str = Field(min_length=1, max_length=128)
    prefix_length: int = Field(ge=1)
    dtype: str = Field(max_length=16, schema_extra={"pattern": r"^(float16|bfloat16|float32)$"})
    size_bytes: int = Field(ge=0, sa_type=_BIGINT)
    sha256: str = Field(min_length=64, max_length=64, schema_extra={"pattern": SHA256_PATTERN})
    metrics: dict[str, Any] = Field(default_factory=dict, sa_type=_JSON)
    # The operator's base prefix this version was trained from (no foreign key: a version
    # outlives a deleted base, and then, if stacked, is refused at serving with a 409).
    base_prefix_id: uuid.UUID | None = Field(default=None)
    base_mode: str | None = Field(
        default=None, max_length=16, schema_extra={"pattern": r"^(warm_start|stack)$"}
    )


class PrefixVersionCreate(PrefixVersionBase):
    """The blob is written first (at ``prefix_key(tenant_id, id)``), then published."""

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    object_key: str = Field(min_length=1, max_length=1024)


class PrefixVersion(PrefixVersionBase, table=True):
    __tablename__ = "prefixes"
    __table_args__ = (
        sa.UniqueConstraint("tenant_id", "version", name="uq_prefixes_tenant_id_version"),
        sa.Index("ix_prefixes_job_id", "job_id"),
        # At most one active prefix per tenant, enforced by the database.
        sa.Index(
            "uq_prefixes_one_active_per_tenant",
            "tenant_id",
            unique=True,
            postgresql_where=sa.text("active"),
            sqlite_where=sa.text("active"),
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    tenant_id: uuid.UUID = Field(foreign_key="tenants.id", ondelete="CASCADE")
    job_id: uuid.UUID | None = Field(
        default=None, foreign_key="training_jobs.id", ondelete="SET NULL"
    )
    version: int = Field(ge=1)
    object_key: str = Field(max_length=1024)
    active: bool = Field(default=False)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_DT)
    activated_at: datetime | None = Field(default=None, sa_type=_DT)


class PrefixVersionPublic(PrefixVersionBase):
    id: uuid.UUID
    tenant_id: uuid.UUID
    job_id: uuid.UUID | None
    version: int
    active: bool
    created_at: datetime
    activated_at: datetime | None


# --- blob deletes not done yet (retried until the blob is gone) -----------------------------


class PendingBlobDelete(SQLModel, table=True):
    """A blob whose row was deleted (a dataset, a prefix version) but whose delete in the
    object store has not been confirmed yet. Recorded in the same transaction as the row's
    deletion, removed once the blob is gone; the scheduler's loop retries the rest
    (``common/blob_deletes.py``). Ids and a key only, no personal data."""

    __tablename__ = "pending_blob_deletes"
    __table_args__ = (
        sa.UniqueConstraint("object_key", name="uq_pending_blob_deletes_object_key"),
        sa.Index("ix_pending_blob_deletes_tenant_id", "tenant_id"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    # No foreign key: a tenant's erasure deletes these rows with its other rows (and the
    # blobs with its whole prefix).
    tenant_id: uuid.UUID
    kind: str = Field(max_length=16)  # "dataset" or "prefix"
    item_id: uuid.UUID  # the dataset's or prefix version's id
    object_key: str = Field(max_length=1024)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_DT)
    attempts: int = Field(default=0)
    last_attempt_at: datetime | None = Field(default=None, sa_type=_DT)
    last_error: str | None = Field(default=None, sa_type=_t(sa.Text()))


# --- base prefixes and their data (the operator's: never a tenant's) -----------------------


class OperatorDataset(SQLModel, table=True):
    """Training data the operator uploaded for base prefixes, stored under
    ``operator/datasets/``; no ``tenant_id`` column, so tenant erasure never touches it."""

    __tablename__ = "operator_datasets"
    __table_args__ = (sa.Index("ix_operator_datasets_created_at", "created_at"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str | None = Field(default=None, max_length=100)
    sha256: str = Field(max_length=64)
    size_bytes: int = Field(sa_type=_BIGINT)
    example_count: int = Field(default=0)
    object_key: str = Field(max_length=1024)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_DT)


class BasePrefixCreate(SQLModel):
    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    name: str = Field(min_length=1, max_length=100)
    base_model_fingerprint: str = Field(min_length=1, max_length=128)
    prefix_length: int = Field(ge=1)
    dtype: str = Field(max_length=16)
    size_bytes: int = Field(ge=0, sa_type=_BIGINT)
    sha256: str = Field(min_length=64, max_length=64)
    object_key: str = Field(min_length=1, max_length=1024)
    metrics: dict[str, Any] = Field(default_factory=dict, sa_type=_JSON)


class BasePrefix(SQLModel, table=True):
    """One immutable version of an operator's base prefix (``name``, ``version``), trained
    by an operator job on operator datasets only, stored under ``operator/base-prefixes/``."""

    __tablename__ = "base_prefixes"
    __table_args__ = (
        sa.UniqueConstraint("name", "version", name="uq_base_prefixes_name_version"),
        # At most one default base prefix, enforced by the database.
        sa.Index(
            "uq_base_prefixes_one_default",
            "is_default",
            unique=True,
            postgresql_where=sa.text("is_default"),
            sqlite_where=sa.text("is_default"),
        ),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(max_length=100)
    version: int = Field(ge=1)
    job_id: uuid.UUID | None = Field(
        default=None, foreign_key="training_jobs.id", ondelete="SET NULL"
    )
    base_model_fingerprint: str = Field(max_length=128)
    prefix_length: int
    dtype: str = Field(max_length=16)
    size_bytes: int = Field(sa_type=_BIGINT)
    sha256: str = Field(max_length=64)
    object_key: str = Field(max_length=1024)
    metrics: dict[str, Any] = Field(default_factory=dict, sa_type=_JSON)
    is_default: bool = Field(default=False)
    created_at: datetime = Field(default_factory=utcnow, sa_type=_DT)


# --- tenant deletion audit (no personal data: ids, times and counts only) ------------------


class DeletionAuditBase(SQLModel):
    tenant_id: uuid.UUID
    requested_at: datetime = Field(default_factory=utcnow, sa_type=_DT)
    completed_at: datetime | None = Field(default=None, sa_type=_DT)
    objects_erased: int = Field(default=0, ge=0)
    rows_erased: int = Field(default=0, ge=0)


class DeletionAudit(DeletionAuditBase, table=True):
    # No foreign key: the audit row outlives the tenant it describes. One per tenant: an
    # erasure that runs again never writes a second record.
    __tablename__ = "deletion_audits"
    __table_args__ = (
        sa.Index("uq_deletion_audits_tenant_id", "tenant_id", unique=True),
        sa.Index("ix_deletion_audits_requested_at", "requested_at"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)


# --- tenant erasure under way (deleted when its audit record is written) -------------------


class ErasureStep(StrEnum):
    """The step an erasure runs next (``common/erasure.py``), in order. Marking the tenant
    ``deleting`` creates the row; writing the audit record deletes it."""

    cancel_jobs = "cancel_jobs"
    delete_objects = "delete_objects"
    delete_rows = "delete_rows"
    evict_replicas = "evict_replicas"
    verify = "verify"


class TenantErasure(SQLModel, table=True):
    """The durable state of one tenant's erasure: ids, times, counts, no personal data.
    No foreign key: it outlives the tenant's rows, deleted half-way through."""

    __tablename__ = "tenant_erasures"

    tenant_id: uuid.UUID = Field(primary_key=True)
    step: ErasureStep = Field(default=ErasureStep.cancel_jobs, sa_type=_enum(ErasureStep))
    requested_at: datetime = Field(default_factory=utcnow, sa_type=_DT)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=_DT)
    runs: int = Field(default=0)  # how many times a runner took it up
    lease_owner: str | None = Field(default=None, max_length=200)
    lease_expires_at: datetime | None = Field(default=None, sa_type=_DT)
    jobs_cancelled: int = Field(default=0)
    objects_erased: int = Field(default=0)
    rows_erased: int = Field(default=0)
    # The tenant's prefix ids, recorded with the row deletion: what the serving replicas
    # must no longer hold.
    prefix_ids: list[str] = Field(default_factory=list, sa_type=_JSON)
    last_error: str | None = Field(default=None, sa_type=_t(sa.Text()))


# --- nightly retraining runs (workers/nightly.py; one row per night) -----------------------


class NightlyRunBase(SQLModel):
    run_date: date = Field(description="The night: jobs carry the idempotency key nightly-<date>.")
    started_at: datetime = Field(description="When the night's first planning pass started.")
    planned_at: datetime | None = Field(
        default=None, description="When the night's latest planning pass finished."
    )
    finished_at: datetime | None = Field(
        default=None,
        description="When the night's last job reached a final state (null while any is "
        "queued or running).",
    )
    planner_runs: int = Field(default=0, ge=0, description="Planning passes this night.")
    tenants_planned: int = Field(default=0, ge=0, description="Tenants with a job this night.")
    tenants_skipped: int = Field(
        default=0, ge=0, description="Tenants left out by the latest planning pass."
    )
    jobs_succeeded: int = Field(default=0, ge=0)
    jobs_failed: int = Field(default=0, ge=0)
    jobs_cancelled: int = Field(default=0, ge=0)
    prefixes_kept_inactive: int = Field(
        default=0, ge=0, description="Succeeded jobs whose prefix the quality gate kept inactive."
    )
    estimated_tokens: int = Field(
        default=0, ge=0, description="Training tokens of the night's jobs, estimated at planning."
    )
    wall_seconds: float | None = Field(
        default=None, description="finished_at - started_at, once every job is final."
    )


class NightlyRun(NightlyRunBase, table=True):
    __tablename__ = "nightly_runs"
    __table_args__ = (sa.UniqueConstraint("run_date", name="uq_nightly_runs_run_date"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    run_date: date = Field(sa_type=_t(sa.Date()))
    started_at: datetime = Field(default_factory=utcnow, sa_type=_DT)
    planned_at: datetime | None = Field(default=None, sa_type=_DT)
    finished_at: datetime | None = Field(default=None, sa_type=_DT)
    estimated_tokens: int = Field(default=0, sa_type=_BIGINT)


class NightlyRunPublic(NightlyRunBase):
    id: uuid.UUID
