"""Composition root of a pool manager process: `llorch pool-manager --config F [--index N]`."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc.aio
from prometheus_client import CollectorRegistry

from llorch import gpu, trust
from llorch.config import LlorchConfig, PoolConfig
from llorch.digest import DigestCache
from llorch.lifecycle import background, grpc_server, metrics_endpoint
from llorch.rpc import load_internal_token
from llorch.store import Store
from llorch.v1 import poolmgr_pb2_grpc

from .drain import Drains
from .eventlog import EventLog
from .executor import Executor
from .faults import PoolError
from .metrics import PoolMetrics
from .reload import Reloads, Runner
from .service import PoolManagerService, Pools, Registration, renew_leases_forever
from .supervisor import Replica
from .topology import resolve_devices

log = logging.getLogger(__name__)


def addresses(cfg: LlorchConfig, index: int) -> tuple[str, str]:
    """(gRPC address, metrics address) of pool manager `index` (SPEC §1: 50061+n and 9111+n)."""
    host = cfg.grpc.scheduler.rpartition(":")[0]
    return (
        f"{host}:{cfg.grpc.pool_manager_base_port + index}",
        f"{host}:{cfg.grpc.metrics_base_port + 10 + index}",
    )


async def build_pools(
    cfg: LlorchConfig,
    pool_cfgs: list[PoolConfig],
    metrics: PoolMetrics,
    probe: gpu.GpuProbe,
    assign: dict[str, int],
) -> Pools:
    catalog = {m.id: m for m in cfg.catalog.models}
    digests = DigestCache(cfg.state_dir / "digests.json")
    entries: list[tuple[PoolConfig, str, list[Replica]]] = []
    errors: dict[str, tuple[str, str, int]] = {}
    holder: list[Pools] = []
    inventory = probe.devices()

    def changed() -> None:
        if holder:
            holder[0].on_change()

    def unservable(pool: PoolConfig, code: PoolError, message: str) -> None:
        errors[pool.id] = (code.value, message, int(time.time() * 1000))
        entries.append((pool, "", []))

    for pool in pool_cfgs:
        model = catalog.get(pool.model)
        path = Path(model.path) if model is not None else None
        if model is None or path is None or not path.exists():
            reason = "not in the catalog" if path is None else f"file {path} does not exist"
            unservable(pool, PoolError.MODEL_NOT_FOUND, f"model {pool.model}: {reason}")
            continue
        # SPEC §5.7: a model is verified before preload, and one that fails is never loaded.
        policy = trust.policy_for(model.trust_policy, cfg.catalog.trust_policy)
        verified = await trust.verify(trust.claim_of(model), policy, digests)
        if not verified.passed:
            message = f"model {pool.model} failed verification: {'; '.join(verified.errors)}"
            unservable(pool, PoolError.UNTRUSTED_ARTIFACT, message)
            continue
        devices = resolve_devices(cfg, pool, assign, inventory)
        if isinstance(devices, str):
            why = f" ({probe.reason})" if probe.reason else ""
            unservable(pool, PoolError.INSUFFICIENT_VRAM, devices + why)
            continue
        digest = verified.digest or await digests.digest(path)
        replicas = [
            Replica(pool, k, path, devices, cfg.state_dir, probe, metrics, changed)
            for k in range(pool.replicas)
        ]
        entries.append((pool, digest, replicas))
    holder.append(Pools(entries, metrics, errors))
    return holder[0]


async def serve(
    cfg: LlorchConfig,
    stop: asyncio.Event,
    index: int = 0,
    pool_ids: list[str] | None = None,
    assign: dict[str, int] | None = None,
) -> None:
    token = load_internal_token(cfg.state_dir, cfg.grpc.internal_token_file)
    address, metrics_address = addresses(cfg, index)
    metrics = PoolMetrics(CollectorRegistry())
    selected = [p for p in cfg.pools if pool_ids is None or p.id in pool_ids]
    assert cfg.redis.url is not None, "redis.url must be set (llorch up sets LLORCH_REDIS_URL)"
    with metrics_endpoint(metrics_address, metrics.registry):
        probe = gpu.open_probe(cfg.telemetry, cfg.state_dir)
        if probe.reason:
            log.info("no GPU telemetry", extra={"event": "gpu_probe", "reason": probe.reason})
        pools = await build_pools(cfg, selected, metrics, probe, assign or {})
        async with Store.connect(cfg.redis.url, cfg.redis.key_prefix, cluster=cfg.redis.cluster) as store:
            events = EventLog(store, cfg.sse.retention_s)
            executor = Executor(events, pools.replicas, metrics)

            def make(old: Replica, model_ref: str, path: Path, generation: int) -> Replica:
                """A reload's successor of ``old``: the same pool and devices, another model."""
                pool = old.pool.model_copy(update={"model": model_ref})
                return Replica(
                    pool,
                    old.index,
                    path,
                    old.devices,
                    cfg.state_dir,
                    probe,
                    metrics,
                    pools.on_change,
                    generation,
                )

            by_pool = {pool.id: replicas for pool, _digest, replicas in pools.pools}
            drains = Drains(by_pool, executor.watchdog, metrics)
            runner = Runner()
            reloads = Reloads(
                pools, executor, drains, runner, DigestCache(cfg.state_dir / "digests.json"), make
            )

            def register(server: grpc.aio.Server) -> None:
                poolmgr_pb2_grpc.add_PoolManagerServicer_to_server(
                    PoolManagerService(pools, executor, drains, reloads), server
                )

            for replica in pools.replicas.values():
                runner.start(replica)
            registration = Registration(
                cfg.grpc.scheduler, token, f"pm-{index}", address, metrics_address, pools, executor
            )
            async with (
                background(
                    runner.run(),
                    registration.run(),
                    renew_leases_forever(store, executor),
                    executor.watchdog.watch(),
                ),
                grpc_server(address, token, register),  # exits first: stop serving, then stop the loops
            ):
                log.info(
                    "pool manager listening", extra={"event": "pool_manager_started", "address": address}
                )
                await stop.wait()
                # Shutdown drains: no new Start, running tasks finish within the grace period or end
                # with WORKER_RESET, and the scheduler hears they finished before the stream closes.
                pools.drain()
                await executor.drain()
                await registration.flush()
            await events.aclose()
        probe.close()
