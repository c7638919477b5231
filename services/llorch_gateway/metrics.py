"""The gateway's own metric families and the `/metrics` union over every service (SPEC §6, D21)."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llorch.metrics import LATENCY_BUCKETS_MS

UNION_TIMEOUT_S = 2.0
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Method labels kept as sent; any other method a client invents counts as ``other`` (bounded series)."""
# A relay lag is normally well under the contract's first bucket (5 ms): two finer ones below it.
RELAY_LAG_BUCKETS_MS = (1, 2.5, *LATENCY_BUCKETS_MS)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.http_requests = Counter(
            "gateway_http_requests_total",
            "HTTP requests by route template",
            ["route", "method", "status"],
            registry=registry,
        )
        self._request_counts: dict[tuple[str, str, str], Counter] = {}
        self.component_up = Gauge(
            "component_up", "1 when the component answered", ["component"], registry=registry
        )
        # Events carry no append time; the feed's receipt is the nearest: the script that appends an
        # event publishes it in the same step. Events replayed from the log are not counted, and the
        # events of one live message (they arrive and are written together) count once, by its first.
        self.sse_relay_lag = Histogram(
            "sse_relay_lag_ms",
            "From the gateway's receipt of a live task event to the write of its SSE frame (ms); "
            "one observation per live message, for its first event",
            buckets=RELAY_LAG_BUCKETS_MS,
            registry=registry,
        )
        # rule: a config rule id, a built-in rule name or `plugin:<name>` (bounded by the config).
        self.policy_decisions = Counter(
            "policy_decisions_total",
            "Outbound policy decisions (SPEC §5.9)",
            ["decision", "rule"],
            registry=registry,
        )

    def count_request(self, route: str, method: str, status: str) -> None:
        """One request answered; each label set's child is looked up once (``labels`` validates and
        locks on every call, a measurable part of an admission's CPU)."""
        key = (route, method if method in METHODS else "other", status)
        child = self._request_counts.get(key)
        if child is None:
            child = self._request_counts[key] = self.http_requests.labels(*key)
        child.inc()

    async def union(self, session: aiohttp.ClientSession, components: dict[str, str]) -> bytes:
        """Own families plus each component's exposition; a component that fails gets component_up 0."""

        async def fetch(name: str, address: str) -> bytes:
            try:
                async with session.get(
                    f"http://{address}/metrics", timeout=aiohttp.ClientTimeout(UNION_TIMEOUT_S)
                ) as r:
                    body = await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                body, ok = b"", False
            self.component_up.labels(name).set(1 if ok else 0)
            return body if ok else b""

        parts = await asyncio.gather(*(fetch(n, a) for n, a in sorted(components.items())))
        return generate_latest(self.registry) + b"".join(parts)
