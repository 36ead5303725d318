"""Request limits of the API: the body size (checked from ``Content-Length`` before anything
is read, then counted while the body streams in) and a per-tenant token bucket on generate.

Both answer with the error body of every other error and name the setting that was hit:
413 ``payload_too_large`` and 429 ``rate_limited`` (with ``Retry-After``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import error_response, route_path


@dataclass(frozen=True)
class BodyLimit:
    setting: str  # the Settings field that sets it, named in the error
    max_bytes: int  # the setting's value plus ``framing``
    framing: int = 0  # bytes allowed beyond the setting (multipart boundaries, part headers)


class BodyTooLargeError(StarletteHTTPException):
    """Raised from ``receive`` once the body outgrows its limit: FastAPI's body parsing and
    our streaming upload both let an ``HTTPException`` through, so it becomes a 413."""

    def __init__(self, limit: BodyLimit) -> None:
        super().__init__(413, detail=body_too_large_message(limit))


def body_too_large_message(limit: BodyLimit) -> str:
    if limit.framing:
        return (
            f"request body larger than {limit.setting} ({limit.max_bytes - limit.framing} "
            f"bytes, plus {limit.framing} bytes of multipart framing)"
        )
    return f"request body larger than {limit.setting} ({limit.max_bytes} bytes)"


class BodySizeLimitMiddleware:
    """Refuse a request whose body is larger than its route's limit, without reading it
    when ``Content-Length`` already says so, and otherwise as soon as the bytes received
    pass it (a chunked body has no ``Content-Length``)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        default: BodyLimit,
        per_route: dict[tuple[str, str], BodyLimit] | None = None,
    ) -> None:
        self.app = app
        self.default = default
        self.per_route = per_route or {}

    def limit_for(self, scope: Scope) -> BodyLimit:
        path = route_path(scope)
        return self.per_route.get((scope.get("method", ""), path.rstrip("/") or "/"), self.default)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit.max_bytes:
            await _too_large(limit, scope)(scope, receive, send)
            return

        received = 0
        body_unread = _has_body(scope, declared)

        async def counting_receive() -> Message:
            nonlocal received, body_unread
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_unread = body_unread and message.get("more_body", False)
                if received > limit.max_bytes:
                    raise BodyTooLargeError(limit)
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if body_unread and message["status"] >= 400:
                    message = _closing(message)
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError:
            if started:
                raise
            await _too_large(limit, scope)(scope, receive, send)


def _has_body(scope: Scope, declared: int | None) -> bool:
    if declared is not None:
        return declared > 0
    return any(
        name == b"transfer-encoding" and b"chunked" in value.lower()
        for name, value in scope.get("headers", [])
    )


def _closing(start: Message) -> Message:
    """An error answered before its request's body was read (a 429 or 401 to an upload,
    say) closes the connection: keeping it alive would mean reading, and throwing away,
    the rest of a body of up to ``max_dataset_bytes`` on the HTTP proxy that every tenant's
    requests go through."""
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"connection"]
    return {**start, "headers": [*headers, (b"connection", b"close")]}


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(limit: BodyLimit, scope: Scope) -> JSONResponse:
    # The client may still be sending: closing after the answer is the server's business.
    return error_response(
        scope,
        413,
        "payload_too_large",
        body_too_large_message(limit),
        headers={"Connection": "close"},
    )


class TokenBucket:
    """Per-key token buckets: ``burst`` requests at once, refilled at ``rate`` per second.
    Thread-safe (dependencies run in a thread pool). Full, idle buckets are forgotten once
    more than ``max_keys`` keys are tracked, so memory stays bounded."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate, self.burst, self.clock, self.max_keys = rate, burst, clock, max_keys
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def acquire(self, key: Hashable, cost: float = 1.0) -> float:
        """Take ``cost`` tokens for ``key`` (at most ``burst``, so any request can pass a
        full bucket): 0.0 when granted, else the seconds until they are there."""
        cost = min(max(cost, 0.0), float(self.burst))
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens >= cost:
                self._buckets[key] = (tokens - cost, now)
                if len(self._buckets) > self.max_keys:
                    self._forget_full(now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (cost - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        for key, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.rate >= self.burst:
                del self._buckets[key]


def retry_after_header(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class ConcurrencyLimit:
    """Per-key amounts in use at once (a tenant's in-flight generate cost, open streams,
    uploads): :meth:`try_acquire` takes ``amount`` if the key stays within ``limit``;
    :meth:`release` gives it back. Thread-safe; keys at zero are forgotten."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def try_acquire(self, key: Hashable, amount: int = 1) -> bool:
        with self._lock:
            used = self._used.get(key, 0)
            # A request larger than the whole limit may run alone (its size is capped elsewhere).
            if used > 0 and used + amount > self.limit:
                return False
            self._used[key] = used + amount
            return True

    def release(self, key: Hashable, amount: int = 1) -> None:
        with self._lock:
            left = self._used.get(key, 0) - amount
            if left > 0:
                self._used[key] = left
            else:
                self._used.pop(key, None)

    def in_use(self, key: Hashable) -> int:
        with self._lock:
            return self._used.get(key, 0)


class ApiKeyCache:
    """API key → tenant lookups of one ingress replica, trusted for ``ttl`` seconds (0: never
    cached), so a burst of requests costs one database round trip per key and interval.
    Keyed by the key's SHA-256 (the plaintext is never kept). A revocation or a tenant
    erasure made through this replica drops the tenant's entries at once; one made anywhere
    else (another replica, the CLI) takes effect within ``ttl``. Misses are not cached, so a
    new key works at once. Bounded: expired entries are dropped once ``max_keys`` are held."""

    def __init__(
        self, ttl: float, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        self.ttl, self.clock, self.max_keys = ttl, clock, max_keys
        self._entries: dict[str, tuple[object, Hashable, float]] = {}  # hash -> (tenant, id, until)
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> object | None:
        if self.ttl <= 0:
            return None
        with self._lock:
            entry = self._entries.get(key_hash)
            if entry is None:
                return None
            if entry[2] <= self.clock():
                del self._entries[key_hash]
                return None
            return entry[0]

    def put(self, key_hash: str, tenant: object, tenant_id: Hashable) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            now = self.clock()
            if len(self._entries) >= self.max_keys:
                for stale in [k for k, e in self._entries.items() if e[2] <= now]:
                    del self._entries[stale]
                if len(self._entries) >= self.max_keys:
                    self._entries.clear()
            self._entries[key_hash] = (tenant, tenant_id, now + self.ttl)

    def forget_tenant(self, tenant_id: Hashable) -> None:
        with self._lock:
            for key_hash in [k for k, e in self._entries.items() if e[1] == tenant_id]:
                del self._entries[key_hash]
