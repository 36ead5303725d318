"""Errors of the metadata layer. All are :class:`common.errors.PrefixdError`, so the CLI
and the API print their message and map them to an exit code or an HTTP status."""

from __future__ import annotations

from common.errors import PrefixdError


class DatabaseError(PrefixdError):
    """Base class of the metadata layer's errors."""


class DatabaseUnavailableError(DatabaseError):
    """The database cannot be reached; the message names the URL with its password masked."""


class DatabaseNotMigratedError(DatabaseError):
    """The schema is missing or older (or newer) than this code; the message names the fix."""


class NotFoundError(DatabaseError):
    """A row (tenant, dataset, job, prefix) does not exist, or belongs to another tenant."""

    exit_code = 3


class ConflictError(DatabaseError):
    """The operation conflicts with the row's current state."""

    exit_code = 4


class TenantNotActiveError(ConflictError):
    """The tenant is being deleted (or is gone): nothing may be added to it."""


class LeaseLostError(ConflictError):
    """The caller no longer owns the job's lease (expired, reclaimed, cancelled or finished)."""


class QuotaExceededError(DatabaseError):
    """A per-tenant quota would be exceeded; the message names the quota and its value."""

    def __init__(self, message: str, *, limit: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit  # the setting's name, e.g. "tenant_dataset_bytes_quota"
        self.retry_after = retry_after  # seconds until the quota resets, where it does
