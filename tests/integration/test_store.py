"""The store's Lua steps against real Redis: append-unless-terminal, capacity, strict priority, leases."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llorch.store import QueueLimits, Store


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    async with Store.connect(redis_url, prefix="t:") as s:
        yield s


async def test_nothing_lands_after_a_terminal_event(store: Store) -> None:
    assert await store.create_task("a", {"state": "queued"}, 60)
    assert not await store.create_task("a", {"state": "queued"}, 60)  # TASK_EXISTS
    assert (
        await store.append(
            "a", [("started", "{}", ""), ("token", '{"t":"x","i":0}', "")], {"tokens_out": "1"}
        )
        == 1
    )
    prev, _ = await store.terminate(
        "a", "canceled", {"code": "CANCELED", "message": "m", "retriable": False}, 60
    )
    assert prev == "queued"
    assert await store.append("a", [("token", '{"t":"y","i":1}', "")]) == -1
    assert await store.append("unknown", [("token", "{}", "")]) == -2
    events = await store.read_events("a", -1)
    assert [(e.seq, e.name) for e in events] == [(0, "started"), (1, "token"), (2, "error")]
    assert '"tokens_out":1' in events[-1].data
    assert (await store.task("a"))["state"] == "canceled"
    assert 0 < await store.client.ttl(store.keys.events("a")) <= 60
    assert await store.read_events("a", 1) == events[2:]


def _limits(
    capacity: int, policy: str = "reject", ci: int | None = None, cb: int | None = None
) -> QueueLimits:
    return QueueLimits(capacity, ci or capacity, cb or capacity, policy)


async def test_enqueue_respects_capacity_and_claim_is_strict_priority_fifo(store: Store) -> None:
    order = [("b1", "batch"), ("i1", "interactive"), ("b2", "batch"), ("i2", "interactive")]
    positions = [(await store.enqueue("rs", t, p, _limits(4), 10**13)).position for t, p in order]  # type: ignore[arg-type]
    assert positions == [0, 0, 2, 1]
    assert (await store.enqueue("rs", "x", "interactive", _limits(4), 10**13)).position == -1
    assert await store.queue_depths("rs") == (2, 2)
    claimed = []
    while claims := await store.claim("rs", 10_000, limit=3):
        claimed += [c.task_id for c in claims]
    assert claimed == ["i1", "i2", "b1", "b2"]
    assert sorted(await store.leased("rs")) == ["b1", "b2", "i1", "i2"]


async def test_requeue_restores_the_place_and_dequeue_removes(store: Store) -> None:
    for t in ("a", "b", "c"):
        await store.enqueue("rs", t, "interactive", _limits(8), 10**13)
    [first] = await store.claim("rs", 10_000)
    await store.requeue_head("rs", first)
    assert await store.leased("rs") == []
    assert await store.dequeue("rs", "b") and not await store.dequeue("rs", "b")
    assert [c.task_id for c in await store.claim("rs", 10_000, limit=5)] == ["a", "c"]


async def test_overdue_queued_tasks_are_listed(store: Store) -> None:
    await store.enqueue("rs", "late", "interactive", _limits(8), 1)
    await store.enqueue("rs", "fine", "interactive", _limits(8), 10**13)
    assert await store.overdue_queued("rs") == ["late"]


async def test_aged_batch_task_goes_before_newer_interactive(store: Store) -> None:
    await store.enqueue("rs", "old-batch", "batch", _limits(8), 10**13)
    await store.client.zadd(store.keys.queue_admitted("rs"), {"old-batch": 1})  # admitted long ago
    await store.enqueue("rs", "new-interactive", "interactive", _limits(8), 10**13)
    strict = await store.claim("rs", 10_000, limit=1, max_batch_wait_ms=0)
    assert [c.task_id for c in strict] == ["new-interactive"]
    await store.requeue_head("rs", strict[0])
    aged = await store.claim("rs", 10_000, limit=2, max_batch_wait_ms=1000)
    assert [c.task_id for c in aged] == ["old-batch", "new-interactive"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.sampled_from(["interactive", "batch", "claim"]), st.booleans()), max_size=40),
    st.integers(min_value=1, max_value=8),
    st.sampled_from(["reject", "drop-lru"]),
    st.integers(min_value=1, max_value=8),
)
async def test_queue_matches_a_reference_model(
    store: Store, ops: list[tuple[str, bool]], capacity: int, policy: str, batch_cap: int
) -> None:
    """Any sequence of enqueues and claims under either policy, against a plain-Python model: FIFO per
    class, interactive strictly first, capacity and class caps never exceeded, drop-lru evicts the
    oldest batch task and never an interactive one, a class cap below the capacity never evicts, and a
    refusal leaves the queue as it was."""
    await store.client.flushdb()
    limits = QueueLimits(capacity, capacity, min(batch_cap, capacity), policy)
    model: dict[str, list[str]] = {"interactive": [], "batch": []}
    for n, (op, _) in enumerate(ops):
        if op == "claim":
            claims = await store.claim("rs", 10_000)
            expected = (model["interactive"] or model["batch"] or [None])[0]
            assert (claims[0].task_id if claims else None) == expected
            if expected is not None:
                (model["interactive"] if model["interactive"] else model["batch"]).pop(0)
            continue
        task_id = f"t{n}"
        before = await store.queue_depths("rs")
        result = await store.enqueue("rs", task_id, op, limits, 10**13)  # type: ignore[arg-type]
        cap = limits.batch_capacity if op == "batch" else limits.interactive_capacity
        class_full = len(model[op]) >= cap
        full = len(model["interactive"]) + len(model["batch"]) >= capacity
        drop = policy == "drop-lru" and bool(model["batch"])
        if (class_full and cap < capacity) or (full and not drop):
            assert result.position == -1 and result.evicted == ""
            assert await store.queue_depths("rs") == before
            continue
        victim = model["batch"][0] if full else ""
        assert result.evicted == victim
        if victim:
            model["batch"].pop(0)
        model[op].append(task_id)
        ahead = (
            len(model["interactive"]) - 1
            if op == "interactive"
            else len(model["interactive"]) + len(model["batch"]) - 1
        )
        assert result.position == ahead
        assert sum(await store.queue_depths("rs")) <= capacity
    assert await store.queue_depths("rs") == (len(model["interactive"]), len(model["batch"]))


async def test_every_append_is_published_in_the_feed_format(store: Store) -> None:
    """What the scripts publish is what the gateway's feed parses: the same events as the log."""
    from llorch_gateway.feed import EventFeed

    feed = EventFeed(store)
    async with store.subscribe_events() as pubsub:
        with feed.subscribe("p") as sub:
            assert await store.create_task("p", {"state": "queued"}, 60)
            await store.append("p", [("started", '{"a":"x\\u001fy"}', "")])
            await store.append_many(
                [("p", [("token", '{"t":" hi","i":0}', ""), ("token", "{}", "")], {})], 60
            )
            await store.terminate(
                "p", "canceled", {"code": "CANCELED", "message": "m", "retriable": False}, 60
            )
            delivered = []
            deadline = time.monotonic() + 30
            while len(delivered) < 4 and time.monotonic() < deadline:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:  # None: the subscribe confirmation, or nothing yet
                    feed._dispatch(message["data"])
                    delivered += await sub.next(5) or []
    assert delivered == await store.read_events("p", -1)


async def test_queued_frames_land_only_while_queued(store: Store) -> None:
    assert await store.create_task("q", {"state": "queued"}, 60)
    await store.append("q", [("started", "{}", "")])
    await store.append_queued_frames([("q", '{"phase":"queued","queue_position":0}')])
    assert await store.mark_running("q", {"state": "running"})
    await store.append_queued_frames([("q", '{"phase":"queued","queue_position":0}')])
    assert [e.name for e in await store.read_events("q", -1)] == ["started", "metrics"]
