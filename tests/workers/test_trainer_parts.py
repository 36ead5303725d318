"""The trainer's parts without Ray, on real databases (SQLite and PostgreSQL) and S3 over
HTTP: hyperparameter validation, publishing (and cleaning up after a refused publish),
orphan sweeps, progress events at a bounded rate, and the minimal tenant erasure."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from sqlmodel import Session, select

from common.blob_deletes import delete_orphan_prefix_blobs
from common.blobstore import dataset_key, prefix_key, prefixes_key_prefix, tenant_key_prefix
from common.db import crud
from common.db.errors import LeaseLostError, TenantNotActiveError
from common.db.models import (
    ApiKey,
    Dataset,
    JobEvent,
    JobEventCreate,
    JobState,
    PrefixVersion,
    Tenant,
    TrainingJob,
)
from common.erasure import erase_tenant
from common.errors import InvalidInputError
from common.hyperparameters import parse_hyperparameters
from common.prefix_file import Prefix as PrefixArtifact
from common.prefix_file import prefix_from_bytes
from common.training import Progress
from tests.fixtures.factories import make_dataset, make_job, make_tenant
from workers.scheduler import describe_trainer_error
from workers.trainer import (
    ProgressWriter,
    job_examples,
    publish_trained_prefix,
    split_validation,
)


def artifact() -> PrefixArtifact:
    return PrefixArtifact(
        key_values=torch.randn(2, 2, 2, 4, 16),
        base_model_fingerprint="f" * 64,
        architecture="llama",
        metrics={"steps": 3, "train_loss": float("nan")},
    )


@dataclass(frozen=True)
class Claimed:
    id: uuid.UUID
    tenant_id: uuid.UUID


def claimed_job(session: Session, owner: str = "trainer") -> Claimed:
    job = make_job(session, make_tenant(session))
    claimed = crud.claim_next_job(session=session, owner=owner, lease_seconds=60)
    assert claimed is not None and claimed.id == job.id
    return Claimed(job.id, job.tenant_id)


# --- hyperparameters ------------------------------------------------------------------------


def test_hyperparameters_become_a_training_config() -> None:
    spec = parse_hyperparameters({"epochs": 2, "learning_rate": 1, "validation_split": 0.2})
    assert spec.config.epochs == 2 and spec.config.learning_rate == 1.0
    assert spec.validation_split == 0.2 and spec.config.prefix_length == 10  # a default
    automatic = parse_hyperparameters(None)
    assert automatic.config.epochs is None and automatic.validation_split is None
    assert parse_hyperparameters({"epochs": None}).config.epochs is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"epochs": "3"}, "epochs: Input should be a valid integer"),
        ({"epochs": True}, "epochs: Input should be a valid integer"),
        ({"epochs": 0}, "epochs must be at least 1 (or unset: automatic), got 0"),
        ({"prefix_length": -1}, "prefix length must be at least 1"),
        ({"loss_reduction": "max"}, "loss_reduction: Input should be 'sequence_sum' or"),
        ({"dtype": "int8"}, "dtype: Input should be"),
        ({"validation_split": 1.0}, "validation_split: Input should be less than 1"),
        (
            {"epoch": 3},
            "unknown hyperparameter 'epoch' (known: base_mode, base_prefix, batch_size, dtype, epochs,",
        ),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_bad_hyperparameters_are_user_errors(raw: Any, message: str) -> None:
    with pytest.raises(InvalidInputError, match=r"^invalid hyperparameters: ") as caught:
        parse_hyperparameters(raw)
    assert message in str(caught.value)


def test_validation_split_holds_out_examples_reproducibly() -> None:
    from common.data import Example

    examples = [Example(f"in {i}", f"out {i}") for i in range(10)]
    train, validation = split_validation(examples, 0.2, seed=1)
    assert validation is not None and len(validation) == 2 and len(train) == 8
    assert set(train) | set(validation) == set(examples)
    assert split_validation(examples, 0.2, seed=1) == (train, validation)
    assert split_validation(examples, 0.0, seed=1) == (examples, None)
    with pytest.raises(InvalidInputError, match="leaves nothing to train on"):
        split_validation(examples[:1], 0.5, seed=1)


def put_dataset(session: Session, store: Any, tenant: Tenant, examples: int) -> Dataset:
    """A dataset row and its JSONL blob, as an upload leaves them."""
    import hashlib
    import json

    dataset = make_dataset(session, tenant, example_count=examples)
    data = "".join(
        json.dumps({"input": f"in {i}", "output": f"out {i}"}) + "\n" for i in range(examples)
    ).encode()
    store.put_bytes(dataset.object_key, data)
    dataset.sha256 = hashlib.sha256(data).hexdigest()
    session.add(dataset)
    session.commit()
    session.refresh(dataset)
    return dataset


@pytest.mark.parametrize(
    ("examples", "hyperparameters", "held_out"),
    [
        (60, {"prefix_length": 4}, 9),  # automatic: 15 % of 60 held out for early stopping
        (30, {"prefix_length": 4}, 0),  # automatic, too few examples to spare any
        (60, {"epochs": 3}, 0),  # a fixed epoch count asks for no validation
        (60, {"validation_split": 0.0}, 0),  # explicitly none
        (60, {"validation_split": 0.5}, 30),  # explicitly half
    ],
)
def test_jobs_follow_the_automatic_validation_rule(
    db_engine, s3_store, examples, hyperparameters, held_out
) -> None:
    with Session(db_engine) as session:
        tenant = make_tenant(session)
        dataset = put_dataset(session, s3_store, tenant, examples)
        job = make_job(session, tenant, datasets=[dataset], hyperparameters=hyperparameters)
        spec = parse_hyperparameters(job.hyperparameters)
        train, validation = job_examples(db_engine, s3_store, job, spec)
    assert len(validation or []) == held_out and len(train) == examples - held_out
    if held_out:
        assert validation is not None and not set(train) & set(validation)


# --- publishing -----------------------------------------------------------------------------


def test_publish_writes_the_blob_then_the_row(db_engine, s3_store) -> None:
    with Session(db_engine) as session:
        job = claimed_job(session)
    prefix_id = publish_trained_prefix(
        db_engine,
        s3_store,
        job_id=job.id,
        tenant_id=job.tenant_id,
        owner="trainer",
        prefix=artifact(),
    )
    with Session(db_engine) as session:
        active = crud.get_active_prefix(session=session, tenant_id=job.tenant_id)
        done = crud.get_job(session=session, job_id=job.id)
    assert active is not None and active.id == prefix_id
    assert active.object_key == prefix_key(job.tenant_id, prefix_id)
    assert active.metrics == {"steps": 3, "train_loss": None}  # NaN is not JSON
    assert done is not None and done.state == JobState.succeeded
    loaded = prefix_from_bytes(s3_store.get_bytes(active.object_key))
    assert loaded.prefix_length == 4 and s3_store.head(active.object_key).sha256 == active.sha256


def test_a_refused_publish_deletes_the_blob_it_wrote(db_engine, s3_store) -> None:
    with Session(db_engine) as session:
        job = claimed_job(session)
        crud.mark_tenant_deleting(session=session, tenant_id=job.tenant_id)
    with pytest.raises(TenantNotActiveError):
        publish_trained_prefix(
            db_engine,
            s3_store,
            job_id=job.id,
            tenant_id=job.tenant_id,
            owner="trainer",
            prefix=artifact(),
        )
    assert s3_store.list_objects(tenant_key_prefix(job.tenant_id)) == []

    with Session(db_engine) as session:
        other = claimed_job(session)
    with pytest.raises(LeaseLostError):
        publish_trained_prefix(
            db_engine,
            s3_store,
            job_id=other.id,
            tenant_id=other.tenant_id,
            owner="not-me",
            prefix=artifact(),
        )
    assert s3_store.list_objects(tenant_key_prefix(other.tenant_id)) == []
    with Session(db_engine) as session:
        assert session.exec(select(PrefixVersion)).all() == []


def test_orphan_sweep_deletes_only_blobs_without_a_row(db_engine, s3_store) -> None:
    with Session(db_engine) as session:
        job = claimed_job(session)
    tenant_id = job.tenant_id
    published = publish_trained_prefix(
        db_engine,
        s3_store,
        job_id=job.id,
        tenant_id=tenant_id,
        owner="trainer",
        prefix=artifact(),
    )
    orphan = prefix_key(tenant_id, uuid.uuid4())
    s3_store.put_bytes(orphan, b"left by a trainer that died before publishing")
    data = dataset_key(tenant_id, uuid.uuid4())
    s3_store.put_bytes(data, b"{}")
    assert delete_orphan_prefix_blobs(db_engine, s3_store, tenant_id) == 1
    keys = {b.key for b in s3_store.list_objects(tenant_key_prefix(tenant_id))}
    assert keys == {prefix_key(tenant_id, published), data}
    assert delete_orphan_prefix_blobs(db_engine, s3_store, tenant_id) == 0
    assert s3_store.list_objects(prefixes_key_prefix(uuid.uuid4())) == []


# --- progress events ------------------------------------------------------------------------


def test_progress_events_are_written_at_a_bounded_rate(db_engine) -> None:
    with Session(db_engine) as session:
        job = claimed_job(session)
    writer = ProgressWriter(db_engine, job.id, every=3600)

    def progress(step: int, validation_loss: float | None = None) -> Progress:
        return Progress(step, 100, 1, 1.0 / step, validation_loss, 10.0, 0.1 * step)

    for step in range(1, 61):
        writer(progress(step, validation_loss=0.5 if step == 30 else None))
    writer.finish(progress(60))  # training stopped early (patience) at step 60
    with Session(db_engine) as session:
        events = crud.list_job_events(session=session, job_id=job.id)
    assert [(e.step, e.total_steps, e.val_loss) for e in events] == [(1, 100, None), (60, 100, 0.5)]
    writer.finish(progress(60))  # already written: nothing more
    with Session(db_engine) as session:
        assert len(crud.list_job_events(session=session, job_id=job.id)) == 2


def test_trainer_errors_are_described_in_one_line() -> None:
    from ray.exceptions import (
        ActorDiedError,
        NodeDiedError,
        OutOfMemoryError,
        RayTaskError,
        WorkerCrashedError,
    )

    assert "process died" in describe_trainer_error(WorkerCrashedError())
    # A trainer process is an actor: its death fails its job's call with ActorDiedError, and
    # Ray's memory monitor killing it with OutOfMemoryError (its death cause's OOM context).
    assert "process died" in describe_trainer_error(ActorDiedError())
    assert "not retried" in describe_trainer_error(OutOfMemoryError("node low on memory"))
    # A process started for a claimed job whose start raised: the job's error says why.
    start_failed = ActorDiedError(
        RayTaskError(
            "TrainerProcess.__init__",
            "Traceback (most recent call last):\n  File x\n"
            "common.errors.InvalidInputError: unsupported PREFIXD_BLOB_URL scheme",
            InvalidInputError("unsupported PREFIXD_BLOB_URL scheme"),
        )
    )
    assert describe_trainer_error(start_failed) == (
        "the trainer process failed to start: "
        "common.errors.InvalidInputError: unsupported PREFIXD_BLOB_URL scheme"
    )
    assert "node" in describe_trainer_error(NodeDiedError("n"))
    assert describe_trainer_error(RuntimeError("boom\nmore")) == (
        "the trainer failed: RuntimeError: boom"
    )


# --- tenant erasure (minimal; issue 7 owns the full one) ------------------------------------


def test_erase_tenant_leaves_only_an_audit_record(db_engine, s3_store) -> None:
    with Session(db_engine) as session:
        job = claimed_job(session)
        tenant_id = job.tenant_id
        tenant = session.get(Tenant, tenant_id)
        assert tenant is not None
        crud.create_api_key(session=session, tenant_id=tenant_id)
        dataset_object_key = make_dataset(session, tenant).object_key
        crud.record_job_event(
            session=session, job_id=job.id, event_in=JobEventCreate(step=1, total_steps=2)
        )
        queued_id = make_job(session, tenant).id
        keeper = make_tenant(session)
        keeper_id = keeper.id
        kept_job_id = make_job(session, keeper).id
    s3_store.put_bytes(dataset_object_key, b"x")
    publish_trained_prefix(
        db_engine,
        s3_store,
        job_id=job.id,
        tenant_id=tenant_id,
        owner="trainer",
        prefix=artifact(),
    )
    s3_store.put_bytes(dataset_key(keeper_id, uuid.uuid4()), b"y")

    audit = erase_tenant(engine=db_engine, store=s3_store, tenant_id=tenant_id)

    assert audit.completed_at is not None and audit.objects_erased == 2
    # tenant, key, 3 datasets (one per job + one), 2 jobs, 1 event, 1 prefix
    assert audit.rows_erased == 1 + 1 + 3 + 2 + 1 + 1
    assert s3_store.list_versions(tenant_key_prefix(tenant_id)) == []
    assert len(s3_store.list_objects(tenant_key_prefix(keeper_id))) == 1
    with Session(db_engine) as session:
        assert session.get(Tenant, tenant_id) is None
        for model in (ApiKey, Dataset, TrainingJob, PrefixVersion):
            assert session.exec(select(model).where(model.tenant_id == tenant_id)).all() == []
        assert session.exec(select(JobEvent).where(JobEvent.job_id == job.id)).all() == []
        assert session.get(TrainingJob, queued_id) is None
        assert crud.get_job(session=session, job_id=kept_job_id) is not None
        (record,) = crud.list_deletion_audits(session=session, tenant_id=tenant_id)
        assert record.id == audit.id
