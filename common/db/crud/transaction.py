"""The one commit helper every data-layer write goes through, SQL timestamp literals, and
the membership test for long lists of ids."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlmodel import Session

from common.db.types import UTCDateTime


def commit(session: Session) -> None:
    try:
        session.commit()
    except BaseException:
        session.rollback()
        raise


def sql_timestamp(value: datetime) -> sa.ColumnElement[datetime]:
    return sa.literal(value, UTCDateTime())


def id_in(session: Session, column: Any, ids: Sequence[uuid.UUID]) -> sa.ColumnElement[bool]:
    """``column IN ids`` for lists of thousands of ids: on PostgreSQL ``= ANY(array)``, one
    parameter (an IN list of 1,000 parameters costs the driver more than the query costs the
    server); on SQLite an IN list (at most 32,766 parameters in SQLite 3.32 and later)."""
    if session.get_bind().dialect.name == "postgresql":
        array = sa.bindparam(None, list(ids), type_=postgresql.ARRAY(sa.Uuid()))
        return column == sa.any_(array)
    return column.in_(list(ids))
