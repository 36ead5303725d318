"""What every ``prefixd`` subcommand shares: user errors as one line, quiet libraries."""

from __future__ import annotations

import functools
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import typer

from common.errors import PrefixdError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(command: F) -> F:
    """A user error (``PrefixdError``) prints ``error: <message>`` on stderr and exits with
    its code — never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PrefixdError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(error.exit_code) from None

    return wrapper  # type: ignore[return-value]


def quiet_libraries() -> None:
    """transformers' own progress bars and warnings would drown ours."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@contextmanager
def migrated_database() -> Iterator[Any]:
    """An engine on the configured database; a database that is down or not migrated is a
    user error naming the URL (password masked) or `prefixd db upgrade`."""
    from common.config import get_settings
    from common.db.engine import create_db_engine, require_migrated

    engine = create_db_engine(get_settings())
    try:
        require_migrated(engine)
        yield engine
    finally:
        engine.dispose()


@contextmanager
def migrated_storage() -> Iterator[tuple[Any, Any, Any]]:
    """Settings, an engine on the migrated database (as :func:`migrated_database`) and the
    blob store."""
    from common.blobstore import build_blob_store
    from common.config import get_settings

    settings = get_settings()
    with migrated_database() as engine:
        yield settings, engine, build_blob_store(settings)


class StopRequested(Exception):
    """Ctrl-C or SIGTERM reached a long-running command (``up``, ``worker``)."""


def _request_stop(signum: int, frame: Any) -> None:
    raise StopRequested(signal.Signals(signum).name)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`StopRequested` for a long-running command.

    SIGINT is set explicitly, not left to Python's default: a process started in the
    background by a non-interactive shell inherits SIGINT *ignored* (and Python keeps it so),
    which made Ctrl-C sent by a supervisor or a test do nothing."""
    previous = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def format_time(value: datetime | None) -> str:
    """How every command prints a timestamp: UTC, to the second, ``-`` for none."""
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
