"""The API's request and response bodies, one module per group of routes: ``fields``
(names, idempotency keys, list pages), ``tenants``, ``datasets``, ``jobs``, ``prefixes``,
``base_prefixes``, ``fine_tuning``, ``generation`` (generate, completions, chat). A table's public view that the API returns as it is
(``ApiKeyPublic``, ``PrefixVersionPublic``, ``JobEventPublic``) stays with its table in
``common/db/models.py``, in the model family of the template; everything else a route reads
or answers is defined here, not in the route module. The names are re-exported here.
"""

from __future__ import annotations

from services.api.schemas.base_prefixes import (
    BasePrefixJobOut,
    BasePrefixJobSubmit,
    BasePrefixOut,
    OperatorDatasetOut,
)
from services.api.schemas.datasets import DatasetDeletePending, DatasetOut
from services.api.schemas.fields import IdempotencyKey, Name, Page
from services.api.schemas.fine_tuning import FineTuningHyperparameters, FineTuningJobCreate
from services.api.schemas.generation import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    GenerateResponse,
)
from services.api.schemas.jobs import JobOut, JobProgress, JobSubmit
from services.api.schemas.prefixes import PrefixDeleted
from services.api.schemas.tenants import (
    ApiKeyCreateRequest,
    ErasureProgress,
    TenantCreated,
    TenantCreateRequest,
    TenantDeletion,
    TenantOut,
)

__all__ = [
    "ApiKeyCreateRequest",
    "BasePrefixJobOut",
    "BasePrefixJobSubmit",
    "BasePrefixOut",
    "ChatCompletionRequest",
    "CompletionRequest",
    "DatasetDeletePending",
    "DatasetOut",
    "ErasureProgress",
    "FineTuningHyperparameters",
    "FineTuningJobCreate",
    "GenerateRequest",
    "GenerateResponse",
    "IdempotencyKey",
    "JobOut",
    "JobProgress",
    "JobSubmit",
    "Name",
    "OperatorDatasetOut",
    "Page",
    "PrefixDeleted",
    "TenantCreateRequest",
    "TenantCreated",
    "TenantDeletion",
    "TenantOut",
]
