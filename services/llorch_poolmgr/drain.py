"""Operator drains of one pool (SPEC §5.6, ``POST /v1/pools/{id}/drain``).

A drained pool's Ready replicas take no new task (:meth:`Executor.try_start` refuses them, and they
report ``Draining``, so the scheduler dispatches elsewhere and queued tasks stay queued for the other
replicas). Running tasks may finish until the deadline; any still running then end with
``POOL_UNAVAILABLE``. An idle drained replica reports ``Drained``, its engine still loaded. Resume
returns it to Ready. Each step counts in ``drain_events_total{pool_id, event}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from llorch.errors import Code, OrchestratorError

from .metrics import PoolMetrics
from .supervisor import Replica
from .watchdog import Watchdog

log = logging.getLogger(__name__)

Unload = Callable[[list[Replica]], Awaitable[None]]


class Drains:
    def __init__(self, replicas: dict[str, list[Replica]], watchdog: Watchdog, metrics: PoolMetrics) -> None:
        """``replicas``: each pool's replicas, by pool id."""
        self.replicas = replicas
        self.watchdog = watchdog
        self.metrics = metrics
        self._timers: dict[str, asyncio.Task[None]] = {}
        self.changed = asyncio.Event()  # a watched replica changed: a task ended, a state moved
        for pool in replicas.values():
            self.watch(pool)

    def watch(self, replicas: list[Replica]) -> None:
        """Hear when these replicas change (a reload's new ones too)."""
        for replica in replicas:
            replica.on_change = _also(replica.on_change, self.changed.set)

    def drain(self, pool_id: str, deadline_ms: int, then: Unload | None = None) -> bool:
        """Start draining ``pool_id`` (again: the new deadline counts); False when it is unknown.
        ``then`` runs once the pool is drained (an unload)."""
        replicas = self.replicas.get(pool_id)
        if replicas is None:
            return False
        self._stop_timer(pool_id)
        for replica in replicas:
            replica.draining = True
            replica.on_change()
        self.metrics.drain_events.labels(pool_id, "started").inc()
        log.info(
            "pool draining", extra={"event": "drain_started", "pool_id": pool_id, "deadline_ms": deadline_ms}
        )
        finish = self._finish(pool_id, replicas, deadline_ms / 1000, then)
        self._timers[pool_id] = asyncio.create_task(finish)
        return True

    def resume(self, pool_id: str) -> None:
        """Undo a drain (a no-op for a pool that is not drained)."""
        self._stop_timer(pool_id)
        replicas = self.replicas.get(pool_id, [])
        if any(r.draining for r in replicas):
            self.metrics.drain_events.labels(pool_id, "resumed").inc()
            log.info("pool resumed from drain", extra={"event": "drain_resumed", "pool_id": pool_id})
        for replica in replicas:
            replica.draining = False
            replica.on_change()

    async def aclose(self) -> None:
        for pool_id in list(self._timers):
            self._stop_timer(pool_id)

    async def _idle(self, replicas: list[Replica], within_s: float | None) -> None:
        """Until nothing runs on ``replicas``, or ``within_s`` has passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                while any(r.running for r in replicas):
                    self.changed.clear()
                    await self.changed.wait()

    def _stop_timer(self, pool_id: str) -> None:
        timer = self._timers.pop(pool_id, None)
        if timer is not None:
            timer.cancel()

    async def _finish(
        self, pool_id: str, replicas: list[Replica], deadline_s: float, then: Unload | None
    ) -> None:
        await self.settle(pool_id, replicas, deadline_s, "drained")
        if then is not None:
            await then(replicas)
        if self._timers.get(pool_id) is asyncio.current_task():
            del self._timers[pool_id]

    async def settle(self, pool_id: str, replicas: list[Replica], deadline_s: float, what: str) -> None:
        """Let the tasks running on ``replicas`` finish within ``deadline_s``; cut the rest off with
        POOL_UNAVAILABLE and wait until their terminal events are written."""
        await self._idle(replicas, deadline_s)
        running = [t for r in replicas for t in list(r.running)]
        if running:
            why = OrchestratorError(
                Code.POOL_UNAVAILABLE,
                f"pool {pool_id} was {what} and the deadline passed before the task finished",
                pool_id=pool_id,
            )
            cut = sum(self.watchdog.cut(task_id, why) for task_id in running)
            self.metrics.drain_events.labels(pool_id, "deadline").inc()
            log.warning(
                "drain deadline passed",
                extra={"event": "drain_deadline", "pool_id": pool_id, "tasks": cut},
            )
            await self._idle(replicas, None)  # their terminal events are being written
        self.metrics.drain_events.labels(pool_id, "completed").inc()
        log.info("pool drained", extra={"event": "drain_completed", "pool_id": pool_id})
        for replica in replicas:
            replica.on_change()


def _also(first: Callable[[], None], then: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        first()
        then()

    return both
