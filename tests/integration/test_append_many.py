"""One APPEND call for many tasks: each task's result and log are what separate appends would give,
and the one message it publishes carries every task's events in the feed's format."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from llorch import events
from llorch.store import Append, NewTask, QueueLimits, Refused, Store, TaskRecord, TaskRequest, TaskState
from llorch_gateway.feed import EventFeed


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    async with Store.connect(redis_url, prefix="am:") as s:
        yield s


async def _admit(store: Store, task_id: str, rs: str) -> None:
    task = NewTask(task_id, rs, "interactive", "m", "", "mock", 60_000, TaskRequest("p", 4, 1, "best_effort"))
    window = [events.started(task_id, 0, 0, 1.0, "interactive")]
    admitted = await store.admit(task, QueueLimits(8, 8, 8, "reject"), 10**13, (0, window), 60, 60)
    assert admitted.status == "ok"


async def _record(store: Store, task_id: str) -> TaskRecord:
    record = await store.task(task_id)
    assert record is not None
    return record


async def test_many_tasks_in_one_call_match_their_logs_and_the_feed(store: Store) -> None:
    for task_id, rs in (("a", "rs1"), ("b", "rs2"), ("c", "rs1"), ("ended", "rs1")):
        await _admit(store, task_id, rs)
    error = '{"code":"INTERNAL","message":"m","retriable":false,"tokens_out":0}'
    assert await store.append(Append("ended", [("error", error, TaskState.FAILED.value)])) == 1

    feed = EventFeed(store)
    messages: asyncio.Queue[str] = asyncio.Queue()
    async with store.follow_events(messages.put_nowait):
        with feed.subscribe("a") as sub_a, feed.subscribe("b") as sub_b, feed.subscribe("c") as sub_c:
            tokens = [("token", events.token(f" {k}", k), "") for k in range(3)]
            end = ("end", '{"tokens_out":3}', TaskState.SUCCEEDED.value)
            results = await store.append_many(
                [
                    Append("a", tokens, tokens_out=3, batch_id="a-1"),
                    Append("gone", tokens),  # unknown id: refused, the others still land
                    Append("b", [*tokens, end], tokens_out=3),
                    Append("ended", tokens),  # its log already ended
                    Append("c", []),  # nothing to write: no part in the message
                ],
                60,
            )
            assert results == [3, Refused.UNKNOWN, 4, Refused.ENDED, 0]
            # the same batch again (a retry after a lost reply) writes nothing twice
            assert await store.append_many([Append("a", tokens, tokens_out=3, batch_id="a-1")], 60) == [3]

            message = await asyncio.wait_for(messages.get(), 30)
            assert message.count("\x1e") == 1  # one message, parts for a and b
            feed._dispatch(message)
            assert await sub_a.next(5) == (await store.read_events("a", -1))[1:]
            assert await sub_b.next(5) == (await store.read_events("b", -1))[1:]
            assert await sub_c.next(0.01) is None

    a, b = await _record(store, "a"), await _record(store, "b")
    assert (a.state, a.tokens_out) == (TaskState.QUEUED, 3)
    assert (b.state, b.tokens_out) == (TaskState.SUCCEEDED, 3)
    assert [e.name for e in await store.read_events("b", -1)] == ["started", "token", "token", "token", "end"]
    assert await store.append(Append("b", tokens)) == Refused.ENDED


async def test_an_event_after_the_terminal_one_in_a_batch_is_refused_before_writing(store: Store) -> None:
    await _admit(store, "t", "rs1")
    bad = Append("t", [("end", "{}", TaskState.SUCCEEDED.value), ("token", events.token("x", 0), "")])
    with pytest.raises(ValueError, match="follows the terminal"):
        await store.append_many([bad], 60)
    assert [e.name for e in await store.read_events("t", -1)] == ["started"]


async def _script_exists_calls(store: Store) -> int:
    stats = await store.client.info("commandstats")
    return int(stats.get("cmdstat_script|exists", {}).get("calls", 0))


async def test_one_round_trip_and_a_redis_that_forgot_the_script(store: Store) -> None:
    """A batch is one pipeline of EVALSHA, with no SCRIPT EXISTS before it; after a script flush (what
    a Redis restart does) the batch still lands, once."""
    await _admit(store, "f", "rs1")
    token = [("token", events.token(" x", 0), "")]
    before = await _script_exists_calls(store)
    assert await store.append_many([Append("f", token, tokens_out=1, batch_id="f-1")], 60) == [1]
    assert await _script_exists_calls(store) == before
    await store.client.script_flush()
    assert await store.append_many([Append("f", token, tokens_out=2, batch_id="f-2")], 60) == [2]
    assert [e.seq for e in await store.read_events("f", -1)] == [0, 1, 2]
