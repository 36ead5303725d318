"""``prefixd base-prefixes …`` on a real database (SQLite and PostgreSQL) and a local blob
directory: upload, datasets, train (queued; ``--wait`` follows it to the end), list,
set-default, delete (refused while a tenant's active prefix is stacked on it), and bad
input as one ``error:`` line with the error's exit code, never a traceback."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlmodel import Session
from typer.testing import CliRunner

from common.blobstore import LocalBlobStore
from common.blobstore.keys import base_prefix_key
from common.db import crud
from common.db.models import BasePrefixCreate, JobEventCreate
from prefixd.cli import app
from tests.common.test_base_prefixes_crud import stacked_version
from tests.fixtures.factories import examples, jsonl, make_tenant


@pytest.fixture
def store(tmp_path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


@pytest.fixture
def cli(db_engine, store, monkeypatch) -> CliRunner:
    monkeypatch.setenv("PREFIXD_DATABASE_URL", db_engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv("PREFIXD_BLOB_URL", str(store.root))
    return CliRunner()


def finish_like_a_trainer(engine, job_id: uuid.UUID) -> None:
    """What a trainer does for an operator job (claim, progress, publish), in a thread."""
    time.sleep(1.0)
    with Session(engine) as session:
        owner = f"fake-trainer-{uuid.uuid4().hex}"
        claimed = crud.claim_next_job(session=session, owner=owner, lease_seconds=60)
        assert claimed is not None and claimed.id == job_id
        for step in (1, 2):
            crud.record_job_event(
                session=session,
                job_id=job_id,
                event_in=JobEventCreate(step=step, total_steps=2, loss=1.0 / step),
            )
        base_id = uuid.uuid4()
        crud.publish_base_prefix(
            session=session,
            job_id=job_id,
            owner=owner,
            result={"status": "no_validation_examples"},
            base_in=BasePrefixCreate(
                id=base_id,
                name="task",
                base_model_fingerprint="fp",
                prefix_length=4,
                dtype="float32",
                size_bytes=1,
                sha256="0" * 64,
                object_key=base_prefix_key(base_id),
            ),
        )


def test_upload_train_wait_list_default_and_delete(cli, db_engine, store, tmp_path: Path) -> None:
    data = tmp_path / "operator.jsonl"
    data.write_bytes(jsonl(examples(5)))
    uploaded = cli.invoke(app, ["base-prefixes", "upload", str(data), "--name", "e2e"])
    assert uploaded.exit_code == 0, uploaded.output
    dataset_id = uploaded.stdout.split()[0]
    assert "5 examples" in uploaded.stdout
    assert store.list_objects("operator/datasets/") != []
    listed = json.loads(cli.invoke(app, ["base-prefixes", "datasets", "--json"]).stdout)
    assert [(d["id"], d["name"], d["examples"]) for d in listed] == [(dataset_id, "e2e", 5)]

    queued = cli.invoke(
        app, ["base-prefixes", "train", "task", "--dataset", dataset_id, "--epochs", "2"]
    )
    assert queued.exit_code == 0, queued.output
    job_id = uuid.UUID(queued.stdout.split()[2])
    with Session(db_engine) as session:
        job = crud.get_operator_job(session=session, job_id=job_id)
        assert (
            job is not None
            and job.hyperparameters["epochs"] == 2
            and job.base_prefix_name == "task"
        )
        crud.cancel_job(session=session, job_id=job_id)

    # `--wait` follows the job (a stand-in trainer finishes it) to its end.
    result: dict[str, object] = {}

    def run() -> None:
        result["out"] = cli.invoke(
            app, ["base-prefixes", "train", "task", "--dataset", dataset_id, "--wait"]
        )

    follower = threading.Thread(target=run)
    follower.start()
    deadline = time.monotonic() + 30
    while True:
        with Session(db_engine) as session:
            queued_now = [
                j for j in crud.list_operator_jobs(session=session) if j.state == "queued"
            ]
        if queued_now or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert queued_now, "the follower never queued its job"
    finish_like_a_trainer(db_engine, queued_now[0].id)
    follower.join(timeout=60)
    followed = result["out"]
    assert followed.exit_code == 0, followed.output  # type: ignore[attr-defined]
    assert "(task v1)" in followed.stdout and "no_validation_examples" in followed.stdout  # type: ignore[attr-defined]

    with Session(db_engine) as session:
        (base,) = crud.list_base_prefixes(session=session)
    table = cli.invoke(app, ["base-prefixes", "list"])
    assert table.exit_code == 0 and str(base.id) in table.stdout and "* " not in table.stdout
    assert cli.invoke(app, ["base-prefixes", "set-default", str(base.id)]).exit_code == 0
    rows = json.loads(cli.invoke(app, ["base-prefixes", "list", "--json"]).stdout)
    assert [(r["id"], r["default"], r["dependents"]) for r in rows] == [(str(base.id), True, 0)]

    # A tenant serving a prefix stacked on it: deletion refused, the error names why.
    with Session(db_engine) as session:
        stacked_version(session, make_tenant(session), base.id)
    refused = cli.invoke(app, ["base-prefixes", "delete", str(base.id)])
    assert (
        refused.exit_code == 4
        and refused.output.startswith("error: ")
        and "1 tenant" in refused.output
    )
    assert "Traceback" not in refused.output
    assert (
        json.loads(cli.invoke(app, ["base-prefixes", "list", "--json"]).stdout)[0]["dependents"]
        == 1
    )

    assert cli.invoke(app, ["base-prefixes", "set-default", "--clear"]).exit_code == 0
    deleted = cli.invoke(app, ["base-prefixes", "delete-dataset", dataset_id])
    assert deleted.exit_code == 0, deleted.output  # every job that read it has finished
    assert store.list_objects("operator/datasets/") == []


def test_bad_input_is_one_error_line(cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"input": "a", "output": "b"}\n{"input": "a"}\n')
    cases = [
        (["base-prefixes", "upload", str(bad)], 2, "bad.jsonl:2: missing field"),
        (["base-prefixes", "upload", str(tmp_path / "missing.jsonl")], 2, "cannot read"),
        (["base-prefixes", "set-default"], 2, "--clear"),
        (["base-prefixes", "delete", "nope"], 2, "base prefix id"),
        (["base-prefixes", "delete", str(uuid.uuid4())], 3, "not found"),
        (["base-prefixes", "train", "t", "--dataset", str(uuid.uuid4())], 3, "operator dataset"),
        (
            ["base-prefixes", "train", "t", "--dataset", str(uuid.uuid4()), "--epochs", "0"],
            2,
            "epochs",
        ),
        (["base-prefixes", "delete-dataset", str(uuid.uuid4())], 3, "not found"),
    ]
    for args, code, named in cases:
        got = cli.invoke(app, args)
        assert got.exit_code == code, (args, got.output)
        assert got.output.startswith("error: ") and named in got.output, (args, got.output)
        assert "Traceback" not in got.output


def test_generate_local_serves_a_stacked_prefix_only_behind_its_base(
    test_settings, monkeypatch, tmp_path: Path, tiny_model_dirs
) -> None:
    import torch

    from common.architectures import prefix_shape
    from common.base_prefix import key_values_fingerprint, stack_prefixes
    from common.generation import DecodingConfig, generate_texts
    from common.model_loading import load_model
    from common.prefix_file import Prefix, save_prefix

    monkeypatch.setenv("PREFIXD_HOME", str(test_settings.home))
    model = str(tiny_model_dirs["llama"])
    loaded = load_model(model, settings=test_settings)
    shape = prefix_shape(loaded.model.config)
    base_kv = torch.randn(shape.tensor_shape(3), generator=torch.Generator().manual_seed(1))
    own_kv = torch.randn(shape.tensor_shape(2), generator=torch.Generator().manual_seed(2))
    base = save_prefix(
        Prefix(base_kv, loaded.fingerprint, loaded.architecture), tmp_path / "base.safetensors"
    )
    tenant = save_prefix(
        Prefix(
            own_kv,
            loaded.fingerprint,
            loaded.architecture,
            base_prefix_id="b1",
            base_fingerprint=key_values_fingerprint(base_kv),
            base_mode="stack",
        ),
        tmp_path / "tenant.safetensors",
    )
    other = save_prefix(
        Prefix(base_kv + 1, loaded.fingerprint, loaded.architecture), tmp_path / "other.safetensors"
    )
    runner = CliRunner()
    common = ["generate-local", "--model", model, "--max-new-tokens", "5", "--json"]

    served = runner.invoke(
        app, [*common, "--prefix", str(tenant), "--base", str(base), "alpha red"]
    )
    assert served.exit_code == 0, served.output
    stacked = Prefix(stack_prefixes(base_kv, own_kv), loaded.fingerprint, loaded.architecture)
    expected = generate_texts(loaded, [(stacked, "alpha red")], DecodingConfig(max_new_tokens=5))
    assert json.loads(served.stdout[served.stdout.index("[") :])[0]["output"] == expected[0]

    for args, named in [
        (["--prefix", str(tenant)], "pass its file with --base"),
        (["--prefix", str(tenant), "--base", str(other)], "has changed"),
        (["--prefix", str(base), "--base", str(base)], "drop --base"),
        (["--base", str(base)], "--base needs --prefix"),
    ]:
        got = runner.invoke(app, [*common, *args, "alpha"])
        assert got.exit_code == 2 and named in got.output, (args, got.output)
        assert "Traceback" not in got.output
