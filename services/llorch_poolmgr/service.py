"""The PoolManager gRPC service and its registration stream to the scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
from redis.exceptions import RedisError

from llorch.config import PoolConfig
from llorch.rpc import metadata, unary
from llorch.store import Store
from llorch.v1 import poolmgr_pb2, poolmgr_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2

from .executor import Executor
from .metrics import PoolMetrics
from .supervisor import Replica

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
HEARTBEAT_S = 2.0
_STATE_ORDER = ("Ready", "SelfTest", "Preloading", "Backoff", "Unavailable", "Stopped")
LEASE_RENEW_S = 5.0
LEASE_MS = 15_000


class Pools:
    """This manager's pools and replicas, rendered as the scheduler's PoolState messages."""

    def __init__(
        self,
        pools: list[tuple[PoolConfig, str, list[Replica]]],
        metrics: PoolMetrics,
        errors: dict[str, tuple[str, str, int]] | None = None,
    ) -> None:
        self.pools = pools  # (config, model digest, replicas)
        self.metrics = metrics
        self.errors = errors or {}  # pool_id -> (code, message, at_ms) for pools that cannot start
        self.changed = asyncio.Event()

    @property
    def replicas(self) -> dict[str, Replica]:
        return {r.replica_id: r for _, _, replicas in self.pools for r in replicas}

    def states(self) -> list[types_pb2.PoolState]:
        return [self._state(cfg, digest, replicas) for cfg, digest, replicas in self.pools]

    def _state(self, cfg: PoolConfig, digest: str, replicas: list[Replica]) -> types_pb2.PoolState:
        ready = [r for r in replicas if r.state == "Ready"]
        states = {r.state for r in replicas}
        state = next((s for s in _STATE_ORDER if s in states), "Unavailable")  # no replicas: see last_error
        self.metrics.pool_ready.labels(cfg.id).set(1 if ready else 0)
        circuit_open = any(r.circuit == "open" for r in replicas)
        self.metrics.circuit_open.labels(cfg.id).set(1 if circuit_open else 0)
        devices = replicas[0].device_labels if replicas else _config_devices(cfg)
        pool = types_pb2.PoolState(
            pool_id=cfg.id,
            engine=cfg.engine,
            engine_version=next((r.engine_version for r in ready), ""),
            model_ref=cfg.model,
            model_digest=digest,
            ctx=cfg.ctx,
            sampler_profile_version=cfg.sampler_profile_version,
            state=state,
            devices=devices,
            restarts=sum(r.restarts for r in replicas),
            queue_capacity=cfg.queue.capacity,
            full_policy=cfg.queue.full_policy,
            max_tokens_limit=cfg.effective_max_tokens_limit,
            workloads=list(cfg.workloads),
            live=any(r.pid for r in replicas),
            circuit="open" if circuit_open else "closed",
            cost_per_1k_tokens=cfg.cost_per_1k_tokens,
            slots=cfg.slots,
            kv_bytes_per_token=replicas[0].kv_bytes_per_token if replicas else 0,
        )
        for r in replicas:
            replica = pool.replicas.add(
                replica_id=r.replica_id,
                state=r.state,
                pid=r.pid,
                port=r.port,
                slots_total=r.slots_total,
                slots_busy=len(r.running),
                circuit=r.circuit,
            )
            if r.telemetry.kv_cache_usage_ratio is not None:
                replica.kv_cache_usage_ratio = r.telemetry.kv_cache_usage_ratio
        ratios = [
            r.telemetry.kv_cache_usage_ratio for r in ready if r.telemetry.kv_cache_usage_ratio is not None
        ]
        if ratios:
            pool.kv_cache_usage_ratio = sum(ratios) / len(ratios)
        pool.telemetry.extend(self._telemetry(devices, replicas))
        errors = [r.last_error for r in replicas if r.last_error is not None]
        if cfg.id in self.errors:
            errors.append(self.errors[cfg.id])
        if errors:
            code, message, at_ms = max(errors, key=lambda e: e[2])
            pool.has_error = True
            pool.last_error.CopyFrom(types_pb2.PoolErrorInfo(code=code, message=message, at_ms=at_ms))
        return pool

    def _telemetry(self, devices: list[str], replicas: list[Replica]) -> list[types_pb2.DeviceTelemetry]:
        out: list[types_pb2.DeviceTelemetry] = []
        for device in devices:
            seen = types_pb2.DeviceTelemetry(device=device)
            used = [r.telemetry.vram_used_bytes.get(device) for r in replicas]
            seen.vram_used_bytes = sum(u for u in used if u is not None)
            utils = [u for r in replicas if (u := r.telemetry.gpu_utilization.get(device)) is not None]
            totals = [r.telemetry.vram_total_bytes.get(device, 0) for r in replicas]
            seen.vram_total_bytes = max(totals, default=0)
            dev = next((g for r in replicas if (g := r.telemetry.gpus.get(device)) is not None), None)
            if dev is not None:  # as of the replicas' last telemetry, not a probe call per report
                seen.name = dev.name
                seen.vram_free_bytes = dev.free_bytes
            if utils:
                seen.gpu_utilization = max(utils)
            out.append(seen)
        return out


def _config_devices(cfg: PoolConfig) -> list[str]:
    return [str(d) for d in cfg.devices] if isinstance(cfg.devices, list) else [cfg.devices]


class PoolManagerService(poolmgr_pb2_grpc.PoolManagerServicer):
    def __init__(self, pools: Pools, executor: Executor) -> None:
        self.pools = pools
        self.executor = executor

    @unary
    async def Start(self, request: poolmgr_pb2.GenerateRequest, context: Context) -> poolmgr_pb2.StartReply:
        """Take a slot and run the task (it outlives this call); its end is reported on the
        registration stream."""
        return poolmgr_pb2.StartReply(accepted=self.executor.try_start(request) is not None)

    @unary
    async def Abort(self, request: poolmgr_pb2.AbortRequest, context: Context) -> poolmgr_pb2.AbortResponse:
        return poolmgr_pb2.AbortResponse(aborted=self.executor.abort(request.task_id))

    @unary
    async def Health(
        self, request: poolmgr_pb2.HealthRequest, context: Context
    ) -> poolmgr_pb2.HealthResponse:
        return poolmgr_pb2.HealthResponse(pools=self.pools.states())

    @unary
    async def EraseKV(
        self, request: poolmgr_pb2.EraseKVRequest, context: Context
    ) -> poolmgr_pb2.EraseKVResponse:
        """Evict the KV of the replica's slots when it is idle; a busy replica keeps its cache."""
        replica = self.pools.replicas.get(request.replica_id)
        adapter = replica.adapter if replica is not None else None
        if replica is None or adapter is None or replica.running:
            return poolmgr_pb2.EraseKVResponse(erased=0)
        erased = 0
        for slot in range(replica.slots_total):
            erased += await adapter.erase_kv(slot)
        return poolmgr_pb2.EraseKVResponse(erased=erased)

    @unary
    async def Resume(
        self, request: poolmgr_pb2.ResumeRequest, context: Context
    ) -> poolmgr_pb2.ResumeResponse:
        for cfg, _digest, replicas in self.pools.pools:
            if cfg.id == request.pool_id:
                for replica in replicas:
                    replica.resume()
                state = next(p.state for p in self.pools.states() if p.pool_id == cfg.id)
                return poolmgr_pb2.ResumeResponse(found=True, state=state)
        return poolmgr_pb2.ResumeResponse(found=False)


async def register_forever(
    scheduler_address: str,
    token: str,
    manager_id: str,
    address: str,
    metrics_address: str,
    pools: Pools,
    executor: Executor,
) -> None:
    """Keep one RegisterPoolManager stream open; report at connect, on change and every heartbeat."""
    while True:
        try:
            async with grpc.aio.insecure_channel(scheduler_address) as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                call = stub.RegisterPoolManager(
                    _reports(manager_id, address, metrics_address, pools, executor), metadata=metadata(token)
                )
                async for _ack in call:
                    pass
        except grpc.aio.AioRpcError as exc:
            log.info("scheduler stream closed", extra={"event": "register_retry", "code": exc.code().name})
        await asyncio.sleep(0.5)


async def _reports(
    manager_id: str, address: str, metrics_address: str, pools: Pools, executor: Executor
) -> AsyncIterator[scheduler_pb2.PoolManagerReport]:
    while True:
        pools.changed.clear()
        finished, executor.finished = executor.finished, []
        yield scheduler_pb2.PoolManagerReport(
            manager_id=manager_id,
            address=address,
            metrics_address=metrics_address,
            pools=pools.states(),
            running_task_ids=sorted(executor.running),
            finished=finished,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pools.changed.wait(), HEARTBEAT_S)


async def renew_leases_forever(store: Store, executor: Executor) -> None:
    while True:
        await asyncio.sleep(LEASE_RENEW_S)
        by_set: dict[str, list[str]] = {}
        for task_id, rs in executor.leases.items():
            by_set.setdefault(rs, []).append(task_id)
        with contextlib.suppress(RedisError):
            await store.renew_leases(by_set, LEASE_MS)
