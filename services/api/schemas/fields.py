"""Fields and shapes shared by the API's bodies: names, idempotency keys, list pages.

Text that reaches the database is refused when PostgreSQL could not store it (a NUL
character, a lone surrogate), so such input is a 422, never a 500.
"""

from __future__ import annotations

from typing import Annotated, Generic, TypeVar

from pydantic import AfterValidator, BaseModel, Field

from common.db.crud.jobs import RESERVED_IDEMPOTENCY_KEY_PREFIX, is_reserved_idempotency_key
from common.db.types import storable_text

Name = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(storable_text)]


def _not_reserved(key: str) -> str:
    if is_reserved_idempotency_key(key):
        raise ValueError(
            f"keys starting with {RESERVED_IDEMPOTENCY_KEY_PREFIX!r} are reserved for nightly "
            "retraining jobs; choose another key"
        )
    return key


IdempotencyKey = Annotated[
    str,
    Field(min_length=1, max_length=200),
    AfterValidator(storable_text),
    AfterValidator(_not_reserved),
]


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """A list answer: ``data`` in the route's documented order."""

    data: list[T]
