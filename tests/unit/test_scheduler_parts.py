"""Admission, Dispatcher, Sessions and the lease sweeper built directly, against a real Redis.

Each is wired from its narrow collaborators the way the composition root wires it, with a registry fed
the pool reports a pool manager would send. The pool manager's address is a closed port where a test
needs a dispatch to fail the way it fails when a pool manager is gone.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from prometheus_client import CollectorRegistry

from llorch import events
from llorch.config import GREEDY_V1, validate_config
from llorch.errors import Code, OrchestratorError
from llorch.store import LEASE_MS, NewTask, Placement, QueueLimits, Store, TaskRequest, TaskState
from llorch.v1 import poolmgr_pb2, poolmgr_pb2_grpc, types_pb2
from llorch_cli.embedded_redis import EmbeddedRedis
from llorch_scheduler.__main__ import build
from llorch_scheduler.admission import Admission
from llorch_scheduler.dispatcher import Dispatcher
from llorch_scheduler.leases import LeaseSweeper
from llorch_scheduler.metrics import SchedulerMetrics
from llorch_scheduler.queuewatch import QueueWatch
from llorch_scheduler.registry import PoolRegistry, set_of
from llorch_scheduler.residency import QueueView
from llorch_scheduler.sessions import Sessions
from llorch_scheduler.submission import Budget, Submission
from tests.support.events_schema import check_event
from tests.support.procs import free_port, wait_until

MODEL = "mock-tiny"


def _pool(
    state: str = "Ready", pool_id: str = "p1", capacity: int = 4, policy: str = "reject"
) -> types_pb2.PoolState:
    return types_pb2.PoolState(
        pool_id=pool_id,
        engine="mock",
        engine_version="mock-1",
        model_ref=MODEL,
        model_digest="sha256:0",
        ctx=2048,
        sampler_profile_version="greedy-v1",
        state=state,
        replicas=[types_pb2.ReplicaState(replica_id=f"{pool_id}-r0", state=state, slots_total=1, pid=42)],
        queue_capacity=capacity,
        full_policy=policy,
        max_tokens_limit=1024,
        live=True,
        workloads=["completion"],
    )


@dataclass
class Parts:
    store: Store
    registry: PoolRegistry
    admission: Admission
    dispatcher: Dispatcher
    sessions: Sessions
    sweeper: LeaseSweeper
    watch: QueueWatch

    def report(self, *pools: types_pb2.PoolState, address: str = "") -> None:
        self.registry.update("pm-0", address or f"127.0.0.1:{free_port()}", "127.0.0.1:1", list(pools))


def _build(store: Store, capacity: int = 4, policy: str = "reject", dispatch_attempts: int = 1) -> Parts:
    """The scheduler's object graph, as serve() builds it (pool config comes from the reports)."""
    cfg = validate_config(
        {
            "version": 1,
            "sse": {"retention_s": 60},
            "scheduler": {"dispatch_attempts": dispatch_attempts},
            "sampler_profiles": {"greedy-v1": GREEDY_V1.model_dump()},
            "catalog": {"models": [{"id": MODEL, "path": str(Path(__file__))}]},
            "pools": [
                {
                    "id": "p1",
                    "engine": "mock",
                    "model": MODEL,
                    "devices": "cpu",
                    "queue": {"capacity": capacity, "full_policy": policy},
                    "sampler_profile_version": "greedy-v1",
                }
            ],
        }
    )
    registry = PoolRegistry()
    parts = build(cfg, store, registry, SchedulerMetrics(CollectorRegistry()), "token")
    return Parts(
        store, registry, parts.admission, parts.dispatcher, parts.sessions, parts.sweeper, parts.watch
    )


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    async with Store.connect(redis_url, prefix="u:") as s:
        await s.client.flushdb()
        yield s


async def _ended(store: Store, task_id: str, what: str) -> None:
    """Until the task's record says it ended."""

    async def ended() -> bool:
        record = await store.task(task_id)
        return record is not None and not record.live

    await wait_until(ended, 60, what)


def _request(**fields: Any) -> Submission:
    return replace(Submission(model_ref=MODEL, prompt="hello", max_tokens=8), **fields)


async def _log(store: Store, task_id: str) -> list[tuple[str, dict[str, object]]]:
    out = []
    for event in await store.read_events(task_id, -1):
        data = json.loads(event.data)
        check_event(event.name, data)
        out.append((event.name, data))
    return out


# -- Admission ----------------------------------------------------------------------------------------


async def test_admission_writes_record_started_and_queue_entry_together(store: Store) -> None:
    parts = _build(store)
    parts.report(_pool())
    first = await parts.admission.admit(_request())
    second = await parts.admission.admit(_request(task_id="chosen-id", priority="batch"))
    assert (first.queue_position, second.queue_position) == (0, 1)
    for admitted in (first, second):
        record = await store.task(admitted.task_id)
        assert record is not None and record.state == TaskState.QUEUED and record.rs == admitted.rs
        [(name, started)] = await _log(store, admitted.task_id)
        assert name == "started" and started["queue_position"] == admitted.queue_position
        assert started["predicted_start_ms"] == admitted.predicted_start_ms
    assert await store.queue_depths(first.rs) == (1, 1)


async def test_a_known_task_id_is_refused_without_a_second_queue_entry(store: Store) -> None:
    parts = _build(store)
    parts.report(_pool())
    admitted = await parts.admission.admit(_request(task_id="dup"))
    with pytest.raises(OrchestratorError) as err:
        await parts.admission.admit(_request(task_id="dup"))
    assert err.value.code == Code.TASK_EXISTS
    assert await store.queue_depths(admitted.rs) == (1, 0)
    assert [name for name, _ in await _log(store, "dup")] == ["started"]


async def test_a_full_queue_writes_nothing(store: Store) -> None:
    parts = _build(store, capacity=1)
    parts.report(_pool(capacity=1))
    await parts.admission.admit(_request())
    with pytest.raises(OrchestratorError) as err:
        await parts.admission.admit(_request(task_id="refused"))
    assert err.value.code == Code.ADMISSION_REJECT and err.value.context["retry_after_ms"] >= 250
    assert await store.task("refused") is None and await store.read_events("refused", -1) == []


async def test_drop_lru_ends_the_displaced_batch_task_typed(store: Store) -> None:
    parts = _build(store, capacity=1, policy="drop-lru")
    parts.report(_pool(capacity=1, policy="drop-lru"))
    victim = await parts.admission.admit(_request(priority="batch"))
    newer = await parts.admission.admit(_request(priority="interactive"))
    log = await _log(store, victim.task_id)
    assert [name for name, _ in log] == ["started", "error"]
    assert log[-1][1]["code"] == "QUEUE_FULL_DROP_LRU" and log[-1][1]["retriable"] is True
    assert await store.queue_depths(newer.rs) == (1, 0)


@pytest.mark.parametrize(
    ("state", "code", "retriable"),
    [
        ("Stopped", Code.POOL_UNAVAILABLE, False),
        ("Unavailable", Code.POOL_UNAVAILABLE, False),  # its circuit is open
        ("Draining", Code.POOL_UNAVAILABLE, False),
        ("Preloading", Code.POOL_UNREADY, True),
        ("Backoff", Code.POOL_UNREADY, True),
    ],
)
async def test_no_ready_pool_is_unready_or_unavailable_by_what_it_waits_for(
    store: Store, state: str, code: Code, retriable: bool
) -> None:
    """Defect 3: a pool that only an operator can bring back is POOL_UNAVAILABLE with its pool_id."""
    parts = _build(store)
    parts.report(_pool(state=state))
    with pytest.raises(OrchestratorError) as err:
        await parts.admission.admit(_request())
    assert err.value.code == code and err.value.retriable is retriable
    assert err.value.context["pool_id"] == "p1"


async def test_an_unknown_model_names_the_served_ones(store: Store) -> None:
    parts = _build(store)
    parts.report(_pool())
    with pytest.raises(OrchestratorError) as err:
        await parts.admission.admit(_request(model_ref="nope"))
    assert err.value.code == Code.INVALID_PARAMS and err.value.context["served_models"] == [MODEL]


# -- Sessions -----------------------------------------------------------------------------------------


async def test_session_affinity_survives_a_scheduler_restart(store: Store) -> None:
    """Defect 6: where a session last ran is in its Redis record, not in one process's memory."""
    parts = _build(store)
    parts.report(_pool())
    first = await parts.admission.admit(_request(session_id="s1"))
    await parts.sessions.dispatched(first.task_id, "p1-r0", 42, 0.0)
    await parts.sessions.settle(first.task_id, 3)

    restarted = _build(store)  # a new process: nothing carried over in memory
    restarted.report(_pool())
    second = await restarted.admission.admit(_request(session_id="s1"))
    assert await restarted.sessions.warm_replica(second.task_id) == ("p1-r0", 42)
    info = await restarted.sessions.info("s1")
    assert info.kv_warmth is True and info.record.replica_id == "p1-r0" and info.record.turns == 2
    cold = await restarted.admission.admit(_request(session_id="s1", kv_hint="cold"))
    assert await restarted.sessions.warm_replica(cold.task_id) is None


# -- Dispatcher and the sweeper -----------------------------------------------------------------------


async def _dispatch_until_ended(parts: Parts, task_id: str, what: str) -> None:
    """Run the dispatcher until the task has ended."""
    run = asyncio.create_task(parts.dispatcher.run())
    try:
        parts.dispatcher.wake()
        await _ended(parts.store, task_id, what)
    finally:
        run.cancel()


async def test_a_dispatch_to_a_gone_pool_manager_ends_typed_and_frees_the_lease(store: Store) -> None:
    parts = _build(store)
    parts.report(_pool())  # its address is a closed port
    admitted = await parts.admission.admit(_request())
    await _dispatch_until_ended(parts, admitted.task_id, "the dispatch to fail")
    log = await _log(store, admitted.task_id)
    assert [name for name, _ in log] == ["started", "error"]
    assert log[-1][1]["code"] == "WORKER_RESET" and log[-1][1]["pool_id"] == "p1"
    assert await store.leased(admitted.rs) == []


async def test_a_deadline_is_judged_against_the_queue_as_it_is_after_a_dispatch(store: Store) -> None:
    """The queue depth admission predicts from follows each claim at once, not only the periodic scan
    (not running here): a task dispatched is no longer ahead of the next one."""
    parts = _build(store)
    parts.report(_pool())  # one slot; its address is a closed port, so the dispatch fails
    ahead = await parts.admission.admit(_request(max_tokens=40))
    await _dispatch_until_ended(parts, ahead.task_id, "the first task's dispatch to fail")
    # 40 tokens at the prior 25 ms/token: one task ahead would start this one 1,000 ms from now.
    admitted = await parts.admission.admit(_request(max_tokens=40, deadline_ms=500))
    assert (admitted.queue_position, admitted.predicted_start_ms) == (0, 0)


class _RefusingManager(poolmgr_pb2_grpc.PoolManagerServicer):
    """A pool manager whose every start answers "no slot" (the race where the scheduler's view of a
    replica's slots is older than the replica's own)."""

    def __init__(self) -> None:
        self.starts = 0

    async def StartStream(
        self, messages: AsyncIterator[poolmgr_pb2.StartCalls], context: Any
    ) -> AsyncIterator[poolmgr_pb2.StartResults]:
        async for message in messages:
            self.starts += len(message.calls)
            yield poolmgr_pb2.StartResults(
                results=[
                    poolmgr_pb2.StartResult(call=c.call, reply=poolmgr_pb2.StartReply())
                    for c in message.calls
                ]
            )


@pytest.mark.parametrize("attempts", [1, 3])
async def test_dispatch_attempts_bounds_the_refusals_before_replica_exhausted(
    store: Store, attempts: int
) -> None:
    manager = _RefusingManager()
    server = grpc.aio.server()
    poolmgr_pb2_grpc.add_PoolManagerServicer_to_server(manager, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    parts = _build(store, dispatch_attempts=attempts)
    parts.report(_pool(), address=f"127.0.0.1:{port}")
    admitted = await parts.admission.admit(_request())
    run = asyncio.create_task(parts.dispatcher.run())
    try:
        parts.dispatcher.wake()

        await _ended(store, admitted.task_id, "the task to end")
    finally:
        run.cancel()
        await server.stop(None)
    log = await _log(store, admitted.task_id)
    assert log[-1][0] == "error" and log[-1][1]["code"] == "REPLICA_EXHAUSTED", log[-1]
    assert manager.starts == attempts


async def test_the_sweeper_ends_a_dispatched_task_whose_lease_lapsed(store: Store) -> None:
    parts = _build(store)
    parts.report(_pool())
    admitted = await parts.admission.admit(_request())
    [claim] = await store.claim(admitted.rs, lease_ms=-1)  # dispatched by a scheduler that then died
    await store.mark_running(claim.task_id, Placement("127.0.0.1:1", "p1", "p1-r0"))
    assert await parts.sweeper.sweep() == 1
    log = await _log(store, claim.task_id)
    assert log[-1][0] == "error" and log[-1][1]["code"] == "WORKER_RESET"
    assert await store.leased(admitted.rs) == [] and await parts.sweeper.sweep() == 0


async def test_the_sweeper_returns_a_claim_that_was_never_dispatched(store: Store) -> None:
    """A claim whose dispatch died before the record said running goes back to the head of its class."""
    parts = _build(store)
    parts.report(_pool())
    first = await parts.admission.admit(_request())
    second = await parts.admission.admit(_request())
    [claim] = await store.claim(first.rs, lease_ms=-1)
    assert claim.task_id == first.task_id
    assert await parts.sweeper.sweep() == 1
    assert await store.leased(first.rs) == []
    record = await store.task(first.task_id)
    assert record is not None and record.state == TaskState.QUEUED
    assert [c.task_id for c in await store.claim(first.rs, LEASE_MS, limit=2)] == [
        first.task_id,
        second.task_id,
    ]
    assert [name for name, _ in await _log(store, first.task_id)] == ["started"]


async def test_a_claim_put_back_counts_ahead_of_the_next_admission(store: Store) -> None:
    """The queue depth admission predicts from rises again when a claim goes back to its queue (here
    a lapsed claim the sweeper returns), so the next task is judged behind it."""
    parts = _build(store)
    parts.report(_pool())  # one slot
    first = await parts.admission.admit(_request(max_tokens=40))
    [claim] = await store.claim(first.rs, lease_ms=-1)
    parts.dispatcher.queue_moved(first.rs, [claim.priority], -1)  # what the dispatcher's claim tells
    assert await parts.sweeper.sweep() == 1
    # 40 tokens at the prior 25 ms/token: the returned task ahead starts this one 1,000 ms from now.
    with pytest.raises(OrchestratorError) as refused:
        await parts.admission.admit(_request(max_tokens=40, deadline_ms=500))
    assert refused.value.code == Code.DEADLINE_UNMET


async def test_a_drained_queue_is_claimed_from_again_only_once_a_task_is_queued(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that comes back short shows the set's queue empty: later wakes (a task's end, a pool
    report) send no claim until this process queues a task again, also one queued while that claim was
    in flight (its store step ran after the claim's)."""
    parts = _build(store)
    parts.report(_pool())  # one slot; its address is a closed port, so a dispatch fails and frees it
    dispatcher = parts.dispatcher
    claim = store.claim
    claimed: list[list[str]] = []

    async def recorded(*args: Any, **kwargs: Any) -> Any:
        out = await claim(*args, **kwargs)
        claimed.append([c.task_id for c in out])
        if len(claimed) == 3:  # a task admitted while this claim was in flight
            late = await parts.admission.admit(_request(task_id="late"))
            dispatcher.queued(late.rs)
        return out

    monkeypatch.setattr(store, "claim", recorded)
    await dispatcher._fill_all()  # nothing queued yet: one claim, empty
    await dispatcher._fill_all()  # known empty: no claim
    assert claimed == [[]]
    first = await parts.admission.admit(_request(task_id="first"))
    dispatcher.queued(first.rs)
    await dispatcher._fill_all()  # claims it, its dispatch fails and frees the slot, then empty
    await dispatcher._fill_all()  # "late" came while that claim was out: claimed, then empty
    await dispatcher._fill_all()  # known empty again
    assert claimed == [[], ["first"], [], ["late"], []]
    for task_id in ("first", "late"):
        assert [name for name, _ in await _log(store, task_id)] == ["started", "error"]


async def test_a_queue_filled_behind_the_dispatchers_back_is_claimed_after_the_next_scan(
    store: Store,
) -> None:
    """A set taken for empty (its last claim came back short) whose queue holds a task this process
    never queued (Redis restarted from an older state): the queue watch's scan sees it, and the next
    fill claims it."""
    parts = _build(store)
    parts.report(_pool())  # its address is a closed port, so the dispatch fails
    await parts.dispatcher._fill_all()  # an empty claim: the set is taken for empty from now on
    admitted = await parts.admission.admit(_request())  # the dispatcher is not told (no queued())
    await parts.dispatcher._fill_all()
    record = await store.task(admitted.task_id)
    assert record is not None and record.state == TaskState.QUEUED
    await parts.watch.scan(admitted.rs)
    await parts.dispatcher._fill_all()
    assert [name for name, _ in await _log(store, admitted.task_id)] == ["started", "error"]


async def test_a_class_emptied_by_claims_has_no_oldest_age(store: Store) -> None:
    """Between scans the queue view follows admissions and claims: a class with no task left reports
    no waiting age (residency weighs that age against its swap wait)."""
    parts = _build(store)
    parts.report(_pool())
    first = await parts.admission.admit(_request())
    await parts.watch.scan(first.rs)  # the view's oldest task: this one
    assert parts.watch.views()[first.rs].interactive == 1
    [claim] = await store.claim(first.rs, LEASE_MS)
    parts.dispatcher.queue_moved(first.rs, [claim.priority], -1)
    assert parts.watch.views()[first.rs] == QueueView(first.rs)


async def test_the_sweeper_ends_a_victim_its_evicting_admission_left(store: Store) -> None:
    parts = _build(store, capacity=1, policy="drop-lru")
    parts.report(_pool(capacity=1, policy="drop-lru"))
    victim = await parts.admission.admit(_request(priority="batch"))
    task = NewTask(
        "newer", victim.rs, "interactive", MODEL, "", "mock", 60_000, TaskRequest("p", 4, 1, "strict")
    )
    started = events.started("newer", 0, 0, 1.0, "interactive")
    limits = QueueLimits(1, 1, 1, "drop-lru")
    # An admission that evicts, then dies before ending its victim (its parking expires at once).
    result = await store.admit(task, limits, 10**13, (0, [started]), 60, 60)
    assert result.evicted == victim.task_id
    await store.client.zadd(store.keys.evicted(victim.rs), {victim.task_id: 0})
    assert await parts.sweeper.sweep() == 1
    log = await _log(store, victim.task_id)
    assert [name for name, _ in log] == ["started", "error"] and log[-1][1]["code"] == "QUEUE_FULL_DROP_LRU"
    assert await store.expired_evictions() == []


async def test_the_sweeper_renews_a_lease_its_manager_still_reports(store: Store) -> None:
    parts = _build(store)
    admitted_rs = set_of(_pool())
    parts.report(_pool())
    admitted = await parts.admission.admit(_request())
    await store.claim(admitted_rs, lease_ms=-1)
    parts.registry.update("pm-0", "127.0.0.1:1", "127.0.0.1:1", [_pool()], frozenset({admitted.task_id}))
    assert await parts.sweeper.sweep() == 0
    record = await store.task(admitted.task_id)
    assert record is not None and record.live
    assert await store.leased(admitted_rs) == [admitted.task_id]
    assert LEASE_MS > 0


async def test_dispatch_resumes_by_itself_after_a_redis_restart(tmp_path: Path) -> None:
    """Issue 10 finding 1: the dispatcher loop outlives a Redis restart (AOF keeps the queue)."""
    server = EmbeddedRedis(tmp_path / "redis", appendonly=True)
    server.start()
    try:
        async with Store.connect(server.url, prefix="r:") as store:
            parts = _build(store)
            parts.report(_pool())
            run = asyncio.create_task(parts.dispatcher.run())
            try:
                await store.client.config_set("appendfsync", "always")
                server.stop()
                parts.dispatcher.wake()  # the fill fails: Redis is gone

                async def paused() -> bool:
                    return parts.dispatcher.outage.down

                await wait_until(paused, 30, "the dispatcher to notice the outage")
                assert not run.done()
                server.start()

                async def resumed() -> bool:
                    return not parts.dispatcher.outage.down

                # The retried fill finds the queue empty before the admission below; the admission
                # then tells the dispatcher, as the service does after each one.
                await wait_until(resumed, 30, "the dispatcher to resume")
                admitted = await parts.admission.admit(_request())
                parts.dispatcher.queued(admitted.rs)

                await _ended(store, admitted.task_id, "a dispatch after the restart")
                assert not parts.dispatcher.outage.down and not run.done()
            finally:
                run.cancel()
    finally:
        server.stop()


async def test_a_restarted_scheduler_settles_a_session_task_it_never_saw_dispatched(store: Store) -> None:
    """The end of a task dispatched before a restart refunds its session's unused reservation."""
    parts = _build(store)
    parts.report(_pool())
    admitted = await parts.admission.admit(_request(session_id="s2", budget=Budget(tokens=100)))
    session = await store.session("s2")
    assert session is not None and session.budgets.tokens == 100 - (2 + 8)  # prompt_est + max_tokens
    [claim] = await store.claim(admitted.rs, LEASE_MS)
    await store.mark_running(claim.task_id, Placement("127.0.0.1:1", "p1", "p1-r0"))

    restarted = _build(store)
    restarted.report(_pool())
    await restarted.dispatcher.finished(types_pb2.TaskFinished(task_id=claim.task_id, tokens_out=3))
    session = await store.session("s2")
    assert session is not None and session.budgets.tokens == 100 - (2 + 3)
    assert await store.leased(admitted.rs) == []
