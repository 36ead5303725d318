"""What one training job costs the database and the object store: the figures behind
docs/SCALE.md, measured in this process on the tiny model.

A fresh PostgreSQL database (migrated), an S3 server over HTTP (moto's, on a free port), a
local Ray (the frozen weights in its object store), the tiny random Llama of
tests/fixtures/models.py. Each tenant uploads a dataset and gets a job (claimed with
``claim_next_job``, run with ``run_training_job``, the trainer's entry point, in this
process), then a second dataset and a nightly (``batch``) job, which the quality gate
compares with the first version. Counted, per job:

- SQL statements (a ``before_cursor_execute`` listener on every engine) and transactions
  (``commit`` events): of the claim, and of the trainer by kind (lease renewals, progress
  events, the rest: reading the job and its datasets, publishing);
- object-store requests (every HTTP request botocore sends, by method);
- the scheduler's own statements per poll, with nothing to claim (its tick's calls:
  the expired-lease sweep, an empty claim, the lease check of the running jobs);
- a trainer process's start as the warm pool makes it (``--process-starts``): wall time
  and the process's CPU seconds.

Then one job's compute on the **embedded model** (SmolLM2-135M) at a realistic data size:
``--embedded-examples`` E2E examples, the automatic budget (a validation split and early
stopping), one torch thread, timed apart: loading the model, and ``train_prefix`` (what a
trainer runs between reading the data and publishing).

    .venv/bin/python -m bench.job_lifecycle [--tenants 4] [--examples 40] [--embedded-examples 50]
        [--process-starts 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import socket
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bench.nightly_planning import DEFAULT_POSTGRES_URL, fresh_database
from bench.report import write_section
from common.blobstore import build_blob_store, dataset_key
from common.config import Settings
from common.db import crud
from common.db.engine import parse_database_url, session_scope
from common.db.models import DatasetCreate, JobPriority, TenantCreate, TrainingJobCreate

SECTION = "One job's database and object-store requests (bench/job_lifecycle.py)"
WORDS = "red green blue one two three four five six seven eight nine ten".split()
PARAMS = {"prefix_length": 4, "mid_dim": 16, "batch_size": 4, "learning_rate": 0.01}


def examples(n: int, seed: int) -> bytes:
    rows = [
        {
            "input": f"alpha {WORDS[(i * 7 + seed) % 13]} {WORDS[(i + seed) % 13]}",
            "output": " ".join(WORDS[(i + seed) % 5 : (i + seed) % 5 + 4]),
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


class Tally:
    """Statements, commits and object-store requests of this process, by kind."""

    def __init__(self) -> None:
        self.statements: Counter[str] = Counter()
        self.commits = 0
        self.connections = 0  # database connections opened
        self.requests: Counter[str] = Counter()

    @staticmethod
    def kind(statement: str) -> str:
        text = " ".join(statement.split())
        if text.startswith("UPDATE training_jobs SET lease_expires_at"):
            return "lease renewal"
        if text.startswith("INSERT INTO job_events"):
            return "job event"
        return "other"


@contextmanager
def tallied() -> Iterator[Tally]:
    import botocore.endpoint

    tally = Tally()

    def statement(_conn: Any, _cursor: Any, text: str, *_: Any) -> None:
        tally.statements[Tally.kind(text)] += 1

    def commit(_conn: Any) -> None:
        tally.commits += 1

    def connect(_dbapi: Any, _record: Any) -> None:
        tally.connections += 1

    send = botocore.endpoint.Endpoint._send

    def counted_send(endpoint: Any, request: Any) -> Any:
        listing = request.method == "GET" and "list-type=" in request.url
        tally.requests["LIST" if listing else request.method] += 1
        return send(endpoint, request)

    sa.event.listen(Engine, "before_cursor_execute", statement)
    sa.event.listen(Engine, "commit", commit)
    sa.event.listen(Engine, "connect", connect)
    botocore.endpoint.Endpoint._send = counted_send  # type: ignore[method-assign]
    try:
        yield tally
    finally:
        botocore.endpoint.Endpoint._send = send  # type: ignore[method-assign]
        sa.event.remove(Engine, "before_cursor_execute", statement)
        sa.event.remove(Engine, "commit", commit)
        sa.event.remove(Engine, "connect", connect)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def add_dataset(engine: Engine, store: Any, tenant_id: uuid.UUID, data: bytes) -> uuid.UUID:
    dataset_id = uuid.uuid4()
    key = dataset_key(tenant_id, dataset_id)
    store.put_bytes(key, data)
    with session_scope(engine) as session:
        crud.add_dataset(
            session=session,
            tenant_id=tenant_id,
            dataset_in=DatasetCreate(
                id=dataset_id,
                object_key=key,
                sha256=hashlib.sha256(data).hexdigest(),
                size_bytes=len(data),
                example_count=data.count(b"\n"),
            ),
        )
    return dataset_id


def run_job(
    settings: Settings, engine: Engine, shared: Any, tenant_id: uuid.UUID, job_in: Any
) -> dict[str, Any]:
    from workers.trainer import prepare_trainer, run_training_job

    with session_scope(engine) as session:
        job, _ = crud.enqueue_job(session=session, tenant_id=tenant_id, job_in=job_in)
    owner = f"bench-{uuid.uuid4().hex[:8]}"
    # As in a warm pool process: prepared (engine connected, store client, weights mapped)
    # before the claim, counted apart from the job.
    with tallied() as preparing:
        prepared = prepare_trainer(settings, shared)
    with tallied() as claim, session_scope(engine) as session:
        claimed = crud.claim_next_job(session=session, owner=owner, lease_seconds=600)
    assert claimed is not None and claimed.id == job.id
    started = time.perf_counter()
    with tallied() as trainer:
        report = run_training_job(settings, shared, str(job.id), owner, prepared=prepared)
    seconds = time.perf_counter() - started
    if report.outcome != "succeeded":
        raise RuntimeError(f"job {job.id}: {report.outcome} {report.error}")
    return {
        "priority": str(job_in.priority),
        "seconds": seconds,
        "claim": dict(claim.statements),
        "claim_commits": claim.commits,
        "trainer": dict(trainer.statements),
        "trainer_commits": trainer.commits,
        "trainer_connections": trainer.connections,
        "prepare_connections": preparing.connections,
        "prepare_statements": sum(preparing.statements.values()),
        "s3": dict(trainer.requests),
    }


def scheduler_poll(engine: Engine, running: int) -> dict[str, int]:
    """Statements and commits of one scheduler poll with nothing to claim and ``running``
    jobs under watch (the calls of ``Scheduler._tick``)."""
    with tallied() as tally, session_scope(engine) as session:
        crud.reclaim_expired_jobs(session=session)
        crud.job_lease_owners(session=session, job_ids=[uuid.uuid4() for _ in range(running)])
        crud.claim_next_job(session=session, owner="bench-poll", lease_seconds=600)
    return {"statements": sum(tally.statements.values()), "commits": tally.commits}


def trainer_starts(settings: Settings, shared: Any, count: int) -> list[dict[str, float]]:
    """``count`` trainer processes started one after the other as the warm pool starts
    them (workers/trainer_pool.py: a Ray actor, 1 CPU, prepared at its start), each killed
    once ready: the wall time from its creation to ``ready``, and the process's CPU seconds
    (its whole life: the Ray worker's start, the imports, ``prepare_trainer``)."""
    import psutil
    import ray

    from workers.trainer_pool import TrainerProcessActor, run_claimed_job

    starts = []
    for _ in range(count):
        started = time.perf_counter()
        actor: Any = TrainerProcessActor.options(  # type: ignore[attr-defined]
            num_cpus=1, max_restarts=0
        ).remote(settings, shared, run_claimed_job, True)
        info: dict[str, Any] = ray.get(actor.ready.remote(), timeout=600)
        wall = time.perf_counter() - started
        cpu = psutil.Process(info["pid"]).cpu_times()
        ray.kill(actor, no_restart=True)
        starts.append(
            {
                "wall_seconds": wall,
                "cpu_seconds": cpu.user + cpu.system,
                "prepare_seconds": float(info["prepare_seconds"]),
            }
        )
    return starts


def embedded_job(examples: int, max_steps: int = 0) -> dict[str, Any]:
    """One job's training on the embedded model, one torch thread; ``max_steps`` > 0 stops
    it after that many steps (the automatic budget's plan and validation cadence unchanged),
    for a per-step cost on a busy machine."""
    import torch

    from common.data import encode_example
    from common.datasets.e2e import low_data_split, read_e2e
    from common.model_loading import EMBEDDED, load_model
    from common.training import train_prefix
    from common.training_budget import automatic_validation_split
    from common.training_config import TrainingConfig
    from workers.quality_gate import evaluate_prefix

    torch.set_num_threads(1)
    data = low_data_split(read_e2e(), n_train=examples, n_test=1, seed=0).train
    train, validation = automatic_validation_split(data, 0)
    with tempfile.TemporaryDirectory(prefix="prefixd-bench-embedded-") as tmp:
        started = time.perf_counter()
        loaded = load_model(EMBEDDED, settings=Settings(home=Path(tmp)))
        loading = time.perf_counter() - started
        # CPU seconds beside wall seconds: with one torch thread they are what the job takes
        # on a core of its own, whatever else this shared machine runs.
        started, started_cpu = time.perf_counter(), time.process_time()
        config = TrainingConfig()
        steps_done = 0

        def count(_progress: Any) -> None:
            nonlocal steps_done
            steps_done += 1

        result = train_prefix(
            loaded,
            train,
            config,
            validation=validation or None,
            on_progress=count,
            should_stop=lambda: 0 < max_steps <= steps_done,
        )
        training = time.perf_counter() - started
        training_cpu = time.process_time() - started_cpu
        # One validation pass as the early stopping, the job report and the quality gate
        # run it: the loss over the held-out examples, forward only, in training's batches.
        encoded = [encode_example(loaded.tokenizer, e) for e in validation or train[:8]]
        started, started_cpu = time.perf_counter(), time.process_time()
        evaluate_prefix(loaded, result.prefix.key_values, encoded, config.batch_size)
        evaluation = time.perf_counter() - started
        evaluation_cpu = time.process_time() - started_cpu
    return {
        "examples": examples,
        "train": len(train),
        "validation": len(validation or []),
        "load_seconds": loading,
        "train_seconds": training,
        "train_cpu_seconds": training_cpu,
        "evaluation_cpu_seconds": evaluation_cpu,
        "steps": int(result.prefix.metrics["steps"]),
        "planned_steps": int(result.prefix.metrics["planned_steps"]),
        "evaluations": len({p.step for p in result.history if p.validation_loss is not None}),
        "evaluation_seconds": evaluation,
        "evaluation_batches": math.ceil(len(encoded) / config.batch_size),
        "batch_size": config.batch_size,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from moto.server import ThreadedMotoServer

    from common.model_loading import load_model
    from common.shared_weights import share_model
    from tests.fixtures.models import build_tiny_model_dir

    # The S3 test server's dummy credentials, for the boto3 clients the trainer makes.
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        num_cpus=1,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        with (
            tempfile.TemporaryDirectory(prefix="prefixd-bench-lifecycle-") as tmp,
            fresh_database(parse_database_url(args.postgres_url)) as engine,
        ):
            root = Path(tmp)
            model_dir = build_tiny_model_dir(root / "model", "llama")
            settings = Settings(
                home=root / "home",
                model=str(model_dir),
                database_url=engine.url.render_as_string(hide_password=False),
                blob_url="s3://bench-lifecycle/prefixd",
                s3_endpoint_url=endpoint,
                trainer_num_cpus=1,
            )
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-lifecycle")
            store = build_blob_store(settings)
            shared = share_model(load_model(str(model_dir), settings=settings))
            jobs = []
            for t in range(args.tenants):
                with session_scope(engine) as session:
                    tenant = crud.create_tenant(
                        session=session, tenant_in=TenantCreate(name=f"bench-{t}")
                    )
                    tenant_id = tenant.id
                first = add_dataset(engine, store, tenant_id, examples(args.examples, t))
                jobs.append(
                    run_job(
                        settings,
                        engine,
                        shared,
                        tenant_id,
                        TrainingJobCreate(dataset_ids=[first], hyperparameters=PARAMS),
                    )
                )
                second = add_dataset(engine, store, tenant_id, examples(args.examples // 2, t + 7))
                nightly = PARAMS | {"validation_split": 0.1, "validation_split_method": "hash"}
                jobs.append(
                    run_job(
                        settings,
                        engine,
                        shared,
                        tenant_id,
                        TrainingJobCreate(
                            dataset_ids=[first, second],
                            hyperparameters=nightly,
                            priority=JobPriority.batch,
                        ),
                    )
                )
                print(json.dumps(jobs[-2:]), flush=True)
            polls = {n: scheduler_poll(engine, n) for n in (0, 8)}
            print(json.dumps({"polls": polls}), flush=True)
            starts = trainer_starts(settings, shared, args.process_starts)
            print(json.dumps({"starts": starts}), flush=True)
    finally:
        ray.shutdown()
        server.stop()
    return {
        "embedded": (
            embedded_job(args.embedded_examples, args.embedded_steps)
            if args.embedded_examples
            else None
        ),
        "load": os.getloadavg()[0],
        "jobs": jobs,
        "polls": polls,
        "starts": starts,
        "heartbeat_seconds": settings.job_heartbeat_seconds,
        "event_seconds": settings.progress_event_seconds,
        "poll_seconds": settings.scheduler_poll_seconds,
    }


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"{len(result['jobs'])} jobs of {args.tenants} tenants on the tiny model (a first job "
        f"over {args.examples} examples, then a nightly `batch` job over it and "
        f"{args.examples // 2} new examples, judged by the quality gate against the first "
        "version), PostgreSQL and S3 over HTTP (moto), the trainer run in this process. "
        "Statements counted by a SQLAlchemy listener on every engine, transactions by "
        "`commit` events, connections by `connect` events, object-store requests by "
        "botocore's HTTP sends. Each trainer is prepared before its claim, as a warm "
        "process is (`prepare_trainer`: its engine connected once), counted apart.",
        "",
        "| job | wall s (median) | claim: statements / commits | trainer: lease renewals | "
        "trainer: job events | trainer: other statements | trainer commits | trainer: "
        "database connections opened (preparing + job) | S3 requests |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for priority in ("interactive", "batch"):
        runs = [j for j in result["jobs"] if j["priority"] == priority]

        def median(field: str, kind: str | None = None, runs: list[Any] = runs) -> float:
            values = [(j[field] if kind is None else j[field].get(kind, 0)) for j in runs]
            return float(statistics.median(values))

        requests: Counter[str] = Counter()
        for j in runs:
            requests.update(j["s3"])
        s3 = ", ".join(f"{method} {n / len(runs):g}" for method, n in sorted(requests.items()))
        claim = sum(median("claim", kind) for kind in ("lease renewal", "job event", "other"))
        lines.append(
            f"| {priority} | {median('seconds'):.2f} | {claim:g} / "
            f"{median('claim_commits'):g} | {median('trainer', 'lease renewal'):g} | "
            f"{median('trainer', 'job event'):g} | {median('trainer', 'other'):g} | "
            f"{median('trainer_commits'):g} | {median('prepare_connections'):g} + "
            f"{median('trainer_connections'):g} | {s3} |"
        )
    polls = result["polls"]
    lines += [
        "",
        f"Rates while a job trains: one lease renewal (1 statement, 1 commit) every "
        f"{result['heartbeat_seconds']:g} s and at most one progress event (1 INSERT, 1 "
        f"commit) every {result['event_seconds']:g} s. One scheduler poll (every "
        f"{result['poll_seconds']:g} s) with nothing to claim: {polls[0]['statements']} "
        f"statements, {polls[0]['commits']} commits ({polls[8]['statements']} and "
        f"{polls[8]['commits']} while it watches running jobs).",
        "",
    ]
    starts = result["starts"]
    if starts:

        def middle(field: str) -> float:
            return float(statistics.median(start[field] for start in starts))

        lines += [
            f"A trainer process's start ({len(starts)} started one after the other as the warm "
            "pool starts them, each a Ray actor with 1 CPU, killed once ready), medians: "
            f"**{middle('cpu_seconds'):.1f} CPU seconds** of the process (the Ray worker, the "
            f"imports, `prepare_trainer`), {middle('wall_seconds'):.1f} s from its creation to "
            f"ready, of which `prepare_trainer` {middle('prepare_seconds'):.2f} s; CPU seconds "
            "per start: " + ", ".join(f"{start['cpu_seconds']:.1f}" for start in starts) + ".",
            "",
        ]
    embedded = result["embedded"]
    if embedded is not None:
        lines += [
            f"One job's training on the embedded model (SmolLM2-135M), {embedded['examples']} "
            f"E2E examples ({embedded['train']} trained on, {embedded['validation']} held out "
            "by the automatic budget), default hyperparameters, 1 torch thread: "
            f"**{embedded['train_cpu_seconds']:.0f} CPU seconds** "
            f"({embedded['train_seconds']:.0f} s of wall time) of `train_prefix` for "
            f"{embedded['steps']} of {embedded['planned_steps']} planned steps ("
            + ("stopped by `--embedded-steps`" if args.embedded_steps else "early stopping")
            + "), "
            f"{embedded['train_cpu_seconds'] / embedded['steps']:.2f} CPU s a "
            "step, validation passes included; "
            f"loading the model {embedded['load_seconds']:.1f} s (a trainer maps the shared "
            f"weights instead). One forward pass over the {embedded['validation']} held-out "
            f"examples ({embedded['evaluation_batches']} batch(es) of "
            f"{embedded['batch_size']}, as early stopping, the job report and the quality gate "
            f"run it): {embedded['evaluation_cpu_seconds']:.2f} CPU s "
            f"({embedded['evaluation_seconds']:.2f} s); training ran "
            f"{embedded['evaluations']} of them. Load average {result['load']:.1f} on 2 cores.",
            "",
        ]
    lines += [
        f"Reproduce: `.venv/bin/python -m bench.job_lifecycle --tenants {args.tenants} "
        f"--examples {args.examples} --embedded-examples {args.embedded_examples} "
        f"--embedded-steps {args.embedded_steps} --process-starts {args.process_starts}`",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument(
        "--embedded-examples",
        type=int,
        default=50,
        help="E2E examples of the embedded-model job (0: skip it).",
    )
    parser.add_argument(
        "--embedded-steps",
        type=int,
        default=0,
        help="stop the embedded-model job after this many steps (0: its whole budget).",
    )
    parser.add_argument(
        "--process-starts", type=int, default=3, help="trainer processes started and timed"
    )
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--no-write", action="store_true", help="Do not touch BENCHMARKS.md.")
    args = parser.parse_args()
    result = measure(args)
    body = report(result, args)
    print(body)
    if not args.no_write:
        print(f"wrote {write_section(SECTION, body)}")


if __name__ == "__main__":
    main()
