"""Composition root of the gateway process: `llorch gateway --config F`."""

from __future__ import annotations

import asyncio
import logging
import os

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from llorch import tracing
from llorch.config import LlorchConfig
from llorch.redis_auth import connect_store
from llorch.rpc import load_internal_token
from llorch.throttle import BackoffClamp

from .app import Deps, build_app
from .auth import Authenticator, load_tokens
from .edge import EdgeRunner
from .feed import EventFeed
from .metrics import GatewayMetrics
from .scheduler_client import SchedulerClient
from .worker_metrics import WorkerMetrics, WorkerRegistry
from .workers import (
    WorkerGroup,
    WorkerRole,
    WorkersGaveUp,
    check_address_free,
    watch_parent,
    worker_command,
    worker_role,
)

log = logging.getLogger(__name__)


async def serve(cfg: LlorchConfig, stop: asyncio.Event) -> None:
    internal = load_internal_token(cfg.state_dir, cfg.grpc.internal_token_file)
    clamp = BackoffClamp(cfg.scheduler.backoff_min_ms, cfg.scheduler.backoff_max_ms)
    auth = Authenticator(load_tokens(cfg), cfg.api.probes_require_auth, clamp)
    host, _, port = cfg.api.bind.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("gateway bound beyond loopback", extra={"event": "bind_public", "address": cfg.api.bind})
    assert cfg.redis.url is not None, "redis.url must be set (llorch up sets LLORCH_REDIS_URL)"
    role = worker_role(cfg.api.workers)  # None with one worker
    if role is not None and role.index == 0:  # the parent: refuse to join another gateway's workers
        check_address_free(host, int(port))
    workers = None if role is None else WorkerMetrics(WorkerRegistry(), role.metrics_socket, role.siblings)
    registry = CollectorRegistry() if workers is None else workers.registry
    scheduler = SchedulerClient(cfg.grpc.scheduler, internal, cfg.grpc.tls)
    async with (
        tracing.traced(cfg.telemetry.otlp_endpoint, "gateway"),  # before build_app (its middleware)
        connect_store(cfg.redis) as store,
        aiohttp.ClientSession() as http,
    ):
        scheduler.located = store.locate
        feed = EventFeed(store)
        feed_task = asyncio.create_task(feed.run())
        await feed.connected.wait()
        deps = Deps(cfg, store, scheduler, auth, GatewayMetrics(registry), http, feed, workers)
        runner = EdgeRunner(build_app(deps), keepalive_timeout_s=cfg.api.keepalive_timeout_s)
        await runner.setup()
        # Several workers: each its own listening socket on the address; the kernel spreads the
        # connections over them (see .workers for why).
        site = web.TCPSite(runner, host, int(port), backlog=1024, reuse_port=role is not None)
        await site.start()
        if workers is not None:
            await workers.start()
        log.info(
            "gateway listening",
            extra={"event": "gateway_started", "url": f"http://{cfg.api.bind}", "pid": os.getpid()},
        )
        try:
            await _run(role, stop)
        finally:
            await runner.cleanup()
            if workers is not None:
                await workers.aclose()
            feed_task.cancel()
            await asyncio.gather(feed_task, return_exceptions=True)
            await scheduler.aclose()


async def _run(role: WorkerRole | None, stop: asyncio.Event) -> None:
    """Serve until ``stop``: worker 0 also keeps workers 1..N-1 running; a child also stops when its
    parent is gone."""
    if role is None:
        await stop.wait()
    elif role.index == 0:
        try:
            await WorkerGroup(role, worker_command()).run_until(stop)
        except WorkersGaveUp as exc:
            log.error("gateway workers gave up", extra={"event": "workers_gave_up", "reason": str(exc)})
            raise SystemExit(1) from None
    else:
        watcher = asyncio.create_task(watch_parent(stop))
        try:
            await stop.wait()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
