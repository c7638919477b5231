"""The relay's per-token shortcuts behave like the plain code they replace: the feed's events equal
``Event(...)`` and stay frozen, ``Tail.accept`` keeps its prefix rule, a live message is timed once, and
a writer queued for a flush takes every token added while that flush is in flight into the next one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llorch import events
from llorch.events import TERMINAL
from llorch.store import RS, US, Append, Event, NewTask, QueueLimits, Refused, Store, TaskRequest, TaskState
from llorch_gateway.feed import EventFeed, Tail
from llorch_poolmgr.eventlog import EventLog


def _message(*parts: tuple[str, int, list[tuple[str, str]]]) -> str:
    return RS.join(
        US.join([task_id, str(first), *(x for pair in pairs for x in pair)])
        for task_id, first, pairs in parts
    )


def test_the_feed_builds_the_same_immutable_events_and_times_each_message_once() -> None:
    feed = EventFeed.__new__(EventFeed)  # no store: only _dispatch is used
    feed._subs = {}
    with feed.subscribe("a", timed=True) as a, feed.subscribe("b") as b:
        feed._dispatch(
            _message(
                ("a", 4, [("token", '{"t":"x","i":0}'), ("metrics", "{}")]),
                ("nobody", 0, [("token", "{}")]),
                ("b", 1, [("end", '{"tokens_out":0}')]),
            )
        )
        feed._dispatch(_message(("a", 6, [("token", '{"t":"y","i":1}')])))
        got_a, got_b = a._items, b._items
        assert got_a == [
            Event(4, "token", '{"t":"x","i":0}'),
            Event(5, "metrics", "{}"),
            Event(6, "token", '{"t":"y","i":1}'),
        ]
        assert got_b == [Event(1, "end", '{"tokens_out":0}')]
        assert a.arrivals is not None and sorted(a.arrivals) == [4, 6]  # one per message, its first
        assert b.arrivals is None
        with pytest.raises(AttributeError):
            got_a[0].seq = 9  # type: ignore[misc]
        assert hash(got_a[0]) == hash(Event(4, "token", '{"t":"x","i":0}'))


def _accept_reference(log_at: int, ended: bool, batch: list[Event]) -> tuple[list[Event], int, bool]:
    """The event-at-a-time rule: continue the log by one seq at a time, stop after a terminal event."""
    out: list[Event] = []
    for e in batch:
        if ended or e.seq != log_at + 1:
            break
        log_at = e.seq
        out.append(e)
        ended = e.name in TERMINAL
    return out, log_at, ended


@given(
    log_at=st.integers(-1, 5),
    ended=st.booleans(),
    seqs=st.lists(st.integers(-1, 12), max_size=12),
    names=st.lists(st.sampled_from(["token", "metrics", "end", "error"]), min_size=12, max_size=12),
)
def test_accept_takes_the_same_prefix_as_the_event_at_a_time_rule(
    log_at: int, ended: bool, seqs: list[int], names: list[str]
) -> None:
    batch = [Event(s, n, "{}") for s, n in zip(seqs, names, strict=False)]
    tail = Tail.__new__(Tail)
    tail.log_at, tail.ended = log_at, ended
    want = _accept_reference(log_at, ended, batch)
    assert (tail.accept(list(batch)), tail.log_at, tail.ended) == want


class GatedStore(Store):
    """A real store whose first ``append_many`` waits for ``gate``: a flush held in flight."""

    gate: asyncio.Event
    entered: asyncio.Event
    calls = 0

    async def append_many(self, batches: Sequence[Append], retention_s: int) -> list[int | Refused]:
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            await self.gate.wait()
        return await super().append_many(batches, retention_s)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[GatedStore]:
    async with GatedStore.connect(redis_url, prefix="h:") as s:
        assert isinstance(s, GatedStore)
        s.gate, s.entered = asyncio.Event(), asyncio.Event()
        yield s


async def test_tokens_added_during_a_flush_go_in_the_next_one_in_order(store: GatedStore) -> None:
    task = NewTask("t", "rs", "interactive", "m", "", "mock", 60_000, TaskRequest("p", 8, 1, "best_effort"))
    started = events.started("t", 0, 0, 1.0, "interactive")
    await store.admit(task, QueueLimits(8, 8, 8, "reject"), 10**13, (0, [started]), 60, 60)
    log = EventLog(store, retention_s=60)
    writer = log.writer("t")
    writer.add_token(events.token("a", 0), 1)
    writer.add_token(events.token("b", 1), 2)
    async with asyncio.timeout(30):  # a hang guard
        await store.entered.wait()  # the flusher took the first two and waits at the gate
        for i, text in enumerate("cde", start=2):
            writer.add_token(events.token(text, i), i + 1)
        assert not writer.idle.is_set()
        store.gate.set()
        writer.add("end", "{}", TaskState.SUCCEEDED)
        await writer.close()
    assert store.calls == 2 and not writer.rejected
    logged = await store.read_events("t", -1)
    assert [e.name for e in logged] == ["started", *["token"] * 5, "end"]
    assert [e.data for e in logged[1:6]] == [events.token(t, i) for i, t in enumerate("abcde")]
    record = await store.task("t")
    assert record is not None and record.state == TaskState.SUCCEEDED and record.tokens_out == 5
    await log.aclose()
