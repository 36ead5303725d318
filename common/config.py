"""The one settings object. Every component reads configuration from a ``Settings``
instance handed to it; nothing else in the code base reads the environment.

Settings come from environment variables (``PREFIXD_*``, plus ``RAY_ADDRESS``); defaults
describe the embedded single-machine mode (SQLite and a blob directory under
``PREFIXD_HOME``, the embedded SmolLM2 model, a local Ray).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PREFIXD_", extra="ignore")

    home: Path = Field(
        default=Path("~/.prefixd"),
        description="Data directory of the embedded default (SQLite file, blobs, model cache).",
    )
    model: str = Field(
        default="embedded",
        description="Base model: a Hugging Face model directory, or `embedded` (SmolLM2-135M-Instruct).",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL (`postgresql+psycopg://…` or `sqlite:///…`); default a SQLite file in PREFIXD_HOME.",
    )
    blob_url: str | None = Field(
        default=None,
        description="`s3://bucket/key-prefix` or a local directory; default PREFIXD_HOME/blobs.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible server (MinIO, …); default the AWS endpoint.",
    )
    s3_max_attempts: int = Field(
        default=5,
        ge=1,
        description="Tries of one S3 request (first plus retries, exponential backoff with jitter) before the store counts as unreachable (503 in the API; a trainer's attempt fails and is retried).",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="Bearer token of the admin routes; generated and printed by `prefixd up` when unset.",
    )
    http_port: int = Field(default=8000, ge=1, le=65535, description="Port of the HTTP API.")
    ray_address: str | None = Field(
        default=None,
        validation_alias=AliasChoices("RAY_ADDRESS", "PREFIXD_RAY_ADDRESS"),
        description="Address of an existing Ray cluster; default a local Ray.",
    )

    # --- Inference (services/inference) -------------------------------------------------
    inference_replicas: int = Field(default=1, ge=1, description="Inference replicas (Ray Serve).")
    inference_num_cpus: float = Field(default=1.0, gt=0, description="CPUs per inference replica.")
    inference_num_gpus: float = Field(default=0.0, ge=0, description="GPUs per inference replica.")
    inference_max_ongoing_requests: int = Field(
        default=64, ge=1, description="Requests one inference replica accepts at once."
    )
    max_batch_size: int = Field(
        default=16, ge=1, description="Rows decoded together by one replica (continuous batching)."
    )
    batch_wait_ms: float = Field(
        default=5.0,
        ge=0,
        description="How long an idle replica that got several requests at once waits for more of the burst before its first forward pass; a request alone starts at once.",
    )
    prefix_cache_bytes: int = Field(
        default=256 * 1024 * 1024, ge=0, description="Bytes of prefixes one replica keeps (LRU)."
    )
    prefix_cache_sweep_seconds: float = Field(
        default=2.0,
        gt=0,
        description="How often a replica drops cached prefixes that were deleted.",
    )
    max_new_tokens_limit: int = Field(
        default=256, ge=1, description="Largest max_new_tokens a request may ask for."
    )

    # --- Training workers (workers/) ----------------------------------------------------
    scheduler_namespace: str = Field(
        default="prefixd",
        min_length=1,
        description="Ray namespace of the scheduler actor (named `prefixd-scheduler`, one per cluster and namespace).",
    )
    trainer_slots: int | None = Field(
        default=None,
        ge=1,
        description="Trainers running at once; default as many as the cluster's CPUs/GPUs allow, less trainer_warm_processes (at least 1).",
    )
    trainer_num_cpus: float = Field(default=1.0, gt=0, description="CPUs per trainer process.")
    trainer_num_gpus: float = Field(default=0.0, ge=0, description="GPUs per trainer process.")
    trainer_resources: dict[str, float] = Field(
        default_factory=dict,
        description='Custom Ray resources per trainer, JSON (e.g. `{"trainer": 1}` to run trainers only on nodes started with that resource).',
    )
    trainer_warm_processes: int = Field(
        default=1,
        ge=0,
        description="Trainer processes kept started and prepared (torch imported, the frozen model mapped, database connected) beyond the running ones, so a claimed job starts at once instead of after a process start (seconds). Each still runs one job and is then replaced in the background; each holds a trainer's resources (CPUs, GPUs, custom resources) while it waits, and the automatic trainer_slots leaves room for them. 0: a process is started for each job after its claim.",
    )
    job_lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description="A running job's lease: a trainer that stops heartbeating this long loses its job (retried).",
    )
    job_heartbeat_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How often a trainer renews its lease and looks for cancellation (less than the lease).",
    )
    trainer_start_timeout_seconds: float = Field(
        default=600.0,
        gt=0,
        description="Lease of a claimed job until its trainer process has started and heartbeats.",
    )
    progress_event_seconds: float = Field(
        default=2.0,
        ge=0,
        description="Least time between two progress events of a job written to the database.",
    )
    scheduler_poll_seconds: float = Field(
        default=1.0, gt=0, description="How often the scheduler looks for queued jobs."
    )
    job_max_steps: int = Field(
        default=100_000,
        ge=1,
        description="Most optimizer steps one job may take (epochs x batches per epoch): a submission over it is refused (422), a job over it fails without retry.",
    )
    job_max_runtime_seconds: float = Field(
        default=6 * 3600.0,
        gt=0,
        description="Longest one attempt of a job may train: the trainer stops between two steps and the job fails without retry; the scheduler force-stops a trainer still running trainer_stop_grace_seconds later.",
    )
    trainer_stop_grace_seconds: float = Field(
        default=30.0,
        ge=0,
        description="How long a trainer has to stop by itself (past job_max_runtime_seconds, or once its job is no longer its own: reclaimed, cancelled, erased), plus three heartbeats, before the scheduler force-stops its process.",
    )

    # --- Nightly retraining (workers/nightly.py, workers/quality_gate.py) ---------------
    nightly_validation_split: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="Fraction of a tenant's examples a nightly job holds out (a stable, hash-based split) when its hyperparameters hold out none; the quality gate compares on it.",
    )
    nightly_max_regression: float = Field(
        default=0.02,
        ge=0,
        description="A nightly job's prefix becomes active only if its validation loss is at most (1 + this) times the active version's on the same held-out examples; else it is kept inactive with a note.",
    )

    # --- Tenant erasure (common/erasure.py) -----------------------------------------------
    erasure_lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Lease of a running tenant erasure, renewed between its steps; the scheduler resumes an erasure whose runner stopped (lease run out) or failed (no progress) after this long.",
    )
    erasure_replica_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="How long an erasure waits for every inference replica to confirm it holds none of the tenant's prefixes; past it the run fails and is resumed later.",
    )

    erasure_resweep_window_seconds: float = Field(
        default=24 * 3600.0,
        ge=0,
        description="For this long after an erasure completed, the scheduler sweeps the tenant's `tenants/<id>/` prefix again (objects, versions, unfinished multipart uploads) every `PREFIXD_STORAGE_SWEEP_SECONDS`, catching a writer that ended after the erasure; 0: no periodic re-sweep.",
    )
    storage_sweep_seconds: float = Field(
        default=60.0,
        gt=0,
        description="How often the scheduler retries pending blob deletes (a dataset or prefix version whose blob delete failed) and re-sweeps recently erased tenants.",
    )
    upload_spool_stale_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="At start, an API replica removes `prefixd-upload-*` spool files in the temporary directory older than this (left by a killed replica); younger ones may belong to a replica still running.",
    )

    # --- API limits (services/api; exceeding one gives 413 or 429 naming it) ------------
    max_request_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        description="Largest request body of a JSON route, in bytes (413 beyond; checked from Content-Length before reading, and counted while streaming).",
    )
    max_dataset_bytes: int = Field(
        default=100 * 1024 * 1024,
        ge=1,
        description="Largest dataset upload, in bytes (413 beyond).",
    )
    max_dataset_examples: int = Field(
        default=100_000, ge=1, description="Most examples in one dataset (413 beyond)."
    )
    max_peft_adapter_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1,
        description="Largest PEFT adapter upload (POST /v1/prefixes/peft), in bytes, and the "
        "largest file inside its archive once unpacked (413 beyond).",
    )
    max_prefix_length: int = Field(
        default=200,
        ge=1,
        description="Longest prefix a job may ask for (at most half the model's context); every uploaded example must fit in the model's context minus it.",
    )
    tenant_dataset_bytes_quota: int = Field(
        default=1024 * 1024 * 1024,
        ge=0,
        description="Total bytes of datasets one tenant may keep (413 beyond).",
    )
    tenant_unfinished_jobs_quota: int = Field(
        default=10, ge=1, description="Queued plus running jobs one tenant may have (429 beyond)."
    )
    generate_rate_per_second: float = Field(
        default=10.0,
        gt=0,
        description="Generate requests per second one tenant may make, per API replica (token bucket; 429 beyond).",
    )
    tenant_training_tokens_per_day: int = Field(
        default=50_000_000,
        ge=1,
        description="Training tokens (estimated as dataset bytes / 4 x epochs) of the jobs one tenant may submit per UTC day; 429 beyond, naming the limit and when it resets. Nightly jobs do not count.",
    )
    generate_burst: int = Field(
        default=20, ge=1, description="Generate requests one tenant may make at once (bucket size)."
    )
    max_request_cost: int = Field(
        default=16384,
        ge=1,
        description="Largest cost of one generate/completions request: inputs × beams (or n) × new tokens (422 beyond).",
    )
    generate_cost_unit: int = Field(
        default=1024,
        ge=1,
        description="Cost (inputs × beams × new tokens) one token of the generate rate limit pays for: a request takes ceil(cost / unit) tokens, at most generate_burst.",
    )
    tenant_max_inflight_cost: int = Field(
        default=32768,
        ge=1,
        description="Total cost of one tenant's generate requests in flight at once, per API replica (429 beyond).",
    )
    tenant_max_concurrent_streams: int = Field(
        default=4,
        ge=1,
        description="Streaming generate requests one tenant may hold open at once, per API replica (429 beyond).",
    )
    tenant_max_concurrent_uploads: int = Field(
        default=2,
        ge=1,
        description="Dataset uploads one tenant may send at once, per API replica (429 beyond).",
    )
    upload_refusal_delay_seconds: float = Field(
        default=1.0,
        ge=0,
        le=30,
        description="How long an upload over tenant_max_concurrent_uploads waits for its 429, its body unread: a client that ignores Retry-After and resends at once otherwise has the front proxy take in and drop its bodies many times a second, on the cores that serve everyone.",
    )
    upload_validation_processes: int = Field(
        default=2,
        ge=1,
        description="Processes per API replica that parse and tokenize uploaded datasets (each holds the tokenizer), so a large upload never holds the interpreter that serves generate calls; more uploads wait for one. One tenant uses all but one of them at once (all when there is one), so another tenant's upload never waits behind its uploads.",
    )

    # --- API ingress (services/app_builder.py, services/api) ----------------------------
    api_replicas: int = Field(default=1, ge=1, description="API ingress replicas (Ray Serve).")
    api_max_ongoing_requests: int = Field(
        default=256,
        ge=1,
        description="Requests one API ingress replica handles at once (Serve's default is 5).",
    )
    api_max_queued_requests: int = Field(
        default=1024,
        ge=-1,
        description="Requests waiting for an API ingress replica beyond max_ongoing_requests (-1: no limit; the proxy answers 503 beyond).",
    )
    serve_high_throughput: bool = Field(
        default=True,
        description="Ray Serve's high-throughput mode on a Ray that `prefixd up` starts: HAProxy instead of the Python HTTP proxy, gRPC between replicas, one event loop per replica (services/serve_mode.py). On a cluster (RAY_ADDRESS) the operator sets it on `ray start` (deploy/).",
    )
    serve_drain_seconds: float = Field(
        default=2.0,
        ge=0,
        description="In high-throughput mode on a Ray that `prefixd up` starts: how long a stopping API replica keeps answering while HAProxy stops sending it requests (Ray's default of 30 s waits for load balancers on other nodes; here HAProxy is on the same node and learns of it within a controller broadcast).",
    )
    api_key_cache_seconds: float = Field(
        default=2.0,
        ge=0,
        description="How long an API replica trusts a looked-up API key (0: look up every request); a revocation or erasure on another replica takes effect within it, on the same replica at once.",
    )
    readyz_cache_seconds: float = Field(
        default=2.0,
        ge=0,
        description="How long /readyz reuses its last database and blob store probe.",
    )

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def model_cache_dir(self) -> Path:
        """Where the embedded model is converted to safetensors once."""
        return self.home_dir / "models"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'prefixd.sqlite3'}"

    @property
    def resolved_blob_url(self) -> str:
        return self.blob_url or str(self.home_dir / "blobs")


def get_settings() -> Settings:
    """Read the settings from the environment now (not at import time)."""
    return Settings()


def env_name(field: str) -> str:
    """The environment variable that sets a field (``PREFIXD_<FIELD>``, or its alias)."""
    info = Settings.model_fields[field]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"PREFIXD_{field.upper()}"


def settings_table() -> str:
    """Every setting as a Markdown table (docs/SETTINGS.md is generated from it, and a test
    keeps the two equal, so documentation and code cannot drift)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for field, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = (
            "(unset)"
            if default is None
            else f"`{json.dumps(default) if isinstance(default, dict) else default}`"
        )
        description = (info.description or "").replace("|", "\\|")
        lines.append(f"| `{env_name(field)}` | {shown} | {description} |")
    return "\n".join(lines) + "\n"
