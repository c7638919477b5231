"""What queued tasks see while they wait (SPEC §3, §5.1, §5.2).

Every ``sse.queued_metrics_interval_ms`` each replica set's queue is read once: tasks past their
deadline are taken out and end with DEADLINE_UNMET; every task whose position changed since its last
frame gets a queued ``metrics`` event (position, predicted start, queue depth, on-time probability), all
in one pipelined round trip. So a waiting client hears at most one frame per interval, and only news.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from redis.exceptions import RedisError

from llorch import events
from llorch.config import LlorchConfig
from llorch.errors import Code, OrchestratorError
from llorch.metrics import QUEUE_REPLICA
from llorch.store import Priority, Store, TaskState, now_ms

from .estimator import Estimator
from .metrics import SchedulerMetrics
from .registry import PoolRegistry
from .sessions import Sessions

log = logging.getLogger(__name__)


@dataclass
class Waiting:
    rs: str
    tokens: int
    deadline_at_ms: int
    position: int


class QueueWatch:
    def __init__(
        self,
        cfg: LlorchConfig,
        store: Store,
        registry: PoolRegistry,
        estimator: Estimator,
        metrics: SchedulerMetrics,
        sessions: Sessions,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.registry = registry
        self.estimator = estimator
        self.metrics = metrics
        self.sessions = sessions
        self.waiting: dict[str, Waiting] = {}
        self._depths: dict[str, tuple[int, int]] = {}

    def admitted(
        self, task_id: str, rs: str, priority: Priority, tokens: int, deadline_ms: int, position: int
    ) -> None:
        self.waiting[task_id] = Waiting(rs, tokens, now_ms() + deadline_ms, position)
        ni, nb = self._depths.get(rs, (0, 0))  # kept current between scans: the next scan corrects it
        self._depths[rs] = (ni + 1, nb) if priority == "interactive" else (ni, nb + 1)

    def depth_ahead(self, rs: str, priority: Priority) -> int:
        """Tasks that would be dispatched before a new one of ``priority`` (as of the last scan)."""
        ni, nb = self._depths.get(rs, (0, 0))
        return ni if priority == "interactive" else ni + nb

    async def run(self) -> None:
        interval_s = self.cfg.sse.queued_metrics_interval_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            for rs in self.registry.replica_sets():
                with contextlib.suppress(RedisError):
                    await self.scan(rs)

    async def scan(self, rs: str) -> None:
        for task_id in await self.store.overdue_queued(rs):
            await self._expire(rs, task_id)
        interactive, batch, _ = await self.store.queued(rs)
        self._depths[rs] = (len(interactive), len(batch))
        order = interactive + batch
        total, _ = self.registry.slots(rs)
        starts = self.estimator.starts_ms(rs, len(order), total, self.cfg.scheduler.default_max_tokens)
        frames: list[tuple[str, str]] = []
        for position, (task_id, start) in enumerate(zip(order, starts, strict=True)):
            waiting = self.waiting.get(task_id)
            if waiting is None or waiting.position == position:
                continue
            waiting.position = position
            budget = waiting.deadline_at_ms - now_ms()
            on_time = self.estimator.on_time_probability(rs, start, waiting.tokens, budget)
            frames.append((task_id, events.queued(position, start, len(order), on_time)))
        if frames:
            await self.store.append_queued_frames(frames)
        queued = set(order)
        for task_id in [t for t, w in self.waiting.items() if w.rs == rs and t not in queued]:
            del self.waiting[task_id]

    async def _expire(self, rs: str, task_id: str) -> None:
        exc = OrchestratorError(Code.DEADLINE_UNMET, "the task's deadline passed while it was queued")
        # Terminal first, then out of the queue: a crash in between leaves an ended task that the
        # dispatcher skips, never a live task that nothing will end.
        ended = await self.store.terminate(
            task_id, TaskState.FAILED, events.error(exc), self.cfg.sse.retention_s
        )
        await self.store.dequeue(rs, task_id)
        await self.sessions.settle(task_id, 0)
        if ended.previous == TaskState.QUEUED:
            info = self.registry.set_info(rs)
            engine, version = (info.engine, info.engine_version) if info else ("none", "")
            self.metrics.tasks_canceled.labels(engine, version, rs, QUEUE_REPLICA, "deadline").inc()
            log.info(
                "queued task expired",
                extra={"event": "task_canceled", "task_id": task_id, "code": Code.DEADLINE_UNMET.value},
            )
