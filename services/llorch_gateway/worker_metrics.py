"""The gateway's own families summed over its ``api.workers`` processes, so /metrics stays one union.

Each worker keeps its own registry and serves it, unsummed, on a loopback listener of its own (the
socket its parent bound for it, see :mod:`.workers`). The worker that answers a scrape first reads its
siblings' expositions (:meth:`WorkerMetrics.refresh`), then its registry (a :class:`WorkerRegistry`)
yields its own counters and histograms with the siblings' samples added: the same families and labels
as with one process, so dashboards and alerts do not change. Gauges (``component_up``) are the
answering worker's own: it sets them during the scrape. A sibling that does not answer adds nothing and
shows as ``component_up{component="gateway-worker-<n>"} 0``; a restarted worker starts from zero, which
the union shows as a counter reset (``rate()`` handles it).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable, Mapping
from typing import Final

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .workers import worker_name

SUMMED: Final = frozenset({"counter", "histogram"})
SIBLING_TIMEOUT_S: Final = 2.0
Key = tuple[str, tuple[tuple[str, str], ...]]
"""(sample name, sorted labels): one series of a family."""


class WorkerRegistry(CollectorRegistry):
    """A worker's registry: :meth:`collect` adds the siblings' counters and histograms as last read by
    :meth:`set_siblings`; :meth:`own` is this worker's exposition alone."""

    def __init__(self) -> None:
        super().__init__()
        self._siblings: dict[str, dict[Key, float]] = {}

    def own(self) -> bytes:
        """This worker's families in the text format, without the siblings'."""
        return generate_latest(_Own(self))

    def set_siblings(self, expositions: Iterable[str]) -> None:
        """Replace the siblings' samples with those of ``expositions`` (summed over them)."""
        totals: dict[str, dict[Key, float]] = {}
        for text in expositions:
            for family in text_string_to_metric_families(text):
                if family.type not in SUMMED:
                    continue
                series = totals.setdefault(family.name, {})
                for s in family.samples:
                    if not s.name.endswith("_created"):
                        key = (s.name, tuple(sorted(s.labels.items())))
                        series[key] = series.get(key, 0.0) + s.value
        self._siblings = totals

    def collect(self) -> Iterable[Metric]:
        siblings = self._siblings
        for family in super().collect():
            extra = siblings.get(family.name)
            yield family if family.type not in SUMMED or not extra else _summed(family, extra)

    def _own_collect(self) -> Iterable[Metric]:
        return super().collect()


class _Own:
    """The registry's own families, for :func:`generate_latest`."""

    def __init__(self, registry: WorkerRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        return self._registry._own_collect()


def _summed(family: Metric, extra: Mapping[Key, float]) -> Metric:
    merged = Metric(family.name, family.documentation, family.type, family.unit)
    seen: set[Key] = set()
    for s in family.samples:
        key = (s.name, tuple(sorted(s.labels.items())))
        seen.add(key)
        merged.add_sample(s.name, s.labels, s.value + extra.get(key, 0.0))
    for (name, labels), value in extra.items():  # series only the siblings have seen so far
        if (name, labels) not in seen:
            merged.add_sample(name, dict(labels), value)
    return merged


class WorkerMetrics:
    """This worker's side of the union: serves its own exposition on ``sock``, reads the siblings'."""

    def __init__(self, registry: WorkerRegistry, sock: socket.socket, siblings: Mapping[int, str]) -> None:
        self.registry = registry
        self.sock = sock
        self.siblings = dict(siblings)  # worker index -> its loopback metrics address
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._own)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        await web.SockSite(self._runner, self.sock).start()

    async def aclose(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def refresh(self, http: aiohttp.ClientSession, up: Gauge) -> None:
        """Read every sibling's own families now; each gets its ``component_up`` 1 or 0."""

        async def fetch(index: int, address: str) -> str:
            try:
                async with http.get(
                    f"http://{address}/metrics", timeout=aiohttp.ClientTimeout(SIBLING_TIMEOUT_S)
                ) as r:
                    text = await r.text() if r.status == 200 else None
            except (aiohttp.ClientError, TimeoutError):
                text = None
            up.labels(worker_name(index)).set(0 if text is None else 1)
            return text or ""

        texts = await asyncio.gather(*(fetch(k, a) for k, a in sorted(self.siblings.items())))
        self.registry.set_siblings(texts)

    async def _own(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.registry.own(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )
