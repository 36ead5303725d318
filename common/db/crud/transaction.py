"""The one commit helper every data-layer write goes through, and SQL timestamp literals."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
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
