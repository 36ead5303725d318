"""``prefixd base-prefixes …``: the operator's base prefixes, on the database and blob
store directly (like ``prefixd tenants``); registered by prefixd/cli.py.

    prefixd base-prefixes upload FILE [--name N]        # operator data (JSONL)
    prefixd base-prefixes datasets                      # operator datasets
    prefixd base-prefixes train NAME --dataset ID … [--epochs N] [--wait]   # queue an operator job
    prefixd base-prefixes list [--name N]               # versions, default marked
    prefixd base-prefixes set-default ID | --clear
    prefixd base-prefixes delete ID                     # refused while tenants depend on it
    prefixd base-prefixes delete-dataset ID

A base prefix is trained on operator data only (never a tenant's). User errors print one
line ``error: …`` on stderr and exit 2 — never a traceback.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer

from prefixd.cli_support import migrated_storage, user_errors

base_prefixes_app = typer.Typer(
    help="Base prefixes (operators): upload operator data, train, list, default, delete.",
    no_args_is_help=True,
)


def _id(text: str, what: str) -> uuid.UUID:
    from common.blobstore.keys import validate_id

    return uuid.UUID(validate_id(text.strip().lower(), what=what))


@base_prefixes_app.command("upload")
@user_errors
def upload(
    data: Annotated[Path, typer.Argument(help="Operator training data, JSONL of {input, output}.")],
    name: Annotated[str | None, typer.Option("--name", help="A label for the dataset.")] = None,
) -> None:
    """Upload operator data for base prefixes (checked line by line; stored under
    operator/datasets/, never visible to tenants)."""
    from common.blobstore.base import sha256_hex
    from common.blobstore.keys import operator_dataset_key
    from common.data import read_jsonl
    from common.db import crud
    from common.db.engine import session_scope
    from common.db.models import OperatorDataset
    from common.errors import InvalidInputError

    if name is not None and not 1 <= len(name) <= 100:
        raise InvalidInputError("--name must have 1 to 100 characters")
    examples = read_jsonl(data)  # line-precise errors naming the file
    if not examples:
        raise InvalidInputError(f"{data}: no examples")
    raw = data.read_bytes()
    with migrated_storage() as (settings, engine, store):
        if len(raw) > settings.max_dataset_bytes:
            raise InvalidInputError(
                f"{data} has {len(raw)} bytes, more than max_dataset_bytes "
                f"({settings.max_dataset_bytes})"
            )
        dataset_id = uuid.uuid4()
        key = operator_dataset_key(dataset_id)
        store.put_bytes(key, raw)
        try:
            with session_scope(engine) as session:
                dataset = crud.add_operator_dataset(
                    session=session,
                    dataset_in=OperatorDataset(
                        id=dataset_id,
                        name=name,
                        object_key=key,
                        sha256=sha256_hex(raw),
                        size_bytes=len(raw),
                        example_count=len(examples),
                    ),
                )
                typer.echo(f"{dataset.id}  ({dataset.example_count} examples, {len(raw)} bytes)")
        except BaseException:
            store.delete(key)
            raise


@base_prefixes_app.command("datasets")
@user_errors
def datasets(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Operator datasets, newest first."""
    from common.db import crud
    from common.db.engine import session_scope

    with migrated_storage() as (_, engine, _store), session_scope(engine) as session:
        rows = [
            {
                "id": str(d.id),
                "name": d.name,
                "examples": d.example_count,
                "bytes": d.size_bytes,
                "created_at": d.created_at.isoformat(),
            }
            for d in crud.list_operator_datasets(session=session, limit=1000)
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    elif not rows:
        typer.echo("no operator datasets")
    for row in rows if not as_json else []:
        typer.echo(f"{row['id']}  {row['examples']:>7} examples  {row['name'] or ''}")


@base_prefixes_app.command("delete-dataset")
@user_errors
def delete_dataset(dataset_id: Annotated[str, typer.Argument()]) -> None:
    """Delete an operator dataset (refused while an unfinished operator job reads it)."""
    from common.db import crud
    from common.db.engine import session_scope

    wanted = _id(dataset_id, "dataset id")
    with migrated_storage() as (_, engine, store):
        with session_scope(engine) as session:
            dataset = crud.delete_operator_dataset(session=session, dataset_id=wanted)
        store.delete(dataset.object_key)
    typer.echo(f"deleted operator dataset {wanted}")


@base_prefixes_app.command("train")
@user_errors
def train(
    name: Annotated[str, typer.Argument(help="The base prefix to train a new version of.")],
    dataset: Annotated[
        list[str], typer.Option("--dataset", help="Operator dataset id (repeatable).")
    ],
    validation_split: Annotated[
        float | None,
        typer.Option(
            "--validation-split", help="Held out for validation (default: automatic, as for jobs)."
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs")] = None,
    prefix_length: Annotated[int | None, typer.Option("--prefix-length")] = None,
    learning_rate: Annotated[float | None, typer.Option("--learning-rate")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the job's progress until it ends.")
    ] = False,
) -> None:
    """Queue an operator job training the next version of base prefix NAME on operator
    datasets (through the same queue as tenants' jobs; `prefixd worker` runs it)."""
    from common.db import crud
    from common.db.engine import session_scope
    from common.hyperparameters import parse_hyperparameters

    params: dict[str, Any] = {}
    for key, value in (
        ("epochs", epochs),
        ("prefix_length", prefix_length),
        ("learning_rate", learning_rate),
        ("seed", seed),
        ("validation_split", validation_split),
    ):
        if value is not None:
            params[key] = value
    spec = parse_hyperparameters(params)  # bad values fail before anything is queued
    hyperparameters = {k: v for k, v in params.items()}
    hyperparameters |= {"prefix_length": spec.config.prefix_length}
    ids = [_id(d, "dataset id") for d in dataset]
    with migrated_storage() as (_, engine, _store):
        with session_scope(engine) as session:
            job = crud.enqueue_base_prefix_job(
                session=session,
                name=name,
                dataset_ids=ids,
                validation_dataset_id=None,
                hyperparameters=hyperparameters,
            )
            job_id = job.id
        typer.echo(f"queued job {job_id} (base prefix {name!r})")
        if wait:
            _follow(engine, job_id)


def _follow(engine: Any, job_id: uuid.UUID, poll_seconds: float = 1.0) -> None:
    """A progress bar from the job's events until the job ends; a failed job is an error."""
    from tqdm import tqdm

    from common.db import crud
    from common.db.engine import session_scope
    from common.db.models import TERMINAL_JOB_STATES, JobState
    from common.errors import PrefixdError

    after: int | None = None
    with tqdm(total=None, unit="step", desc="training", file=sys.stderr) as bar:
        while True:
            with session_scope(engine) as session:
                job = crud.get_operator_job(session=session, job_id=job_id)
                events = crud.list_job_events(session=session, job_id=job_id, after_id=after)
                state = job.state if job is not None else None
                error, result = (job.error, job.result) if job is not None else (None, None)
            for event in events:
                after = event.id
                if event.total_steps:
                    bar.total = event.total_steps
                bar.n = event.step
                if event.loss is not None:
                    bar.set_postfix(loss=f"{event.loss:.3f}")
                bar.refresh()
            if state is None or state in TERMINAL_JOB_STATES:
                break
            time.sleep(poll_seconds)
    if state != JobState.succeeded:
        raise PrefixdError(f"job {job_id} {state.value if state else 'vanished'}: {error}")
    with session_scope(engine) as session:
        made = [b for b in crud.list_base_prefixes(session=session) if b.job_id == job_id]
    if made:
        typer.echo(f"base prefix {made[0].id} ({made[0].name} v{made[0].version})")
    typer.echo(json.dumps(result, indent=2))


@base_prefixes_app.command("list")
@user_errors
def list_bases(
    name: Annotated[str | None, typer.Option("--name")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Base prefix versions; `*` marks the default; DEPENDENTS: tenants whose active
    prefix is stacked on the version."""
    from common.db import crud
    from common.db.engine import session_scope

    with migrated_storage() as (_, engine, _store), session_scope(engine) as session:
        bases = crud.list_base_prefixes(session=session, name=name)
        counts = crud.base_prefix_dependents(session=session, base_prefix_ids=[b.id for b in bases])
        rows = [
            {
                "id": str(b.id),
                "name": b.name,
                "version": b.version,
                "default": b.is_default,
                "prefix_length": b.prefix_length,
                "dependents": counts.get(b.id, 0),
                "created_at": b.created_at.isoformat(),
            }
            for b in bases
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no base prefixes")
        return
    typer.echo(f"  {'ID':36}  {'NAME':20}  {'VER':>3}  {'LEN':>3}  DEPENDENTS")
    for row in rows:
        mark = "*" if row["default"] else " "
        typer.echo(
            f"{mark} {row['id']:36}  {row['name']:20}  {row['version']:>3}  "
            f"{row['prefix_length']:>3}  {row['dependents']}"
        )


@base_prefixes_app.command("set-default")
@user_errors
def set_default(
    base_prefix_id: Annotated[str | None, typer.Argument()] = None,
    clear: Annotated[bool, typer.Option("--clear", help="No default any more.")] = False,
) -> None:
    """Mark a base prefix version the default (what jobs' `base_prefix: default` means)."""
    from common.db import crud
    from common.db.engine import session_scope
    from common.errors import InvalidInputError

    if clear == (base_prefix_id is not None):
        raise InvalidInputError("give a base prefix id or --clear")
    wanted = _id(base_prefix_id, "base prefix id") if base_prefix_id is not None else None
    with migrated_storage() as (_, engine, _store), session_scope(engine) as session:
        crud.set_default_base_prefix(session=session, base_prefix_id=wanted)
    typer.echo(f"default base prefix: {wanted or 'none'}")


@base_prefixes_app.command("delete")
@user_errors
def delete(base_prefix_id: Annotated[str, typer.Argument()]) -> None:
    """Delete a base prefix version (row, then blob); refused while a tenant's active
    prefix is stacked on it or an unfinished job trains on it."""
    from common.db import crud
    from common.db.engine import session_scope

    wanted = _id(base_prefix_id, "base prefix id")
    with migrated_storage() as (_, engine, store):
        with session_scope(engine) as session:
            base = crud.delete_base_prefix(session=session, base_prefix_id=wanted)
        store.delete(base.object_key)
    typer.echo(f"deleted base prefix {wanted} ({base.name} v{base.version})")
