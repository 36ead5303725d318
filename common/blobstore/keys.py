"""Object-key layout. Everything a tenant owns lives under ``tenants/<tenant_id>/`` so a
tenant's deletion is one prefix delete. Keys are built from ids only (UUIDs, validated),
never from names a user supplied."""

from __future__ import annotations

import re
import uuid

from common.errors import InvalidInputError

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

TENANTS_ROOT = "tenants/"


def validate_id(value: uuid.UUID | str, *, what: str = "id") -> str:
    """The canonical text of a UUID (lower-case, hyphenated); anything else is refused."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str) and _UUID_RE.fullmatch(value):
        return value
    raise InvalidInputError(f"invalid {what} {value!r}: expected a UUID such as {uuid.UUID(int=0)}")


def tenant_key_prefix(tenant_id: uuid.UUID | str) -> str:
    """``tenants/<tenant_id>/`` — the key prefix of everything the tenant owns."""
    return f"{TENANTS_ROOT}{validate_id(tenant_id, what='tenant id')}/"


def datasets_key_prefix(tenant_id: uuid.UUID | str) -> str:
    return f"{tenant_key_prefix(tenant_id)}datasets/"


def prefixes_key_prefix(tenant_id: uuid.UUID | str) -> str:
    return f"{tenant_key_prefix(tenant_id)}prefixes/"


def dataset_key(tenant_id: uuid.UUID | str, dataset_id: uuid.UUID | str) -> str:
    """``tenants/<tenant_id>/datasets/<dataset_id>.jsonl``"""
    return f"{datasets_key_prefix(tenant_id)}{validate_id(dataset_id, what='dataset id')}.jsonl"


def prefix_key(tenant_id: uuid.UUID | str, prefix_id: uuid.UUID | str) -> str:
    """``tenants/<tenant_id>/prefixes/<prefix_id>.safetensors`` (one immutable key per
    prefix version: every training attempt writes under a fresh prefix id)."""
    return f"{prefixes_key_prefix(tenant_id)}{validate_id(prefix_id, what='prefix id')}.safetensors"


def key_belongs_to_tenant(key: str, tenant_id: uuid.UUID | str) -> bool:
    return key.startswith(tenant_key_prefix(tenant_id)) and ".." not in key.split("/")


# The operator's objects (base prefixes and their training data) live outside
# ``tenants/``: erasing a tenant never touches them, and no tenant key prefix covers them.
OPERATOR_ROOT = "operator/"


def operator_dataset_key(dataset_id: uuid.UUID | str) -> str:
    """``operator/datasets/<dataset_id>.jsonl``"""
    return f"{OPERATOR_ROOT}datasets/{validate_id(dataset_id, what='dataset id')}.jsonl"


def base_prefixes_key_prefix() -> str:
    return f"{OPERATOR_ROOT}base-prefixes/"


def base_prefix_key(base_prefix_id: uuid.UUID | str) -> str:
    """``operator/base-prefixes/<base_prefix_id>.safetensors``"""
    return (
        f"{base_prefixes_key_prefix()}{validate_id(base_prefix_id, what='base prefix id')}"
        ".safetensors"
    )
