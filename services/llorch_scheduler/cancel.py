"""Cancel (SPEC §5.3): race-free by construction.

The terminal CANCELED event is written first, through the store's append-unless-terminal step; only
then does the client get its answer, and only then is the engine request aborted. Whatever the pool
manager appends after that is refused, so no token can follow the terminal event, and a cancel that
races the task's own end leaves exactly one terminal event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from llorch import events
from llorch.errors import Code, OrchestratorError
from llorch.metrics import QUEUE_REPLICA
from llorch.store import Store, TaskState

from .metrics import SchedulerMetrics
from .registry import SetInfo
from .sessions import Sessions

log = logging.getLogger(__name__)


class Canceller:
    def __init__(
        self,
        store: Store,
        sessions: Sessions,
        metrics: SchedulerMetrics,
        set_info: Callable[[str], SetInfo | None],
        abort: Callable[[str, str], None],
        retention_s: int,
    ) -> None:
        """``abort(manager_address, task_id)`` stops the engine request in the background."""
        self.store = store
        self.sessions = sessions
        self.metrics = metrics
        self.set_info = set_info
        self.abort = abort
        self.retention_s = retention_s

    async def cancel(self, task_id: str) -> TaskState:
        """End the task with CANCELED; returns the state it was in (a terminal one: nothing changed)."""
        why = OrchestratorError(Code.CANCELED, "canceled by the client")
        return await self.end(task_id, why, TaskState.CANCELED, "client")

    async def end(self, task_id: str, why: OrchestratorError, state: TaskState, reason: str) -> TaskState:
        """End the task with ``why`` (its model retired, say) the way a cancel does: dequeued or
        aborted, its session settled, ``tasks_canceled_total{reason}`` counted."""
        payload = events.error(why)
        result = await self.store.terminate(task_id, state, payload, self.retention_s)
        if result.previous is None:
            raise OrchestratorError(Code.NOT_FOUND, f"task {task_id} is unknown or expired")
        if not result.was_live:
            return result.previous
        record = await self.store.task(task_id)
        if record is not None:
            info = self.set_info(record.rs)
            engine, version = (info.engine, info.engine_version) if info else (record.engine or "none", "")
            self.metrics.tasks_canceled.labels(
                engine, version, record.pool_id or record.rs, record.replica_id or QUEUE_REPLICA, reason
            ).inc()
            await self.sessions.settle(task_id, record.tokens_out)
            if result.previous == TaskState.QUEUED:
                await self.store.dequeue(record.rs, task_id)
        log.info(
            "task canceled",
            extra={"event": "task_canceled", "task_id": task_id, "state": result.previous, "reason": reason},
        )
        if result.previous == TaskState.RUNNING and result.manager:
            self.abort(result.manager, task_id)
        return result.previous
