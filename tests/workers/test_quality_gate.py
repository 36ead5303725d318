"""The nightly quality gate (workers/quality_gate.py): the stable hash split, the comparison
slice, and — through the trainer's own code path without Ray, with a tiny model, real
PostgreSQL and a blob directory — a nightly job whose prefix is worse than the active one
is published inactive with a note, while a better one becomes active."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from common.blobstore.local import LocalBlobStore
from common.config import Settings
from common.data import Example
from common.db import crud
from common.db.models import JobPriority, JobState, TrainingJob, TrainingJobCreate
from common.errors import InvalidInputError
from tests.workers.conftest import WorkerEnv, examples
from workers import trainer
from workers.quality_gate import comparison_slice, hash_split
from workers.trainer import LeaseKeeper, split_validation


def rows(n: int, start: int = 0) -> list[Example]:
    return [Example(f"input {i}", f"output {i}") for i in range(start, start + n)]


def test_the_hash_split_is_stable_as_data_grows() -> None:
    train, held = hash_split(rows(200), 0.1, seed=3)
    assert 8 <= len(held) <= 35 and len(train) + len(held) == 200
    more_train, more_held = hash_split(rows(200) + rows(100, start=200), 0.1, seed=3)
    assert set(held) <= set(more_held) and set(train) <= set(more_train)
    assert hash_split(rows(200), 0.1, seed=4)[1] != held  # the seed picks another slice
    assert split_validation(rows(200), 0.1, 3, method="hash") == (train, held)
    # At least one example on each side; one example cannot be split.
    assert [len(part) for part in hash_split(rows(2), 0.01, seed=0)] == [1, 1]
    assert [len(part) for part in hash_split(rows(2), 0.99, seed=0)] == [1, 1]
    with pytest.raises(InvalidInputError, match="leaves nothing to train on"):
        hash_split(rows(1), 0.5, seed=0)


def test_the_comparison_slice_leaves_out_what_the_active_version_trained_on() -> None:
    old, new = rows(40), rows(20, start=40)
    _, held = hash_split(old + new, 0.25, seed=0)
    interactive = TrainingJob(tenant_id=uuid.uuid4(), hyperparameters={"seed": 0})
    unseen, basis = comparison_slice(held, interactive, old)
    assert basis == "unseen_by_active" and unseen == [e for e in held if e in new]
    # A nightly (hash-split) active version never trained on its own held-out examples.
    nightly = TrainingJob(
        tenant_id=uuid.uuid4(),
        hyperparameters={"seed": 0, "validation_split": 0.25, "validation_split_method": "hash"},
    )
    assert comparison_slice(held, nightly, old)[0] == held
    assert comparison_slice(held, None, None) == (held, "whole_slice")


# --- through the trainer --------------------------------------------------------------------

GOOD = {"prefix_length": 4, "mid_dim": 16, "epochs": 8, "batch_size": 4, "learning_rate": 0.01}
NIGHTLY = {"validation_split": 0.25, "validation_split_method": "hash"}


@pytest.fixture
def env(pg_engine, tmp_path: Path) -> WorkerEnv:
    settings = Settings(
        home=tmp_path / "home",
        database_url=pg_engine.url.render_as_string(hide_password=False),
        blob_url=str(tmp_path / "blobs"),
        nightly_max_regression=0.02,
        progress_event_seconds=3600,
    )
    return WorkerEnv(settings, pg_engine, LocalBlobStore(tmp_path / "blobs"))


@pytest.fixture
def prepared(env: WorkerEnv, tiny_llama) -> trainer.PreparedTrainer:
    """What a warm trainer process holds before its job; the tiny model stands in for the
    weights a trainer maps from Ray's object store."""
    return trainer.PreparedTrainer(env.engine, env.store, tiny_llama)


def run(
    env: WorkerEnv,
    prepared: trainer.PreparedTrainer,
    tenant_id: uuid.UUID,
    datasets: list[Any],
    params: dict[str, Any],
    *,
    priority: JobPriority,
) -> TrainingJob:
    """Enqueue, claim and run one job through the trainer's code path (no Ray)."""
    with env.session() as session:
        job, _ = crud.enqueue_job(
            session=session,
            tenant_id=tenant_id,
            job_in=TrainingJobCreate(
                dataset_ids=[d.id for d in datasets], hyperparameters=params, priority=priority
            ),
        )
        owner = f"test-{uuid.uuid4().hex}"
        claimed = crud.claim_next_job(session=session, owner=owner, lease_seconds=300)
        assert claimed is not None and claimed.id == job.id
    lease = LeaseKeeper(env.engine, job.id, owner, lease_seconds=300, every=60)  # not started
    outcome = trainer._train_and_publish(
        env.settings,
        prepared,
        job.id,
        owner,
        lease,
        lambda outcome, **fields: (outcome, fields),  # type: ignore[arg-type,return-value]
        times=trainer.PhaseTimes(),
    )
    assert outcome[0] == "succeeded", outcome
    return env.job(job.id)


@pytest.mark.slow
def test_a_worse_nightly_prefix_stays_inactive_and_a_better_one_is_activated(
    env: WorkerEnv, prepared: trainer.PreparedTrainer
) -> None:
    tenant = env.tenant()
    old = env.dataset(tenant.id, examples(24))
    first = run(env, prepared, tenant.id, [old], GOOD, priority=JobPriority.interactive)
    new = env.dataset(tenant.id, examples(16, seed=3))

    # A nightly job that barely trains: worse than the active version on held-out data.
    worse = GOOD | NIGHTLY | {"epochs": 1, "learning_rate": 1e-6}
    rejected = run(env, prepared, tenant.id, [old, new], worse, priority=JobPriority.batch)
    with env.session() as session:
        versions = crud.list_prefixes(session=session, tenant_id=tenant.id)
    assert [(p.version, p.active, p.job_id) for p in versions] == [
        (1, True, first.id),
        (2, False, rejected.id),
    ]
    metrics = versions[1].metrics
    assert metrics["quality_gate"] == "kept_inactive"
    assert metrics["quality_gate_basis"] == "unseen_by_active"
    assert metrics["quality_gate_active_version"] == 1 and metrics["quality_gate_examples"] >= 1
    assert metrics["quality_gate_validation_loss"] > metrics["quality_gate_active_validation_loss"]
    assert rejected.state == JobState.succeeded and rejected.error is None
    assert (
        rejected.note is not None and "kept inactive by the nightly quality gate" in rejected.note
    )
    assert "active version 1" in rejected.note
    assert versions[1].activated_at is None and first.note is None

    # A nightly job that trains well on all the data: compared on the same slice, activated.
    better = run(env, prepared, tenant.id, [old, new], GOOD | NIGHTLY, priority=JobPriority.batch)
    with env.session() as session:
        active = crud.get_active_prefix(session=session, tenant_id=tenant.id)
    assert active is not None and (active.version, active.job_id) == (3, better.id)
    assert active.metrics["quality_gate"] == "passed" and better.note is None
    assert active.metrics["quality_gate_examples"] == metrics["quality_gate_examples"]
    assert (
        active.metrics["quality_gate_validation_loss"]
        <= active.metrics["quality_gate_active_validation_loss"] * 1.02
    )
