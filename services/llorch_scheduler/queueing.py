"""The queue side of admission: limits from config, the full-queue policies (reject, drop-lru with the
evicted task's terminal event) and the 429 contract (SPEC §5.1, §2.2)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from llorch import events
from llorch.config import PoolConfig
from llorch.errors import Code, OrchestratorError
from llorch.metrics import QUEUE_REPLICA
from llorch.store import Admitted, Priority, QueueLimits, Store, TaskState

from .estimator import Estimator
from .metrics import SchedulerMetrics
from .registry import SetInfo
from .sessions import Sessions

log = logging.getLogger(__name__)


class QueueFront:
    def __init__(
        self,
        pools: Sequence[PoolConfig],
        retention_s: int,
        store: Store,
        estimator: Estimator,
        metrics: SchedulerMetrics,
        sessions: Sessions,
    ) -> None:
        self.retention_s = retention_s
        self.store = store
        self.estimator = estimator
        self.metrics = metrics
        self.sessions = sessions
        self._pools = {p.id: p for p in pools}

    def limits(self, info: SetInfo) -> QueueLimits:
        """Capacities summed over the set's member pools; a class cap defaults to the pool's capacity."""
        members = [self._pools[p] for p in info.pool_ids if p in self._pools]
        capacity = sum(p.queue.capacity for p in members) or 1

        def cap(priority: Priority) -> int:
            return (
                sum(getattr(p.admission, priority).queue_capacity or p.queue.capacity for p in members)
                or capacity
            )

        return QueueLimits(capacity, cap("interactive"), cap("batch"), info.full_policy)

    def enqueued(self, info: SetInfo, priority: Priority) -> None:
        self.metrics.tasks_enqueued.labels(
            info.engine, info.engine_version, info.rs, QUEUE_REPLICA, priority
        ).inc()

    async def evict(self, info: SetInfo, victim: str, slots_total: int) -> None:
        """End the displaced batch task with QUEUE_FULL_DROP_LRU; then drop its parked entry."""
        backoff = self.estimator.backoff_ms(info.rs, slots_total)
        exc = OrchestratorError(
            Code.QUEUE_FULL_DROP_LRU,
            "evicted from a full queue by a newer task (drop-lru); resubmit later",
            policy_label="drop-lru",
            retry_after_ms=backoff,
        )
        await self.store.terminate(
            victim, TaskState.FAILED, events.error(exc, engine=info.engine), self.retention_s
        )
        await self.store.release_eviction(info.rs, victim)
        await self.sessions.settle(victim, 0)
        self._count_rejection(info, Code.QUEUE_FULL_DROP_LRU, "drop-lru")
        log.info(
            "task evicted",
            extra={
                "event": "admission_rejected",
                "task_id": victim,
                "code": Code.QUEUE_FULL_DROP_LRU.value,
                "engine": info.engine,
            },
        )

    def full(
        self, info: SetInfo, limits: QueueLimits, result: Admitted, slots_total: int
    ) -> OrchestratorError:
        backoff = self.estimator.backoff_ms(info.rs, slots_total)
        drop_lru = limits.policy == "drop-lru"
        code = Code.QUEUE_FULL_DROP_LRU if drop_lru else Code.ADMISSION_REJECT
        self._count_rejection(info, code, limits.policy)
        log.info(
            "queue full", extra={"event": "admission_rejected", "code": code.value, "engine": info.engine}
        )
        return OrchestratorError(
            code,
            f"the queue for this model is full ({result.depth} queued); retry after {backoff} ms",
            engine=info.engine,
            policy_label=limits.policy,
            retry_after_ms=backoff,
        )

    def _count_rejection(self, info: SetInfo, code: Code, policy: str) -> None:
        self.metrics.tasks_rejected.labels(info.engine, code.value).inc()
        self.metrics.backpressure.labels(info.engine, policy).inc()
