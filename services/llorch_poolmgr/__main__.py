"""Composition root of a pool manager process: `llorch pool-manager --config F [--index N]`.

Where it runs: by default on the scheduler's machine (`llorch up`), listening on grpc.scheduler's host.
On another host it serves the pools whose `host` is its `--host NAME`, binds `--listen HOST` and
registers `--advertise HOST` with the scheduler, which dials that address back.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from pathlib import Path

import grpc.aio
from prometheus_client import CollectorRegistry

from llorch import gpu, tracing, trust
from llorch.config import LlorchConfig, PoolConfig
from llorch.config_rules import LOCAL_HOST
from llorch.digest import DigestCache
from llorch.lifecycle import background, grpc_server, metrics_endpoint
from llorch.redis_auth import connect_store
from llorch.rpc import load_internal_token
from llorch.v1 import poolmgr_pb2_grpc

from .drain import Drains
from .eventlog import EventLog
from .executor import Executor
from .faults import PoolError
from .footprint import Footprint, Sizer, cpu_total_bytes
from .metrics import PoolMetrics
from .reload import Reloads, Runner
from .residency import Residency
from .service import PoolManagerService, Pools, Registration, renew_leases_forever
from .supervisor import Replica
from .topology import resolve_devices

log = logging.getLogger(__name__)


class ServeOptionError(ValueError):
    """The pool manager's options do not describe something it can serve; the message says why."""


def addresses(cfg: LlorchConfig, index: int, host: str | None = None) -> tuple[str, str]:
    """(gRPC address, metrics address) of pool manager `index` (SPEC §1: 50061+n and 9111+n) on `host`
    (default: grpc.scheduler's host); an IPv6 host comes back in brackets."""
    host = (host or cfg.grpc.scheduler.rpartition(":")[0]).strip("[]")
    if ":" in host:
        host = f"[{host}]"
    return (
        f"{host}:{cfg.grpc.pool_manager_base_port + index}",
        f"{host}:{cfg.grpc.metrics_base_port + 10 + index}",
    )


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False  # a host name


def advertised_host(listen: str | None, advertise: str | None) -> str | None:
    """The host the scheduler dials: `advertise`, else the `listen` host (None: grpc.scheduler's host).

    A wildcard listen host (0.0.0.0, ::) binds every address but names none the scheduler could dial,
    so it needs `advertise`."""
    if advertise is not None:
        if _is_wildcard(advertise):
            raise ServeOptionError(
                f"--advertise {advertise} is a wildcard: give an address the scheduler can dial"
            )
        return advertise
    if listen is not None and _is_wildcard(listen):
        raise ServeOptionError(
            f"--listen {listen} binds every address, so the scheduler cannot dial it: add --advertise HOST, "
            "the address this pool manager is reached at (e.g. the Pod IP)"
        )
    return listen


def select_pools(
    cfg: LlorchConfig, host: str = LOCAL_HOST, pool_ids: list[str] | None = None
) -> list[PoolConfig]:
    """The pools this pool manager serves: those whose `host` is `host`, narrowed to `pool_ids`."""
    selected = [p for p in cfg.pools if p.host == host and (pool_ids is None or p.id in pool_ids)]
    if not selected:
        among = f" among --pools {','.join(pool_ids)}" if pool_ids is not None else ""
        hosts = ", ".join(sorted({p.host for p in cfg.pools}))
        raise ServeOptionError(f"no pool has host: {host}{among} (the config's pool hosts: {hosts})")
    return selected


def manager_id(host: str, index: int) -> str:
    """The id this pool manager registers under: unique per host, since every host counts from 0."""
    return f"pm-{index}" if host == LOCAL_HOST else f"pm-{host}-{index}"


def _bindable(address: str) -> str:
    """`address` as the metrics server binds it: prometheus_client takes an IPv6 host without brackets."""
    host, _, port = address.rpartition(":")
    return f"{host.strip('[]')}:{port}"


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
    sizer = Sizer(inventory, cpu_total_bytes(cfg.residency))
    footprints: dict[str, Footprint] = {}

    def changed() -> None:
        if holder:
            holder[0].on_change()

    def unservable(pool: PoolConfig, code: PoolError, message: str) -> None:
        errors[pool.id] = (code.value, message, int(time.time() * 1000))
        entries.append((pool, "", []))
        labels = [str(d) for d in pool.devices] if isinstance(pool.devices, list) else [pool.devices]
        footprints[pool.id] = sizer.devices(labels)

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
        footprints[pool.id] = await sizer.measure(pool, devices, path)
        replicas = [
            Replica(pool, k, path, devices, cfg.state_dir, probe, metrics, changed)
            for k in range(pool.replicas)
        ]
        entries.append((pool, digest, replicas))
    holder.append(Pools(entries, metrics, sizer, footprints, errors))
    return holder[0]


async def serve(
    cfg: LlorchConfig,
    stop: asyncio.Event,
    index: int = 0,
    pool_ids: list[str] | None = None,
    assign: dict[str, int] | None = None,
    *,
    host: str = LOCAL_HOST,
    listen: str | None = None,
    advertise: str | None = None,
) -> None:
    """Serve the pools of `host` (narrowed to `pool_ids`) on `listen`, registered as `advertise`."""
    token = load_internal_token(cfg.state_dir, cfg.grpc.internal_token_file)
    selected = select_pools(cfg, host, pool_ids)
    bind, metrics_bind = addresses(cfg, index, listen)
    address, metrics_address = addresses(cfg, index, advertised_host(listen, advertise))
    me = manager_id(host, index)
    # `devices: auto` placement counts the pools that share this host's GPUs, not other hosts' pools.
    cfg = cfg.model_copy(update={"pools": [p for p in cfg.pools if p.host == host]})
    metrics = PoolMetrics(CollectorRegistry())
    assert cfg.redis.url is not None, "redis.url must be set (llorch up sets LLORCH_REDIS_URL)"
    with metrics_endpoint(_bindable(metrics_bind), metrics.registry):
        probe = gpu.open_probe(cfg.telemetry, cfg.state_dir)
        if probe.reason:
            log.info("no GPU telemetry", extra={"event": "gpu_probe", "reason": probe.reason})
        pools = await build_pools(cfg, selected, metrics, probe, assign or {})
        async with (
            tracing.traced(cfg.telemetry.otlp_endpoint, "poolmgr", me),  # flushed last
            connect_store(cfg.redis) as store,
        ):
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
            residency = Residency(pools, runner)

            def register(server: grpc.aio.Server) -> None:
                poolmgr_pb2_grpc.add_PoolManagerServicer_to_server(
                    PoolManagerService(pools, executor, drains, reloads, residency), server
                )

            for replica in pools.replicas.values():
                runner.start(replica)
            registration = Registration(
                cfg.grpc.scheduler, token, me, address, metrics_address, pools, executor, cfg.grpc.tls
            )
            async with (
                background(
                    runner.run(),
                    registration.run(),
                    renew_leases_forever(store, executor),
                    executor.watchdog.watch(),
                ),
                grpc_server(bind, token, register, cfg.grpc.tls),  # exits first: stop serving, then the loops
            ):
                log.info(
                    "pool manager listening on %s, registered as %s",
                    bind,
                    address,
                    extra={"event": "pool_manager_started", "address": bind, "manager_id": me},
                )
                await stop.wait()
                # Shutdown drains: no new Start, running tasks finish within the grace period or end
                # with WORKER_RESET, and the scheduler hears they finished before the stream closes.
                pools.drain()
                await executor.drain()
                await registration.flush()
            await events.aclose()
        probe.close()
