"""SSE relay (SPEC §3): replay from the task's event log, then follow it live until the terminal event.

Frames are assembled from the stored event name and its already-encoded JSON: no re-encoding per
client. Live events come from the gateway's :class:`EventFeed`; the log fills any gap. Reading never
consumes events, so any number of clients may follow one task, from any position, and a client that
goes away affects nothing.

Resuming (``Last-Event-ID: N``):

- N before the last event: the events after N are replayed, then followed live.
- N at or past the terminal event of a finished task (what EventSource sends after a clean close):
  the terminal event is sent again, with its own id, and the stream closes at once. A client that
  lost its state learns the outcome; none is left waiting on heartbeats until retention expires.
- N past the last event of a running task: the events up to N are not sent (SPEC §3: "wait for the
  next one"), events after N follow as usual, and the terminal event is always sent when it comes,
  even when its seq is at or below N, so the stream can never outlive its task.

Once the 200 has started, an error (a Redis error, say) can no longer become an HTTP response: the
stream ends with the comment ``: error <CODE>`` and the connection is closed, so the client sees a
clean end of the body, reconnects with its Last-Event-ID and resumes from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import cast

from aiohttp import HttpVersion11, web

from llorch.errors import Code, OrchestratorError, invalid
from llorch.events import TERMINAL as TERMINAL_EVENTS
from llorch.events import EventName
from llorch.store import READ_PAGE, Event, Store

from .edge import CORRELATION_HEADER, CORRELATION_ID, METRICS
from .feed import EventFeed, Subscription, Tail
from .metrics import LoopHistogram

log = logging.getLogger(__name__)

HEARTBEAT = b": hb\n\n"
WRITE_BUFFER_LIMIT = 0x10000
"""Bytes a client may leave unread before live frames wait for its connection to drain (aiohttp's
own limit for a write's drain)."""
_EVENT_ID = re.compile(r"-?[0-9]{1,18}")


def parse_last_event_id(request: web.Request) -> int:
    """-1 (from the start) unless Last-Event-ID or ?last_event_id names a seq."""
    raw = request.headers.get("Last-Event-ID", request.query.get("last_event_id"))
    if raw is None:
        return -1
    value = raw.strip()
    if not _EVENT_ID.fullmatch(value) or int(value) < -1:
        raise invalid("Last-Event-ID", "Last-Event-ID must be an integer event id (0, 1, 2, ...)")
    return int(value)


def error_comment(code: Code) -> bytes:
    """The terminal comment of a stream cut by a server-side error (not an `error` event: the task
    itself has not failed)."""
    return f": error {code.value}\n\n".encode()


async def relay(
    request: web.Request,
    store: Store,
    feed: EventFeed,
    task_id: str,
    heartbeat_s: float,
    session_headers: Callable[[str], Awaitable[dict[str, str]]] | None = None,
) -> web.StreamResponse:
    """``session_headers``: the response's extra headers for a task of a session (its id), asked for
    before the 200 is sent."""
    after = parse_last_event_id(request)
    # Subscribe before the replay so nothing appended in between can be missed.
    with feed.subscribe(task_id, timed=True) as sub:
        replay, session_id = await store.stream_start(task_id, after)
        if not replay and not await store.task_exists(task_id):
            raise OrchestratorError(Code.NOT_FOUND, f"task {task_id} is unknown or expired")
        last = await store.last_event(task_id) if not replay and after >= 0 else None
        headers = await session_headers(session_id) if session_id and session_headers else None
        response = await open_event_stream(request, headers)
        if request.method == "HEAD":  # the head a GET gets, and no body
            await response.write_eof()
            return response
        ending = ("disconnect", "")  # unless the terminal event is written or an error cuts it
        try:
            ahead = not replay and after >= 0 and (last is None or last.seq < after)
            log_at = (last.seq if last is not None else -1) if ahead else after
            lag = request.app[METRICS].sse_relay_lag
            stream = _Stream(response, store, task_id, after, log_at, lag, request.transport)
            if last is not None and last.name in TERMINAL_EVENTS and last.seq <= after:
                # A reconnect at or past the end of a finished task. (A log that grew between the
                # replay and this read is not that: its events are delivered by the feed below.)
                await stream.write_terminal(last)
                ending = stream_ending(last)
                return response
            await stream.run(replay, sub, heartbeat_s)
            # No terminal event: the task's log expired while the client followed it.
            ending = stream_ending(stream.terminal) if stream.terminal else ("error", Code.NOT_FOUND.value)
        except ConnectionResetError:
            pass  # the client went away; the task is not affected
        except Exception as exc:  # after the 200 an error can only end the stream
            log.warning(
                "stream cut by an error",
                extra={"event": "sse_aborted", "task_id": task_id, "error": type(exc).__name__},
            )
            ending = ("error", Code.INTERNAL.value)
            await abort_stream(response, Code.INTERNAL)
        finally:
            log_stream_ended(task_id, *ending)
    return response


def stream_ending(terminal: Event) -> tuple[str, str]:
    """``stream_ended``'s (reason, code) after a task's terminal event was written to the client."""
    if terminal.name == EventName.END:
        return "end", ""
    return "error", str(json.loads(terminal.data).get("code", ""))


def log_stream_ended(task_id: str, reason: str, code: str = "") -> None:
    """SPEC §5.11 ``stream_ended``: a client's stream of a task is over. ``reason`` is ``end`` (the
    task's end was sent), ``error`` (its error was sent, or a server-side error cut the stream;
    ``code`` says which) or ``disconnect`` (the client went away first)."""
    extra: dict[str, object] = {"event": "stream_ended", "task_id": task_id, "reason": reason}
    if code:
        extra["code"] = code
    log.info("stream ended", extra=extra)


async def abort_stream(response: web.StreamResponse, code: Code) -> None:
    """End a started stream with ``: error <code>`` and close its connection (no keep-alive)."""
    response.force_close()
    with contextlib.suppress(ConnectionError, RuntimeError):
        await response.write(error_comment(code))
        await response.write_eof()


def _frames(events: list[Event]) -> bytes:
    """The SSE frames of ``events``, in one buffer (one write per batch)."""
    if len(events) == 1:
        seq, name, data = events[0]
        return f"id: {seq}\nevent: {name}\ndata: {data}\n\n".encode()
    return "".join([f"id: {seq}\nevent: {name}\ndata: {data}\n\n" for seq, name, data in events]).encode()


class _Stream:
    """One client's position: ``after``, the last seq it has, and the tail's ``log_at``, the last seq
    read from the log. They differ only for a client that resumed past the end of a running task:
    events up to its id are read but not sent, except the terminal event.

    While the stream's task waits for live events, the feed's dispatch hands them to :meth:`_offer`,
    which writes the plain case to the connection at once, without waking the task (those wake-ups
    were about a third of the gateway's CPU per token at 256 paced streams). The task keeps every
    other case: a gap, a resumed client, the terminal event, a client not reading (the transport's
    buffer over :data:`WRITE_BUFFER_LIMIT`: the task's write waits for it to drain).
    """

    def __init__(
        self,
        response: web.StreamResponse,
        store: Store,
        task_id: str,
        after: int,
        log_at: int,
        lag: LoopHistogram | None = None,
        transport: asyncio.BaseTransport | None = None,
    ) -> None:
        self.response = response
        # the body is written straight to ``transport`` (None: never) only where it is chunked or raw
        # (no compression), as aiohttp would write it; the 200's head went out in prepare()
        direct = transport is not None and not response.compression
        self.transport = cast(asyncio.WriteTransport, transport) if direct else None
        self.chunked = response.chunked
        self.tail = Tail(store, task_id, log_at)
        self.after = after
        self.lag = lag
        self.arrivals: dict[int, float] = {}
        self.terminal: Event | None = None  # the task's terminal event, once written

    async def run(self, replay: list[Event], sub: Subscription, heartbeat_s: float) -> None:
        """Write the replayed events, then follow the log until the terminal event."""
        if sub.arrivals is not None:
            self.arrivals = sub.arrivals
        if await self.write(self.tail.accept(replay)):
            return
        if self.transport is not None:
            sub.sink = self._offer
        try:
            async for batch in self.tail.batches(sub, heartbeat_s, caught_up=len(replay) < READ_PAGE):
                if batch is None:
                    await self.response.write(HEARTBEAT)
                elif await self.write(batch):
                    return
        finally:
            sub.sink = None

    def _offer(self, events: list[Event], arrived: float) -> bool:
        """Write live ``events`` now if they simply continue the stream; False leaves them to the task."""
        tail, transport = self.tail, self.transport
        first = events[0].seq
        if (
            tail.ended
            or first != tail.log_at + 1
            or first <= self.after
            or events[-1].seq != first + len(events) - 1
            or transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT
        ):
            return False
        for event in events:
            if event.name in TERMINAL_EVENTS:
                return False
        body = _frames(events)
        transport.write(b"%x\r\n%b\r\n" % (len(body), body) if self.chunked else body)
        tail.log_at = self.after = events[-1].seq
        if self.lag is not None:
            self.lag.observe((time.monotonic() - arrived) * 1000)
        return True

    async def write(self, events: list[Event]) -> bool:
        """Write the events the client lacks; True (and the body ends) after the terminal one."""
        if events:
            # The events continue the log in seq order: all are new to the client unless it resumed
            # past them (then only the terminal one is sent).
            sent = events
            if events[0].seq <= self.after:
                sent = [e for e in events if e.seq > self.after or e.name in TERMINAL_EVENTS]
            self.after = max(self.after, events[-1].seq)
            if sent:
                await self.response.write(_frames(sent))
                if self.arrivals:
                    self._observe_lag(sent[0].seq)
        if self.tail.ended:
            self.terminal = events[-1] if events else self.terminal  # accept() stops at the terminal
            await self.response.write_eof()
        return self.tail.ended

    def _observe_lag(self, first_sent: int) -> None:
        """sse_relay_lag_ms for the live messages whose first event was just written: one observation
        per message (its events arrived together and are written together), not one per event, which
        would cost a histogram update per token. Arrivals at or before the client's position are
        dropped either way (replayed events have none)."""
        now = time.monotonic()
        for seq in [s for s in self.arrivals if s <= self.after]:
            arrived = self.arrivals.pop(seq)
            if seq >= first_sent and self.lag is not None:
                self.lag.observe((now - arrived) * 1000)

    async def write_terminal(self, event: Event) -> None:
        """The terminal event again, for a client that resumed at or past it; then the body ends."""
        await self.response.write(_frames([event]))
        await self.response.write_eof()


async def open_event_stream(
    request: web.Request, headers: Mapping[str, str] | None = None
) -> web.StreamResponse:
    """Send the 200 head of a ``text/event-stream`` answer (uncached, with the correlation id and
    ``headers``); every SSE route of the gateway starts its answer here."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            CORRELATION_HEADER: request[CORRELATION_ID],
            **(headers or {}),
        }
    )
    if request.version >= HttpVersion11:
        response.enable_chunked_encoding()  # what aiohttp would choose, said so (see _Stream.chunked)
    await response.prepare(request)
    return response
