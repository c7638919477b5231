"""The whole stack on a real 3-master Redis Cluster (valkey on loopback): admission, streaming,
cancel and sessions, with every multi-key step in one slot (a task's keys live in its replica set's
slot) and the rest (locators, sessions) spread over the nodes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from llorch.respwire import HiredisConnection
from llorch.store import Event, Keys, Store
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


async def _plain_reads(store: Store, rs: str) -> list[Any]:
    """Every read the store sends as plain commands in one round trip (``Store._round_trip``), after
    writing what they read through the store's own client."""
    keys, client, now = store.keys, store.client, int(time.time() * 1000)
    await client.sadd(keys.replica_sets(), rs)
    await client.zadd(keys.queue(rs, "interactive"), {"i1": 1, "i2": 2})
    await client.zadd(keys.queue(rs, "batch"), {"b1": 1})
    await client.zadd(keys.queue_admitted(rs), {"b1": 1234.5})
    await client.zadd(keys.queue_deadlines(rs), {"i1": now - 60_000, "b1": now + 600_000})
    await client.zadd(keys.lease(rs), {"i2": now - 60_000, "b1": now + 600_000})
    await client.xadd(keys.events(rs, "t1"), {"e": "started", "d": "{}"}, id="0-1")
    await client.xadd(keys.events(rs, "t1"), {"e": "token", "d": '{"t":"a"}'}, id="0-2")
    await client.hset(keys.task(rs, "t1"), "session_id", "s1")
    store.locate("t1", rs)
    reads: list[Any] = [
        await store.queued(rs),
        await store.queue_depths(rs),
        await store.queue_position(rs, "b1", "batch"),
        await store.queue_position(rs, "gone", "batch"),
        await store.overdue_queued(rs),
        await store.expired_leases(),
        await store.stream_start("t1", -1),
        await store.stream_start("t1", 0),
        await store.read_events("t1", 1),
        await store.last_event("t1"),
        await store.task_exists("t1"),
        await store.task_exists("unknown"),
        await store.task("unknown"),
    ]
    await store.renew_leases({rs: ["i2", "never-leased"]}, 60_000)
    reads.append(await store.expired_leases())
    reads.append(sorted(await store.leased(rs)))
    await store.release_leases([(rs, "i2"), (rs, "b1")])
    reads.append(await store.leased(rs))
    return reads


async def test_plain_reads_agree_on_the_wire_and_through_redis_py(
    redis_url: str, cluster: RedisCluster
) -> None:
    """The same reads over the store's own wire (a single Redis) and through redis-py's pipeline (a
    cluster, which has no wire) give the same values, and the values written."""
    async with (
        Store.connect(redis_url, prefix="plain:") as single,
        Store.connect(cluster.url, cluster=True, prefix="plain:") as spread,
    ):
        assert single.wire is not None and spread.wire is None  # both paths run
        on_wire = await _plain_reads(single, "rs-w")
        through_redis_py = await _plain_reads(spread, "rs-w")
    started, token = Event(0, "started", "{}"), Event(1, "token", '{"t":"a"}')
    assert on_wire == [
        (["i1", "i2"], ["b1"], [("b1", 1234.5)]),
        (2, 1),
        2,  # behind the two interactive tasks
        None,
        ["i1"],
        [("rs-w", "i2")],
        ([started, token], "s1"),
        ([token], "s1"),
        [],
        token,
        True,
        False,
        None,
        [],  # renewed: not expired any more
        ["b1", "i2"],  # a renewal adds no lease
        [],
    ]
    assert through_redis_py == on_wire
