"""Admission is one store step: a scheduler killed (SIGKILL) in the middle of a burst of admissions
leaves no queue entry without its record, no record without its `started`, and every task it answered
202 for still ends with exactly one terminal event once a scheduler is back."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from llorch.store import Keys, TaskState
from tests.support.procs import wait_until
from tests.support.stack import Client, mock_pool

BURST = 48


async def _invariants(redis_url: str) -> tuple[int, list[str]]:
    """(queued entries checked, violations) over every replica set's queue and every task record."""
    keys = Keys("llorch:")
    problems: list[str] = []
    checked = 0
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        for rs in await client.smembers(keys.replica_sets()):
            for priority in ("interactive", "batch"):
                for task_id in await client.zrange(keys.queue(rs, priority), 0, -1):  # type: ignore[arg-type]
                    checked += 1
                    state = await client.hget(keys.task(rs, task_id), "state")
                    if state != TaskState.QUEUED:
                        problems.append(f"queue entry {task_id} has record state {state!r}")
        async for key in client.scan_iter(match=keys.task("*", "*")):
            rs, task_id = key[key.index("{") + 1 : key.rindex("}")], key.rpartition("}:")[2]
            first = await client.xrange(keys.events(rs, task_id), count=1)
            if await client.get(keys.locator(task_id)) != rs:
                problems.append(f"record {task_id} has no locator to its set {rs}")
            if not first or first[0][1]["e"] != "started":
                problems.append(f"record {task_id} has no `started` at seq 0")
    finally:
        await client.aclose()
    return checked, problems


async def test_a_scheduler_killed_mid_burst_leaves_no_orphan(
    stack_factory: Any, http: aiohttp.ClientSession, redis_url: str
) -> None:
    stack = stack_factory(pools=[mock_pool(args=["--token-delay-ms", "20"], capacity=256)])
    await stack.start()
    client = Client(stack, http)
    answered: list[tuple[int, dict[str, Any]]] = []

    async def submit() -> None:
        try:
            status, body, _ = await client.submit(max_tokens=2)
        except aiohttp.ClientError:
            return  # the gateway may drop a request whose scheduler call died
        answered.append((status, body))

    burst = [asyncio.create_task(submit()) for _ in range(BURST)]

    async def some_answered() -> bool:
        return len(answered) >= 4

    await wait_until(some_answered, 60, "the first admissions")
    stack.procs["scheduler"].kill(signal.SIGKILL)  # admissions are in flight right now
    await asyncio.gather(*burst)
    checked, problems = await _invariants(redis_url)
    assert not problems, problems

    stack._spawn("scheduler", "scheduler")  # a new scheduler on the same Redis
    await stack.wait_ready()
    accepted = [body["task_id"] for status, body in answered if status == 202]
    assert accepted, answered
    assert all(status in (202, 503) for status, _ in answered), sorted({s for s, _ in answered})
    for task_id in accepted:
        events = [e async for e in client.follow(task_id)]
        terminal = [e for e in events if e.event in ("end", "error")]
        assert len(terminal) == 1 and terminal[0] is events[-1], [e.event for e in events]

    # Admissions the kill cut off before their answer are complete queued tasks too: the new
    # scheduler dispatches them, so the queues empty.
    async def drained() -> bool:
        checked_after, problems = await _invariants(redis_url)
        assert not problems, problems
        return checked_after == 0

    await wait_until(drained, 60, "every admitted task to be dispatched")
    print(f"burst {BURST}: answered {len(answered)}, 202 {len(accepted)}, queue entries checked {checked}")
