"""Sessions: budgets reserved at admission and refunded exactly, turns, TTL, affinity and failover."""

from __future__ import annotations

import os
import signal
from typing import Any

import aiohttp

from tests.support.procs import wait_until
from tests.support.stack import Client, SseEvent, Stack, mock_pool


async def _session(http: aiohttp.ClientSession, stack: Stack, session_id: str) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers) as r:
        return r.status, dict(await r.json())


async def _health(http: aiohttp.ClientSession, stack: Stack, pool_id: str) -> dict[str, Any]:
    async with http.get(f"{stack.url}/v1/pools/{pool_id}/health", headers=stack.headers) as r:
        return dict(await r.json())


def _dispatch(events: list[SseEvent]) -> dict[str, Any]:
    (frame,) = [e.data for e in events if e.event == "metrics" and e.data.get("phase") == "dispatch"]
    return frame


async def test_budget_is_reserved_refunded_exactly_and_exhaustion_is_403_before_enqueue(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool(args=["--eos-after", "5"], cost_per_1k_tokens=2.0)])
    await stack.start()
    client = Client(stack, http)
    budget = {"tokens": 100, "cost": 1.0}
    status, body, headers = await client.submit(session_id="s1", prompt="hello", max_tokens=40, budget=budget)
    assert status == 202 and body["session_id"] == "s1"
    assert headers["X-Budget-Tokens-Remaining"] == "58"  # 100 - (2 prompt + 40)
    assert headers["X-Budget-Cost-Remaining"] == "0.9160"  # 1.0 - 42 / 1000 x 2.0
    assert "X-Budget-Time-Remaining-Ms" not in headers  # no time budget set
    events = await client.events(body["task_id"])
    assert events[-1].event == "end" and events[-1].data["tokens_out"] == 5
    decode = next(e.data for e in events if e.event == "metrics" and e.data.get("phase") == "decode")
    assert decode["tokens_budget_remaining"] == 58 and decode["cost_budget_remaining"] == 0.916  # top level
    assert "budget" not in decode and "time_budget_remaining_ms" not in decode  # SPEC §3, defect 2

    async def refunded() -> bool:
        return (await _session(http, stack, "s1"))[1].get("tokens_budget_remaining") == 93

    await wait_until(refunded, 30, "the unused 35 tokens to be refunded")  # 58 + (42 - 7)
    _, info = await _session(http, stack, "s1")
    assert info["cost_budget_remaining"] == 0.986 and info["turns"] == 1 and info["max_turns"] == 8
    assert info["model_ref"] == "mock-tiny" and info["replica_id"] == "mock-a-r0"
    assert 0 < info["ttl_ms_remaining"] <= 600_000
    assert info["kv_bytes"] > 0 and info["kv_bytes"] % 7 == 0  # 7 tokens held x the model's bytes/token
    status, refusal, _ = await client.submit(session_id="s1", task_id="too-big", max_tokens=100)
    assert status == 403 and refusal["code"] == "BUDGET_EXHAUSTED" and refusal["budget"] == "tokens"
    assert refusal["remaining"] == 93
    async with http.get(f"{stack.url}/v1/tasks/too-big", headers=stack.headers) as r:
        assert r.status == 404  # refused before enqueue: no task record
    _, after = await _session(http, stack, "s1")
    assert after["turns"] == 1 and after["tokens_budget_remaining"] == 93  # the refusal held nothing


async def test_turns_are_limited_and_a_session_keeps_its_model(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool()], extra={"sessions": {"max_turns": 2}})
    await stack.start()
    client = Client(stack, http)
    for _ in range(2):
        await client.admit(session_id="s2", max_tokens=1)
    status, body, _ = await client.submit(session_id="s2", max_tokens=1)
    assert status == 403 and body["code"] == "BUDGET_EXHAUSTED" and body["budget"] == "turns"
    status, body, _ = await client.submit(session_id="s2", model_ref="other-model", max_tokens=1)
    assert status == 400  # the model is unknown before the session is even looked at


async def test_expired_session_is_404_and_its_id_starts_fresh(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool()], extra={"sessions": {"ttl_ms": 1500}})
    await stack.start()
    client = Client(stack, http)
    assert (await client.events(await client.admit(session_id="s3", max_tokens=1)))[-1].event == "end"

    async def expired() -> bool:
        return (await _session(http, stack, "s3"))[0] == 404

    await wait_until(expired, 30, "the session to expire")
    _, body = await _session(http, stack, "s3")
    assert body["code"] == "NOT_FOUND"
    await client.admit(session_id="s3", max_tokens=1)
    assert (await _session(http, stack, "s3"))[1]["turns"] == 1


async def test_delete_removes_the_session_and_is_idempotent(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool()])
    await stack.start()
    client = Client(stack, http)
    assert (await client.events(await client.admit(session_id="s4", max_tokens=1)))[-1].event == "end"
    for _ in range(2):
        async with http.delete(f"{stack.url}/v1/sessions/s4", headers=stack.headers) as r:
            assert r.status == 204 and r.headers["X-Correlation-Id"]
    assert (await _session(http, stack, "s4"))[0] == 404
    async with http.delete(f"{stack.url}/v1/sessions/-bad", headers=stack.headers) as r:
        assert r.status == 400


async def test_affinity_keeps_a_session_warm_and_failover_is_cold(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(
        pools=[
            mock_pool("mock-a"),
            mock_pool("mock-b", slots=2, restart={"initial_backoff_ms": 50, "max_backoff_ms": 200}),
        ]
    )
    await stack.start()
    client = Client(stack, http)

    async def both_ready() -> bool:
        return all([(await _health(http, stack, p))["ready"] for p in ("mock-a", "mock-b")])

    await wait_until(both_ready, 60, "both pools to be Ready")
    first = await client.events(await client.admit(session_id="s5", max_tokens=2))
    assert _dispatch(first)["replica_id"] == "mock-b-r0"  # most free slots
    assert _dispatch(first)["kv_warmth"] is False
    long_task = await client.admit(max_tokens=2000)  # mock-b again: now 1 free slot on each pool
    async for event in client.follow(long_task):
        if event.event == "token":
            break
    warm = await client.events(await client.admit(session_id="s5", max_tokens=2))
    assert _dispatch(warm)["replica_id"] == "mock-b-r0" and _dispatch(warm)["kv_warmth"] is True
    cold = await client.events(await client.admit(session_id="s5", max_tokens=2, kv_hint="cold"))
    assert _dispatch(cold)["replica_id"] == "mock-a-r0" and _dispatch(cold)["kv_warmth"] is False
    assert await client.cancel(long_task) == 204
    # s5's last replica is mock-a now; kill that engine: the next turn runs cold wherever it lands.
    pid = (await _health(http, stack, "mock-a"))["replicas"][0]["pid"]
    os.kill(pid, signal.SIGKILL)

    async def restarted() -> bool:
        health = await _health(http, stack, "mock-a")
        return bool(health["ready"] and health["replicas"][0]["pid"] not in (None, pid))

    await wait_until(restarted, 60, "mock-a to restart")
    failover = _dispatch(await client.events(await client.admit(session_id="s5", max_tokens=2)))
    assert failover["kv_warmth"] is False and failover["kv_migrated"] is False
