"""Cancel without races (SPEC §5.5): queued → never dispatched; running → aborted, slot freed;
after the 204 nothing more is ever appended to the task's log."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp

from tests.support.procs import wait_until
from tests.support.stack import Client, SseEvent, Stack, mock_pool

TERMINAL = ("end", "error")


async def _pool(http: aiohttp.ClientSession, stack: Stack, pool_id: str = "mock-a") -> dict[str, Any]:
    async with http.get(f"{stack.url}/v1/pools/{pool_id}/health", headers=stack.headers) as r:
        assert r.status == 200
        return dict(await r.json())


async def _slots_all_free(http: aiohttp.ClientSession, stack: Stack) -> None:
    async def free() -> bool:
        metrics = (await _pool(http, stack))["metrics"]
        return bool(metrics["slots_free"] == metrics["slots_total"] and metrics["tasks_running"] == 0)

    await wait_until(free, 60, "every slot to be free")


async def _first_token(client: Client, task_id: str) -> list[SseEvent]:
    seen: list[SseEvent] = []
    async for event in client.follow(task_id):
        seen.append(event)
        if event.event == "token":
            return seen
    raise AssertionError(f"stream ended before a token: {seen}")


async def test_cancel_queued_task_is_never_dispatched(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool(slots=1, args=["--token-delay-ms", "50"])])
    await stack.start()
    client = Client(stack, http)
    running = await client.admit(max_tokens=1000, prompt="long")
    await _first_token(client, running)
    queued = await client.admit(max_tokens=5)
    assert (await client.status(queued))["state"] == "queued"
    assert await client.cancel(queued) == 204
    events = await client.events(queued)
    assert [e.event for e in events] == ["started", "error"]
    assert events[-1].data["code"] == "CANCELED" and events[-1].data["tokens_out"] == 0
    assert (await client.status(queued))["state"] == "canceled"
    assert await client.cancel(running) == 204
    await _slots_all_free(http, stack)
    assert [e.event for e in await client.events(queued)] == ["started", "error"]


async def test_cancel_running_task_stops_tokens_and_frees_the_slot(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool(slots=1, args=["--token-delay-ms", "20"])])
    await stack.start()
    client = Client(stack, http)
    task_id = await client.admit(max_tokens=2000)
    await _first_token(client, task_id)
    assert await client.cancel(task_id) == 204
    after_204 = await client.events(task_id)
    assert after_204[-1].event == "error" and after_204[-1].data["code"] == "CANCELED"
    tokens = [e for e in after_204 if e.event == "token"]
    assert after_204[-1].data["tokens_out"] == len(tokens)
    await _slots_all_free(http, stack)
    assert await client.events(task_id) == after_204  # nothing was appended after the 204
    follow_up = await client.admit(max_tokens=3)
    assert (await client.events(follow_up))[-1].event == "end"


async def test_cancel_after_end_and_unknown(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    stack = stack_factory(pools=[mock_pool()])
    await stack.start()
    client = Client(stack, http)
    task_id = await client.admit(max_tokens=2)
    done = await client.events(task_id)
    assert await client.cancel(task_id) == 204
    assert await client.events(task_id) == done
    assert (await client.status(task_id))["state"] == "succeeded"
    assert await client.cancel("no-such-task") == 404


async def _trial(client: Client, rng: random.Random) -> tuple[str, list[SseEvent]]:
    """Cancel at a random moment; return the log as replayed right after the 204."""
    task_id = await client.admit(max_tokens=rng.randint(1, 24), prompt=f"p{rng.random()}")
    moment = rng.choice(["at-once", "mid-stream", "after-end"])
    if moment != "at-once":
        wanted = rng.randint(0, 12) if moment == "mid-stream" else 10**6
        seen = 0
        async for event in client.follow(task_id):
            seen += 1
            if seen > wanted or event.event in TERMINAL:
                break
    assert await client.cancel(task_id) == 204
    log = await client.events(task_id)
    terminals = [e for e in log if e.event in TERMINAL]
    assert len(terminals) == 1 and log[-1] is terminals[0], log
    if log[-1].event == "error":
        assert log[-1].data["code"] == "CANCELED"
        assert log[-1].data["tokens_out"] == sum(1 for e in log if e.event == "token")
    return task_id, log


async def test_property_no_event_after_cancel_204(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    """600 cancels at random moments (queued, at dispatch, mid-stream, after end): the log read right
    after each 204 is the log forever after, it ends in exactly one terminal, and every slot frees."""
    stack = stack_factory(pools=[mock_pool(slots=4, capacity=64, args=["--token-delay-ms", "2"])])
    await stack.start()
    client = Client(stack, http)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    logs: list[tuple[str, list[SseEvent]]] = []
    for _ in range(75):
        batch = [random.Random(rng.random()) for _ in range(8)]
        logs += await asyncio.gather(*(_trial(client, r) for r in batch))
    assert len(logs) == 600
    await _slots_all_free(http, stack)
    for task_id, log in logs:
        assert await client.events(task_id) == log, f"seed {seed}: task {task_id} changed after its 204"
    outcomes = {log[-1].event for _, log in logs}
    assert outcomes == {"end", "error"}, f"seed {seed}: trials never reached both outcomes"
