"""Concurrent admissions share Redis round trips (issue 16): the ADMIT calls made while one is in flight
go out as one pipeline. Each stays one atomic step, they take effect in the order they were made, a
full queue refuses exactly the surplus, and a Redis that forgot its scripts costs no admission. On a
single Redis the step also writes a minted id's locator and the recent-tasks index."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from llorch import events
from llorch.store import AdmitStatus, Admitted, NewTask, QueueLimits, Store, TaskRequest

RS = "rs-p"
CAP = 30
BURST = 50


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    async with Store.connect(redis_url, prefix="p:") as s:
        yield s


def _task(task_id: str) -> NewTask:
    return NewTask(
        task_id, RS, "interactive", "m", "", "mock", 60_000, TaskRequest("hi", 4, 1, "best_effort")
    )


async def _admit(store: Store, task_id: str, minted: bool) -> Admitted:
    window = [events.started(task_id, p, 0, 1.0, "interactive") for p in range(3)]
    return await store.admit(
        _task(task_id), QueueLimits(CAP, CAP, CAP, "reject"), 10**13, (0, window), 60, 60, minted_id=minted
    )


def _count_shared_trips(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every round trip the store's wire makes for more than one command."""
    assert store.wire is not None  # a single Redis: the scripts go over the store's own connection
    shared: list[int] = []
    original = store.wire.execute

    async def execute(commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        if len(commands) > 1:
            shared.append(len(commands))
        return await original(commands)

    monkeypatch.setattr(store.wire, "execute", execute)
    return shared


@pytest.mark.parametrize("minted", [True, False])
async def test_a_burst_is_pipelined_and_refuses_exactly_the_surplus(
    store: Store, monkeypatch: pytest.MonkeyPatch, minted: bool
) -> None:
    assert (await _admit(store, "first", minted)).status == AdmitStatus.OK  # the set is known now
    opened = _count_shared_trips(store, monkeypatch)
    ids = [f"b{n:02d}" for n in range(BURST)]
    results = dict(zip(ids, await asyncio.gather(*(_admit(store, t, minted) for t in ids)), strict=True))
    assert opened, "concurrent admissions never shared a round trip"
    admitted = sorted((r.position, t) for t, r in results.items() if r.status == AdmitStatus.OK)
    refused = [t for t, r in results.items() if r.status == AdmitStatus.FULL]
    assert [p for p, _ in admitted] == list(range(1, CAP)) and len(refused) == BURST - CAP + 1
    if minted:  # nothing before the step to reorder them: they take effect in the order made
        assert [t for _, t in admitted] == ids[: CAP - 1]
    client, keys = store.client, store.keys
    assert await client.zrange(keys.queue(RS, "interactive"), 0, -1) == ["first", *(t for _, t in admitted)]
    for _, task_id in admitted:
        assert await client.hget(keys.task(RS, task_id), "state") == "queued"
        assert await client.get(keys.locator(task_id)) == RS
        assert (await client.xrange(keys.events(RS, task_id)))[0][1]["e"] == "started"
    for task_id in refused:  # nothing of it stays, and its id is free again
        assert not await client.exists(keys.task(RS, task_id), keys.events(RS, task_id))
        assert await client.get(keys.locator(task_id)) is None
    recent = [t.task_id for t in await store.recent_tasks(BURST)]
    assert recent == [*(t for _, t in reversed(admitted)), "first"]


async def test_a_redis_that_forgot_its_scripts_loses_no_admission(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await _admit(store, "warm", True)).status == AdmitStatus.OK  # the script is loaded
    await store.client.script_flush()
    assert store.wire is not None
    original = store.wire.execute

    async def execute_then_forget(commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """After every round trip Redis forgets the script again, so the calls that waited meet
        NOSCRIPT inside their pipeline."""
        result = await original(commands)
        await store.client.script_flush()
        return result

    monkeypatch.setattr(store.wire, "execute", execute_then_forget)
    opened = _count_shared_trips(store, monkeypatch)
    ids = [f"f{n}" for n in range(8)]
    results = await asyncio.gather(*(_admit(store, task_id, True) for task_id in ids))
    assert [r.status for r in results] == [AdmitStatus.OK] * len(ids)
    assert sorted(r.position for r in results) == list(range(1, len(ids) + 1))
    assert await store.client.zcard(store.keys.queue(RS, "interactive")) == len(ids) + 1
    assert len(opened) >= 2  # the batch, then its calls sent again once the script was loaded


async def test_a_known_id_is_refused_inside_a_burst(store: Store) -> None:
    assert (await _admit(store, "dup", False)).status == AdmitStatus.OK
    results = await asyncio.gather(*(_admit(store, task_id, False) for task_id in ("x1", "dup", "x2")))
    assert [r.status for r in results] == [AdmitStatus.OK, AdmitStatus.EXISTS, AdmitStatus.OK]
    queued = await store.client.zrange(store.keys.queue(RS, "interactive"), 0, -1)
    assert queued[0] == "dup" and sorted(queued[1:]) == ["x1", "x2"]
    assert await store.client.get(store.keys.locator("dup")) == RS  # the live task keeps its id
