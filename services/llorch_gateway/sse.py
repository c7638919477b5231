"""SSE relay (SPEC §3): replay from the task's event log, then follow it live until the terminal event.

Frames are assembled from the stored event name and its already-encoded JSON: no re-encoding per
client. Reading never consumes events, so any number of clients may follow one task, from any
position. A client that goes away affects nothing.
"""

from __future__ import annotations

import contextlib
import re

from aiohttp import web

from llorch.errors import Code, OrchestratorError, invalid
from llorch.store import TERMINAL_EVENTS, Store

from .edge import CORRELATION_HEADER

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


async def relay(request: web.Request, store: Store, task_id: str, heartbeat_s: float) -> web.StreamResponse:
    after = parse_last_event_id(request)
    if not await store.task_exists(task_id):
        raise OrchestratorError(Code.NOT_FOUND, f"task {task_id} is unknown or expired")
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            CORRELATION_HEADER: request["correlation_id"],
        }
    )
    await response.prepare(request)
    with contextlib.suppress(ConnectionResetError):  # the client went away; the task is unaffected
        await _follow(response, store, task_id, after, int(heartbeat_s * 1000))
    return response


async def _follow(
    response: web.StreamResponse, store: Store, task_id: str, after: int, block_ms: int
) -> None:
    while True:
        events = await store.wait_events(task_id, after, block_ms)
        if not events:
            if not await store.task_exists(task_id):
                break  # retention expired while the client waited
            await response.write(HEARTBEAT)
            continue
        frames = "".join(f"id: {e.seq}\nevent: {e.name}\ndata: {e.data}\n\n" for e in events)
        await response.write(frames.encode())
        after = events[-1].seq
        if events[-1].name in TERMINAL_EVENTS:
            break
    await response.write_eof()
