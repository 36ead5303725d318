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
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool

from common.db.engine import create_db_engine, parse_database_url, upgrade_database

NIGHT = date(2031, 3, 14)
PREVIOUS_NIGHT = "2031-03-13"
SECTION = "Nightly planning at scale (bench/nightly_planning.py)"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

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


def timed(engine: Engine, work: Callable[[], Any]) -> tuple[float, int, Any]:
    """Wall seconds, statements issued, and the result of ``work()``."""
    with counted_statements(engine) as statements:
        started = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - started
    return seconds, len(statements), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    args = parser.parse_args()
    admin_url = parse_database_url(args.postgres_url)
    for size in args.sizes:
        with fresh_database(admin_url) as engine:
            started = time.perf_counter()
            counts = build_world(engine, size)
            print(size, counts, f"{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
