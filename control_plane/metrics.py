"""Prometheus metrics of one app instance (a registry per app, so tests and replicas never share).

Owns the metric definitions and the ASGI middleware that times requests by route template.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Metrics", "RequestMetricsMiddleware"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "edgefleet_cp_http_requests",
            "HTTP requests by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edgefleet_cp_http_request_seconds",
            "HTTP request latency by route template",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=self.registry,
        )
        self.desired_polls = Counter(
            "edgefleet_cp_desired_state_polls",
            "Desired-state reads by result (not_modified, sent) and cache (hit, miss)",
            ["result", "cache"],
            registry=self.registry,
        )
        self.enrollments = Counter(
            "edgefleet_cp_enrollments",
            "Device enrollments by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.builds = Counter(
            "edgefleet_cp_builds",
            "Finished variant builds by status",
            ["status"],
            registry=self.registry,
        )


class RequestMetricsMiddleware:
    """Pure ASGI middleware (cheaper than ``BaseHTTPMiddleware`` on the hot poll path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route: Any = scope.get("route")
            template = scope.get("route_template") or getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(template, scope["method"], str(status[0])).inc()
            self.metrics.latency.labels(template).observe(time.perf_counter() - start)
