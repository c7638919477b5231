"""The store's Lua steps against real Redis: append-unless-terminal, capacity, strict priority, leases."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llorch import events
from llorch.errors import Code, OrchestratorError
from llorch.respwire import HiredisConnection
from llorch.store import (
    AdmitStatus,
    Admitted,
    Append,
    Event,
    NewTask,
    Placement,
    Priority,
    QueueLimits,
    Refused,
    Store,
    TaskRequest,
    TaskState,
)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    async with Store.connect(redis_url, prefix="t:") as s:
        yield s


async def test_commands_are_packed_by_hiredis(store: Store) -> None:
    """Both of the store's clients (commands, and the live-event subscription) pack in C."""
    assert await store.ping()
    assert store.client.connection_pool.connection_class is HiredisConnection
    assert store._subscriber.connection_pool.connection_class is HiredisConnection


def _limits(
    capacity: int, policy: str = "reject", ci: int | None = None, cb: int | None = None
) -> QueueLimits:
    return QueueLimits(capacity, ci or capacity, cb or capacity, policy)


async def _admit(
    store: Store,
    task_id: str,
    priority: str = "interactive",
    limits: QueueLimits | None = None,
    deadline_at_ms: int = 10**13,
    rs: str = "rs",
) -> Admitted:
    """Admit with a `started` window of positions 0..3 whose payloads name their position."""
    prio: Priority = "batch" if priority == "batch" else "interactive"
    task = NewTask(task_id, rs, prio, "m", "", "mock", 60_000, TaskRequest("p", 4, 1, "best_effort"))
    window = [events.started(task_id, p, 10 * p, 1.0, prio) for p in range(4)]
    return await store.admit(task, limits or _limits(8), deadline_at_ms, (0, window), 60, 60)


async def test_nothing_lands_after_a_terminal_event(store: Store) -> None:
    assert (await _admit(store, "a")).status == AdmitStatus.OK
    assert (await _admit(store, "a")).status == AdmitStatus.EXISTS
    assert (
        await store.append(Append("a", [("token", '{"t":"x","i":0}', "")], tokens_out=1, batch_id="b1")) == 1
    )
    assert await store.append(Append("a", [("token", '{"t":"x","i":0}', "")], 1, "b1")) == 1  # a retry
    ended = await store.terminate(
        "a", TaskState.CANCELED, events.error(OrchestratorError(Code.CANCELED, "m")), 60
    )
    assert ended.previous == TaskState.QUEUED and ended.was_live
    assert await store.append(Append("a", [("token", '{"t":"y","i":1}', "")])) == Refused.ENDED
    assert await store.append(Append("unknown", [("token", "{}", "")])) == Refused.UNKNOWN
    log = await store.read_events("a", -1)
    assert [(e.seq, e.name) for e in log] == [(0, "started"), (1, "token"), (2, "error")]
    assert '"tokens_out":1' in log[-1].data
    record = await store.task("a")
    assert record is not None and record.state == TaskState.CANCELED and record.tokens_out == 1
    assert 0 < await store.client.ttl(store.keys.events("rs", "a")) <= 60
    assert await store.read_events("a", 1) == log[2:]
    again = await store.terminate(
        "a", TaskState.FAILED, events.error(OrchestratorError(Code.INTERNAL, "x")), 60
    )
    assert again.previous == TaskState.CANCELED and not again.was_live
    assert (await store.terminate("nope", TaskState.FAILED, "{}", 60)).previous is None


async def test_a_stream_start_reads_the_log_and_the_session_id_together(store: Store) -> None:
    """An SSE stream's first read: read_events' page and the task's session id (None without one)."""
    await _admit(store, "plain")
    request = TaskRequest("p", 4, 1, "best_effort")
    task = NewTask("in-session", "rs", "interactive", "m", "s-1", "mock", 60_000, request)
    window = [events.started("in-session", p, 0, 1.0, "interactive") for p in range(4)]
    assert (await store.admit(task, _limits(8), 10**13, (0, window), 60, 60)).status == AdmitStatus.OK
    assert await store.stream_start("plain", -1) == (await store.read_events("plain", -1), None)
    log, session_id = await store.stream_start("in-session", -1)
    assert [e.name for e in log] == ["started"] and session_id == "s-1"
    assert await store.stream_start("in-session", 0) == ([], "s-1")
    assert await store.stream_start("unknown", -1) == ([], None)


async def test_admission_is_one_step_record_started_and_queue_entry(store: Store) -> None:
    """ADMIT writes all three or nothing: a refusal leaves no record, no log and no queue entry, and
    `started` names the position the task really got (from the offered window)."""
    for n in range(3):
        assert (await _admit(store, f"t{n}", limits=_limits(3))).position == n
    refused = await _admit(store, "t3", limits=_limits(3))
    assert refused.status == AdmitStatus.FULL and refused.position == -1
    assert await store.task("t3") is None and await store.read_events("t3", -1) == []
    for n in range(3):
        record = await store.task(f"t{n}")
        assert record is not None and record.state == TaskState.QUEUED and record.rs == "rs"
        assert record.request == TaskRequest("p", 4, 1, "best_effort")
        [started] = await store.read_events(f"t{n}", -1)
        assert started.seq == 0 and events.validate("started", started.data).queue_position == n  # type: ignore[attr-defined]
    # Past the window, the last offered payload stands (the queue watch then sends the true position).
    for n in range(3, 6):
        await _admit(store, f"u{n}")
    [started] = await store.read_events("u5", -1)
    assert events.validate("started", started.data).queue_position == 3  # type: ignore[attr-defined]


async def test_enqueue_respects_capacity_and_claim_is_strict_priority_fifo(store: Store) -> None:
    order = [("b1", "batch"), ("i1", "interactive"), ("b2", "batch"), ("i2", "interactive")]
    positions = [(await _admit(store, t, p, _limits(4))).position for t, p in order]
    assert positions == [0, 0, 2, 1]
    assert (await _admit(store, "x", "interactive", _limits(4))).position == -1
    assert await store.queue_depths("rs") == (2, 2)
    claimed = []
    while claims := await store.claim("rs", 10_000, limit=3):
        claimed += [c.task_id for c in claims]
    assert claimed == ["i1", "i2", "b1", "b2"]
    assert sorted(await store.leased("rs")) == ["b1", "b2", "i1", "i2"]


async def test_requeue_restores_the_place_and_dequeue_removes(store: Store) -> None:
    for t in ("a", "b", "c"):
        await _admit(store, t)
    [first] = await store.claim("rs", 10_000)
    await store.requeue_head("rs", first)
    assert await store.leased("rs") == []
    assert await store.dequeue("rs", "b") and not await store.dequeue("rs", "b")
    assert [c.task_id for c in await store.claim("rs", 10_000, limit=5)] == ["a", "c"]


async def test_overdue_queued_tasks_are_listed(store: Store) -> None:
    await _admit(store, "late", deadline_at_ms=1)
    await _admit(store, "fine")
    assert await store.overdue_queued("rs") == ["late"]


async def test_aged_batch_task_goes_before_newer_interactive(store: Store) -> None:
    await _admit(store, "old-batch", "batch")
    await store.client.zadd(store.keys.queue_admitted("rs"), {"old-batch": 1})  # admitted long ago
    await _admit(store, "new-interactive")
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
        result = await _admit(store, task_id, op, limits)
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
    """What the scripts publish is what the gateway's feed parses: the same events as the log, but for
    admission's `started`, which only the log holds (nothing can follow a task before it is admitted)."""
    from llorch_gateway.feed import EventFeed

    feed = EventFeed(store)
    async with store.follow_events(feed._dispatch):  # as the feed itself follows them
        with feed.subscribe("p") as sub:
            await _admit(store, "p")
            await store.append(Append("p", [("metrics", '{"a":"x\\u001fy"}', "")]))
            await store.append_many(
                [Append("p", [("token", '{"t":" hi","i":0}', ""), ("token", "{}", "")])], 60
            )
            await store.terminate(
                "p", TaskState.CANCELED, events.error(OrchestratorError(Code.CANCELED, "m")), 60
            )
            delivered: list[Event] = []
            while len(delivered) < 4 and (more := await sub.next(30)) is not None:
                delivered += more
    logged = await store.read_events("p", -1)
    assert logged[0].name == "started" and delivered == logged[1:]


async def test_queued_frames_land_only_while_queued(store: Store) -> None:
    await _admit(store, "q")
    await store.append_queued_frames([("q", '{"phase":"queued","queue_position":0}')])
    record = await store.mark_running("q", Placement("m:1", "pool", "r0"))
    assert record is not None and record.state == TaskState.RUNNING and record.replica_id == "r0"
    await store.append_queued_frames([("q", '{"phase":"queued","queue_position":0}')])
    assert [e.name for e in await store.read_events("q", -1)] == ["started", "metrics"]


_budget_ops = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.integers(1, 60), st.integers(0, 500)),
        st.tuples(st.just("settle"), st.integers(0, 80), st.integers(0, 700)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_budget_ops, st.integers(0, 150), st.integers(0, 1500), st.integers(1, 10))
async def test_session_budgets_match_a_reference_model(
    store: Store, ops: list[tuple[str, int, int]], tokens: int, cost: int, max_turns: int
) -> None:
    """Any sequence of admissions and settlements against a plain-Python model: a reservation is taken
    only when it fits, the remaining budgets never go negative, a settlement refunds exactly what the
    task did not use (use beyond the reservation is not charged), each reservation settles once, and
    once everything has settled the budgets equal the start minus what was used."""
    await store.client.flushdb()
    left = {"tokens": tokens, "cost": cost}
    turns = 0
    held: dict[str, tuple[int, int]] = {}
    used_total = {"tokens": 0, "cost": 0}
    for n, (op, a, b) in enumerate(ops):
        if op == "admit":
            task_id = f"t{n}"
            result = await store.session_admit(
                "s", "m", task_id, (a, b), (tokens, None, cost), 600_000, max_turns
            )
            fits = turns < max_turns and left["tokens"] >= a and left["cost"] >= b
            if not fits:
                assert isinstance(result, tuple) and result[0] in ("turns", "tokens", "cost")
                continue
            assert not isinstance(result, tuple)
            left["tokens"] -= a
            left["cost"] -= b
            turns += 1
            held[task_id] = (a, b)
            assert (result.turns, result.tokens, result.cost_micro, result.time_ms) == (
                turns,
                left["tokens"],
                left["cost"],
                None,
            )
        elif held:
            task_id = sorted(held)[a % len(held)]
            reserved = held.pop(task_id)
            used = (min(reserved[0], a), min(reserved[1], b))
            assert await store.session_settle("s", task_id, (a, b), 0, 600_000)
            assert not await store.session_settle("s", task_id, (a, b), 0, 600_000)  # exactly once
            left["tokens"] += reserved[0] - used[0]
            left["cost"] += reserved[1] - used[1]
            used_total["tokens"] += used[0]
            used_total["cost"] += used[1]
        session = await store.session("s")
        if session is not None:
            assert session.budgets.tokens == left["tokens"] >= 0
            assert session.budgets.cost_micro == left["cost"] >= 0
            assert 0 < session.ttl_ms <= 600_000
    for task_id, reserved in list(held.items()):
        assert await store.session_settle("s", task_id, (0, 0), 0, 600_000)
        left["tokens"] += reserved[0]
        left["cost"] += reserved[1]
    if turns:
        session = await store.session("s")
        assert session is not None
        assert session.budgets.tokens == tokens - used_total["tokens"] == left["tokens"]
        assert session.budgets.cost_micro == cost - used_total["cost"] == left["cost"]


async def test_a_refused_first_turn_leaves_no_session_and_undo_gives_the_turn_back(store: Store) -> None:
    await store.client.flushdb()
    assert await store.session_admit("s", "m", "t0", (10, 0), (5, None, None), 60_000, 8) == ("tokens", "5")
    assert await store.session("s") is None
    admitted = await store.session_admit("s", "m", "t1", (3, 0), (5, 1000, None), 60_000, 8)
    assert not isinstance(admitted, tuple) and admitted.turns == 1 and admitted.time_ms == 1000
    assert await store.session_admit("s", "other", "t2", (1, 0), (5, None, None), 60_000, 8) == ("model", "m")
    assert await store.session_settle("s", "t1", (0, 0), 0, 60_000, undo=True)
    session = await store.session("s")
    assert session is not None and session.turns == 0 and session.budgets.tokens == 5
    again = await store.session_admit("s", "m", "t3", (1, 0), (5, None, None), 60_000, 8)
    assert not isinstance(again, tuple)
    assert await store.session_settle("s", "t3", (1, 0), 1500, 60_000)  # time charged, floor 0
    session = await store.session("s")
    assert session is not None and session.budgets.time_ms == 0
    ran = await store.session_ran_on("s", "r1", 4242)
    assert ran is not None and (ran.replica_id, ran.replica_pid) == ("r1", 4242)
    assert await store.session_ran_on("gone", "r1", 1) is None
    assert await store.session_admit("s", "m", "t4", (1, 0), (5, None, None), 60_000, 8) == ("time_ms", "0")
