"""The event log's multi-event entries: one APPEND flush of a task writes its events as entries of up
to ENTRY_MAX events each, and every reader (read_events, last_event, the live message, SSE replay with
Last-Event-ID) still sees one event per seq, exactly once and in order."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from llorch import events
from llorch.store import (
    ENTRY_MAX,
    READ_PAGE,
    Append,
    Event,
    NewTask,
    QueueLimits,
    Refused,
    Store,
    TaskRequest,
    TaskState,
)
from llorch_gateway.feed import EventFeed
from tests.support.procs import wait_until
from tests.support.stack import Client, SseEvent, mock_pool

US = "\x1f"
BIG = 150  # events of one task in one flush: entries of 64, 64 and 22
END = events.end(
    tokens_out=BIG + 5,
    decode_ms=1,
    tokens_in=1,
    queue_time_ms=0,
    first_token_ms=0,
    finish_reason="length",
    pool_id="p",
    replica_id="r",
)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    async with Store.connect(redis_url, prefix="le:") as s:
        yield s


async def _admit(store: Store, task_id: str, rs: str = "rs-le") -> Event:
    """A queued task (dequeued again: nothing serves ``rs``) whose log holds `started`."""
    task = NewTask(task_id, rs, "interactive", "m", "", "mock", 60_000, TaskRequest("p", 4, 1, "best_effort"))
    started = events.started(task_id, 0, 0, 1.0, "interactive")
    admitted = await store.admit(task, QueueLimits(8, 8, 8, "reject"), 10**13, (0, [started]), 60, 60)
    assert admitted.status == "ok"
    assert await store.dequeue(rs, task_id)
    return Event(0, "started", started)


def _tokens(first: int, n: int) -> list[tuple[str, str, str]]:
    # a raw US in the text is escaped by the JSON encoder, so it cannot split a blob
    return [("token", events.token(f" w{k}\x1f", k), "") for k in range(first, first + n)]


def _expected(start: Event, batches: list[list[tuple[str, str, str]]]) -> list[Event]:
    log = [start]
    for batch in batches:
        for name, data, _ in batch:
            log.append(Event(len(log), name, data))
    return log


async def _next_message(messages: asyncio.Queue[str]) -> str:
    return await asyncio.wait_for(messages.get(), 30)


async def test_every_position_reads_exactly_the_events_after_it(store: Store) -> None:
    started = await _admit(store, "m")
    one, big, alone = _tokens(0, 1), _tokens(1, BIG), _tokens(BIG + 1, 1)
    last = [*_tokens(BIG + 2, 3), ("end", END, TaskState.SUCCEEDED.value)]
    live: asyncio.Queue[str] = asyncio.Queue()
    async with store.follow_events(live.put_nowait):
        assert await store.append(Append("m", [("metrics", '{"phase":"decode"}', "")])) == 1
        assert await store.append(Append("m", one, tokens_out=1)) == 2
        flush = Append("m", big, tokens_out=BIG + 1, batch_id="m-big")
        assert await store.append_many([flush], 60) == [BIG + 2]
        # The live message of the big flush is the format the feed has always parsed: every event.
        await _next_message(live)
        await _next_message(live)
        parts = ["m", "3"] + [x for name, data, _ in big for x in (name, data)]
        assert await _next_message(live) == US.join(parts)
        assert await store.last_event("m") == Event(BIG + 2, "token", big[-1][1])
        # A retry of the same batch (its reply was lost) writes nothing twice.
        entries = await store.client.xlen(store.keys.events("rs-le", "m"))
        assert await store.append(flush) == BIG + 2
        assert await store.client.xlen(store.keys.events("rs-le", "m")) == entries
        assert await store.append(Append("m", alone)) == BIG + 3
        assert await store.append(Append("m", last, tokens_out=BIG + 5)) == BIG + 7
    log = _expected(started, [[("metrics", '{"phase":"decode"}', "")], one, big, alone, last])
    assert [e.seq for e in log] == list(range(BIG + 8))

    # The entries: started {e, d}; then one entry per flush of at most ENTRY_MAX events.
    raw = await store.client.xrange(store.keys.events("rs-le", "m"))
    shape = [(entry_id, body.get("n", "e")) for entry_id, body in raw]
    big_entries = [("0-4", "64"), ("0-68", "64"), ("0-132", str(BIG - 2 * ENTRY_MAX))]
    assert shape == [("0-1", "e"), ("0-2", "1"), ("0-3", "1"), *big_entries, ("0-154", "1"), ("0-155", "4")]

    for after in range(-1, len(log)):
        for count in (1, 2, 63, 64, 65, READ_PAGE, 100_000):
            assert await store.read_events("m", after, count) == log[after + 1 :][:count], (after, count)
    assert await store.last_event("m") == log[-1]
    record = await store.task("m")
    assert record is not None and (record.state, record.tokens_out) == (TaskState.SUCCEEDED, BIG + 5)
    assert record.error_json == ""  # only a terminal `error` is the record's error
    assert await store.append(Append("m", alone)) == Refused.ENDED


async def test_a_terminal_error_in_a_flush_is_the_records_error(store: Store) -> None:
    await _admit(store, "f")
    error = '{"code":"INTERNAL","message":"m","retriable":false,"tokens_out":2}'
    batch = [*_tokens(0, 2), ("error", error, TaskState.FAILED.value)]
    assert await store.append(Append("f", batch, tokens_out=2)) == 3
    record = await store.task("f")
    assert record is not None and (record.state, record.error_json) == (TaskState.FAILED, error)
    assert await store.last_event("f") == Event(3, "error", error)


async def test_a_raw_separator_is_refused_before_writing(store: Store) -> None:
    await _admit(store, "s")
    with pytest.raises(ValueError, match="raw"):
        await store.append(Append("s", [*_tokens(0, 1), ("token", '{"t":"a\x1fb","i":1}', "")]))
    assert [e.name for e in await store.read_events("s", -1)] == ["started"]


async def test_the_feed_delivers_a_multi_event_message_per_event(store: Store) -> None:
    await _admit(store, "l")
    feed = EventFeed(store)
    live: asyncio.Queue[str] = asyncio.Queue()
    async with store.follow_events(live.put_nowait):
        with feed.subscribe("l") as sub:
            await store.append(Append("l", _tokens(0, ENTRY_MAX + 5)))
            feed._dispatch(await _next_message(live))
            delivered = await sub.next(5)
    assert delivered == await store.read_events("l", 0)
    assert delivered is not None and len(delivered) == ENTRY_MAX + 5


def _sse(log: list[Event]) -> list[SseEvent]:
    return [SseEvent(e.seq, e.name, json.loads(e.data)) for e in log]


async def test_last_event_id_inside_an_entry_resumes_exactly(
    stack_factory: Any, http: aiohttp.ClientSession, redis_url: str
) -> None:
    stack = stack_factory(pools=[mock_pool()])
    await stack.start()
    client = Client(stack, http)
    async with Store.connect(redis_url) as store:  # the stack's own prefix
        started = await _admit(store, "sse-done")
        big = _tokens(0, BIG)
        last = [*_tokens(BIG, 3), ("end", END, TaskState.SUCCEEDED.value)]
        await store.append(Append("sse-done", big))
        await store.append(Append("sse-done", last))
        log = _sse(_expected(started, [big, last]))
        # mid-entry (the first entry holds 1..64), at entry edges, the last token, the end itself
        for after in (-1, 0, 1, 2, 30, 63, 64, 65, 100, 128, 129, BIG, BIG + 2):
            assert await client.events("sse-done", last_event_id=after) == log[after + 1 :], after
        assert await client.events("sse-done", last_event_id=BIG + 3) == log[-1:]  # the end again

        # A running task: resume inside an entry, then the rest arrives live.
        started = await _admit(store, "sse-live")
        head = _tokens(0, 100)
        await store.append(Append("sse-live", head))
        seen: list[SseEvent] = []

        async def follow() -> None:
            async for event in client.follow("sse-live", last_event_id=40):
                seen.append(event)

        async def caught_up() -> bool:
            return len(seen) >= 60 or reader.done()

        reader = asyncio.create_task(follow())
        await wait_until(caught_up, what="the resumed stream's replay")
        assert len(seen) == 60 and not reader.done()
        tail = [*_tokens(100, 80), ("end", END, TaskState.SUCCEEDED.value)]
        await store.append(Append("sse-live", tail))
        await asyncio.wait_for(reader, 30)
    assert seen == _sse(_expected(started, [head, tail]))[41:]
