"""The PoolManager gRPC service and its registration stream to the scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc.aio

from llorch import tracing
from llorch.config import GrpcTlsConfig, PoolConfig
from llorch.grpc_tls import open_channel, tls_refusal
from llorch.logs import correlation_id_var
from llorch.resilience import Outage, until_done
from llorch.rpc import CORRELATION_KEY, metadata, unary
from llorch.store import LEASE_MS, Store
from llorch.v1 import poolmgr_pb2, poolmgr_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2

from .drain import Drains
from .executor import Executor
from .footprint import Footprint, Sizer
from .metrics import PoolMetrics
from .preload import MIB
from .supervisor import Replica, ReplicaState

if TYPE_CHECKING:
    from .reload import Reloads
    from .residency import Residency

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
HEARTBEAT_S = 2.0
DRAINING = "Draining"  # a Ready replica taking no new task: its pool (or its manager) drains
DRAINED = "Drained"  # a drained replica with nothing left running; its engine stays loaded
_STATE_ORDER = (
    ReplicaState.READY,
    DRAINING,
    DRAINED,
    ReplicaState.SELFTEST,
    ReplicaState.PRELOADING,
    ReplicaState.BACKOFF,
    ReplicaState.UNAVAILABLE,
    ReplicaState.FAILED,
    ReplicaState.STOPPED,
)
LEASE_RENEW_S = 5.0
REGISTER_BACKOFF_S = (0.5, 5.0)  # first and longest wait between registration attempts
FINAL_REPORT_S = 2.0  # on shutdown, how long to wait for the scheduler to take the last report


class Pools:
    """This manager's pools and replicas, rendered as the scheduler's PoolState messages.

    Rendering (:meth:`states`) has no side effects; :meth:`on_change` (called on every replica state
    change) updates the pool gauges and wakes the registration stream."""

    def __init__(
        self,
        pools: list[tuple[PoolConfig, str, list[Replica]]],
        metrics: PoolMetrics,
        sizer: Sizer,
        footprints: dict[str, Footprint],
        errors: dict[str, tuple[str, str, int]] | None = None,
    ) -> None:
        """``footprints``: each pool's predicted need and its devices' totals (:mod:`.footprint`),
        measured by ``sizer``, which a reload uses again for the new model."""
        self.pools = pools  # (config, model digest, replicas)
        self.metrics = metrics
        self.sizer = sizer
        self.footprints = footprints
        self.errors = errors or {}  # pool_id -> (code, message, at_ms) for pools that cannot start
        self.changed = asyncio.Event()
        self.draining = False
        self.update_gauges()

    def on_change(self) -> None:
        self.update_gauges()
        self.changed.set()

    def update_gauges(self) -> None:
        """`pool_ready` and `circuit_open` per pool, from the replicas' states."""
        for cfg, _digest, replicas in self.pools:
            ready = any(self._replica_state(r) == ReplicaState.READY for r in replicas)
            self.metrics.pool_ready.labels(cfg.id).set(1 if ready else 0)
            circuit_open = any(r.circuit == "open" for r in replicas)
            self.metrics.circuit_open.labels(cfg.id).set(1 if circuit_open else 0)

    def drain(self) -> None:
        """Shutdown: report Ready replicas as Draining so that the scheduler dispatches no more here."""
        self.draining = True
        self.on_change()

    @property
    def replicas(self) -> dict[str, Replica]:
        return {r.replica_id: r for _, _, replicas in self.pools for r in replicas}

    def states(self) -> list[types_pb2.PoolState]:
        return [self._state(cfg, digest, replicas) for cfg, digest, replicas in self.pools]

    def _replica_state(self, replica: Replica) -> str:
        if replica.state != ReplicaState.READY:
            return str(replica.state)
        if self.draining:  # shutting down
            return DRAINING
        if replica.draining:
            return DRAINING if replica.running else DRAINED
        return str(replica.state)

    def _state(self, cfg: PoolConfig, digest: str, replicas: list[Replica]) -> types_pb2.PoolState:
        ready = [r for r in replicas if self._replica_state(r) == ReplicaState.READY]
        states = {self._replica_state(r) for r in replicas}
        state = next((str(s) for s in _STATE_ORDER if s in states), ReplicaState.UNAVAILABLE.value)
        circuit_open = any(r.circuit == "open" for r in replicas)  # no replicas: see last_error
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
            workloads=cfg.served_workloads,
            live=any(r.pid for r in replicas),
            circuit="open" if circuit_open else "closed",
            cost_per_1k_tokens=cfg.cost_per_1k_tokens,
            slots=cfg.slots,
            kv_bytes_per_token=replicas[0].kv_bytes_per_token if replicas else 0,
            residency=cfg.residency,
            pinned=bool(cfg.pinned),
            idle_unload_ms=cfg.effective_idle_unload_s * 1000 if cfg.on_demand else 0,
        )
        footprint = self.footprints.get(cfg.id)
        if footprint is not None:
            pool.need_bytes.update(footprint.need_bytes)
            pool.device_total_bytes.update(footprint.total_bytes)
            pool.headroom_bytes = 0 if cfg.devices == "cpu" else cfg.vram.headroom_mib * MIB
            pool.device_names.update(footprint.names)
        for r in replicas:
            replica = pool.replicas.add(
                replica_id=r.replica_id,
                state=self._replica_state(r),
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
    def __init__(
        self, pools: Pools, executor: Executor, drains: Drains, reloads: Reloads, residency: Residency
    ) -> None:
        self.pools = pools
        self.executor = executor
        self.drains = drains
        self.reloads = reloads
        self.residency = residency

    async def StartStream(
        self, request_iterator: AsyncIterator[poolmgr_pb2.StartCalls], context: Context
    ) -> AsyncIterator[poolmgr_pb2.StartResults]:
        """The scheduler's starts over one stream (see :mod:`llorch.callstream`). A start takes a slot
        and runs the task (it outlives the call; its end is reported on the registration stream). It
        decides at once, so each message of calls is answered by one message of results, in order."""
        async for message in request_iterator:
            results = poolmgr_pb2.StartResults()
            for call in message.calls:
                # The run's task copies this context: its logs carry the call's correlation id.
                bound = correlation_id_var.set(call.context.get(CORRELATION_KEY) or None)
                try:
                    accepted = self._start(call.request, list(call.context.items()))
                finally:
                    correlation_id_var.reset(bound)
                results.results.add(call=call.call).reply.accepted = accepted
            yield results

    def _start(self, request: poolmgr_pb2.GenerateRequest, call_metadata: object) -> bool:
        """The run's engine span is a child of this call's span (the run's task starts inside it
        and inherits it)."""
        with tracing.server_span(
            "llorch.v1.PoolManager/Start",
            call_metadata,
            task_id=request.task_id,
            pool_id=request.pool_id,
            replica_id=request.replica_id,
        ):
            accepted = self.executor.try_start(request) is not None
            tracing.annotate(accepted=accepted)
        return accepted

    @unary
    async def Abort(self, request: poolmgr_pb2.AbortRequest, context: Context) -> poolmgr_pb2.AbortResponse:
        with tracing.server_span(
            "llorch.v1.PoolManager/Abort", context.invocation_metadata(), task_id=request.task_id
        ):
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
        """Start a Stopped pool's engines (an on-demand pool's load), close an open circuit, undo a
        drain. Waits for an unload of the pool under way, whose engines must stop first."""
        async with self.residency.lock(request.pool_id):
            for cfg, _digest, replicas in self.pools.pools:
                if cfg.id == request.pool_id:
                    self.drains.resume(cfg.id)
                    for replica in replicas:
                        if self.reloads.runner.runs(replica):
                            replica.resume()
                        else:  # unloaded: its engine starts again
                            replica.state = ReplicaState.PRELOADING
                            self.reloads.runner.start(replica)
                    return poolmgr_pb2.ResumeResponse(found=True, state=self._state_of(cfg.id))
        return poolmgr_pb2.ResumeResponse(found=False)

    @unary
    async def Unload(self, request: poolmgr_pb2.UnloadRequest, context: Context) -> poolmgr_pb2.UnloadReply:
        """Stop an idle pool's engines (:meth:`Residency.unload`); refused while a task runs there."""
        unloaded = await self.residency.unload(request.pool_id, request.reason)
        if unloaded is None:
            return poolmgr_pb2.UnloadReply(found=False)
        return poolmgr_pb2.UnloadReply(found=True, unloaded=unloaded, state=self._state_of(request.pool_id))

    @unary
    async def Drain(self, request: poolmgr_pb2.DrainRequest, context: Context) -> poolmgr_pb2.ResumeResponse:
        then = self._unload if request.unload else None
        if not self.drains.drain(request.pool_id, request.deadline_ms, then):
            return poolmgr_pb2.ResumeResponse(found=False)
        return poolmgr_pb2.ResumeResponse(found=True, state=self._state_of(request.pool_id))

    @unary
    async def Reload(self, request: poolmgr_pb2.ReloadRequest, context: Context) -> poolmgr_pb2.ReloadReply:
        done = await self.reloads.reload(
            request.pool_id, request.model_ref, Path(request.model_path), request.model_digest
        )
        return poolmgr_pb2.ReloadReply(
            state=done.state,
            model_ref=done.model_ref,
            model_digest=done.model_digest,
            engine_version=done.engine_version,
        )

    async def _unload(self, replicas: list[Replica]) -> None:
        """Stop a drained pool's engines (its model was retired); the pool reports Stopped."""
        for replica in replicas:
            await self.reloads.runner.stop(replica)
            replica.draining = False
            replica.on_change()
        log.info(
            "pool unloaded",
            extra={"event": "pool_unloaded", "pool_id": replicas[0].pool.id if replicas else ""},
        )

    def _state_of(self, pool_id: str) -> str:
        return next(p.state for p in self.pools.states() if p.pool_id == pool_id)


class Registration:
    """The RegisterPoolManager stream to the scheduler: a report at connect, on change and every
    heartbeat, kept open (reconnecting with backoff, the outage logged once) for the process's life.

    Reports are numbered; the scheduler acks each in order, so :meth:`flush` can wait until it took
    everything reported so far (the finished tasks of a shutdown drain)."""

    def __init__(
        self,
        scheduler_address: str,
        token: str,
        manager_id: str,
        address: str,
        metrics_address: str,
        pools: Pools,
        executor: Executor,
        tls: GrpcTlsConfig | None = None,
    ) -> None:
        self.scheduler_address = scheduler_address
        self.tls = tls
        self.refused: str | None = None  # the refusal last logged, so a retry loop logs it once
        self.token = token
        self.manager_id = manager_id
        self.address = address
        self.metrics_address = metrics_address
        self.pools = pools
        self.executor = executor
        self.outage = Outage("scheduler (registration stream)")
        self.sent = 0  # reports handed to a stream
        self.acked = 0  # the newest report the scheduler acked
        self._acked = asyncio.Event()

    async def run(self) -> None:
        wait_s = REGISTER_BACKOFF_S[0]
        while True:
            try:
                await self._stream()
            except grpc.aio.AioRpcError as exc:
                self.outage.failed(exc)
                await self._log_refusal(exc)
                log.debug(
                    "scheduler stream closed", extra={"event": "register_retry", "code": exc.code().name}
                )
            except Exception as exc:  # never let the registration die: the scheduler would lose us
                self.outage.failed(exc)
                log.exception("registration stream failed", extra={"event": "register_retry"})
            await asyncio.sleep(wait_s)
            wait_s = min(REGISTER_BACKOFF_S[1], wait_s * 2) if self.outage.down else REGISTER_BACKOFF_S[0]

    async def _log_refusal(self, exc: grpc.aio.AioRpcError) -> None:
        """Say why the scheduler refused us: a TLS handshake failure never reaches the scheduler's
        code, so this (the client's) log is where a wrong certificate shows up."""
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            reason = "the scheduler refused the internal token"
        elif exc.code() == grpc.StatusCode.UNAVAILABLE and self.tls is not None:
            why = await tls_refusal(self.scheduler_address, self.tls)
            if why is None:
                return  # not a TLS problem: the outage is logged already
            reason = f"TLS handshake with the scheduler failed: {why}"
        else:
            return
        if reason != self.refused:
            self.refused = reason
            fields = {"event": "register_refused", "reason": reason, "address": self.scheduler_address}
            log.error("registration refused", extra=fields)

    async def _stream(self) -> None:
        async with open_channel(self.scheduler_address, self.tls) as channel:
            stub = scheduler_pb2_grpc.SchedulerStub(channel)
            in_flight: list[int] = []
            call = stub.RegisterPoolManager(self._reports(in_flight), metadata=metadata(self.token))
            async for _ack in call:
                self.outage.recovered()
                self.refused = None
                if in_flight:
                    self.acked = in_flight.pop(0)
                    self._acked.set()

    async def _reports(self, in_flight: list[int]) -> AsyncIterator[scheduler_pb2.PoolManagerReport]:
        executor = self.executor
        while True:
            self.pools.changed.clear()
            finished, executor.finished = executor.finished, []
            self.sent += 1
            in_flight.append(self.sent)
            yield scheduler_pb2.PoolManagerReport(
                manager_id=self.manager_id,
                address=self.address,
                metrics_address=self.metrics_address,
                pools=self.pools.states(),
                running_task_ids=sorted(executor.running),
                finished=finished,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.pools.changed.wait(), HEARTBEAT_S)

    async def flush(self, timeout_s: float = FINAL_REPORT_S) -> bool:
        """Send a report now and wait (bounded) until the scheduler acked it."""
        target = self.sent + 1
        self.pools.changed.set()
        try:
            async with asyncio.timeout(timeout_s):
                while self.acked < target:
                    self._acked.clear()
                    await self._acked.wait()
        except TimeoutError:
            return False
        return True


async def renew_leases_forever(store: Store, executor: Executor) -> None:
    """Extend the running tasks' leases every LEASE_RENEW_S. Through a Redis outage it retries with
    backoff (logged once), so the leases are renewed as soon as Redis is back."""
    outage = Outage("redis (lease renewal)")

    async def renew() -> None:
        by_set: dict[str, list[str]] = {}
        for task_id, rs in executor.leases.items():
            by_set.setdefault(rs, []).append(task_id)
        if by_set:
            await store.renew_leases(by_set, LEASE_MS)

    while True:
        await asyncio.sleep(LEASE_RENEW_S)
        try:
            await until_done(renew, outage)
        except Exception:  # a bug, not an outage: keep renewing
            log.exception("lease renewal failed", extra={"event": "lease_renewal_failed"})
