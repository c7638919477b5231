"""The loader: carries out the residency plan (issue 13) against the pool managers.

It builds the planner's snapshot (:mod:`.residency`) from the pool managers' reports, the registry's
slot accounting and the queue watch's queue heads, then loads (``Resume``) and unloads (``Unload``)
on-demand pools. It runs on every wake (an admission, a finished task, a report) and once a second
for the time-based rules (idle unload, ``max_swap_wait_ms``); with no on-demand pool it does nothing.

What it learns: each model's load time (an EWMA of Resume → Ready), which predicts a waiting task's
start; the first load of a model is predicted from its size at :data:`LOAD_BYTES_PER_S` plus
:data:`LOAD_FIXED_MS`. Every load and eviction is logged with its reason and counted
(``model_loads_total``, ``model_evictions_total``, ``model_load_ms``).

The loader is the one writer of its bookkeeping; the dispatcher asks it :meth:`held` and tells it
:meth:`touch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import grpc.aio

from llorch.config import ResidencyConfig
from llorch.lifecycle import COMING_STATES
from llorch.rpc import DEFAULT_DEADLINE_S, metadata
from llorch.v1 import poolmgr_pb2, scheduler_pb2, types_pb2

from . import residency
from .metrics import SchedulerMetrics
from .registry import Manager, PoolRegistry, set_of

log = logging.getLogger(__name__)

TICK_S = 1.0
"""How often the time-based rules are re-checked without a wake."""
LOAD_BYTES_PER_S = 1 << 30
"""A first load's predicted speed (weights read and uploaded); later loads use the measured time."""
LOAD_FIXED_MS = 2_000
"""A first load's fixed part: the engine's start and the self-test."""
PENDING_S = 120.0
"""How long a sent load or unload that the reports do not reflect yet is trusted."""
UNLOAD_TIMEOUT_S = 60.0
_ALPHA = 0.3

_PHASES: Mapping[str, residency.Phase] = {
    "Stopped": "unloaded",
    **dict.fromkeys(COMING_STATES, "loading"),
    "Ready": "ready",
    "Draining": "draining",
    "Drained": "draining",
}

Clock = Callable[[], int]


def wall_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class _Pending:
    since_ms: int
    reason: str


class Loader:
    def __init__(
        self,
        settings: ResidencyConfig,
        registry: PoolRegistry,
        queues: Callable[[], Mapping[str, residency.QueueView]],
        metrics: SchedulerMetrics,
        internal_token: str,
        announce: Callable[[str], Awaitable[None]] | None = None,
        clock: Clock = wall_ms,
    ) -> None:
        """``queues``: each set's queue heads (the queue watch's :meth:`views`); ``announce``: tell a
        set's waiting tasks that their model's load starts (the queue watch's :meth:`announce`)."""
        self.announce = announce
        self.settings = residency.Settings(settings.max_swap_wait_ms, settings.min_residency_s * 1000)
        self.registry = registry
        self.queues = queues
        self.metrics = metrics
        self.token = internal_token
        self.clock = clock
        self.plan = residency.Plan()
        self._wake = asyncio.Event()
        self._loading: dict[str, _Pending] = {}  # pool -> Resume sent, not Ready yet
        self._unloading: dict[str, _Pending] = {}  # pool -> Unload sent, not Stopped yet
        self._loaded_at: dict[str, int] = {}
        self._last_used: dict[str, int] = {}
        self._load_ms: dict[str, float] = {}  # model -> EWMA of its load time
        self._tasks: set[asyncio.Task[None]] = set()

    # -- what the others ask ---------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def held(self, rs: str) -> bool:
        """The set takes no new dispatch: its pool drains for a forced swap."""
        return rs in self.plan.hold

    def touch(self, pool_id: str) -> None:
        """A task was dispatched to, or ended on, this pool."""
        self._last_used[pool_id] = self.clock()

    def load_eta_ms(self, rs: str) -> int | None:
        """How long until the set has a loaded pool, or None when it has one (or is not on-demand)."""
        pools = self.registry.pools()
        if not any(p.residency == "on-demand" for _, p in pools):  # the common case, cheaply
            return None
        members = [(m, p) for m, p in pools if set_of(p) == rs]
        if not members or any(self.registry.is_ready(m, p) for m, p in members):
            return None
        on_demand = [p for _, p in members if p.residency == "on-demand"]
        if not on_demand:
            return None
        now = self.clock()
        etas = []
        for pool in on_demand:
            expected = self._expected_load_ms(pool)
            pending = self._loading.get(pool.pool_id)
            if pending is not None or pool.state in ("Preloading", "SelfTest", "Backoff"):
                since = pending.since_ms if pending is not None else now
                etas.append(max(0, int(expected) - (now - since)))
            else:
                etas.append(int(expected))
        return min(etas)

    def why(self, rs: str) -> str | None:
        return self.plan.waiting.get(rs)

    # -- the loop --------------------------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # a bug must not stop residency: log it and plan again next tick
                log.exception("residency tick failed", extra={"event": "residency_error"})

    def tick(self) -> residency.Plan:
        """Observe the reports, plan, and start the plan's loads and unloads (in the background)."""
        pools = self.registry.pools()
        if not any(p.residency == "on-demand" for _, p in pools):
            return self.plan
        now = self.clock()
        self._observe(pools, now)
        views = [self._view(m, p, now) for m, p in pools]
        self.plan = residency.plan(views, self.queues(), self.totals(), now, self.settings)
        by_id = {p.pool_id: (m, p) for m, p in pools}
        for pool_id in self.plan.load:
            manager, pool = by_id[pool_id]
            self._loading[pool_id] = _Pending(now, "demand")
            self._spawn(self._load(manager, pool))
        for eviction in self.plan.evict:
            manager, pool = by_id[eviction.pool_id]
            self._unloading[eviction.pool_id] = _Pending(now, eviction.reason)
            self._spawn(self._unload(manager, pool, eviction))
        return self.plan

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the snapshot ----------------------------------------------------------------------------------

    def totals(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for _, pool in self.registry.pools():
            for device, total in pool.device_total_bytes.items():
                totals[device] = max(totals.get(device, 0), total)
        return totals

    def _observe(self, pools: list[tuple[Manager, types_pb2.PoolState]], now: int) -> None:
        """Settle the sent loads and unloads the reports now reflect; note when pools became Ready."""
        for _manager, pool in pools:
            pool_id = pool.pool_id
            if pool.state == "Ready" and pool_id not in self._loaded_at:
                self._loaded_at[pool_id] = now
                self._last_used.setdefault(pool_id, now)
                pending = self._loading.pop(pool_id, None)
                if pending is not None:
                    self._loaded(pool, now - pending.since_ms)
            elif pool.state != "Ready":
                self._loaded_at.pop(pool_id, None)
            if pool.state in ("Unavailable", "Failed") and self._loading.pop(pool_id, None) is not None:
                self.metrics.model_loads.labels(pool.model_ref, "failed").inc()
                log.warning(
                    "model load failed",
                    extra={"event": "model_load_failed", "pool_id": pool_id, "model_id": pool.model_ref},
                )
            pending = self._unloading.get(pool_id)
            if pending is not None and (pool.state == "Stopped" or now - pending.since_ms > PENDING_S * 1000):
                del self._unloading[pool_id]
            loading = self._loading.get(pool_id)
            if loading is not None and now - loading.since_ms > PENDING_S * 1000 and pool.state == "Stopped":
                del self._loading[pool_id]  # the Resume was lost: plan it again

    def _view(self, manager: Manager, pool: types_pb2.PoolState, now: int) -> residency.PoolView:
        pool_id = pool.pool_id
        if pool_id in self._unloading:
            phase: residency.Phase = "unloading"
        elif pool_id in self._loading and pool.state in ("Stopped", "Preloading", "SelfTest", "Backoff"):
            phase = "loading"
        elif not manager.connected:
            phase = "draining" if pool.state != "Stopped" else "failed"  # memory unknown: keep it
        else:
            phase = _PHASES.get(pool.state, "failed")
        running = sum(self.registry.busy(r) for r in pool.replicas)
        used = {t.device: t.vram_used_bytes for t in pool.telemetry if t.vram_used_bytes > 0}
        loaded_at = self._loaded_at.get(pool_id, 0)
        return residency.PoolView(
            pool_id=pool_id,
            rs=set_of(pool),
            model=pool.model_ref,
            on_demand=pool.residency == "on-demand",
            pinned=pool.pinned,
            idle_unload_ms=pool.idle_unload_ms,
            need=dict(pool.need_bytes),
            phase=phase,
            used=used if phase in residency.HOLDS_MEMORY else {},
            running=running,
            loaded_at_ms=loaded_at,
            last_used_ms=max(self._last_used.get(pool_id, 0), loaded_at),
            headroom=pool.headroom_bytes,
        )

    # -- actions ---------------------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load(self, manager: Manager, pool: types_pb2.PoolState) -> None:
        """Tell the waiting tasks first (so their streams show the load before its dispatch), then
        ask the pool manager to load."""
        if self.announce is not None:
            await self.announce(set_of(pool))
        self.metrics.model_loads.labels(pool.model_ref, "demand").inc()
        log.info(
            "model load started",
            extra={
                "event": "model_load_started",
                "pool_id": pool.pool_id,
                "model_id": pool.model_ref,
                "reason": "demand",
            },
        )
        try:
            await manager.stub.Resume(
                poolmgr_pb2.ResumeRequest(pool_id=pool.pool_id),
                metadata=metadata(self.token),
                timeout=DEFAULT_DEADLINE_S,
            )
        except grpc.aio.AioRpcError as exc:
            self._loading.pop(pool.pool_id, None)  # planned again on a later tick
            log.warning(
                "model load request failed",
                extra={"event": "model_load_failed", "pool_id": pool.pool_id, "code": exc.code().name},
            )
        self.wake()

    async def _unload(
        self, manager: Manager, pool: types_pb2.PoolState, eviction: residency.Eviction
    ) -> None:
        try:
            reply = await manager.stub.Unload(
                poolmgr_pb2.UnloadRequest(pool_id=pool.pool_id, reason=eviction.reason),
                metadata=metadata(self.token),
                timeout=UNLOAD_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            self._unloading.pop(pool.pool_id, None)
            log.warning(
                "model unload request failed",
                extra={"event": "model_evict_failed", "pool_id": pool.pool_id, "code": exc.code().name},
            )
            self.wake()
            return
        if not reply.unloaded:  # a task got there first: the pool is busy, so it stays
            self._unloading.pop(pool.pool_id, None)
            self.wake()
            return
        self.metrics.model_evictions.labels(pool.model_ref, eviction.reason).inc()
        log.info(
            "model evicted",
            extra={
                "event": "model_evicted",
                "pool_id": pool.pool_id,
                "model_id": pool.model_ref,
                "reason": eviction.reason,
                "for_pool": eviction.for_pool or None,
            },
        )
        self.wake()

    def _loaded(self, pool: types_pb2.PoolState, took_ms: int) -> None:
        self.metrics.model_load_ms.labels(pool.model_ref).observe(took_ms)
        previous = self._load_ms.get(pool.model_ref)
        self._load_ms[pool.model_ref] = (
            float(took_ms) if previous is None else previous + _ALPHA * (took_ms - previous)
        )
        log.info(
            "model loaded",
            extra={
                "event": "model_loaded",
                "pool_id": pool.pool_id,
                "model_id": pool.model_ref,
                "load_ms": took_ms,
            },
        )

    def _expected_load_ms(self, pool: types_pb2.PoolState) -> float:
        learned = self._load_ms.get(pool.model_ref)
        if learned is not None:
            return learned
        size = max(pool.need_bytes.values(), default=0)
        return LOAD_FIXED_MS + size * 1000 / LOAD_BYTES_PER_S

    # -- GET /v1/gpus ----------------------------------------------------------------------------------

    def gpus(self) -> scheduler_pb2.GpusReply:
        pools = self.registry.pools()
        now = self.clock()
        views = {p.pool_id: self._view(m, p, now) for m, p in pools}
        totals = self.totals()
        names: dict[str, str] = {}
        for _, pool in pools:
            names.update(pool.device_names)
        reply = scheduler_pb2.GpusReply(
            max_swap_wait_ms=self.settings.max_swap_wait_ms,
            min_residency_ms=self.settings.min_residency_ms,
        )
        for device, entry in sorted(residency.ledger(views.values(), totals).items()):
            row = reply.devices.add(
                device=device,
                name=names.get(device, ""),
                total_bytes=entry.total,
                used_bytes=entry.used,
                reserved_bytes=entry.reserved,
                free_bytes=entry.free,
            )
            for _, pool in sorted(pools, key=lambda mp: mp[1].pool_id):
                view = views[pool.pool_id]
                if device not in view.need and device not in view.used:
                    continue
                row.residents.add(
                    pool_id=pool.pool_id,
                    model_ref=pool.model_ref,
                    state=_resident_state(view),
                    idle_since_ms=view.last_used_ms if view.phase == "ready" and not view.running else 0,
                    pinned=view.pinned,
                    residency=pool.residency or "always",
                    used_bytes=view.held(device),
                    need_bytes=view.need.get(device, 0),
                    running=view.running,
                    loaded_at_ms=view.loaded_at_ms,
                )
        return reply


def _resident_state(view: residency.PoolView) -> str:
    if view.phase == "ready":
        return "busy" if view.running else "idle"
    return view.phase
