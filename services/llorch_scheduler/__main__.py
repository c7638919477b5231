"""Composition root of the queue-scheduler process: `llorch scheduler --config F`."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import CollectorRegistry, start_http_server
from redis.exceptions import RedisError

from llorch.config import LlorchConfig
from llorch.rpc import AuthInterceptor, load_internal_token
from llorch.store import Store
from llorch.v1 import scheduler_pb2_grpc

from .admission import Admission
from .dispatcher import Dispatcher
from .estimator import Estimator
from .metrics import SchedulerMetrics
from .registry import PoolRegistry
from .service import SchedulerService

log = logging.getLogger(__name__)


def redis_url(cfg: LlorchConfig) -> str:
    if cfg.redis.url is None:
        raise SystemExit("redis.url is null: start the stack with `llorch up` or set LLORCH_REDIS_URL")
    return cfg.redis.url


async def serve(cfg: LlorchConfig, stop: asyncio.Event) -> None:
    token = load_internal_token(cfg.state_dir, cfg.grpc.internal_token_file)
    metrics = SchedulerMetrics(CollectorRegistry())
    metrics_host, _, _ = cfg.grpc.scheduler.rpartition(":")
    metrics_server, metrics_thread = start_http_server(
        cfg.grpc.metrics_base_port, addr=metrics_host, registry=metrics.registry
    )
    registry = PoolRegistry()
    sched = cfg.scheduler
    estimator = Estimator(
        sched.ewma_alpha, sched.prior_ms_per_token, sched.backoff_min_ms, sched.backoff_max_ms
    )
    async with Store.connect(redis_url(cfg), cfg.redis.key_prefix) as store:
        admission = Admission(cfg, store, registry, estimator, metrics)
        dispatcher = Dispatcher(cfg, store, registry, admission, estimator, token)
        service = SchedulerService(
            store, registry, admission, dispatcher, metrics, cfg.sse.retention_s, token
        )
        server = grpc.aio.server(interceptors=[AuthInterceptor(token)])
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
        health_servicer = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        server.add_insecure_port(cfg.grpc.scheduler)
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("scheduler listening", extra={"event": "scheduler_started", "address": cfg.grpc.scheduler})
        loops = [asyncio.create_task(dispatcher.run()), asyncio.create_task(_gauges(service))]
        try:
            await stop.wait()
        finally:
            await health_servicer.enter_graceful_shutdown()
            await server.stop(grace=2)
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await registry.aclose()
            metrics_server.shutdown()
            metrics_thread.join(timeout=2)


async def _gauges(service: SchedulerService) -> None:
    while True:
        with contextlib.suppress(RedisError):
            await service.refresh_queue_gauges()
        await asyncio.sleep(1.0)
