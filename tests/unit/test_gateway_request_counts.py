"""`gateway_http_requests_total`: one series per route template, method and status, counted exactly,
with any method a client invents folded into ``other`` so a hostile client cannot grow the series."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from llorch_gateway.metrics import GatewayMetrics


def _count(registry: CollectorRegistry, method: str, status: str) -> float | None:
    labels = {"route": "/v1/tasks", "method": method, "status": status}
    return registry.get_sample_value("gateway_http_requests_total", labels)


def test_requests_are_counted_per_label_set_and_invented_methods_fold_into_other() -> None:
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    for _ in range(3):
        metrics.count_request("/v1/tasks", "POST", "202")
    metrics.count_request("/v1/tasks", "POST", "429")
    for method in ("BREW", "X" * 200, "PROPFIND"):
        metrics.count_request("/v1/tasks", method, "405")
    assert _count(registry, "POST", "202") == 3
    assert _count(registry, "POST", "429") == 1
    assert _count(registry, "other", "405") == 3
    assert _count(registry, "BREW", "405") is None
