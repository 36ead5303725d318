"""Base prefixes through the real queue: the session's Ray, a scheduler, trainers in their
own processes, PostgreSQL and S3 over HTTP. An operator job trains a base prefix on
operator data; tenants' jobs warm-start from it or stack on it; every job reports what its
prefix bought; erasing a tenant never touches the base."""

from __future__ import annotations

import hashlib
import json
import uuid

import pytest
import torch

from common.architectures import prefix_shape
from common.base_prefix import key_values_fingerprint, stack_prefixes
from common.blobstore.keys import base_prefixes_key_prefix, operator_dataset_key
from common.db import crud
from common.db.models import JobState, OperatorDataset
from common.erasure import erase_tenant, find_tenant_leftovers
from common.model_loading import load_model
from common.prefix_file import prefix_from_bytes
from tests.workers.conftest import QUICK, WorkerEnv, examples, finished, wait_for

pytestmark = pytest.mark.slow


def operator_dataset(env: WorkerEnv, rows: list[dict[str, str]]) -> uuid.UUID:
    content = "".join(json.dumps(r) + "\n" for r in rows).encode()
    dataset_id = uuid.uuid4()
    env.store.put_bytes(operator_dataset_key(dataset_id), content)
    with env.session() as session:
        crud.add_operator_dataset(
            session=session,
            dataset_in=OperatorDataset(
                id=dataset_id,
                object_key=operator_dataset_key(dataset_id),
                sha256=hashlib.sha256(content).hexdigest(),
                size_bytes=len(content),
                example_count=len(rows),
            ),
        )
    return dataset_id


def succeeded(env: WorkerEnv, job_id: uuid.UUID):
    done = wait_for(lambda: finished(env, job_id), timeout=180, what=f"job {job_id}")
    assert done.state == JobState.succeeded, done.error
    return done


def test_base_prefix_warm_start_stacking_reports_and_erasure(
    worker_env, run_scheduler, tiny_model_dirs, test_settings
):
    env = worker_env
    tiny = load_model(str(tiny_model_dirs["llama"]), settings=test_settings)
    shape = prefix_shape(tiny.model.config)
    data = operator_dataset(env, examples(20, seed=7))
    with env.session() as session:
        operator_job = crud.enqueue_base_prefix_job(
            session=session,
            name="e2e-task",
            dataset_ids=[data],
            validation_dataset_id=None,
            hyperparameters=QUICK | {"validation_split": 0.2},
        )
    run_scheduler()

    # 1. The operator job: a base prefix version, stored outside every tenant.
    done = succeeded(env, operator_job.id)
    assert done.tenant_id is None
    with env.session() as session:
        (base,) = crud.list_base_prefixes(session=session)
    assert (base.name, base.version, base.job_id) == ("e2e-task", 1, operator_job.id)
    assert base.object_key.startswith(base_prefixes_key_prefix())
    base_file = prefix_from_bytes(
        env.store.get_bytes(base.object_key),
        expected_fingerprint=tiny.fingerprint,
        expected_shape=shape,
    )
    assert base_file.base_mode is None and base_file.prefix_length == 4
    rows = done.result["against"]
    assert set(rows) == {"new", "bare_model"}  # an operator job: no base, no previous version
    assert rows["new"]["prefix_length"] == 4 and rows["bare_model"]["prefix_length"] == 0

    # 2. Tenants train from it: a warm start, then a stacked version (with a previous one).
    tenant = env.tenant()
    warm = env.submit(
        tenant.id,
        QUICK | {"validation_split": 0.25, "base_prefix": str(base.id), "base_mode": "warm_start"},
    )
    succeeded(env, warm.id)
    stack = env.submit(
        tenant.id,
        QUICK | {"validation_split": 0.25, "base_prefix": str(base.id), "base_mode": "stack"},
    )
    stack_done = succeeded(env, stack.id)
    with env.session() as session:
        versions = crud.list_prefixes(session=session, tenant_id=tenant.id)
    assert [(v.version, v.base_prefix_id, v.base_mode) for v in versions] == [
        (1, base.id, "warm_start"),
        (2, base.id, "stack"),
    ]
    warm_file, stack_file = (
        prefix_from_bytes(
            env.store.get_bytes(v.object_key),
            expected_fingerprint=tiny.fingerprint,
            expected_shape=shape,
        )
        for v in versions
    )
    for file in (warm_file, stack_file):  # the file records the base: id and fingerprint
        assert file.base_prefix_id == str(base.id)
        assert file.base_fingerprint == key_values_fingerprint(base_file.key_values)
    assert warm_file.prefix_length == 4 and stack_file.prefix_length == 4

    # The report: the new prefix as served (stacked: 8 tokens) against the alternatives.
    report = stack_done.result
    assert report["status"] == "measured" and report["examples"] == 5
    rows = report["against"]
    assert set(rows) == {"new", "bare_model", "base", "previous"}
    assert rows["new"]["prefix_length"] == 8 and rows["base"]["prefix_length"] == 4
    assert rows["base"]["base_prefix_id"] == str(base.id)
    assert rows["previous"]["version"] == 1 and rows["previous"]["prefix_length"] == 4
    for row in rows.values():
        assert row["loss"] > 0 and 0 <= row["token_accuracy"] <= 1
    # … and as a job event, after the progress events.
    evaluation = [e for e in env.events(stack.id) if e.details is not None]
    assert len(evaluation) == 1 and evaluation[0].details == {"evaluation": report}
    assert evaluation[0].val_loss == rows["new"]["loss"]

    # The reported "new" loss is the stacked prefix's: recompute it independently.
    served = stack_prefixes(base_file.key_values, stack_file.key_values)
    assert served.shape[3] == 8 and torch.equal(served[:, :, :, :4], base_file.key_values)

    # 3. No validation examples: the result says so.
    plain = env.submit(tenant.id, QUICK)
    assert succeeded(env, plain.id).result["status"] == "no_validation_examples"

    # 4. A job on a base that no longer exists fails with a message naming it.
    gone = str(uuid.uuid4())
    orphan = env.submit(tenant.id, QUICK | {"base_prefix": gone, "base_mode": "stack"})
    failed = wait_for(lambda: finished(env, orphan.id), timeout=120, what="the orphan job")
    assert failed.state == JobState.failed and gone in (failed.error or "")

    # 5. Erasing a stacked tenant never touches the base: row and blob stay.
    other = env.tenant()
    stacked = env.submit(other.id, QUICK | {"base_prefix": str(base.id), "base_mode": "stack"})
    succeeded(env, stacked.id)
    erase_tenant(engine=env.engine, store=env.store, tenant_id=other.id)
    assert find_tenant_leftovers(env.engine, env.store, other.id) == []
    with env.session() as session:
        assert crud.get_base_prefix(session=session, base_prefix_id=base.id) is not None
        assert crud.get_operator_dataset(session=session, dataset_id=data) is not None
    assert env.store.get_bytes(base.object_key) == env.store.get_bytes(base.object_key)
    assert hashlib.sha256(env.store.get_bytes(base.object_key)).hexdigest() == base.sha256
