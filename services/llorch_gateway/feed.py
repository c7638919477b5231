"""Live events for SSE: one pub/sub connection per gateway, fanned out to the streams that follow a task.

The task's Redis stream is the truth; the feed is only the fast path. A subscriber that sees a gap in
the seqs (a message lost while the connection was down) reads the missing events from the stream, and
after a reconnect every subscriber is told to re-read, so no event can be skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterator

from llorch.resilience import BACKOFF_INITIAL_S, BACKOFF_MAX_S, STORE_ERRORS, Outage
from llorch.store import US, Event, Store

log = logging.getLogger(__name__)


class Subscription:
    def __init__(self) -> None:
        self._items: list[Event] = []
        self._ready = asyncio.Event()

    def push(self, events: list[Event]) -> None:
        """Deliver live events; an empty list means "re-read from the stream"."""
        self._items.extend(events) if events else self._items.append(RESYNC)
        self._ready.set()

    async def next(self, timeout_s: float) -> list[Event] | None:
        """The events delivered since the last call; None after ``timeout_s`` of silence."""
        if not self._items:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._ready.wait()
            except TimeoutError:
                return None
        items, self._items = self._items, []
        self._ready.clear()
        return items


RESYNC = Event(-1, "", "")
"""Marker pushed after a reconnect: the subscriber must read the stream for what it may have missed."""


class EventFeed:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._subs: dict[str, set[Subscription]] = {}
        self.connected = asyncio.Event()

    @contextlib.contextmanager
    def subscribe(self, task_id: str) -> Iterator[Subscription]:
        sub = Subscription()
        self._subs.setdefault(task_id, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self._subs.get(task_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[task_id]

    async def run(self) -> None:
        """Follow the live-events channel forever: Redis restarts and dropped connections are retried
        with jittered exponential backoff; an outage is logged once when it starts and once when it
        ends, however many attempts fail. ``connected`` is set only while subscribed."""
        outage = Outage("redis (gateway event feed)")
        delay = BACKOFF_INITIAL_S
        while True:
            try:
                async with self.store.subscribe_events() as pubsub:
                    self.connected.set()
                    outage.recovered()
                    delay = BACKOFF_INITIAL_S
                    for subs in list(self._subs.values()):
                        for sub in subs:
                            sub.push([])  # re-read: messages may have been lost while down
                    async for message in pubsub.listen():
                        self._dispatch(message["data"])
            except STORE_ERRORS as exc:
                outage.failed(exc)
            except Exception as exc:  # the feed must outlive anything it is sent
                log.warning("event feed error", extra={"event": "feed_error", "error": type(exc).__name__})
                outage.failed(exc)
            finally:
                self.connected.clear()
            await asyncio.sleep(delay + random.uniform(0, BACKOFF_INITIAL_S))
            delay = min(BACKOFF_MAX_S, delay * 2)

    def _dispatch(self, data: str) -> None:
        task_id, _, rest = data.partition(US)
        subs = self._subs.get(task_id)
        if not subs:
            return
        parts = rest.split(US)
        first = int(parts[0])
        events = [Event(first + k, parts[1 + 2 * k], parts[2 + 2 * k]) for k in range((len(parts) - 1) // 2)]
        for sub in subs:
            sub.push(events)
