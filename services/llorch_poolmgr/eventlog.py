"""Appending task events to Redis, batched across every task this pool manager runs.

Each task gets a :class:`TaskWriter`; ``add`` never waits. One flusher takes whatever every task
added while the previous round trip was in flight and writes it in one pipeline of
append-unless-terminal calls: one round trip per token when idle, one per many tokens of many tasks
under load. A task's events keep their order because only one flush is in flight at a time.

When an append is refused (a terminal event stood first, e.g. a cancel's) the writer is marked
``rejected`` and drops anything added later; the executor then closes the engine stream. A Redis
error never rejects anything: the flusher retries the same batch with jittered exponential backoff
(redis-py hands out a fresh connection after a connection error) until it is written, logging the
outage once. While the store is down the events wait in memory, in order; :attr:`EventLog.down_s`
tells the executor how long, so it can end tasks that outlive :data:`APPEND_GIVE_UP_S` with a typed
error (written, like everything before it, once the store is back). A writer's :meth:`TaskWriter.close`
returns only once its log is written, so a task is never reported finished while its log is open.

Every flush gives each writer's batch an id (the writer's token and its flush count), so a retried
pipeline whose first try reached Redis but whose reply was lost writes nothing twice.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from typing import Final

from llorch.events import EventName
from llorch.resilience import Outage, until_done
from llorch.store import Append, Refused, Store

log = logging.getLogger(__name__)

APPEND_GIVE_UP_S: Final = 10.0
"""How long a running task waits for an unreachable event log before it is ended with WORKER_RESET."""

_TOKEN: Final = EventName.TOKEN.value


def refused(result: int | Refused) -> bool:
    """Whether ``Store.append_many`` wrote nothing for a task: its log already ended (or is gone).

    The one place that reads the store's append results."""
    return isinstance(result, Refused)


class TaskWriter:
    def __init__(self, log_: EventLog, task_id: str) -> None:
        self._log = log_
        self.task_id = task_id
        self.rejected = False
        self.events: list[tuple[str, str, str]] = []
        self.tokens_out: int | None = None
        self._token = secrets.token_hex(6)
        self._flushes = 0
        self._final = False
        self.idle = asyncio.Event()
        self.idle.set()

    def add(self, name: str, data: str, final_state: str = "", tokens_out: int | None = None) -> None:
        if self._final or self.rejected:
            return
        if not self.events:
            self._queue()
        self.events.append((name, data, final_state))
        if tokens_out is not None:
            self.tokens_out = tokens_out
        self._final = bool(final_state)

    def add_token(self, data: str, tokens_out: int) -> None:
        """``add(TOKEN, data, tokens_out=tokens_out)``, the per-token path, without its options."""
        if self._final or self.rejected:
            return
        if not self.events:
            self._queue()
        self.events.append((_TOKEN, data, ""))
        self.tokens_out = tokens_out

    def _queue(self) -> None:
        """The first event since the last flush took the batch: wake the flusher. Until the next take
        the writer stays queued (and not idle), so later adds only append."""
        self.idle.clear()
        self._log.ready(self)

    async def close(self) -> None:
        """Wait until everything added so far is written (or refused)."""
        self._final = True
        await self.idle.wait()

    def take(self) -> Append:
        """What is waiting to be written, as one idempotent batch; the writer starts a new one."""
        self._flushes += 1
        batch = Append(self.task_id, self.events, self.tokens_out, f"{self._token}-{self._flushes}")
        self.events, self.tokens_out = [], None
        return batch


class EventLog:
    def __init__(self, store: Store, retention_s: int) -> None:
        self.store = store
        self.retention_s = retention_s
        self.outage = Outage("redis (event log)")
        self._ready: dict[str, TaskWriter] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flush_since: float | None = None

    @property
    def down_s(self) -> float:
        """How long the flush in flight has been waiting for the store (failing, or hanging on a
        frozen Redis); 0 when none is in flight."""
        since = self._flush_since
        return 0.0 if since is None else time.monotonic() - since

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

    async def _append(self, batches: list[Append]) -> list[int | Refused]:
        return await self.store.append_many(batches, self.retention_s)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            writers, self._ready = list(self._ready.values()), {}
            batches = [w.take() for w in writers]
            self._flush_since = time.monotonic()
            try:
                results = await until_done(functools.partial(self._append, batches), self.outage)
            except Exception:  # a bug, not an outage: stop these writers rather than the flusher
                log.exception("event append failed", extra={"event": "append_failed"})
                results = [Refused.UNKNOWN] * len(writers)
            finally:
                self._flush_since = None
            for writer, result in zip(writers, results, strict=True):
                if refused(result):
                    writer.rejected = True
                if writer.rejected or not writer.events:
                    writer.idle.set()
