"""SSE relay (SPEC §3): replay from the task's event log, then follow it live until the terminal event.

Frames are assembled from the stored event name and its already-encoded JSON: no re-encoding per
client. Live events come from the gateway's :class:`EventFeed`; the log fills any gap. Reading never
consumes events, so any number of clients may follow one task, from any position, and a client that
goes away affects nothing.
"""

from __future__ import annotations

import contextlib
import re

from aiohttp import web

from llorch.errors import Code, OrchestratorError, invalid
from llorch.events import TERMINAL as TERMINAL_EVENTS
from llorch.store import READ_PAGE, Event, Store

from .edge import CORRELATION_HEADER
from .feed import RESYNC, EventFeed, Subscription

HEARTBEAT = b": hb\n\n"
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


async def relay(
    request: web.Request,
    store: Store,
    feed: EventFeed,
    task_id: str,
    heartbeat_s: float,
    headers: dict[str, str] | None = None,
) -> web.StreamResponse:
    after = parse_last_event_id(request)
    # Subscribe before the replay so nothing appended in between can be missed.
    with feed.subscribe(task_id) as sub:
        replay = await store.read_events(task_id, after)
        if not replay and not await store.task_exists(task_id):
            raise OrchestratorError(Code.NOT_FOUND, f"task {task_id} is unknown or expired")
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                CORRELATION_HEADER: request["correlation_id"],
                **(headers or {}),
            }
        )
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError):
            stream = _Stream(response, store, task_id, after)
            ended = await stream.write(replay)
            if not ended and len(replay) >= READ_PAGE:
                ended = await stream.catch_up()
            if not ended:
                await stream.follow(sub, heartbeat_s)
    return response


class _Stream:
    def __init__(self, response: web.StreamResponse, store: Store, task_id: str, after: int) -> None:
        self.response = response
        self.store = store
        self.task_id = task_id
        self.after = after

    async def follow(self, sub: Subscription, heartbeat_s: float) -> None:
        while True:
            delivered = await sub.next(heartbeat_s)
            if delivered is None:  # silence: a heartbeat, and a look at the log in case the feed missed
                if await self.catch_up():
                    return
                if not await self.store.task_exists(self.task_id):
                    return  # retention expired while the client waited
                await self.response.write(HEARTBEAT)
                continue
            fresh = [e for e in delivered if e.seq > self.after]
            if fresh and await self.write(fresh):
                return
            gap = any(e is RESYNC for e in delivered) or (fresh and self.after < fresh[-1].seq)
            if gap and await self.catch_up():  # a gap or a reconnect: the log decides
                return

    async def catch_up(self) -> bool:
        """Write everything in the log after ``after``; True once the terminal event is written."""
        while events := await self.store.read_events(self.task_id, self.after):
            if await self.write(events):
                return True
        return False

    async def write(self, events: list[Event]) -> bool:
        frames = []
        ended = False
        for e in events:
            if e.seq != self.after + 1:
                break
            frames.append(f"id: {e.seq}\nevent: {e.name}\ndata: {e.data}\n\n")
            self.after = e.seq
            if e.name in TERMINAL_EVENTS:
                ended = True
                break
        if frames:
            await self.response.write("".join(frames).encode())
        if ended:
            await self.response.write_eof()
        return ended
