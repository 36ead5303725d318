"""``prefixd db …``: database schema commands (registered by prefixd/cli.py as ``db``)."""

from __future__ import annotations

import typer

from common.config import get_settings
from prefixd.cli_support import user_errors

db_app = typer.Typer(
    help="Database schema: apply migrations, show the current revision.",
    no_args_is_help=True,
)


@db_app.command("upgrade")
@user_errors
def upgrade(
    revision: str = typer.Argument("head", help="Target revision (default: the newest)."),
) -> None:
    """Create or migrate the database schema (PREFIXD_DATABASE_URL; default a SQLite file
    in PREFIXD_HOME)."""
    from common.db.engine import create_db_engine, masked_url, upgrade_database

    engine = create_db_engine(get_settings())
    try:
        reached = upgrade_database(engine, revision)
        typer.echo(f"database at {masked_url(engine)} is at schema revision {reached}")
    finally:
        engine.dispose()


@db_app.command("current")
@user_errors
def current() -> None:
    """Show the database's schema revision and the one this prefixd needs."""
    from common.db.engine import (
        check_connection,
        create_db_engine,
        current_revision,
        head_revision,
        masked_url,
        require_migrated,
    )
    from common.db.errors import DatabaseNotMigratedError

    engine = create_db_engine(get_settings())
    try:
        check_connection(engine)
        rev = current_revision(engine)
        typer.echo(
            f"database at {masked_url(engine)}: schema revision {rev or '(none)'}; "
            f"this prefixd needs {head_revision()}"
        )
        try:
            require_migrated(engine)
            typer.echo("up to date")
        except DatabaseNotMigratedError as e:
            typer.echo(str(e))
    finally:
        engine.dispose()
