"""Drain and resume of one pool (SPEC §5.6) through the whole stack: no new dispatch to a drained pool,
running tasks finish or end POOL_UNAVAILABLE at the deadline, queued tasks go to the other replicas,
Draining → Drained, `draining` in health, resume, and `drain_events_total`."""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import wait_until
from tests.support.stack import Client, Stack, mock_pool

SLOW = ["--token-delay-ms", "20"]


async def _health(http: aiohttp.ClientSession, stack: Stack, pool_id: str) -> dict[str, Any]:
    async with http.get(f"{stack.url}/v1/pools/{pool_id}/health", headers=stack.headers) as r:
        assert r.status == 200
        return dict(await r.json())


async def _state_is(http: aiohttp.ClientSession, stack: Stack, pool_id: str, state: str) -> None:
    async def reached() -> bool:
        return (await _health(http, stack, pool_id))["state"] == state

    await wait_until(reached, 30, f"{pool_id} to be {state}")


async def _drain(http: aiohttp.ClientSession, stack: Stack, pool_id: str, body: Any) -> tuple[int, Any]:
    url = f"{stack.url}/v1/pools/{pool_id}/drain"
    async with http.post(url, json=body, headers=stack.headers) as r:
        return r.status, await r.json()


async def _drain_events(http: aiohttp.ClientSession, stack: Stack, pool_id: str) -> dict[str, float]:
    async with http.get(f"{stack.url}/metrics") as r:
        text = await r.text()
    return {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "drain_events_total" and s.labels.get("pool_id") == pool_id
    }


async def test_drain_cuts_at_the_deadline_serves_queued_elsewhere_and_resumes(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack: Stack = stack_factory(pools=[mock_pool("mock-a", args=SLOW), mock_pool("mock-b", args=SLOW)])
    await stack.start()
    await _state_is(http, stack, "mock-b", "Ready")
    client = Client(stack, http)

    long_task = await client.admit(max_tokens=1500)  # holds a slot for 30 s

    async def placed() -> bool:
        return bool((await client.status(long_task))["pool_id"])

    await wait_until(placed, 30, "the long task to be dispatched")
    drained = (await client.status(long_task))["pool_id"]
    other = "mock-b" if drained == "mock-a" else "mock-a"
    busy_other = await client.admit(max_tokens=40)  # the other pool is busy too...
    queued = await client.admit(max_tokens=3)  # ...so this one waits in the queue

    status, body = await _drain(http, stack, drained, {"deadline_ms": 300})
    assert (status, body) == (202, {"pool_id": drained, "state": "draining", "deadline_ms": 300})
    events = await client.events(long_task)
    assert events[-1].event == "error", events[-1]
    assert events[-1].data["code"] == "POOL_UNAVAILABLE" and events[-1].data["tokens_out"] > 0
    await _state_is(http, stack, drained, "Drained")
    health = await _health(http, stack, drained)
    assert health["draining"] is True and health["ready"] is False and health["live"] is True

    for task_id in (busy_other, queued):  # the queued task went to the replica that stayed
        assert (await client.events(task_id))[-1].event == "end"
        assert (await client.status(task_id))["pool_id"] == other
    served_elsewhere = await client.admit(max_tokens=2)
    assert (await client.events(served_elsewhere))[-1].event == "end"
    assert (await client.status(served_elsewhere))["pool_id"] == other

    async with http.post(f"{stack.url}/v1/pools/{drained}/resume", headers=stack.headers) as r:
        assert r.status == 202
    await _state_is(http, stack, drained, "Ready")
    assert (await _health(http, stack, drained))["draining"] is False

    # A drain whose running task finishes in time: it ends normally, and then the pool is Drained.
    first = await client.admit(max_tokens=20)
    second = await client.admit(max_tokens=20)
    await wait_until(placed_both(client, first, second), 30, "both tasks to be dispatched")
    pool_of_first = (await client.status(first))["pool_id"]
    status, _ = await _drain(http, stack, pool_of_first, {"deadline_ms": 60_000})
    assert status == 202
    assert (await client.events(first))[-1].event == "end"
    await _state_is(http, stack, pool_of_first, "Drained")
    counts = await _drain_events(http, stack, drained)
    assert counts["started"] >= 1 and counts["deadline"] == 1 and counts["resumed"] == 1
    assert (await _drain_events(http, stack, pool_of_first))["completed"] >= 1


def placed_both(client: Client, *task_ids: str) -> Any:
    async def placed() -> bool:
        return all([(await client.status(t))["pool_id"] for t in task_ids])

    return placed


async def test_drain_bad_input_and_every_member_drained(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack: Stack = stack_factory(pools=[mock_pool("mock-a")])
    await stack.start()
    for body in (
        {},
        {"deadline_ms": 0},
        {"deadline_ms": 3_600_001},
        {"deadline_ms": "5"},
        {"deadline_ms": 5, "x": 1},
    ):
        status, error = await _drain(http, stack, "mock-a", body)
        assert status == 400 and error["code"] == "INVALID_PARAMS", (body, error)
    status, error = await _drain(http, stack, "no-such-pool", {"deadline_ms": 5})
    assert status == 404 and error["code"] == "NOT_FOUND"
    async with http.post(f"{stack.url}/v1/pools/mock-a/drain", data=b"{", headers=stack.headers) as r:
        assert r.status == 400
    assert (await _drain(http, stack, "mock-a", {"deadline_ms": 5}))[0] == 202
    await _state_is(http, stack, "mock-a", "Drained")
    status, refused, _ = await Client(stack, http).submit(max_tokens=2)
    assert status == 503 and refused["code"] == "POOL_UNAVAILABLE", refused
