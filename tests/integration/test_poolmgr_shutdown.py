"""A pool manager's shutdown drains (issue 9, issue 10 item 10): on SIGTERM it takes no new task, lets
running tasks finish within its grace period, ends the rest with a WORKER_RESET that names the shutdown,
and tells the scheduler before it exits; nothing waits for the scheduler's lost-manager timer."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp

from llorch_poolmgr.executor import SHUTDOWN
from tests.support.procs import wait_until
from tests.support.stack import Client, SseEvent, mock_pool

HANG_GUARD_S = 90  # a hang guard only: the drain itself is bounded by DRAIN_GRACE_S plus a few seconds


async def _until_token(client: Client, task_id: str) -> None:
    async for event in client.follow(task_id):
        if event.event == "token":
            return
    raise AssertionError("the stream ended before its first token")


def _terminal(events: list[SseEvent]) -> SseEvent:
    terminals = [e for e in events if e.event in ("end", "error")]
    assert len(terminals) == 1 and events[-1] is terminals[0], [e.event for e in events]
    return terminals[0]


async def test_sigterm_drains_short_tasks_and_cuts_long_ones_with_a_shutdown_error(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    # 50 ms per token: 1000 tokens outlast the grace period (DRAIN_GRACE_S), 20 tokens finish well within it.
    stack = stack_factory(pools=[mock_pool(slots=2, args=["--token-delay-ms", "50"])])
    await stack.start()
    client = Client(stack, http)
    long_task = await client.admit(max_tokens=1000)
    short_task = await client.admit(max_tokens=20)
    await _until_token(client, long_task)
    await _until_token(client, short_task)
    manager = stack.procs["pool-manager"]
    manager.kill(signal.SIGTERM)

    async with asyncio.timeout(HANG_GUARD_S):
        long_events, short_events = await asyncio.gather(client.events(long_task), client.events(short_task))

    assert _terminal(short_events).event == "end"  # running tasks may finish
    cut = _terminal(long_events)
    assert cut.event == "error", cut
    assert cut.data["code"] == "WORKER_RESET" and cut.data["message"] == SHUTDOWN
    assert "stream broke" not in cut.data["message"]  # the engine is not blamed
    assert cut.data["pool_id"] == "mock-a" and cut.data["replica_id"] == "mock-a-r0"
    assert cut.data["tokens_out"] == sum(1 for e in long_events if e.event == "token") > 0

    async def exited() -> bool:
        return not manager.alive()

    await wait_until(exited, HANG_GUARD_S, "the pool manager to exit after its drain")
    assert manager.popen.returncode == 0, manager.log_text()[-3000:]
    status = await client.status(long_task)
    assert status["state"] == "failed", status
    assert "drain_started" in manager.log_text()
