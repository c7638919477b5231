"""The Scheduler gRPC service: thin handlers over admission, dispatch and the registry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from llorch import tracing
from llorch.errors import Code, OrchestratorError, invalid
from llorch.rpc import from_rpc_error, metadata, unary
from llorch.store import Store, TaskState
from llorch.v1 import poolmgr_pb2, poolmgr_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc, types_pb2

from . import admit_stream, inventory
from .admission import Admission
from .cancel import Canceller
from .catalog import Catalog
from .dispatcher import Dispatcher
from .loader import Loader
from .metrics import SchedulerMetrics
from .registry import Manager, PoolRegistry, set_of
from .sessions import MICRO, Sessions, cost_text
from .submission import submission_of

log = logging.getLogger(__name__)

RELOAD_TIMEOUT_S = 600.0
"""The longest a reload may take: a big model's preload and self-test, twice when VRAM is short."""
RETIRE_DEADLINE_MS = 60_000
"""SPEC §2.3's default drain deadline of a state change to Retired."""
Context = grpc.aio.ServicerContext[Any, Any]


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(
        self,
        store: Store,
        registry: PoolRegistry,
        admission: Admission,
        dispatcher: Dispatcher,
        metrics: SchedulerMetrics,
        retention_s: int,
        internal_token: str,
        sessions: Sessions,
        catalog: Catalog,
        loader: Loader,
    ) -> None:
        self.loader = loader
        self.sessions = sessions
        self.catalog = catalog
        self.canceller = Canceller(store, sessions, metrics, registry.set_info, self.abort, retention_s)
        self.store = store
        self.registry = registry
        self.admission = admission
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.retention_s = retention_s
        self.token = internal_token
        self._background: set[asyncio.Task[None]] = set()

    async def AdmitStream(
        self, request_iterator: AsyncIterator[scheduler_pb2.AdmitCalls], context: Context
    ) -> AsyncIterator[scheduler_pb2.AdmitResults]:
        async for result in admit_stream.serve(request_iterator, self._admit):
            yield result

    async def _admit(
        self, request: scheduler_pb2.AdmitRequest, call_metadata: object
    ) -> scheduler_pb2.AdmitResponse:
        with tracing.server_span("llorch.v1.Scheduler/Admit", call_metadata):
            admitted = await self.admission.admit(submission_of(request))
            tracing.annotate(task_id=admitted.task_id, model=request.model_ref)
        self.dispatcher.queued(admitted.rs)
        reply = scheduler_pb2.AdmitResponse(
            task_id=admitted.task_id,
            session_id=request.session_id,
            replica_set_id=admitted.rs,
            queue_position=admitted.queue_position,
            predicted_start_ms=admitted.predicted_start_ms,
            backoff_ms=admitted.backoff_ms,
            on_time_probability=admitted.on_time_probability,
        )
        budgets = admitted.budgets
        if budgets is not None:
            if budgets.tokens is not None:
                reply.budget_tokens = budgets.tokens
            if budgets.time_ms is not None:
                reply.budget_time_ms = budgets.time_ms
            if budgets.cost_micro is not None:
                reply.budget_cost = cost_text(budgets.cost_micro)
        return reply

    @unary
    async def Cancel(
        self, request: scheduler_pb2.CancelRequest, context: Context
    ) -> scheduler_pb2.CancelResponse:
        with tracing.server_span(
            "llorch.v1.Scheduler/Cancel", context.invocation_metadata(), task_id=request.task_id
        ):
            previous = await self.canceller.cancel(request.task_id)  # its Abort joins this trace
        return scheduler_pb2.CancelResponse(previous_state=previous.value)

    def abort(self, manager_address: str, task_id: str) -> None:
        """Abort a task's engine request on its pool manager, in the background."""
        self._spawn(self._abort(manager_address, task_id))

    async def _abort(self, address: str, task_id: str) -> None:
        manager = self.registry.manager_by_address(address)
        if manager is None:
            return
        try:
            await manager.stub.Abort(
                poolmgr_pb2.AbortRequest(task_id=task_id),
                metadata=tracing.grpc_metadata(metadata(self.token)),
                timeout=5,
            )
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "abort failed", extra={"event": "abort_failed", "task_id": task_id, "code": exc.code().name}
            )

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @unary
    async def GetTask(
        self, request: scheduler_pb2.GetTaskRequest, context: Context
    ) -> scheduler_pb2.TaskStatus:
        record = await self.store.task(request.task_id)
        if record is None:
            raise OrchestratorError(Code.NOT_FOUND, f"task {request.task_id} is unknown or expired")
        status = scheduler_pb2.TaskStatus(
            task_id=request.task_id,
            session_id=record.session_id,
            state=record.state.value,
            priority=record.priority,
            model_ref=record.model_ref,
            replica_set_id=record.rs,
            pool_id=record.pool_id,
            replica_id=record.replica_id,
            tokens_out=record.tokens_out,
            error_json=record.error_json,
        )
        if record.state == TaskState.QUEUED:
            position = await self.store.queue_position(record.rs, request.task_id, record.priority)
            if position is not None:
                status.queue_position = position
                total, _ = self.registry.slots(record.rs)
                status.predicted_start_ms = self.admission.estimator.predicted_start_ms(
                    record.rs, position, total, record.request.max_tokens
                )
        return status

    @unary
    async def ListPools(
        self, request: scheduler_pb2.ListPoolsRequest, context: Context
    ) -> scheduler_pb2.ListPoolsResponse:
        reply = scheduler_pb2.ListPoolsResponse()
        for manager, pool in sorted(self.registry.pools(), key=lambda mp: mp[1].pool_id):
            busy = sum(self.registry.busy(r) for r in pool.replicas)
            total = sum(r.slots_total for r in pool.replicas if r.state == "Ready")
            view = reply.pools.add()
            view.state.CopyFrom(pool)
            for replica in view.state.replicas:  # what this scheduler placed counts at once
                replica.slots_busy = self.registry.busy(replica)
            if not manager.connected:
                view.state.state = "Unreachable"
                view.state.live = False
            view.replica_set_id = set_of(pool)
            view.manager_id = manager.manager_id
            view.metrics_address = manager.metrics_address
            view.tasks_running = busy
            view.slots_free = max(0, total - busy)
            view.draining = view.state.state in ("Draining", "Drained")
        reply.metrics_addresses.extend(
            sorted({m.metrics_address for m in self.registry.managers.values() if m.connected})
        )
        return reply

    @unary
    async def GetSession(
        self, request: scheduler_pb2.SessionRequest, context: Context
    ) -> scheduler_pb2.SessionInfo:
        view = await self.sessions.info(request.session_id)
        record, budgets = view.record, view.record.budgets
        cost = None if budgets.cost_micro is None else round(budgets.cost_micro / MICRO, 4)
        return scheduler_pb2.SessionInfo(
            session_id=record.session_id,
            ttl_ms_remaining=record.ttl_ms,
            turns=record.turns,
            max_turns=record.max_turns,
            kv_bytes=view.kv_bytes,
            kv_warmth=view.kv_warmth,
            model_ref=record.model_ref,
            replica_id=record.replica_id,
            created_ms=record.created_ms,
            tokens_budget_remaining=budgets.tokens,
            time_budget_remaining_ms=budgets.time_ms,
            cost_budget_remaining=cost,
        )

    @unary
    async def DeleteSession(
        self, request: scheduler_pb2.SessionRequest, context: Context
    ) -> scheduler_pb2.DeleteSessionResponse:
        """Remove the session; evict its KV on its last replica's idle slots (queued and running
        tasks of the session go on)."""
        held = await self.store.session_delete(request.session_id)
        replica_id = held.replica_id if held else ""
        found = self.registry.find_replica(replica_id) if replica_id else None
        if found is not None and found[0].connected:
            self._spawn(self._erase_kv(found[0].stub, replica_id))
        return scheduler_pb2.DeleteSessionResponse(existed=held is not None)

    async def _erase_kv(self, stub: poolmgr_pb2_grpc.PoolManagerAsyncStub, replica_id: str) -> None:
        try:
            await stub.EraseKV(
                poolmgr_pb2.EraseKVRequest(replica_id=replica_id), metadata=metadata(self.token), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "kv erase failed",
                extra={"event": "erase_kv_failed", "replica_id": replica_id, "code": exc.code().name},
            )

    @unary
    async def ListReplicaSets(
        self, request: scheduler_pb2.ListReplicaSetsRequest, context: Context
    ) -> scheduler_pb2.ListReplicaSetsResponse:
        return await inventory.replica_sets(self.registry, self.store, self.dispatcher.slo)

    @unary
    async def Gpus(self, request: scheduler_pb2.GpusRequest, context: Context) -> scheduler_pb2.GpusReply:
        """The VRAM ledger and its residents (issue 13), as the loader counts them."""
        return self.loader.gpus()

    @unary
    async def Capabilities(
        self, request: scheduler_pb2.CapabilitiesRequest, context: Context
    ) -> scheduler_pb2.CapabilitiesResponse:
        return inventory.capabilities(self.registry, sessions=True)

    @unary
    async def PoolControl(
        self, request: scheduler_pb2.PoolControlRequest, context: Context
    ) -> scheduler_pb2.PoolControlResponse:
        if request.action not in ("resume", "drain", "reload"):
            raise invalid("action", "pool actions are resume, drain and reload")
        found = next(((m, p) for m, p in self.registry.pools() if p.pool_id == request.pool_id), None)
        if found is None:
            raise OrchestratorError(Code.NOT_FOUND, f"pool {request.pool_id} is unknown")
        manager, pool = found
        if not manager.connected:
            raise OrchestratorError(
                Code.POOL_UNAVAILABLE, f"the pool manager of {request.pool_id} is not connected"
            )
        if request.action == "reload":
            return await self._reload(manager, pool, request.new_model_ref)
        try:
            if request.action == "drain":
                drain = poolmgr_pb2.DrainRequest(pool_id=request.pool_id, deadline_ms=request.deadline_ms)
                reply = await manager.stub.Drain(drain, metadata=metadata(self.token), timeout=5)
            else:
                resume = poolmgr_pb2.ResumeRequest(pool_id=request.pool_id)
                reply = await manager.stub.Resume(resume, metadata=metadata(self.token), timeout=5)
        except grpc.aio.AioRpcError as exc:
            raise OrchestratorError(
                Code.POOL_UNAVAILABLE,
                f"the pool manager of {request.pool_id} did not answer ({exc.code().name})",
            ) from None
        log.info(
            f"pool {request.action}", extra={"event": f"pool_{request.action}", "pool_id": request.pool_id}
        )
        return scheduler_pb2.PoolControlResponse(state=reply.state)

    @unary
    async def Catalog(
        self, request: scheduler_pb2.CatalogRequest, context: Context
    ) -> scheduler_pb2.CatalogReply:
        """The catalog's routes (SPEC §2.3); a model Retired drains its pools and ends its queued tasks."""
        catalog = self.catalog
        reply = scheduler_pb2.CatalogReply()
        if request.op == "list":
            entries = catalog.entries(request.state, request.tag)
        elif request.op == "get":
            entries = [catalog.get(request.model_id)]
        elif request.op == "create":
            entry, reply.created = await catalog.create(json.loads(request.body_json or "{}"))
            entries = [entry]
        elif request.op == "delete":
            served_by = [p.pool_id for _, p in self.registry.pools() if p.model_ref == request.model_id]
            await catalog.delete(request.model_id, served_by)
            entries = []
        elif request.op == "verify":
            entries = [await catalog.verify(request.model_id)]
        elif request.op == "state":
            entry, reply.previous_state = await catalog.set_state(request.model_id, request.state)
            entries = [entry]
            if request.state == "Retired" and reply.previous_state != "Retired":
                await self._retire(request.model_id, request.deadline_ms or RETIRE_DEADLINE_MS)
        else:
            raise invalid("op", f"unknown catalog operation {request.op!r}")
        reply.entries_json.extend(json.dumps(e, separators=(",", ":")) for e in entries)
        return reply

    async def _reload(
        self, manager: Manager, pool: types_pb2.PoolState, model_ref: str
    ) -> scheduler_pb2.PoolControlResponse:
        """SPEC §5.6 reload: check trust here (the catalog is ours), swap in the pool manager. Queued
        tasks of the pool's old set stay for its other members; with none left they end
        POOL_UNAVAILABLE, since nothing will serve them."""
        if not model_ref:
            raise invalid("new_model_ref", "new_model_ref is required")
        try:
            entry = self.catalog.get(model_ref)
        except OrchestratorError:
            raise invalid("new_model_ref", f"model {model_ref} is not in the catalog") from None
        if entry["verification"]["status"] == "never":
            entry = await self.catalog.verify(model_ref)
        if not entry["trusted"]:
            raise OrchestratorError(
                Code.UNTRUSTED_ARTIFACT,
                f"model {model_ref} failed verification; it cannot be loaded",
                errors=entry["verification"]["errors"],
            )
        old_set = set_of(pool)
        request = poolmgr_pb2.ReloadRequest(
            pool_id=pool.pool_id,
            model_ref=model_ref,
            model_path=entry["path"],
            model_digest=entry.get("digest") or "",
        )
        try:
            done = await manager.stub.Reload(request, metadata=metadata(self.token), timeout=RELOAD_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, f"the pool manager of {pool.pool_id}") from None
        # The pool manager's next report would say it too; hearing it now means a task for the new
        # model admitted right after this answer finds the pool.
        with contextlib.suppress(grpc.aio.AioRpcError):
            health = await manager.stub.Health(
                poolmgr_pb2.HealthRequest(), metadata=metadata(self.token), timeout=5
            )
            self.registry.update(
                manager.manager_id,
                manager.address,
                manager.metrics_address,
                list(health.pools),
                manager.running,
            )
            self.dispatcher.wake()
        others = [p for _, p in self.registry.pools() if p.pool_id != pool.pool_id and set_of(p) == old_set]
        if not others:
            why = OrchestratorError(
                Code.POOL_UNAVAILABLE,
                f"pool {pool.pool_id} was reloaded onto {model_ref}; nothing serves {pool.model_ref} now",
            )
            interactive, batch, _ = await self.store.queued(old_set)
            for task_id in [*interactive, *batch]:
                await self.canceller.end(task_id, why, TaskState.FAILED, "reloaded")
        log.info(
            "pool reloaded",
            extra={"event": "pool_reload", "pool_id": pool.pool_id, "model_ref": model_ref},
        )
        return scheduler_pb2.PoolControlResponse(
            state=done.state,
            model_ref=done.model_ref,
            model_digest=done.model_digest,
            engine_version=done.engine_version,
        )

    async def _retire(self, model_id: str, deadline_ms: int) -> None:
        """SPEC §5.7: a retired model's pools drain (its running tasks finish or end at the deadline)
        and unload (their engines stop; resume starts them again), and its queued tasks end with
        POOL_UNAVAILABLE."""
        why = OrchestratorError(Code.POOL_UNAVAILABLE, f"model {model_id} was retired")
        members = [(m, p) for m, p in self.registry.pools() if p.model_ref == model_id]
        for rs in {set_of(p) for _, p in members}:
            interactive, batch, _ = await self.store.queued(rs)
            for task_id in [*interactive, *batch]:
                await self.canceller.end(task_id, why, TaskState.FAILED, "retired")
        for manager, pool in members:
            if not manager.connected:
                continue
            drain = poolmgr_pb2.DrainRequest(pool_id=pool.pool_id, deadline_ms=deadline_ms, unload=True)
            try:
                await manager.stub.Drain(drain, metadata=metadata(self.token), timeout=5)
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "drain of a retired model's pool failed",
                    extra={"event": "retire_drain_failed", "pool_id": pool.pool_id, "error": exc.code().name},
                )

    async def RegisterPoolManager(
        self, request_iterator: AsyncIterator[scheduler_pb2.PoolManagerReport], context: Context
    ) -> AsyncIterator[scheduler_pb2.SchedulerDirective]:
        manager_id = ""
        try:
            async for report in request_iterator:
                manager_id = report.manager_id
                running = frozenset(report.running_task_ids)
                self.registry.update(
                    report.manager_id, report.address, report.metrics_address, list(report.pools), running
                )
                await self.dispatcher.finished(*report.finished)
                self.dispatcher.reconcile(report.manager_id, set(running))
                self.dispatcher.wake()
                yield scheduler_pb2.SchedulerDirective(ack=True)
        finally:
            if manager_id:
                self.registry.disconnect(manager_id)
                self._spawn(self.dispatcher.manager_lost(manager_id))

    async def refresh_queue_gauges(self) -> None:
        """Set `queue_depth` for every known set (series exist at 0 from the first report on)."""
        for rs in self.registry.replica_sets():
            info = self.registry.set_info(rs)
            if info is not None:
                depths = await self.store.queue_depths(rs)
                for priority, depth in zip(("interactive", "batch"), depths, strict=True):
                    self.metrics.queue_depth.labels(info.engine, info.engine_version, rs, priority).set(depth)
