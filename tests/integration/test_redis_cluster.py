"""The whole stack on a real 3-master Redis Cluster (valkey on loopback): admission, streaming,
cancel and sessions, with every multi-key step in one slot (a task's keys live in its replica set's
slot) and the rest (locators, sessions) spread over the nodes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from llorch.respwire import HiredisConnection
from llorch.store import Keys, Store
from tests.support.procs import wait_until
from tests.support.redis_cluster import RedisCluster
from tests.support.stack import Client, Stack, mock_pool


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[RedisCluster]:
    nodes = RedisCluster(tmp_path / "cluster")
    try:
        await nodes.start()
        yield nodes
    finally:
        nodes.stop()


async def _node_of(cluster: RedisCluster, key: str) -> int:
    """The port of the node that holds ``key``."""
    for port in cluster.ports:
        client = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            slot = await client.execute_command("CLUSTER", "KEYSLOT", key)
            for start, end, master, *_ in await client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        finally:
            await client.aclose()
    raise AssertionError(f"no node holds {key}")


async def test_admission_stream_cancel_and_sessions_on_a_cluster(
    tmp_path: Path, cluster: RedisCluster, http: aiohttp.ClientSession
) -> None:
    stack = Stack(
        tmp_path / "stack",
        cluster.url,
        pools=[mock_pool(slots=2, args=["--token-delay-ms", "20"])],
        extra={"redis": {"cluster": True}},
    )
    try:
        await stack.start()
        client = Client(stack, http)
        done = [
            await client.admit(max_tokens=4, session_id="cl-s", budget={"tokens": 1000}) for _ in range(3)
        ]
        for task_id in done:
            events = [e async for e in client.follow(task_id)]
            assert events[0].event == "started" and events[-1].event == "end", [e.event for e in events]
            assert sum(e.event == "token" for e in events) == 4
        resumed = [e async for e in client.follow(done[0], last_event_id=1)]
        assert resumed[0].id == 2 and resumed[-1].event == "end"

        long = await client.admit(task_id="cl-long", max_tokens=500)

        async def streaming() -> bool:
            return (await client.status(long))["state"] == "running"

        await wait_until(streaming, 30, "the long task to run")
        assert await client.cancel(long) == 204
        events = [e async for e in client.follow(long)]
        assert events[-1].event == "error" and events[-1].data["code"] == "CANCELED"
        assert (await client.status(long))["state"] == "canceled"

        async with http.get(f"{stack.url}/v1/sessions/cl-s", headers=stack.headers) as r:
            session: dict[str, Any] = await r.json()
        assert r.status == 200 and session["turns"] == 3 and session["tokens_budget_remaining"] < 1000

        keys = Keys("llorch:")
        status = await client.status(done[0])
        rs = status["replica_set_id"]
        record_node = await _node_of(cluster, keys.task(rs, done[0]))
        assert record_node == await _node_of(cluster, keys.queue(rs, "interactive"))  # one slot
        spread = {await _node_of(cluster, keys.locator(t)) for t in [*done, long]}
        spread.add(await _node_of(cluster, keys.session("cl-s")))
        assert len(spread) >= 2, spread  # the stack really uses more than one node
    finally:
        stack.stop()


async def test_every_cluster_node_packs_commands_with_hiredis(cluster: RedisCluster) -> None:
    """Nodes found after the first command are made from the same connection settings as the
    startup node, so each of them packs in C too (llorch.respwire)."""
    async with Store.connect(cluster.url, cluster=True, prefix="t:") as store:
        for n in range(16):  # keys over all three nodes
            await store.client.set(f"t:spread:{n}", "x")
        nodes = store.client.get_nodes()
        assert len(nodes) == 3
        assert {node.connection_class for node in nodes} == {HiredisConnection}
