"""The pool manager's event log against a real Redis: a Redis error is retried, never taken for a
refusal; a retry of a batch that already landed writes nothing twice; a refusal (a terminal event stood
first) rejects the writer; close() returns only once everything is written."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from llorch import events
from llorch.errors import Code, OrchestratorError
from llorch.store import Append, NewTask, QueueLimits, Refused, Store, TaskRequest, TaskState
from llorch_poolmgr.eventlog import EventLog, refused


class FlakyStore(Store):
    """A real store whose ``append_many`` fails ``failures`` times: before reaching Redis, or (with
    ``lose_replies``) after Redis applied the batch, as when a reply is lost with its connection."""

    failures = 0
    lose_replies = False
    calls = 0

    async def append_many(self, batches: Sequence[Append], retention_s: int) -> list[int | Refused]:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            if self.lose_replies:
                await super().append_many(batches, retention_s)
            raise RedisConnectionError("Connection closed by server.")
        return await super().append_many(batches, retention_s)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[FlakyStore]:
    async with FlakyStore.connect(redis_url, prefix="e:") as s:
        assert isinstance(s, FlakyStore)
        yield s


async def _task(store: Store, task_id: str) -> None:
    task = NewTask(
        task_id, "rs", "interactive", "m", "", "mock", 60_000, TaskRequest("p", 4, 1, "best_effort")
    )
    started = events.started(task_id, 0, 0, 1.0, "interactive")
    await store.admit(task, QueueLimits(8, 8, 8, "reject"), 10**13, (0, [started]), 60, 60)


async def _names(store: Store, task_id: str) -> list[str]:
    return [e.name for e in await store.read_events(task_id, -1)]


@pytest.mark.parametrize("lose_replies", [False, True])
async def test_a_failed_append_is_retried_once_written_and_never_rejects(
    store: FlakyStore, lose_replies: bool
) -> None:
    await _task(store, "t1")
    store.failures, store.lose_replies = 3, lose_replies
    log = EventLog(store, retention_s=60)
    writer = log.writer("t1")
    writer.add("token", events.token("a", 0), tokens_out=1)
    writer.add("end", "{}", TaskState.SUCCEEDED)
    async with asyncio.timeout(30):  # a hang guard
        await writer.close()
    assert not writer.rejected and store.calls == 4
    assert await _names(store, "t1") == ["started", "token", "end"]  # each once, in order
    record = await store.task("t1")
    assert record is not None and record.state == TaskState.SUCCEEDED and record.tokens_out == 1
    assert log.down_s == 0.0 and not log.outage.down  # the outage ended with the write
    await log.aclose()


async def test_a_refusal_rejects_the_writer_and_drops_later_events(store: FlakyStore) -> None:
    await _task(store, "t2")
    await store.terminate("t2", TaskState.CANCELED, events.error(OrchestratorError(Code.CANCELED, "c")), 60)
    log = EventLog(store, retention_s=60)
    writer = log.writer("t2")
    writer.add("token", events.token("a", 0), tokens_out=1)
    async with asyncio.timeout(30):
        await writer.close()
    assert writer.rejected
    writer.add("token", events.token("b", 1))
    assert writer.events == []
    assert await _names(store, "t2") == ["started", "error"]
    await log.aclose()


def test_only_store_refusals_count_as_refused() -> None:
    assert refused(Refused.ENDED) and refused(Refused.UNKNOWN)
    assert not refused(0) and not refused(17)
