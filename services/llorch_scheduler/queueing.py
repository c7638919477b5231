"""The queue side of admission: limits from config, per-class rate limits, the full-queue policies
(reject, drop-lru with the evicted task's terminal event) and the 429 contract (SPEC §5.1, §2.2)."""

from __future__ import annotations

import logging

from llorch.config import LlorchConfig
from llorch.errors import Code, OrchestratorError
from llorch.metrics import QUEUE_REPLICA
from llorch.store import Enqueued, Priority, QueueLimits, Store
from llorch.throttle import TokenBucket

from .estimator import Estimator
from .metrics import SchedulerMetrics
from .registry import SetInfo
from .sessions import Sessions

log = logging.getLogger(__name__)


class QueueFront:
    def __init__(
        self,
        cfg: LlorchConfig,
        store: Store,
        estimator: Estimator,
        metrics: SchedulerMetrics,
        sessions: Sessions,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.estimator = estimator
        self.metrics = metrics
        self.sessions = sessions
        self._pools = {p.id: p for p in cfg.pools}
        self._buckets: dict[tuple[str, Priority], TokenBucket] = {}

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

    def throttle(self, info: SetInfo, priority: Priority) -> None:
        """Per-class `rate_limit_rps`, summed over the set's members: 429 rate-limit when exceeded."""
        members = [self._pools[p] for p in info.pool_ids if p in self._pools]
        rps = sum(getattr(p.admission, priority).rate_limit_rps or 0.0 for p in members)
        if rps <= 0:
            return
        bucket = self._buckets.setdefault((info.rs, priority), TokenBucket(rps))
        wait_ms = bucket.take()
        if wait_ms:
            backoff = min(self.cfg.scheduler.backoff_max_ms, max(self.cfg.scheduler.backoff_min_ms, wait_ms))
            self._count_rejection(info, Code.ADMISSION_REJECT, "rate-limit")
            raise OrchestratorError(
                Code.ADMISSION_REJECT,
                f"{priority} tasks for this model are limited to {rps:g}/s; retry after {backoff} ms",
                engine=info.engine,
                policy_label="rate-limit",
                retry_after_ms=backoff,
            )

    async def enqueue(
        self, task_id: str, info: SetInfo, priority: Priority, deadline_at_ms: int, slots_total: int
    ) -> Enqueued:
        limits = self.limits(info)
        result = await self.store.enqueue(info.rs, task_id, priority, limits, deadline_at_ms)
        if result.evicted:
            await self._evict(info, result.evicted, slots_total)
        if result.position < 0:
            raise self._full(info, limits, result, slots_total)
        self.metrics.tasks_enqueued.labels(
            info.engine, info.engine_version, info.rs, QUEUE_REPLICA, priority
        ).inc()
        return result

    async def _evict(self, info: SetInfo, victim: str, slots_total: int) -> None:
        """End the displaced batch task with QUEUE_FULL_DROP_LRU; then drop its parked lease."""
        backoff = self.estimator.backoff_ms(info.rs, slots_total)
        payload = {
            "code": Code.QUEUE_FULL_DROP_LRU.value,
            "retriable": True,
            "policy_label": "drop-lru",
            "retry_after_ms": backoff,
            "engine": info.engine,
            "message": "evicted from a full queue by a newer task (drop-lru); resubmit later",
        }
        # The victim's own admission may not have created its record yet: tombstone=True.
        await self.store.terminate(victim, "failed", payload, self.cfg.sse.retention_s, tombstone=True)
        await self.store.release_lease(info.rs, victim)
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

    def _full(
        self, info: SetInfo, limits: QueueLimits, result: Enqueued, slots_total: int
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
