"""Admissions over the gateway's one ``AdmitStream`` to the scheduler (issue 16): every admission gets
its own answer however many share the stream, refusals keep their type, and a stream broken by a
scheduler restart fails what waited on it as 503 retriable, after which a new stream serves."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from llorch.rpc import DEFAULT_DEADLINE_S
from tests.support.procs import wait_until
from tests.support.raw_http import HANG_GUARD_S
from tests.support.redis_server import RedisServer
from tests.support.stack import Client, Stack, mock_pool

READY_S = 60.0


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    redis = RedisServer(tmp_path / "redis")
    stack = Stack(tmp_path / "stack", redis.url, pools=[mock_pool(capacity=128)])
    try:
        await stack.start()
        yield stack
    finally:
        stack.stop()
        redis.stop()


async def test_concurrent_admissions_each_get_their_own_answer(stack: Stack) -> None:
    """64 admissions in flight at once, each naming its task id, mixed with refusals: each reply is
    the answer to its own request (the stream matches answers by call number, not by order)."""
    async with aiohttp.ClientSession() as session:
        client = Client(stack, session)
        wanted = [f"many-{n:02d}" for n in range(64)]
        admitted = [client.submit(task_id=task_id, max_tokens=1) for task_id in wanted]
        refused = [client.submit(model_ref=f"no-such-model-{n}") for n in range(8)]
        replies = await asyncio.gather(*admitted, *refused)
    for task_id, (status, payload, _) in zip(wanted, replies[:64], strict=True):
        assert status == 202, payload
        assert payload["task_id"] == task_id
        assert payload["stream_url"] == f"/v1/tasks/{task_id}/stream"
    for status, payload, _ in replies[64:]:
        assert status == 400, payload
        assert (payload["code"], payload["field"]) == ("INVALID_PARAMS", "model_ref"), payload
        assert payload["served_models"] == ["mock-tiny"], payload


async def test_a_scheduler_restart_fails_waiting_admissions_as_retriable_and_a_new_stream_serves(
    stack: Stack,
) -> None:
    async with aiohttp.ClientSession() as session:
        client = Client(stack, session)
        await client.admit(max_tokens=1)  # the gateway's stream is open now
        stack.procs["scheduler"].kill()
        stack.procs["scheduler"].popen.wait()
        status, payload, headers = await client.submit(max_tokens=1)
        assert status == 503, payload
        assert payload["code"] == "POOL_UNREADY" and payload["retriable"] is True, payload
        assert int(headers["Retry-After"]) >= 1

        stack.start_scheduler()
        task_id: str | None = None

        async def admitted() -> bool:
            nonlocal task_id
            status, payload, _ = await client.submit(max_tokens=2)
            assert status in (202, 503), payload  # 503 only while the new scheduler comes up
            task_id = str(payload["task_id"]) if status == 202 else None
            return task_id is not None

        await wait_until(admitted, READY_S, "an admission through a new stream")
        assert task_id is not None
        events = await client.events(task_id)
        assert events[-1].event == "end", events[-1]


async def test_a_scheduler_that_does_not_answer_gives_503_at_the_deadline_not_a_hang(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        client = Client(stack, session)
        await client.admit(max_tokens=1)  # the gateway's stream is open now
        stack.procs["scheduler"].kill(signal.SIGSTOP)  # alive, connected, silent
        try:
            async with asyncio.timeout(DEFAULT_DEADLINE_S + HANG_GUARD_S):
                status, payload, _ = await client.submit(max_tokens=1)
        finally:
            stack.procs["scheduler"].kill(signal.SIGCONT)
        assert status == 503, payload
        assert payload["code"] == "POOL_UNREADY" and payload["retriable"] is True, payload
        assert "DEADLINE_EXCEEDED" in payload["message"], payload
        await client.admit(max_tokens=1)  # the same stream serves again once the scheduler does
