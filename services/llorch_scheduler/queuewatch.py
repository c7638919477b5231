"""What queued tasks see while they wait (SPEC §3, §5.1, §5.2).

Every ``sse.queued_metrics_interval_ms`` each replica set's queue is read once: tasks past their
deadline are taken out and end with DEADLINE_UNMET; every task whose position changed since its last
frame gets a queued ``metrics`` event (position, predicted start, queue depth, on-time probability), all
in one pipelined round trip. So a waiting client hears at most one frame per interval, and only news.
A scan that reads tasks in a queue also tells the dispatcher, which takes a set whose last claim came
back short for empty until then (see :meth:`Dispatcher.seen_waiting`).

While the set's on-demand model is not loaded (issue 13) the frames say ``phase: loading`` with the
load's remaining time (``load_eta_ms``, included in the predicted start) and, when the load itself
waits, why (``waiting_for``); a task hears the phase change as news too. The scan also keeps each set's
queue heads (:meth:`views`) for the residency planner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from redis.exceptions import RedisError

from llorch import events
from llorch.config import LlorchConfig
from llorch.errors import Code, OrchestratorError
from llorch.metrics import QUEUE_REPLICA
from llorch.store import Priority, Store, TaskState, now_ms

from .estimator import Estimator
from .metrics import SchedulerMetrics
from .registry import PoolRegistry
from .residency import QueueView
from .sessions import Sessions

LoadEta = Callable[[str], int | None]
"""The set's remaining load time in ms, or None when a member is loaded."""

log = logging.getLogger(__name__)


@dataclass
class Waiting:
    rs: str
    tokens: int
    deadline_at_ms: int
    position: int
    admitted_ms: int = 0
    priority: Priority = "interactive"
    phase: str = ""  # of its last frame
    why: str | None = None  # of its last loading frame


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
        self._views: dict[str, QueueView] = {}
        self.load_eta: LoadEta = lambda _rs: None
        self.why: Callable[[str], str | None] = lambda _rs: None
        self.seen_waiting: Callable[[str], None] = lambda _rs: None  # a scan read tasks in the set's queue

    def admitted(
        self,
        task_id: str,
        rs: str,
        priority: Priority,
        tokens: int,
        deadline_ms: int,
        position: int,
        depths: tuple[int, int],
    ) -> None:
        """``depths``: the set's (interactive, batch) queue lengths right after this admission, as
        the store's admission step counted them."""
        now = now_ms()
        phase = "loading" if self.load_eta(rs) is not None else "queued"
        self.waiting[task_id] = Waiting(rs, tokens, now + deadline_ms, position, now, priority, phase)
        self._set_depths(rs, *depths)

    def moved(self, rs: str, priorities: Iterable[Priority], step: int) -> None:
        """Tasks left the set's queue for dispatch (``step`` -1) or went back to it (+1: a refused
        or retried dispatch, a lapsed claim): the depths admission predicts from follow at once
        instead of at the next scan (a burst would otherwise be told positions long gone)."""
        ni, nb = self._depths.get(rs, (0, 0))
        for priority in priorities:
            if priority == "interactive":
                ni += step
            else:
                nb += step
        self._set_depths(rs, max(0, ni), max(0, nb))

    def _set_depths(self, rs: str, interactive: int, batch: int) -> None:
        """Kept current between scans by admissions and claims; each scan reads the truth again. An
        emptied class has no oldest task; one that fills again has one from now (the scan corrects it)."""
        self._depths[rs] = (interactive, batch)
        view = self._views.get(rs) or QueueView(rs)
        now = now_ms()
        self._views[rs] = replace(
            view,
            interactive=interactive,
            batch=batch,
            oldest_interactive_ms=(view.oldest_interactive_ms or now) if interactive else 0,
            oldest_batch_ms=(view.oldest_batch_ms or now) if batch else 0,
        )

    def views(self) -> dict[str, QueueView]:
        """Each set's queue heads as of the last scan (depths kept current by admissions and claims
        since), ages as of now."""
        now = now_ms()
        out: dict[str, QueueView] = {}
        for rs, view in self._views.items():
            out[rs] = QueueView(
                rs,
                view.interactive,
                view.batch,
                max(0, now - view.oldest_interactive_ms) if view.oldest_interactive_ms else 0,
                max(0, now - view.oldest_batch_ms) if view.oldest_batch_ms else 0,
            )
        return out

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
        interactive, batch, ages = await self.store.queued(rs)
        self._depths[rs] = (len(interactive), len(batch))
        admitted = dict(ages)
        self._views[rs] = QueueView(
            rs,
            len(interactive),
            len(batch),
            int(admitted.get(interactive[0], 0)) if interactive else 0,  # stored as admission epoch ms
            int(admitted.get(batch[0], 0)) if batch else 0,
        )
        order = interactive + batch
        if order:
            self.seen_waiting(rs)
        eta = self.load_eta(rs)
        total, _ = self.registry.slots(rs)
        if eta is not None:
            total = total or self.registry.configured_slots(rs)
        starts = self.estimator.starts_ms(rs, len(order), total, self.cfg.scheduler.default_max_tokens)
        phase, why = ("queued", None) if eta is None else ("loading", self.why(rs))
        frames: list[tuple[str, str]] = []
        for position, (task_id, start) in enumerate(zip(order, starts, strict=True)):
            waiting = self.waiting.get(task_id)
            if waiting is None or (waiting.position, waiting.phase, waiting.why) == (position, phase, why):
                continue
            waiting.position, waiting.phase, waiting.why = position, phase, why
            budget = waiting.deadline_at_ms - now_ms()
            if eta is None:
                on_time = self.estimator.on_time_probability(rs, start, waiting.tokens, budget)
                frames.append((task_id, events.queued(position, start, len(order), on_time)))
                continue
            on_time = self.estimator.on_time_probability(rs, start + eta, waiting.tokens, budget)
            frames.append((task_id, events.loading(position, start + eta, len(order), on_time, eta, why)))
        if frames:
            await self.store.append_queued_frames(frames)
        queued = set(order)
        for task_id in [t for t, w in self.waiting.items() if w.rs == rs and t not in queued]:
            del self.waiting[task_id]

    async def announce(self, rs: str) -> None:
        """A load for the set starts: every task waiting in it hears a ``loading`` frame now (with the
        load's estimate), not only those whose position changed. Best effort: Redis away, no frame."""
        for waiting in self.waiting.values():
            if waiting.rs == rs:
                waiting.phase = ""
        with contextlib.suppress(RedisError):
            await self.scan(rs)

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
