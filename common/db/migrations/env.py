"""Alembic environment. Configured in code by ``common.db.engine.alembic_config``: the
caller hands over an open connection in ``config.attributes["connection"]``; without one
(plain ``alembic`` command line), the engine is built from the prefixd Settings."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context
from sqlmodel import SQLModel

import common.db.models  # noqa: F401  (registers the tables on SQLModel.metadata)

config = context.config
target_metadata = SQLModel.metadata


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from common.config import get_settings
    from common.db.engine import create_db_engine

    engine = create_db_engine(get_settings())
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    from common.config import get_settings
    from common.db.engine import parse_database_url

    context.configure(
        url=parse_database_url(get_settings().resolved_database_url),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
