"""The gateway's own metric families and the `/metrics` union over every service (SPEC §6, D21)."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
from collections.abc import Iterator, Sequence

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from llorch.metrics import LATENCY_BUCKETS_MS

UNION_TIMEOUT_S = 2.0
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Method labels kept as sent; any other method a client invents counts as ``other`` (bounded series)."""
# A relay lag is normally well under the contract's first bucket (5 ms): two finer ones below it.
RELAY_LAG_BUCKETS_MS = (1, 2.5, *LATENCY_BUCKETS_MS)


class LoopHistogram(Collector):
    """A histogram without labels observed from one event loop's thread: plain counts, where
    prometheus_client's :class:`Histogram` takes a lock for its sum and again for a bucket. The relay
    observes once per live message per stream; at 256 paced streams those locks were 8 % of the
    gateway's CPU. The exposition is the same: cumulative ``_bucket`` series with ``le``, ``_count``,
    ``_sum``."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self.name, self.documentation = name, documentation
        self._bounds = (*sorted(float(b) for b in buckets), math.inf)
        self._counts = [0] * len(self._bounds)  # per bucket, not cumulative
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1  # le: the first bound >= value
        self._sum += value

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation)
        cumulative = itertools.accumulate(self._counts)
        buckets = [(_le(b), float(n)) for b, n in zip(self._bounds, cumulative, strict=True)]
        family.add_metric([], buckets, self._sum)
        yield family


def _le(bound: float) -> str:
    """A bucket's ``le`` as prometheus_client writes it (``1.0``, ``+Inf``)."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


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
        self.sse_relay_lag = LoopHistogram(
            "sse_relay_lag_ms",
            "From the gateway's receipt of a live task event to the write of its SSE frame (ms); "
            "one observation per live message, for its first event",
            RELAY_LAG_BUCKETS_MS,
            registry,
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
