"""Composition root of a pool manager process: `llorch pool-manager --config F [--index N]`."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import CollectorRegistry, start_http_server

from llorch.config import LlorchConfig, PoolConfig
from llorch.digest import model_digest
from llorch.rpc import AuthInterceptor, load_internal_token
from llorch.store import Store
from llorch.v1 import poolmgr_pb2_grpc

from .eventlog import EventLog
from .executor import Executor
from .metrics import PoolMetrics
from .service import PoolManagerService, Pools, register_forever, renew_leases_forever
from .supervisor import Replica

log = logging.getLogger(__name__)


def addresses(cfg: LlorchConfig, index: int) -> tuple[str, str]:
    """(gRPC address, metrics address) of pool manager `index` (SPEC §1: 50061+n and 9111+n)."""
    host = cfg.grpc.scheduler.rpartition(":")[0]
    return (
        f"{host}:{cfg.grpc.pool_manager_base_port + index}",
        f"{host}:{cfg.grpc.metrics_base_port + 10 + index}",
    )


async def build_pools(cfg: LlorchConfig, pool_cfgs: list[PoolConfig], metrics: PoolMetrics) -> Pools:
    models = {m.id: Path(m.path) for m in cfg.catalog.models}
    entries: list[tuple[PoolConfig, str, list[Replica]]] = []
    errors: dict[str, tuple[str, str, int]] = {}
    holder: list[Pools] = []

    def changed() -> None:
        if holder:
            holder[0].changed.set()

    for pool in pool_cfgs:
        path = models.get(pool.model)
        if path is None or not path.exists():
            reason = "not in the catalog" if path is None else f"file {path} does not exist"
            errors[pool.id] = ("MODEL_NOT_FOUND", f"model {pool.model}: {reason}", int(time.time() * 1000))
            entries.append((pool, "", []))
            continue
        digest = await model_digest(path, cfg.state_dir / "digests.json")
        replicas = [Replica(pool, k, path, cfg.state_dir / "logs", changed) for k in range(pool.replicas)]
        entries.append((pool, digest, replicas))
    holder.append(Pools(entries, metrics, errors))
    return holder[0]


async def serve(
    cfg: LlorchConfig, stop: asyncio.Event, index: int = 0, pool_ids: list[str] | None = None
) -> None:
    token = load_internal_token(cfg.state_dir, cfg.grpc.internal_token_file)
    address, metrics_address = addresses(cfg, index)
    metrics = PoolMetrics(CollectorRegistry())
    metrics_host, _, metrics_port = metrics_address.rpartition(":")
    metrics_server, metrics_thread = start_http_server(
        int(metrics_port), addr=metrics_host, registry=metrics.registry
    )
    selected = [p for p in cfg.pools if pool_ids is None or p.id in pool_ids]
    pools = await build_pools(cfg, selected, metrics)
    assert cfg.redis.url is not None, "redis.url must be set (llorch up sets LLORCH_REDIS_URL)"
    async with Store.connect(cfg.redis.url, cfg.redis.key_prefix) as store:
        events = EventLog(store, cfg.sse.retention_s)
        executor = Executor(events, pools.replicas, metrics)
        server = grpc.aio.server(interceptors=[AuthInterceptor(token)])
        poolmgr_pb2_grpc.add_PoolManagerServicer_to_server(PoolManagerService(pools, executor), server)
        health_servicer = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        server.add_insecure_port(address)
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("pool manager listening", extra={"event": "pool_manager_started", "address": address})
        loops = [asyncio.create_task(r.run()) for r in pools.replicas.values()]
        loops.append(
            asyncio.create_task(
                register_forever(
                    cfg.grpc.scheduler, token, f"pm-{index}", address, metrics_address, pools, executor
                )
            )
        )
        loops.append(asyncio.create_task(renew_leases_forever(store, executor)))
        loops.append(asyncio.create_task(executor.watch()))
        try:
            await stop.wait()
        finally:
            await health_servicer.enter_graceful_shutdown()
            await server.stop(grace=2)
            for loop in loops:
                loop.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await events.aclose()
            metrics_server.shutdown()
            metrics_thread.join(timeout=2)
