"""``prefixd db …``: database schema commands (registered by prefixd/cli.py as ``db``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer

from common.config import get_settings
from common.errors import PrefixdError

db_app = typer.Typer(
    help="Database schema: apply migrations, show the current revision.",
    no_args_is_help=True,
)

T = TypeVar("T")


def _run(action: Callable[[], T]) -> T:
    """Print a user-fixable error as one line on stderr (never a traceback) and exit."""
    try:
        return action()
    except PrefixdError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None


@db_app.command("upgrade")
def upgrade(
    revision: str = typer.Argument("head", help="Target revision (default: the newest)."),
) -> None:
    """Create or migrate the database schema (PREFIXD_DATABASE_URL; default a SQLite file
    in PREFIXD_HOME)."""
    from common.db.engine import create_db_engine, masked_url, upgrade_database

    engine = _run(lambda: create_db_engine(get_settings()))
    try:
        reached = _run(lambda: upgrade_database(engine, revision))
        typer.echo(f"database at {masked_url(engine)} is at schema revision {reached}")
    finally:
        engine.dispose()


@db_app.command("current")
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

    engine = _run(lambda: create_db_engine(get_settings()))
    try:
        _run(lambda: check_connection(engine))
        rev = _run(lambda: current_revision(engine))
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
