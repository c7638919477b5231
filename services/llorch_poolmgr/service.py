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
        state = (
            "Ready" if ready else ("Backoff" if any(r.state == "Backoff" for r in replicas) else "Starting")
        )
        if not replicas:
            state = "Unavailable"  # the model could not be resolved; see last_error
        self.metrics.pool_ready.labels(cfg.id).set(1 if ready else 0)
        devices = [str(d) for d in cfg.devices] if isinstance(cfg.devices, list) else [cfg.devices]
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
            live=any(r.pid and r.state != "Stopped" for r in replicas),
        )
        for r in replicas:
            pool.replicas.add(
                replica_id=r.replica_id,
                state=r.state,
                pid=r.pid,
                port=r.port,
                slots_total=r.slots_total,
                slots_busy=len(r.running),
            )
        errors = [r.last_error for r in replicas if r.last_error is not None]
        if cfg.id in self.errors:
            errors.append(self.errors[cfg.id])
        if errors:
            code, message, at_ms = max(errors, key=lambda e: e[2])
            pool.has_error = True
            pool.last_error.CopyFrom(types_pb2.PoolErrorInfo(code=code, message=message, at_ms=at_ms))
        return pool


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
