"""What every request handler needs, built once per ingress replica."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.engine import Engine

from common.blobstore import BlobStore
from common.config import Settings
from services.api.limits import ApiKeyCache, ConcurrencyLimit, TokenBucket
from services.api.upload_validation import UploadValidator

if TYPE_CHECKING:
    from services.api.uploads import ExampleChecker

T = TypeVar("T")

# Threads for the handlers' blocking calls (database lookups, tokenizing, blob writes);
# fewer than the engine's connections (5 + 10 overflow), so none waits for one.
BLOCKING_THREADS = 8


@dataclass
class ApiContext:
    settings: Settings
    db: Engine
    blobs: BlobStore
    inference: Any  # DeploymentHandle of services.inference.deployment.InferenceServer
    model_fingerprint: str
    # Per-tenant token buckets of the generate routes (per replica).
    generate_limiter: TokenBucket = field(init=False)
    # Per-tenant amounts in flight (per replica): generate cost, open streams, uploads.
    inflight_cost: ConcurrencyLimit = field(init=False)
    open_streams: ConcurrencyLimit = field(init=False)
    open_uploads: ConcurrencyLimit = field(init=False)
    # API key → tenant, trusted for api_key_cache_seconds (see ApiKeyCache).
    api_keys: ApiKeyCache = field(init=False)
    # The handlers' blocking calls (run_blocking), and work that outlives its request
    # (tenant erasure), off the event loop.
    blocking: ThreadPoolExecutor = field(init=False)
    background: ThreadPoolExecutor = field(init=False)
    # Upload validation (parsing and tokenizing every line), in processes of its own.
    validation: UploadValidator = field(init=False)
    _checker: ExampleChecker | None = field(default=None, init=False, repr=False)
    _checker_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.generate_limiter = TokenBucket(
            self.settings.generate_rate_per_second, self.settings.generate_burst
        )
        self.inflight_cost = ConcurrencyLimit(self.settings.tenant_max_inflight_cost)
        self.open_streams = ConcurrencyLimit(self.settings.tenant_max_concurrent_streams)
        self.open_uploads = ConcurrencyLimit(self.settings.tenant_max_concurrent_uploads)
        self.api_keys = ApiKeyCache(self.settings.api_key_cache_seconds)
        self.blocking = ThreadPoolExecutor(BLOCKING_THREADS, thread_name_prefix="prefixd-api-io")
        self.background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prefixd-api-bg")
        self.validation = UploadValidator(self.settings)

    async def run_blocking(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` on the replica's ``blocking`` threads, in the
        caller's context.

        Not Starlette's ``run_in_threadpool``: anyio ties its worker threads to the event
        loop's root task, finds none in a Ray Serve replica (its loop runs forever) and ties
        a new thread to each request instead, started for the call and ended with the
        request: a thread start per lookup, on every generate call (py-spy, bench/load.py)."""
        call = functools.partial(contextvars.copy_context().run, function, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.blocking, call)

    def example_checker(self) -> ExampleChecker:
        """The base model's tokenizer and context length, loaded on first use."""
        with self._checker_lock:
            if self._checker is None:
                from services.api.uploads import ExampleChecker

                self._checker = ExampleChecker.load(self.settings)
            return self._checker
