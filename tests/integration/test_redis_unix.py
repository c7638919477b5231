"""``redis.url: unix://…`` (the config accepts it): the store and the whole stack work over a Redis that
listens only on a Unix socket. Before, the store passed TCP keepalive to every connection class, and
redis-py's Unix socket connection refuses it, so every service failed at its first Redis call."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from llorch.store import Store
from llorch_cli.embedded_redis import server_binary
from tests.support.procs import Proc
from tests.support.restartable_redis import wait_answering
from tests.support.stack import Client, Stack, mock_pool


@pytest.fixture
async def unix_redis(tmp_path: Path) -> AsyncIterator[str]:
    """A Redis server with no TCP port, only a Unix socket; yields its ``unix://`` URL."""
    sock = tmp_path / "r.sock"
    argv = [server_binary(), "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
    argv += ["--dir", str(tmp_path), "--save", "", "--appendonly", "no"]
    proc = Proc(argv, tmp_path / "redis.log")
    url = f"unix://{sock}?db=0"
    try:
        await wait_answering(proc, url)
        yield url
    finally:
        proc.stop()


async def test_the_store_and_its_script_wire_work_over_a_unix_socket(unix_redis: str) -> None:
    async with Store.connect(unix_redis, "unix-test:") as store:
        assert await store.ping()
        assert store.wire is not None, "a Unix socket is a plain connection: the scripts go on the wire"
        [pong] = await store.wire.execute([("PING",)])
        assert pong == "PONG"


async def test_the_stack_runs_a_task_over_a_unix_socket_redis(
    tmp_path: Path, unix_redis: str, http: aiohttp.ClientSession
) -> None:
    stack = Stack(tmp_path / "stack", unix_redis, [mock_pool()])
    try:
        await stack.start()
        client = Client(stack, http)
        task_id = await client.admit(max_tokens=3)
        events = await client.events(task_id)
        assert [e.event for e in events][-1] == "end", [e.event for e in events]
        assert sum(e.event == "token" for e in events) == 3
    finally:
        stack.stop()
