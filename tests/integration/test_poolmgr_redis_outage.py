"""A Redis outage under a running task (issue 10 item 2): the pool manager's event appends are retried,
never dropped or taken for a refusal; a task that outlives APPEND_GIVE_UP_S of outage is cut off with a
typed WORKER_RESET written once Redis is back, after every event it produced, and the task is not
reported finished (so its lease is not released) while its log is still unwritten."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from llorch.config import load_config
from llorch.store import Store
from llorch_poolmgr.watchdog import LOG_UNREACHABLE
from tests.support.procs import wait_until
from tests.support.restartable_redis import RestartableRedis
from tests.support.stack import Client, Stack, mock_pool

HANG_GUARD_S = 90


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RestartableRedis]:
    server = RestartableRedis(tmp_path / "redis")
    await server.start()
    yield server
    server.stop()


async def test_task_outliving_a_redis_outage_ends_typed_after_all_its_events(
    tmp_path: Path, own_redis: RestartableRedis, http: aiohttp.ClientSession
) -> None:
    stack = Stack(tmp_path / "stack", own_redis.url, pools=[mock_pool(args=["--token-delay-ms", "50"])])
    try:
        await _run(stack, own_redis, http)
    finally:
        stack.stop()


async def _run(stack: Stack, server: RestartableRedis, http: aiohttp.ClientSession) -> None:
    await stack.start()
    client = Client(stack, http)
    task_id = await client.admit(max_tokens=1000)  # 50 s of tokens: it outlives the outage bound
    async for event in client.follow(task_id):
        if event.event == "token":
            break
    manager = stack.procs["pool-manager"]
    server.kill()

    async def cut_off() -> bool:
        assert manager.alive(), manager.log_text()[-3000:]
        return "event_log_unreachable" in manager.log_text()

    await wait_until(cut_off, HANG_GUARD_S, "the pool manager to cut the task off for the lost event log")
    await server.start()

    async def ended() -> bool:
        try:
            return (await client.status(task_id))["state"] == "failed"
        except (aiohttp.ClientError, AssertionError, KeyError):
            return False

    await wait_until(ended, HANG_GUARD_S, "the task's terminal event to be written after Redis returned")
    cfg = load_config(stack.config_path)
    async with Store.connect(server.url, cfg.redis.key_prefix) as store:  # the log itself, not the relay
        events = await store.read_events(task_id, 0, count=100_000)
    names = [e.name for e in events]
    assert names.count("end") + names.count("error") == 1 and names[-1] == "error", names
    error = json.loads(events[-1].data)
    assert error["code"] == "WORKER_RESET" and error["message"] == LOG_UNREACHABLE, error
    tokens = [json.loads(e.data) for e in events if e.name == "token"]
    assert [t["i"] for t in tokens] == list(range(len(tokens)))  # nothing lost, nothing twice
    assert error["tokens_out"] == len(tokens) > 1
    log_text = manager.log_text()
    started = [line for line in log_text.splitlines() if "outage_started" in line]
    assert 1 <= len(started) <= 3, log_text[-3000:]  # once per loop that lost Redis, not per retry
    assert "append_failed" not in log_text
