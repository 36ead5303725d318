"""Engines, sessions and the migration entry points.

``create_db_engine(settings)`` builds the engine from ``Settings.resolved_database_url``:
a SQLite file under the data directory by default, PostgreSQL through psycopg 3 with a
connection pool (``pool_pre_ping``: a connection the server dropped is replaced before use)
otherwise. The same code runs on both.

Credentials are never logged: every message names the URL through :func:`masked_url`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlmodel import Session

from common.config import Settings
from common.db.errors import DatabaseNotMigratedError, DatabaseUnavailableError
from common.errors import InvalidInputError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
UPGRADE_COMMAND = "prefixd db upgrade"


def parse_database_url(url: str | URL) -> URL:
    """Parse a SQLAlchemy URL; bare ``postgresql://`` URLs get the psycopg 3 driver."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except ArgumentError as e:
        raise InvalidInputError(
            "PREFIXD_DATABASE_URL is not a valid SQLAlchemy URL "
            "(expected postgresql+psycopg://user:password@host/db or sqlite:///path)"
        ) from e
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise InvalidInputError(
            f"unsupported database {masked_url(parsed)}: use PostgreSQL "
            "(postgresql+psycopg://…) or SQLite (sqlite:///…)"
        )
    return parsed


def masked_url(url: str | URL | Engine) -> str:
    """The URL as text with its password replaced by ``***`` (safe to log and print)."""
    if isinstance(url, Engine):
        url = url.url
    if isinstance(url, str):
        try:
            url = make_url(url)
        except ArgumentError:
            return "<unparseable database URL>"
    return url.render_as_string(hide_password=True)


def _scrub(text: str, url: URL) -> str:
    if url.password:
        text = text.replace(str(url.password), "***")
    return text


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def create_db_engine(
    source: Settings | str | URL,
    *,
    pool_size: int = 5,
    max_overflow: int = 10,
    connect_timeout_s: int = 10,
    idle_in_transaction_timeout_s: float | None = None,
) -> Engine:
    """Build the engine (no connection is made yet; see :func:`check_connection`).

    ``idle_in_transaction_timeout_s`` (PostgreSQL): the server ends a session of this
    engine that sits that long inside a transaction, and with it the row locks it holds. A
    trainer passes its lease: a process frozen between two statements of a transaction
    (SIGSTOP, a paused VM) would otherwise keep its job row locked, and the scheduler, which
    skips locked rows, would never give the job back to the queue."""
    raw = source.resolved_database_url if isinstance(source, Settings) else source
    url = parse_database_url(raw)
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
        if not in_memory:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {
            "connect_args": {"check_same_thread": False, "timeout": 30},
        }
        if in_memory:
            kwargs["poolclass"] = sa.pool.StaticPool
        engine = sa.create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    connect_args: dict[str, Any] = {
        "connect_timeout": connect_timeout_s,
        "application_name": "prefixd",
    }
    if idle_in_transaction_timeout_s is not None:
        milliseconds = max(1, round(idle_in_transaction_timeout_s * 1000))
        connect_args["options"] = f"-c idle_in_transaction_session_timeout={milliseconds}"
    return sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        pool_recycle=1800,
        pool_timeout=30,
        connect_args=connect_args,
    )


def check_connection(engine: Engine) -> None:
    """Connect once; a database that is down or refuses us raises one clear error."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except SQLAlchemyError as e:
        reason = _scrub(str(getattr(e, "orig", None) or e).strip().splitlines()[0], engine.url)
        raise DatabaseUnavailableError(
            f"cannot connect to the database at {masked_url(engine)}: {reason}"
        ) from None


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session for one unit of work. The data-layer functions commit their own
    transactions; anything left uncommitted when the block raises is rolled back."""
    with Session(engine) as session:
        try:
            yield session
        except BaseException:
            session.rollback()
            raise


# --- migrations ----------------------------------------------------------------------------


def alembic_config(connection: sa.Connection | None = None) -> Any:
    """An Alembic ``Config`` built in code (no alembic.ini, no dependence on the CWD)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (``None``: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError:
        check_connection(engine)  # raises the clear error when the database is down
        raise


def upgrade_database(engine: Engine, revision: str = "head") -> str:
    """Apply the migrations up to ``revision``; returns the revision reached."""
    from alembic import command

    check_connection(engine)
    log.info("migrating the database at %s to %s", masked_url(engine), revision)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), revision)
    reached = current_revision(engine)
    assert reached is not None
    return reached


def downgrade_database(engine: Engine, revision: str) -> None:
    from alembic import command

    check_connection(engine)
    with engine.begin() as conn:
        command.downgrade(alembic_config(conn), revision)


def require_migrated(engine: Engine) -> None:
    """Refuse to start on a database whose schema is not this code's head revision."""
    from alembic.script import ScriptDirectory

    check_connection(engine)
    current = current_revision(engine)
    head = head_revision()
    where = masked_url(engine)
    if current == head:
        return
    if current is None:
        raise DatabaseNotMigratedError(
            f"the database at {where} has no prefixd schema yet; run `{UPGRADE_COMMAND}` first"
        )
    script = ScriptDirectory.from_config(alembic_config())
    try:
        script.get_revision(current)
    except Exception:
        raise DatabaseNotMigratedError(
            f"the database at {where} is at schema revision {current}, which this version of "
            f"prefixd does not know (its newest is {head}); upgrade prefixd"
        ) from None
    raise DatabaseNotMigratedError(
        f"the database at {where} is at schema revision {current}, but this version of prefixd "
        f"needs {head}; run `{UPGRADE_COMMAND}`"
    )
