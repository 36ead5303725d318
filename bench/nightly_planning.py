"""Nightly planning at scale: ``prefixd nightly`` (dry run and real) over 1k, 10k and 100k
synthetic tenants on PostgreSQL, and the claim queries' plans at that size.

Each size gets a fresh PostgreSQL database, migrated to head and filled by SQL
(``generate_series``; not timed) with tenants in these proportions:

- 20% never trained, with one or two datasets (planned: "never trained");
- 40% trained twice (a job and a version per training, the second a nightly job of the
  previous night, active), then one new dataset (planned: "new data");
- 34% trained twice, no new data (skipped);
- 3% trained twice, with new data and a queued interactive job of their own (skipped: busy);
- 2% trained twice with new data, being deleted (skipped); 1% without datasets.

At 100k tenants that is about 230k datasets, 165k jobs and 160k prefix versions. Timed:
``run_nightly`` dry run (plan only), the real pass (plan, enqueue, record), and a second
real pass the same night (must enqueue nothing); the SQL statements each issues are counted
by a SQLAlchemy ``before_cursor_execute`` listener. Baseline, in the same run: the planning
code before batching (``baseline_*`` below, kept here only to measure it) at the sizes
given by ``--baseline-sizes``. At the largest size the claim queries run under
``EXPLAIN (ANALYZE, BUFFERS)`` with the night's jobs queued.

    .venv/bin/python -m bench.nightly_planning [--sizes 1000 10000 100000]
        [--baseline-sizes 1000 10000] [--postgres-url postgresql+psycopg://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool
from sqlmodel import Session, col

from bench.nightly_planning_baseline import (
    baseline_fair_claim_query,
    baseline_oldest_claim_query,
    baseline_run_nightly,
)
from bench.report import write_section
from common.db import crud
from common.db.engine import create_db_engine, parse_database_url, upgrade_database
from common.db.models import JobPriority, JobState, NightlyRun, TrainingJob
from workers.nightly import NightlyPlan, run_nightly

NIGHT = date(2031, 3, 14)
PREVIOUS_NIGHT = "2031-03-13"
SECTION = "Nightly planning at scale (bench/nightly_planning.py)"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TARGET_SECONDS = 60

# The synthetic world, in SQL: tenant i (1..n) falls in a bucket by i % 100. Ids are
# md5-derived, so each table's rows can name the others' without a round trip.
_BUCKET = "(i % 100)"
_NEVER = f"{_BUCKET} < 20"
_NEW_DATA = f"{_BUCKET} BETWEEN 20 AND 59"
_BUSY = f"{_BUCKET} BETWEEN 94 AND 96"
_DELETING = f"{_BUCKET} IN (97, 98)"
_EMPTY = f"{_BUCKET} = 99"
_TRAINED = f"{_BUCKET} BETWEEN 20 AND 98"
# A trained tenant's most recent job start (its second job's): the fair claim's key.
_LAST_START = "timestamptz '2031-02-21 01:30+00' + i * interval '1 second'"


def _uuid(kind: str, *parts: str) -> str:
    joined = " || '-' || ".join(parts)
    return f"md5('{kind}' || {joined})::uuid"


WORLD_SQL = [
    f"""
    INSERT INTO tenants (id, name, status, created_at, last_prefix_version)
    SELECT {_uuid("t", "i")}, 'bench-' || lpad(i::text, 7, '0'),
           CASE WHEN {_DELETING} THEN 'deleting' ELSE 'active' END,
           timestamptz '2031-01-01 00:00+00' + i * interval '1 second',
           CASE WHEN {_TRAINED} THEN 2 ELSE 0 END
    FROM generate_series(1, :n) AS i
    """,
    # Datasets: k = 1, 2 the trained tenants' (one per training), k = 3 new data; the
    # never-trained tenants have one or two (k = 1, 2).
    f"""
    INSERT INTO datasets (id, tenant_id, sha256, size_bytes, example_count, object_key, created_at)
    SELECT {_uuid("d", "i", "k")}, {_uuid("t", "i")}, repeat('0', 64), 2400, 20,
           'tenants/' || {_uuid("t", "i")} || '/datasets/' || {_uuid("d", "i", "k")},
           timestamptz '2031-02-01 00:00+00' + k * interval '10 days' + i * interval '1 second'
    FROM generate_series(1, :n) AS i, generate_series(1, 3) AS k
    WHERE ({_NEVER} AND k <= 1 + i % 2)
       OR ({_TRAINED} AND k <= 2)
       OR (k = 3 AND ({_NEW_DATA} OR {_BUSY} OR {_DELETING}))
    """,
    # Two succeeded jobs per trained tenant, each over its own dataset (k); the second was
    # the previous night's nightly job.
    f"""
    INSERT INTO training_jobs (
        id, tenant_id, priority, hyperparameters, max_attempts, dataset_ids, idempotency_key,
        state, attempts, created_at, updated_at, started_at, finished_at, nightly_run_date,
        estimated_tokens, tenant_last_started_at)
    SELECT {_uuid("j", "i", "k")}, {_uuid("t", "i")},
           CASE WHEN k = 2 THEN 'batch' ELSE 'interactive' END,
           '{{"prefix_length": 10, "epochs": 3}}'::jsonb, 3,
           jsonb_build_array({_uuid("d", "i", "k")}::text),
           CASE WHEN k = 2 THEN 'nightly-{PREVIOUS_NIGHT}' END, 'succeeded', 1,
           timestamptz '2031-02-01 01:00+00' + k * interval '10 days' + i * interval '1 second',
           timestamptz '2031-02-01 02:00+00' + k * interval '10 days' + i * interval '1 second',
           timestamptz '2031-02-01 01:30+00' + k * interval '10 days' + i * interval '1 second',
           timestamptz '2031-02-01 02:00+00' + k * interval '10 days' + i * interval '1 second',
           CASE WHEN k = 2 THEN date '{PREVIOUS_NIGHT}' END, 1800, {_LAST_START}
    FROM generate_series(1, :n) AS i, generate_series(1, 2) AS k
    WHERE {_TRAINED}
    """,
    f"""
    INSERT INTO prefixes (
        id, tenant_id, job_id, version, object_key, active, created_at, activated_at,
        base_model_fingerprint, prefix_length, dtype, size_bytes, sha256, metrics)
    SELECT {_uuid("p", "i", "k")}, {_uuid("t", "i")}, {_uuid("j", "i", "k")}, k,
           'tenants/' || {_uuid("t", "i")} || '/prefixes/' || {_uuid("p", "i", "k")}, k = 2,
           timestamptz '2031-02-01 02:00+00' + k * interval '10 days' + i * interval '1 second',
           timestamptz '2031-02-01 02:00+00' + k * interval '10 days' + i * interval '1 second',
           repeat('f', 64), 10, 'float32', 40960, repeat('0', 64), '{{}}'::jsonb
    FROM generate_series(1, :n) AS i, generate_series(1, 2) AS k
    WHERE {_TRAINED}
    """,
    # The busy tenants' own queued job over their new dataset.
    f"""
    INSERT INTO training_jobs (
        id, tenant_id, priority, hyperparameters, max_attempts, dataset_ids, state, attempts,
        created_at, updated_at, estimated_tokens, tenant_last_started_at)
    SELECT {_uuid("j", "i", "'3'")}, {_uuid("t", "i")}, 'interactive',
           '{{"prefix_length": 10}}'::jsonb, 3, jsonb_build_array({_uuid("d", "i", "'3'")}::text),
           'queued', 0, timestamptz '2031-03-13 12:00+00' + i * interval '1 second',
           timestamptz '2031-03-13 12:00+00' + i * interval '1 second', 1800, {_LAST_START}
    FROM generate_series(1, :n) AS i
    WHERE {_BUSY}
    """,
]


def expected_planned(n: int) -> int:
    """Tenants the planner must pick in a world of ``n``: never trained + new data."""
    return sum(1 for i in range(1, n + 1) if i % 100 < 60)


@contextmanager
def fresh_database(admin_url: URL) -> Iterator[Engine]:
    """A new PostgreSQL database migrated to head; dropped afterwards."""
    admin = sa.create_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    name = f"prefixd_bench_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine = create_db_engine(admin_url.set(database=name))
    try:
        upgrade_database(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def build_world(engine: Engine, tenants: int) -> dict[str, int]:
    """Fill the database (module docstring); returns the row counts."""
    with engine.begin() as conn:
        for statement in WORLD_SQL:
            conn.execute(sa.text(statement), {"n": tenants})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE"))
        return {
            table: int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())
            for table in ("tenants", "datasets", "training_jobs", "prefixes")
        }


@contextmanager
def counted_statements(engine: Engine) -> Iterator[list[str]]:
    """Every SQL statement the engine sends while the block runs (one per execute)."""
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)


@dataclass
class Measurement:
    seconds: float = 0.0
    statements: int = 0
    client_cpu: float = 0.0  # CPU seconds of this process
    database_cpu: float | None = None  # CPU seconds of the PostgreSQL backends it used


def _backend_cpu(pid: int) -> float | None:
    """utime + stime of a process on this machine (Linux), None when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def measured(engine: Engine) -> Iterator[Measurement]:
    """Wall time, statements, and the CPU time of this process and of the database server
    processes serving it while the block runs: under a loaded machine the wall time is
    noise, the CPU seconds much less so."""
    measurement = Measurement()
    backends: dict[int, float | None] = {}

    def checkout(dbapi: Any, record: Any, _proxy: Any) -> None:
        pid = record.info.get("backend_pid")
        if pid is None:
            with dbapi.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                pid = record.info["backend_pid"] = cursor.fetchone()[0]
            dbapi.rollback()
        backends.setdefault(pid, _backend_cpu(pid))

    sa.event.listen(engine, "checkout", checkout)
    try:
        with counted_statements(engine) as statements:
            started, cpu = time.perf_counter(), time.process_time()
            yield measurement
            measurement.seconds = time.perf_counter() - started
            measurement.client_cpu = time.process_time() - cpu
    finally:
        sa.event.remove(engine, "checkout", checkout)
    measurement.statements = len(statements)
    spent = []
    for pid, before in backends.items():
        after = _backend_cpu(pid)
        if after is None or before is None:
            return  # a server process we cannot see: no database CPU figure
        spent.append(after - before)
    measurement.database_cpu = sum(spent)


def plan_of(outcome: Any) -> NightlyPlan:
    return outcome if isinstance(outcome, NightlyPlan) else outcome.plan


def forget_the_night(engine: Engine) -> None:
    """Remove what a real pass wrote, so the next pass starts from the same world."""
    with engine.begin() as conn:
        conn.execute(sa.delete(TrainingJob).where(col(TrainingJob.nightly_run_date) == NIGHT))
        conn.execute(sa.delete(NightlyRun))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE training_jobs"))


# --- the claim queries' plans -------------------------------------------------------------


@dataclass
class ExplainedQuery:
    milliseconds: float  # EXPLAIN ANALYZE's execution time, summed over the statements
    indexes: list[str] = field(default_factory=list)
    seq_scans: list[str] = field(default_factory=list)
    jit: bool = False

    def summary(self) -> str:
        parts = [f"{self.milliseconds:.2f} ms"]
        parts.append("index " + ", ".join(sorted(set(self.indexes))) if self.indexes else "")
        if self.seq_scans:
            parts.append("seq scan " + ", ".join(sorted(set(self.seq_scans))))
        if self.jit:
            parts.append("JIT")
        return "; ".join(p for p in parts if p)


def _walk(node: dict[str, Any], explained: ExplainedQuery) -> None:
    if "Index Name" in node:
        explained.indexes.append(node["Index Name"])
    if node.get("Node Type") in ("Seq Scan", "Parallel Seq Scan"):
        explained.seq_scans.append(node.get("Relation Name", "?"))
    for child in node.get("Plans", []):
        _walk(child, explained)


@contextmanager
def explained_candidates(engine: Engine) -> Iterator[ExplainedQuery]:
    """EXPLAIN (ANALYZE) every candidate SELECT of a claim (an ORDER BY … LIMIT over
    training_jobs; not the expired-lease sweep) just before it runs, on its connection."""
    explained = ExplainedQuery(0.0)

    def explain(_conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        text = " ".join(statement.split())
        if not text.startswith("SELECT") or "ORDER BY" not in text or "LIMIT" not in text:
            return
        if "lease_expires_at <" in text or "training_jobs" not in text:
            return
        cursor.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement, parameters)
        (report,) = cursor.fetchone()[0]
        explained.milliseconds += float(report["Execution Time"])
        explained.jit = explained.jit or "JIT" in report
        _walk(report["Plan"], explained)

    sa.event.listen(engine, "before_cursor_execute", explain)
    try:
        yield explained
    finally:
        sa.event.remove(engine, "before_cursor_execute", explain)


def explain_claims(engine: Engine, *, claims: int) -> dict[str, Any]:
    """The claim queries' plans with the night's jobs queued: today's claims (each call
    also claims a job) against the baseline candidate queries (run, then rolled back)."""
    result: dict[str, Any] = {}
    with Session(engine) as session:
        queued = session.execute(
            sa.select(col(TrainingJob.priority), sa.func.count())
            .where(col(TrainingJob.state) == JobState.queued)
            .group_by(col(TrainingJob.priority))
        ).all()
    result["queued"] = {str(priority): int(n) for priority, n in queued}
    for name, claim, baseline in (
        ("fair claim (claim_next_job)", crud.claim_next_job, baseline_fair_claim_query()),
        ("FIFO claim (claim_oldest_job)", crud.claim_oldest_job, baseline_oldest_claim_query()),
    ):
        with explained_candidates(engine) as new, Session(engine) as session:
            claim(session=session, owner=f"bench-{uuid.uuid4().hex}", lease_seconds=600)
        with explained_candidates(engine) as old, Session(engine) as session:
            session.execute(baseline).all()
            session.rollback()
        seconds = []
        with Session(engine) as session:
            for _ in range(claims):
                started = time.perf_counter()
                claim(session=session, owner=f"bench-{uuid.uuid4().hex}", lease_seconds=600)
                seconds.append(time.perf_counter() - started)
        result[name] = {
            "today": new.summary(),
            "baseline": old.summary(),
            "today_ms": new.milliseconds,
            "baseline_ms": old.milliseconds,
            "claim_call_ms": statistics.median(seconds) * 1000,
        }
    return result


def time_cli(url: URL, *args: str) -> float:
    """``prefixd <args>`` end to end, in a process of its own, output to /dev/null."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PREFIXD_")}
    environment["PREFIXD_DATABASE_URL"] = url.render_as_string(hide_password=False)
    command = [str(Path(sys.executable).with_name("prefixd")), *args]
    started = time.perf_counter()
    subprocess.run(
        command,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    return time.perf_counter() - started


def measure(
    admin_url: URL, size: int, *, baseline: bool, explain: bool, claims: int
) -> dict[str, Any]:
    with fresh_database(admin_url) as engine:
        started = time.perf_counter()
        rows = build_world(engine, size)
        print(f"{size} tenants: {rows} built in {time.perf_counter() - started:.0f} s", flush=True)
        want = expected_planned(size)
        result: dict[str, Any] = {"tenants": size, "rows": rows, "planned": want}
        result["load"] = os.getloadavg()[0]
        run_nightly(engine, run_date=NIGHT, dry_run=True)  # warm the caches, untimed

        def record(name: str, work: Callable[[], Any], *, created: int | None) -> None:
            with measured(engine) as measurement:
                plan = plan_of(work())
            if len(plan.tenants) != want or (created is not None and plan.created != created):
                raise AssertionError(
                    f"{name}: planned {len(plan.tenants)} (expected {want}), created "
                    f"{plan.created} (expected {created})"
                )
            result[name] = measurement.__dict__
            print(f"  {name}: {measurement}", flush=True)

        record("dry run", lambda: run_nightly(engine, run_date=NIGHT, dry_run=True), created=0)
        if baseline:
            record(
                "baseline dry run",
                lambda: baseline_run_nightly(engine, run_date=NIGHT, dry_run=True),
                created=0,
            )
            record(
                "baseline real run",
                lambda: baseline_run_nightly(engine, run_date=NIGHT, dry_run=False),
                created=want,
            )
            forget_the_night(engine)
        record("real run", lambda: run_nightly(engine, run_date=NIGHT), created=want)
        record("second pass", lambda: run_nightly(engine, run_date=NIGHT), created=0)
        if explain:
            result["cli start"] = time_cli(engine.url, "nightly", "--help")
            result["cli dry run"] = time_cli(
                engine.url, "nightly", "--dry-run", "--date", NIGHT.isoformat()
            )
            print(
                f"  prefixd nightly --dry-run: {result['cli dry run']:.1f} s "
                f"(prefixd nightly --help: {result['cli start']:.1f} s)",
                flush=True,
            )
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sa.text("VACUUM ANALYZE training_jobs"))
            result["claims"] = explain_claims(engine, claims=claims)
            # Then with batch jobs only (the busy tenants' interactive jobs cancelled): the
            # baseline fair claim computes every queued job's key before sorting.
            with engine.begin() as conn:
                conn.execute(
                    sa.update(TrainingJob)
                    .where(
                        col(TrainingJob.state) == JobState.queued,
                        col(TrainingJob.priority) == JobPriority.interactive,
                    )
                    .values(state=JobState.cancelled)
                )
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(sa.text("VACUUM ANALYZE training_jobs"))
            result["claims batch only"] = explain_claims(engine, claims=claims)
            print(json.dumps(result["claims"], indent=1), flush=True)
            print(json.dumps(result["claims batch only"], indent=1), flush=True)
    return result


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def cpu(entry: dict[str, Any]) -> float:
        return float(entry["client_cpu"] + (entry["database_cpu"] or 0.0))

    def cell(result: dict[str, Any], name: str) -> str:
        entry = result.get(name)
        if entry is None:
            return "not run"
        database = entry["database_cpu"]
        spent = f"{entry['client_cpu']:.1f} + {database:.1f}" if database is not None else "?"
        return f"{entry['seconds']:.1f} s ({spent}) / {entry['statements']:,}"

    def ratio(result: dict[str, Any], new: str, old: str) -> str:
        if old not in result:
            return "-"
        wall = result[old]["seconds"] / result[new]["seconds"]
        return f"{wall:.1f}× ({cpu(result[old]) / cpu(result[new]):.1f}×)"

    lines = [
        "Planning over synthetic tenants on PostgreSQL 15 (one fresh database per size, filled "
        "by SQL, not timed): 20% never trained, 40% with a new dataset since their last "
        "training (two versions each, the last one active), 34% unchanged, 3% busy with a "
        "queued job of their own, 2% being deleted, 1% without data. `run_nightly` as "
        "`prefixd nightly` calls it; statements counted by a SQLAlchemy "
        "`before_cursor_execute` listener. **Baseline**: the planner before batching "
        "(bench/nightly_planning_baseline.py: every row as an ORM object in one pass, one "
        "`enqueue_job` transaction per tenant), same run, same database.",
        "",
        "| tenants | planned | dry run: today | dry run: baseline | speed-up | real run: "
        "today | real run: baseline | speed-up | second pass (enqueues 0) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['tenants']:,} | {r['planned']:,} | {cell(r, 'dry run')} | "
            f"{cell(r, 'baseline dry run')} | {ratio(r, 'dry run', 'baseline dry run')} | "
            f"{cell(r, 'real run')} | {cell(r, 'baseline real run')} | "
            f"{ratio(r, 'real run', 'baseline real run')} | {cell(r, 'second pass')} |"
        )
    lines += [
        "",
        "Cells: wall seconds (CPU seconds of the planner process + of the PostgreSQL "
        "processes serving it) / SQL statements; speed-up: by wall time (by CPU seconds). "
        "The machine was shared (load average "
        + ", ".join(f"{r['load']:.0f}" for r in results)
        + " at the sizes measured, on 2 cores), so wall times are inflated and noisy; the CPU "
        "seconds are what an idle machine would take, about, the planner and the database "
        "taking turns. Today's statements grow by batch of 1,000 tenants (six reads per page "
        "planned, five statements per batch of 1,000 jobs enqueued), the baseline's by "
        "tenant (six per job enqueued).",
    ]
    largest = results[-1]
    if "claims" in largest:
        rows = largest["rows"]
        lines += [
            "",
            f"Claim queries at {largest['tenants']:,} tenants ({rows['datasets']:,} datasets, "
            f"{rows['training_jobs'] + largest['planned']:,} jobs, {rows['prefixes']:,} prefix "
            "versions) with the night's jobs queued: `EXPLAIN (ANALYZE, BUFFERS)` of the "
            "candidate queries (today: one per priority until one finds a job), and the median "
            f"wall time of {args.claims} calls of today's claim function (each claims a job):",
            "",
            "| claim | queued | today: plan | baseline: plan | speed-up | today: one claim call |",
            "|---|---|---|---|---:|---:|",
        ]
        for state in ("claims", "claims batch only"):
            claims = largest[state]
            queued = ", ".join(f"{n:,} {p}" for p, n in sorted(claims["queued"].items()))
            for name in ("fair claim (claim_next_job)", "FIFO claim (claim_oldest_job)"):
                c = claims[name]
                lines.append(
                    f"| {name} | {queued} | {c['today']} | {c['baseline']} | "
                    f"{c['baseline_ms'] / max(c['today_ms'], 1e-3):,.0f}× | "
                    f"{c['claim_call_ms']:.1f} ms |"
                )
        lines += [
            "",
            f"`prefixd nightly --dry-run` over {largest['tenants']:,} tenants, end to end (a "
            "process of its own: start, migration check, planning, one line per tenant to "
            f"/dev/null): {largest['cli dry run']:.1f} s, of which starting the process "
            f"(`prefixd nightly --help`) {largest['cli start']:.1f} s.",
        ]
    verdict = (
        f"Target: dry run and real run of 100,000 tenants in ≤ {TARGET_SECONDS} s. At "
        f"{largest['tenants']:,} tenants: "
        + "; ".join(
            f"{name} {largest[name]['seconds']:.0f} s of wall time, {cpu(largest[name]):.0f} "
            f"CPU seconds ({'met' if cpu(largest[name]) <= TARGET_SECONDS else 'missed'} "
            f"by CPU, {'met' if largest[name]['seconds'] <= TARGET_SECONDS else 'missed'} "
            "by wall time on this shared machine)"
            for name in ("dry run", "real run")
        )
        + "."
    )
    sizes = " ".join(str(s) for s in args.sizes)
    base = " ".join(str(s) for s in args.baseline_sizes)
    lines += [
        "",
        verdict,
        "",
        f"Reproduce: `.venv/bin/python -m bench.nightly_planning --sizes {sizes} "
        f"--baseline-sizes {base}` (PostgreSQL at `--postgres-url`, default "
        "`postgresql+psycopg://postgres@127.0.0.1:5432/postgres`; the databases it creates "
        "are dropped at the end).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument(
        "--baseline-sizes",
        type=int,
        nargs="*",
        default=[1000, 10000],
        help="Sizes at which the baseline runs too (its real run at 100k takes many minutes).",
    )
    parser.add_argument("--claims", type=int, default=20, help="Claim calls timed at the end.")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--no-write", action="store_true", help="Do not touch BENCHMARKS.md.")
    args = parser.parse_args()
    admin_url = parse_database_url(args.postgres_url)
    sizes = sorted(args.sizes)
    results = [
        measure(
            admin_url,
            size,
            baseline=size in args.baseline_sizes,
            explain=size == sizes[-1],
            claims=args.claims,
        )
        for size in sizes
    ]
    body = report(results, args)
    print(body)
    if not args.no_write:
        print(f"wrote {write_section(SECTION, body)}")


if __name__ == "__main__":
    main()
