"""Composition root of the gateway process: `llorch gateway --config F`."""

from __future__ import annotations

import asyncio
import logging

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

log = logging.getLogger(__name__)


async def serve(cfg: LlorchConfig, stop: asyncio.Event) -> None:
    internal = load_internal_token(cfg.state_dir, cfg.grpc.internal_token_file)
    clamp = BackoffClamp(cfg.scheduler.backoff_min_ms, cfg.scheduler.backoff_max_ms)
    auth = Authenticator(load_tokens(cfg), cfg.api.probes_require_auth, clamp)
    host, _, port = cfg.api.bind.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("gateway bound beyond loopback", extra={"event": "bind_public", "address": cfg.api.bind})
    assert cfg.redis.url is not None, "redis.url must be set (llorch up sets LLORCH_REDIS_URL)"
    scheduler = SchedulerClient(cfg.grpc.scheduler, internal, cfg.grpc.tls)
    async with (
        tracing.traced(cfg.telemetry.otlp_endpoint, "gateway"),  # before build_app (its middleware)
        connect_store(cfg.redis) as store,
        aiohttp.ClientSession() as http,
    ):
        feed = EventFeed(store)
        feed_task = asyncio.create_task(feed.run())
        await feed.connected.wait()
        deps = Deps(cfg, store, scheduler, auth, GatewayMetrics(CollectorRegistry()), http, feed)
        runner = EdgeRunner(build_app(deps), keepalive_timeout_s=cfg.api.keepalive_timeout_s)
        await runner.setup()
        site = web.TCPSite(runner, host, int(port), backlog=1024)
        await site.start()
        log.info("gateway listening", extra={"event": "gateway_started", "url": f"http://{cfg.api.bind}"})
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            feed_task.cancel()
            await asyncio.gather(feed_task, return_exceptions=True)
            await scheduler.aclose()
