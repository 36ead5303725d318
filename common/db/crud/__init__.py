"""The data layer, in the style of fastapi/full-stack-fastapi-template's ``crud.py``, one
module per aggregate: ``tenants`` (and API keys), ``datasets``, ``jobs`` (rows and events),
``queue`` (claims and leases), ``prefixes`` (versions), ``erasure``, ``nightly``,
``blob_deletes`` (blob deletes not confirmed yet); plus ``transaction`` (the commit helper).
Callers write ``crud.publish_prefix(...)``; the names are re-exported here.

Every function is keyword-only and takes ``session=``. Each function that changes rows is
one transaction and commits it through :func:`~common.db.crud.transaction.commit` (which
rolls back on error), so route handlers, the scheduler and the trainer never commit: they
call one of these. Functions that read only never commit. The one other place that commits
is :mod:`common.erasure`, which runs its own transactions step by step under the erasure's
lease.

Tenant isolation: every lookup a tenant can reach takes the ``tenant_id`` and filters by it;
a row of another tenant is reported exactly like a missing one.
"""

from __future__ import annotations

from common.db.crud.blob_deletes import (
    add_pending_blob_delete,
    fail_pending_blob_delete,
    finish_pending_blob_delete,
    list_pending_blob_deletes,
)
from common.db.crud.datasets import (
    add_dataset,
    delete_dataset,
    get_dataset,
    list_datasets,
    tenant_dataset_bytes,
)
from common.db.crud.erasure import (
    begin_tenant_erasure,
    claim_tenant_erasure,
    get_deletion_audit,
    get_tenant_erasure,
    list_deletion_audits,
    list_tenant_erasures,
    recently_erased_tenants,
    release_tenant_erasure,
    renew_tenant_erasure,
    resumable_tenant_erasures,
)
from common.db.crud.jobs import (
    cancel_job,
    count_jobs_by_state,
    count_unfinished_jobs,
    enqueue_job,
    get_job,
    latest_job_events,
    list_all_jobs,
    list_job_events,
    list_jobs,
    recent_job_events,
    record_job_event,
)
from common.db.crud.nightly import (
    NightlyJobCounts,
    finish_nightly_planning,
    get_nightly_run,
    list_nightly_runs,
    nightly_idempotency_key,
    nightly_job_counts,
    refresh_nightly_runs,
    start_nightly_run,
)
from common.db.crud.prefixes import (
    activate_prefix,
    deactivate_all,
    delete_prefix_version,
    existing_prefix_ids,
    get_active_prefix,
    get_prefix,
    get_prefix_by_id,
    list_prefixes,
    prefix_ids_of_jobs,
    publish_prefix,
)
from common.db.crud.queue import (
    claim_next_job,
    claim_oldest_job,
    finish_job,
    heartbeat_job,
    holds_job_lease,
    job_lease_owners,
    reclaim_expired_jobs,
    release_job,
)
from common.db.crud.tenants import (
    API_KEY_PREFIX,
    create_api_key,
    create_tenant,
    get_tenant,
    get_tenant_by_api_key,
    hash_api_key,
    list_api_keys,
    list_tenants,
    lock_tenant,
    mark_tenant_deleting,
    require_active_tenant,
    revoke_api_key,
)
from common.db.crud.transaction import (
    commit,
    sql_timestamp,
)

__all__ = [
    "API_KEY_PREFIX",
    "NightlyJobCounts",
    "activate_prefix",
    "add_dataset",
    "add_pending_blob_delete",
    "begin_tenant_erasure",
    "cancel_job",
    "claim_next_job",
    "claim_oldest_job",
    "claim_tenant_erasure",
    "commit",
    "count_jobs_by_state",
    "count_unfinished_jobs",
    "create_api_key",
    "create_tenant",
    "deactivate_all",
    "delete_dataset",
    "delete_prefix_version",
    "enqueue_job",
    "existing_prefix_ids",
    "fail_pending_blob_delete",
    "finish_job",
    "finish_nightly_planning",
    "finish_pending_blob_delete",
    "get_active_prefix",
    "get_dataset",
    "get_deletion_audit",
    "get_job",
    "get_nightly_run",
    "get_prefix",
    "get_prefix_by_id",
    "get_tenant",
    "get_tenant_by_api_key",
    "get_tenant_erasure",
    "hash_api_key",
    "heartbeat_job",
    "holds_job_lease",
    "job_lease_owners",
    "latest_job_events",
    "list_all_jobs",
    "list_api_keys",
    "list_datasets",
    "list_deletion_audits",
    "list_job_events",
    "list_jobs",
    "list_nightly_runs",
    "list_pending_blob_deletes",
    "list_prefixes",
    "list_tenant_erasures",
    "list_tenants",
    "lock_tenant",
    "mark_tenant_deleting",
    "nightly_idempotency_key",
    "nightly_job_counts",
    "prefix_ids_of_jobs",
    "publish_prefix",
    "recent_job_events",
    "recently_erased_tenants",
    "reclaim_expired_jobs",
    "record_job_event",
    "refresh_nightly_runs",
    "release_job",
    "release_tenant_erasure",
    "renew_tenant_erasure",
    "require_active_tenant",
    "resumable_tenant_erasures",
    "revoke_api_key",
    "sql_timestamp",
    "start_nightly_run",
    "tenant_dataset_bytes",
]
