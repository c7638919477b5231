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
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import Final, cast

from llorch.events import TERMINAL
from llorch.resilience import BACKOFF_INITIAL_S, BACKOFF_MAX_S, STORE_ERRORS, Outage
from llorch.store import RS, US, Event, Store

log = logging.getLogger(__name__)


class Subscription:
    """Live events of one task for one consumer, and a silence timer.

    The silence timer is armed once per silence, not once per wait: each delivery only notes the time,
    and a timer that fires early (events came meanwhile) re-arms itself for the rest of the interval.
    A timeout per wait (``asyncio.timeout``) cost several µs for every relayed token of every stream.

    ``sink``, when its consumer sets one, is offered each delivery that comes while the consumer waits
    in :meth:`next` with nothing pending; it returns True when it took the events (the SSE relay
    writes them to its client at once), and they are then neither kept nor woken for. Anything it
    declines is kept and wakes the consumer as usual, so the order of deliveries is kept.
    """

    def __init__(self, timed: bool = False) -> None:
        self._items: list[Event] = []
        self._ready = asyncio.Event()
        self._waiting = False  # the consumer waits in next()
        self.sink: Callable[[list[Event], float], bool] | None = None
        self._last = time.monotonic()  # the last delivery (or the start)
        self._timer: asyncio.TimerHandle | None = None
        # seq -> time.monotonic() when the feed delivered it live, for the first event of each message
        # (one per group of events that arrived together); only for a consumer that pops them (the
        # SSE relay's sse_relay_lag_ms), else it would grow with the task
        self.arrivals: dict[int, float] | None = {} if timed else None

    def push(self, events: list[Event]) -> None:
        """Deliver live events; an empty list means "re-read from the stream"."""
        self._last = now = time.monotonic()
        if events:
            if self._waiting and not self._items and self.sink is not None and self.sink(events, now):
                return
            if self.arrivals is not None:  # the group's first event stands for the group: they
                self.arrivals.setdefault(events[0].seq, now)  # arrived together
            self._items += events
        else:
            self._items.append(RESYNC)
        self._ready.set()

    async def next(self, timeout_s: float) -> list[Event] | None:
        """The events delivered since the last call; None once ``timeout_s`` passed without one."""
        if not self._items:
            if self._timer is None:
                self._arm(timeout_s, timeout_s)
            self._waiting = True
            try:
                await self._ready.wait()
            finally:
                self._waiting = False
            if not self._items:  # the silence timer woke us
                self._ready.clear()
                self._last = time.monotonic()
                return None
        items, self._items = self._items, []
        self._ready.clear()
        return items

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, delay_s: float, timeout_s: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay_s, self._silence, timeout_s)

    def _silence(self, timeout_s: float) -> None:
        left = self._last + timeout_s - time.monotonic()
        if left > 0:  # something was delivered since the timer was set: wait for the rest
            self._arm(left, timeout_s)
            return
        self._timer = None
        self._ready.set()


# Event(seq, name, data) from one (seq, name, data) tuple, without the named tuple's Python-level
# __new__ (1.05 against 1.23 µs per relayed event in a microbenchmark on the 2-core box)
_event: Final = cast(Callable[[tuple[int, str, str]], Event], partial(tuple.__new__, Event))

REDIS_GRACE_S: Final = 10.0
"""How long an open stream waits out a Redis outage (its looks at the log failing) before it ends with
``: error INTERNAL``: a restart keeps its clients' connections, a longer outage hands them back."""

RESYNC = Event(-1, "", "")
"""Marker pushed after a reconnect: the subscriber must read the stream for what it may have missed."""


class EventFeed:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._subs: dict[str, set[Subscription]] = {}
        self.connected = asyncio.Event()

    @contextlib.contextmanager
    def subscribe(self, task_id: str, timed: bool = False) -> Iterator[Subscription]:
        """Live events of ``task_id``; ``timed`` records when each arrived (see Subscription.arrivals)."""
        sub = Subscription(timed)
        self._subs.setdefault(task_id, set()).add(sub)
        try:
            yield sub
        finally:
            sub.close()
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
                async with self.store.follow_events(self._dispatch) as ended:
                    self.connected.set()
                    outage.recovered()
                    delay = BACKOFF_INITIAL_S
                    for subs in list(self._subs.values()):
                        for sub in subs:
                            sub.push([])  # re-read: messages may have been lost while down
                    await ended
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
        """One live-events message: the parts of one or more tasks (see llorch.store)."""
        followed = self._subs
        for part in data.split(RS):
            task_id, _, rest = part.partition(US)
            subs = followed.get(task_id)
            if not subs:
                continue
            fields = rest.split(US)
            if len(fields) == 3:  # one event, the usual part of a paced stream: half the cost
                events = [_event((int(fields[0]), fields[1], fields[2]))]
            else:
                first = int(fields[0])
                seqs = range(first, first + len(fields) // 2)
                events = list(map(_event, zip(seqs, fields[1::2], fields[2::2], strict=False)))
            for sub in subs:
                sub.push(events)


class Tail:
    """One task's log in seq order, from ``log_at + 1`` until its terminal event.

    :meth:`batches` takes live events from a subscription and reads the log for anything the feed
    missed (a gap in the seqs, a reconnect, a silent interval), so nothing is skipped or repeated.
    """

    def __init__(self, store: Store, task_id: str, log_at: int = -1) -> None:
        self.store = store
        self.task_id = task_id
        self.log_at = log_at
        self.ended = False
        self._away_since: float | None = None  # the first failed look of the outage under way

    def accept(self, events: list[Event]) -> list[Event]:
        """The events that continue the log (up to and including a terminal one): a prefix of
        ``events``."""
        if self.ended:
            return []
        at = self.log_at
        for n, e in enumerate(events):
            if e.seq != at + 1:
                events = events[:n]
                break
            at = e.seq
            if e.name in TERMINAL:
                self.ended = True
                events = events[: n + 1]
                break
        self.log_at = at
        return events

    async def catch_up(self) -> list[Event]:
        """Everything in the log after ``log_at`` (stopping after the terminal event)."""
        out: list[Event] = []
        while not self.ended and (events := await self.store.read_events(self.task_id, self.log_at)):
            accepted = self.accept(events)
            if not accepted:
                break
            out += accepted
        return out

    async def _look(self) -> list[Event] | None:
        """:meth:`catch_up`, or None while Redis is away (see :meth:`_away`)."""
        try:
            caught = await self.catch_up()
        except STORE_ERRORS as exc:
            self._away(exc)
            return None
        self._away_since = None
        return caught

    async def _exists(self) -> bool:
        """Whether the task's record is still there (True while Redis is away: nothing is known)."""
        try:
            return await self.store.task_exists(self.task_id)
        except STORE_ERRORS as exc:
            self._away(exc)
            return True

    def _away(self, exc: BaseException) -> None:
        """A look failed: Redis is away. Raises ``exc`` once it has been away for over
        :data:`REDIS_GRACE_S` (the stream then ends with ``: error INTERNAL``, and the client resumes
        with ``Last-Event-ID``)."""
        now = time.monotonic()
        if self._away_since is None:
            self._away_since = now
        elif now - self._away_since > REDIS_GRACE_S:
            raise exc

    async def batches(
        self, sub: Subscription, tick_s: float, caught_up: bool = False
    ) -> AsyncIterator[list[Event] | None]:
        """New events as they come; None after each ``tick_s`` of silence. Ends after the terminal
        event, or when the task's log has expired. ``caught_up``: the log was just read up to
        ``log_at``, so the first read is skipped.

        Redis away while the stream is open is silence, not an error, for up to
        :data:`REDIS_GRACE_S`: the client keeps its stream (and its heartbeats) until Redis is back.
        The pool manager keeps the task's events meanwhile, and the feed's reconnect makes every
        stream read its log again (a missed look is taken again at the next silence; ``log_at`` has
        not moved)."""
        if not caught_up and (first := await self.catch_up()):
            yield first
        while not self.ended:
            delivered = await sub.next(tick_s)
            if delivered is None:  # silence: a look at the log in case the feed missed something
                caught = await self._look()
                if caught:
                    yield caught
                elif caught is not None and not await self._exists():
                    return  # retention expired while the client waited
                else:
                    yield None
                continue
            new = [e for e in delivered if e.seq > self.log_at]  # never RESYNC (seq -1)
            if accepted := self.accept(new):
                yield accepted
            # A gap: a reconnect, or events past what continues the log (accepted is a prefix of new;
            # the rest of delivered is at or before log_at).
            gap = any(e.seq > self.log_at for e in new[len(accepted) :]) or (
                len(new) < len(delivered) and any(e is RESYNC for e in delivered)
            )
            if gap and not self.ended and (caught := await self._look()):  # the log decides
                yield caught
