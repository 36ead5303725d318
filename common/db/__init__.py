"""Metadata in PostgreSQL or SQLite, through SQLModel: the tables (``models``), engines and
migrations (``engine``), and the data-layer functions (``crud``).

    from common.db import create_db_engine, require_migrated, crud
"""

from common.db import crud
from common.db.engine import (
    UPGRADE_COMMAND,
    check_connection,
    create_db_engine,
    current_revision,
    head_revision,
    masked_url,
    require_migrated,
    session_scope,
    upgrade_database,
)
from common.db.errors import (
    ConflictError,
    DatabaseError,
    DatabaseNotMigratedError,
    DatabaseUnavailableError,
    LeaseLostError,
    NotFoundError,
    TenantNotActiveError,
)
from common.db.models import JobPriority, JobState, TenantStatus

__all__ = [
    "UPGRADE_COMMAND",
    "ConflictError",
    "DatabaseError",
    "DatabaseNotMigratedError",
    "DatabaseUnavailableError",
    "JobPriority",
    "JobState",
    "LeaseLostError",
    "NotFoundError",
    "TenantNotActiveError",
    "TenantStatus",
    "check_connection",
    "create_db_engine",
    "crud",
    "current_revision",
    "head_revision",
    "masked_url",
    "require_migrated",
    "session_scope",
    "upgrade_database",
]
