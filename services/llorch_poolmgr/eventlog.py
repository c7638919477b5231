"""Appending task events to Redis, batched across every task this pool manager runs.

Each task gets a :class:`TaskWriter`; ``add`` never waits. One flusher takes whatever every task
added while the previous round trip was in flight and writes it in one pipeline of
append-unless-terminal calls: one round trip per token when idle, one per many tokens of many tasks
under load. A task's events keep their order because only one flush is in flight at a time. When an
append is refused (a cancel's terminal event stood first) the writer is marked ``rejected`` and drops
anything added later; the executor then closes the engine stream.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from llorch.store import Store

log = logging.getLogger(__name__)


class TaskWriter:
    def __init__(self, log_: EventLog, task_id: str) -> None:
        self._log = log_
        self.task_id = task_id
        self.rejected = False
        self.events: list[tuple[str, str, str]] = []
        self.fields: dict[str, str] = {}
        self._final = False
        self.idle = asyncio.Event()
        self.idle.set()

    def add(self, name: str, data: str, final_state: str = "", **fields: str) -> None:
        if self._final or self.rejected:
            return
        self.events.append((name, data, final_state))
        self.fields.update(fields)
        self._final = bool(final_state)
        self.idle.clear()
        self._log.ready(self)

    async def close(self) -> None:
        """Wait until everything added so far is written (or refused)."""
        self._final = True
        await self.idle.wait()


class EventLog:
    def __init__(self, store: Store, retention_s: int) -> None:
        self.store = store
        self.retention_s = retention_s
        self._ready: dict[str, TaskWriter] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def writer(self, task_id: str) -> TaskWriter:
        if self._task is None:
            self._task = asyncio.create_task(self._run())
        return TaskWriter(self, task_id)

    def ready(self, writer: TaskWriter) -> None:
        self._ready[writer.task_id] = writer
        self._wake.set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            writers, self._ready = list(self._ready.values()), {}
            batches = []
            for w in writers:
                batches.append((w.task_id, w.events, w.fields))
                w.events, w.fields = [], {}
            try:
                results = await self.store.append_many(batches, self.retention_s)
            except RedisError:
                log.exception("event append failed", extra={"event": "append_failed"})
                results = [-1] * len(writers)  # the task's lease will lapse and the sweeper ends it
            for writer, result in zip(writers, results, strict=True):
                if result < 0:
                    writer.rejected = True
                if writer.rejected or not writer.events:
                    writer.idle.set()
