"""Prometheus metrics of the lineage API, served at GET /metrics (no token: the chart's ServiceMonitor
scrapes it; nothing in it names an artifact).

flashops_lineage_requests_total{method,route,status}      requests by route template (/v1/nodes/{node_id})
flashops_lineage_request_seconds{method,route}            latency histogram
flashops_lineage_database_errors_total{kind}              unavailable (503, retry) | invalid (422) | internal (500)

Each app gets its own registry, so two apps in one process (tests, `--workers`) never share counters.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 - re-exported for the route

UNMATCHED = "unmatched"  # every path no route knows shares one label value, so scanners cannot blow up the series


class LineageMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("flashops_lineage_requests", "lineage API requests by route and HTTP status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("flashops_lineage_request_seconds", "lineage API request latency",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.database_errors = Counter("flashops_lineage_database_errors", "database failures by kind",
                                       ["kind"], registry=self.registry)

    def observe(self, method: str, route: str | None, status: int, seconds: float) -> None:
        route = route or UNMATCHED
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def database_error(self, status: int) -> None:
        self.database_errors.labels({503: "unavailable", 422: "invalid"}.get(status, "internal")).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streamed bodies): times each HTTP request
    and labels it with the route template FastAPI matched."""

    def __init__(self, app, metrics: LineageMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            self.metrics.observe(scope["method"], getattr(route, "path", None), status, time.perf_counter() - start)
