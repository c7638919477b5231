"""Composition root of the queue-scheduler process: `llorch scheduler --config F`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc.aio
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError

from llorch import tracing
from llorch.config import LlorchConfig
from llorch.lifecycle import background, grpc_server, metrics_endpoint
from llorch.redis_auth import connect_store
from llorch.rpc import load_internal_token
from llorch.store import Store
from llorch.throttle import BackoffClamp
from llorch.v1 import scheduler_pb2_grpc

from .admission import Admission
from .catalog import Catalog
from .dispatcher import Dispatcher, DispatchSettings
from .estimator import Estimator
from .leases import LeaseSweeper
from .loader import Loader
from .metrics import SchedulerMetrics
from .queueing import QueueFront
from .queuewatch import QueueWatch
from .registry import PoolRegistry
from .service import SchedulerService
from .sessions import Sessions
from .throttles import Throttles

log = logging.getLogger(__name__)


def redis_url(cfg: LlorchConfig) -> str:
    if cfg.redis.url is None:
        raise SystemExit("redis.url is null: start the stack with `llorch up` or set LLORCH_REDIS_URL")
    return cfg.redis.url


@dataclass(frozen=True)
class Parts:
    """The scheduler's object graph over one store and one registry."""

    sessions: Sessions
    watch: QueueWatch
    admission: Admission
    dispatcher: Dispatcher
    sweeper: LeaseSweeper
    catalog: Catalog
    loader: Loader


def build(
    cfg: LlorchConfig, store: Store, registry: PoolRegistry, metrics: SchedulerMetrics, token: str
) -> Parts:
    """Wire the scheduler's parts, each from its narrow collaborators (tests build them the same way)."""
    sched = cfg.scheduler
    clamp = BackoffClamp(sched.backoff_min_ms, sched.backoff_max_ms)
    estimator = Estimator(sched.ewma_alpha, sched.prior_ms_per_token, clamp)
    served = {p.model for p in cfg.pools}
    served_models = [m.id for m in cfg.catalog.models if m.id in served]
    sessions = Sessions(cfg.sessions, store, registry)
    watch = QueueWatch(cfg, store, registry, estimator, metrics, sessions)
    loader = Loader(cfg.residency, registry, watch.views, metrics, token, watch.announce)
    watch.load_eta, watch.why = loader.load_eta_ms, loader.why
    throttles = Throttles(cfg.pools, cfg.api.tokens, clamp, metrics)
    front = QueueFront(cfg.pools, cfg.sse.retention_s, store, estimator, metrics, sessions)
    catalog = Catalog(
        cfg.state_dir / "catalog.sqlite",
        cfg.catalog.trust_policy,
        {p.model: p.engine for p in cfg.pools},
        metrics.catalog_verifications,
        metrics.model_state,
    )
    admission = Admission(
        sched,
        cfg.queue.soft_watermark,
        served_models,
        store,
        registry,
        estimator,
        metrics,
        watch,
        sessions,
        front,
        throttles,
        catalog.state_of,
        loader.load_eta_ms,
    )
    dispatcher = Dispatcher(
        DispatchSettings.of(cfg),
        store,
        registry,
        estimator,
        sessions,
        throttles,
        metrics,
        token,
        loader,
        watch.moved,
    )
    watch.seen_waiting = dispatcher.seen_waiting
    sweeper = LeaseSweeper(store, registry.running_tasks, dispatcher.lease_expired, admission.finish_eviction)
    return Parts(sessions, watch, admission, dispatcher, sweeper, catalog, loader)


async def serve(cfg: LlorchConfig, stop: asyncio.Event, listen: str | None = None) -> None:
    """Serve gRPC on `listen` (default: grpc.scheduler, the address the others dial) and the metrics on
    its host; `llorch scheduler --listen 0.0.0.0:50051` in a container."""
    listen = listen or cfg.grpc.scheduler
    token = load_internal_token(cfg.state_dir, cfg.grpc.internal_token_file)
    metrics = SchedulerMetrics(CollectorRegistry())
    host = listen.rpartition(":")[0].strip("[]")  # prometheus_client takes an IPv6 host bare
    registry = PoolRegistry(cfg.grpc.tls)
    with metrics_endpoint(f"{host}:{cfg.grpc.metrics_base_port}", metrics.registry):
        async with (
            tracing.traced(cfg.telemetry.otlp_endpoint, "scheduler"),  # flushed last, after the store
            connect_store(cfg.redis, redis_url(cfg)) as store,
        ):
            parts = build(cfg, store, registry, metrics, token)
            await parts.catalog.import_config(cfg.catalog.models)
            service = SchedulerService(
                store,
                registry,
                parts.admission,
                parts.dispatcher,
                metrics,
                cfg.sse.retention_s,
                token,
                parts.sessions,
                parts.catalog,
                parts.loader,
            )

            def register(server: grpc.aio.Server) -> None:
                scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)

            loops = (
                parts.dispatcher.run(),
                parts.sweeper.run(),
                _gauges(service),
                parts.watch.run(),
                parts.catalog.verify_pending(),
                parts.loader.run(),
            )
            async with (
                background(*loops),
                grpc_server(listen, token, register, cfg.grpc.tls),  # exits first, then the loops
            ):
                log.info("scheduler listening", extra={"event": "scheduler_started", "address": listen})
                await stop.wait()
            await parts.loader.aclose()
            await parts.dispatcher.aclose()
            await registry.aclose()
            parts.catalog.close()


async def _gauges(service: SchedulerService) -> None:
    while True:
        with contextlib.suppress(RedisError):
            await service.refresh_queue_gauges()
        await asyncio.sleep(1.0)
