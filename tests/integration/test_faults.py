"""Nothing is lost: every admitted task ends in `end` or a typed `error`, whatever fails underneath."""

from __future__ import annotations

import os
import signal
from typing import Any

import aiohttp

from tests.support.procs import wait_until
from tests.support.stack import Client, SseEvent, Stack, mock_pool


async def _health(http: aiohttp.ClientSession, stack: Stack) -> dict[str, Any]:
    async with http.get(f"{stack.url}/v1/pools/mock-a/health", headers=stack.headers) as r:
        assert r.status == 200
        return dict(await r.json())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def _until_token(client: Client, task_id: str) -> None:
    async for event in client.follow(task_id):
        if event.event == "token":
            return
    raise AssertionError("the stream ended before its first token")


def _error(events: list[SseEvent]) -> dict[str, Any]:
    assert events[-1].event == "error", [e.event for e in events]
    assert sum(1 for e in events if e.event in ("end", "error")) == 1
    return events[-1].data


async def test_pool_manager_killed_mid_stream_ends_with_worker_reset(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool(args=["--token-delay-ms", "50"])])
    await stack.start()
    client = Client(stack, http)
    engine_pid = (await _health(http, stack))["replicas"][0]["pid"]
    task_id = await client.admit(max_tokens=1000)
    await _until_token(client, task_id)
    stack.procs["pool-manager"].kill(signal.SIGKILL)
    error = _error(await client.events(task_id))
    assert error["code"] == "WORKER_RESET" and error["retriable"] is True
    assert error["pool_id"] == "mock-a"

    async def engine_gone() -> bool:
        return not _alive(engine_pid)

    await wait_until(engine_gone, 30, "the engine to die with its pool manager")
    stack.start_pool_manager()
    await stack.wait_ready()
    after = await client.admit(max_tokens=2)
    assert (await client.events(after))[-1].event == "end"


async def test_engine_crash_mid_stream_is_typed_and_the_replica_restarts(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(
        pools=[
            mock_pool(
                args=["--crash-after-tokens", "3"],
                restart={"initial_backoff_ms": 100, "max_backoff_ms": 1000},
            )
        ]
    )
    await stack.start()
    client = Client(stack, http)
    first_pid = (await _health(http, stack))["replicas"][0]["pid"]
    task_id = await client.admit(max_tokens=10)
    events = await client.events(task_id)
    error = _error(events)
    assert error["code"] == "WORKER_RESET"
    assert error["tokens_out"] == sum(1 for e in events if e.event == "token")

    async def restarted() -> bool:
        health = await _health(http, stack)
        return bool(health["ready"] and health["restarts"] >= 1 and health["replicas"][0]["pid"] != first_pid)

    await wait_until(restarted, 60, "the replica to restart")
    assert (await _health(http, stack))["last_error"]["code"] == "ENGINE_CRASHED"
    short = await client.admit(max_tokens=2)
    assert (await client.events(short))[-1].event == "end"


async def test_engine_error_object_maps_to_internal(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    stack = stack_factory(pools=[mock_pool(args=["--fail-after-tokens", "2", "--fail-code", "500"])])
    await stack.start()
    client = Client(stack, http)
    events = await client.events(await client.admit(max_tokens=10))
    error = _error(events)
    assert error["code"] == "INTERNAL" and error["tokens_out"] == 2
    assert error["engine"] == "mock" and error["replica_id"] == "mock-a-r0"


async def test_hung_engine_hits_the_idle_watchdog(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    stack = stack_factory(
        pools=[mock_pool(args=["--hang-after-tokens", "2"], timeouts={"idle_ms": 1000, "wall_ms": 600000})]
    )
    await stack.start()
    client = Client(stack, http)
    error = _error(await client.events(await client.admit(max_tokens=10)))
    assert error["code"] == "DECODE_TIMEOUT" and error["tokens_out"] == 2

    async def counted() -> bool:
        async with http.get(f"{stack.url}/metrics") as r:
            lines = (await r.text()).splitlines()
        return any(
            line.startswith("tasks_canceled_total{") and 'reason="watchdog"' in line and line.endswith(" 1.0")
            for line in lines
        )

    await wait_until(counted, 30, "tasks_canceled_total{reason=watchdog} to count the timeout")


async def test_queue_full_gives_429_with_retry_after(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    stack = stack_factory(pools=[mock_pool(capacity=2, args=["--token-delay-ms", "50"])])
    await stack.start()
    client = Client(stack, http)
    running = await client.admit(max_tokens=1000)
    await _until_token(client, running)
    queued = [await client.admit(max_tokens=5) for _ in range(2)]
    status, body, headers = await client.submit(max_tokens=5)
    assert status == 429
    assert body["code"] == "ADMISSION_REJECT" and body["policy_label"] == "reject"
    assert body["retriable"] is True and body["engine"] == "mock"
    assert body["retry_after_ms"] >= 250
    assert int(headers["Retry-After"]) >= 1
    assert int(headers["X-Backoff-Ms"]) == body["retry_after_ms"]
    assert headers["X-Correlation-Id"]
    for task_id in [running, *queued]:
        assert await client.cancel(task_id) == 204
    accepted, _, _ = await client.submit(max_tokens=1)
    assert accepted == 202


async def test_running_task_past_its_deadline_ends_with_deadline_unmet(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool(args=["--token-delay-ms", "50"])])
    await stack.start()
    client = Client(stack, http)
    events = await client.events(await client.admit(max_tokens=1000, deadline_ms=1500))
    error = _error(events)
    assert error["code"] == "DEADLINE_UNMET" and error["retriable"] is False
    assert error["tokens_out"] == sum(1 for e in events if e.event == "token") >= 1
    follow_up = await client.admit(max_tokens=2)
    assert (await client.events(follow_up))[-1].event == "end"


async def test_api_token_rps_throttle(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    stack = stack_factory(
        pools=[mock_pool()],
        extra={"api": {"tokens": [{"name": "agents", "token_env": "LLORCH_API_TOKEN", "rps": 0.01}]}},
    )
    await stack.start()
    client = Client(stack, http)
    answers = [await client.submit(max_tokens=1) for _ in range(2)]  # burst 1, refill every 100 s
    assert answers[0][0] == 202
    status, body, headers = answers[-1]
    assert status == 429
    assert body["code"] == "ADMISSION_REJECT" and body["policy_label"] == "rate-limit"
    assert int(headers["Retry-After"]) >= 1 and int(headers["X-Backoff-Ms"]) == body["retry_after_ms"]


async def test_api_token_tokens_per_min(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    stack = stack_factory(
        pools=[mock_pool()],
        extra={
            "api": {"tokens": [{"name": "agents", "token_env": "LLORCH_API_TOKEN", "tokens_per_min": 100}]}
        },
    )
    await stack.start()
    client = Client(stack, http)
    first = await client.admit(max_tokens=60, prompt="hello")  # reserves 2 + 60
    status, body, headers = await client.submit(max_tokens=60, prompt="hello")
    assert status == 429 and body["policy_label"] == "rate-limit" and int(headers["Retry-After"]) >= 1
    assert (await client.events(first))[-1].event == "end"
