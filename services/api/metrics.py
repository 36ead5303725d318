"""Prometheus metrics of an API replica, served at ``GET /metrics`` (text format).

- ``prefixd_http_requests_total{method, route, status}``: requests answered, by route
  *template* (``/v1/jobs/{job_id}``, never a raw path, so ids do not blow up the label set;
  ``unmatched`` for paths no route has);
- ``prefixd_http_request_duration_seconds{method, route}``: latency histogram (until the
  last byte of the response, streaming included);
- ``prefixd_jobs{state}``: training jobs of every tenant by state, read from the database
  at scrape time (the same on every replica).

Counters and histograms are per replica (each ingress replica has its own registry); with
several replicas, scrape each, or sum them in Prometheus.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.db import crud

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class JobStateCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "prefixd_jobs", "Training jobs of every tenant by state.", labels=["state"]
        )
        try:
            with Session(self.engine) as session:
                counts = crud.count_jobs_by_state(session=session)
        except Exception as error:  # a scrape must not fail because the database is down
            log.warning("metrics: cannot count jobs (%s)", type(error).__name__)
            return
        for state, count in counts.items():
            family.add_metric([state.value], count)
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no query at registration time


class ApiMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "prefixd_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "prefixd_http_request_duration_seconds",
            "HTTP request latency in seconds, by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(JobStateCollector(engine))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)


def route_template(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class MetricsMiddleware:
    """Counts and times every HTTP request (outermost, so it sees 413s and 500s too)."""

    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.observe(
                scope.get("method", ""),
                route_template(scope),
                status,
                time.perf_counter() - start,
            )
