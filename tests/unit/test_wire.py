"""The store's own Redis connection (:class:`llorch.respwire.Wire`), against a real server: replies
in order with error replies as values, one connection shared by concurrent callers, a cancelled
caller leaving the stream in step, and redis-py's failure contract through a restart, a frozen server
and a wrong password (which never shows up in the error); a subscription handing over its messages
until its connection is lost or its consumer fails."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import AuthenticationError, ConnectionError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llorch.respwire import Wire
from llorch_cli.embedded_redis import EmbeddedRedis

PASSWORD = "wire-test-password-7c1e"


def _wire(url: str, timeout_s: float = 10.0) -> Wire:
    wire = Wire.of(Redis.from_url(url), timeout_s)
    assert wire is not None
    return wire


@pytest.fixture
async def wire(redis_url: str) -> AsyncIterator[Wire]:
    w = _wire(redis_url)
    yield w
    await w.aclose()


async def test_replies_come_back_in_order_and_an_error_reply_is_a_value(wire: Wire) -> None:
    replies = await wire.execute(
        [
            ("SET", "w:k", "v"),
            ("GET", "w:k"),
            ("EVALSHA", "0" * 40, 0),
            ("INCRBY", "w:k", 1),
            ("GET", "w:none"),
        ]
    )
    assert replies[:2] == ["OK", "v"] and replies[4] is None
    assert isinstance(replies[2], NoScriptError)
    assert isinstance(replies[3], ResponseError) and "not an integer" in str(replies[3])
    assert await wire.execute([]) == []


async def test_concurrent_callers_share_one_connection(wire: Wire, redis_url: str) -> None:
    replies = await asyncio.gather(*(wire.execute([("ECHO", str(n))]) for n in range(200)))
    assert replies == [[str(n)] for n in range(200)]
    admin = Redis.from_url(redis_url, decode_responses=True)
    try:
        [mine] = await wire.execute([("CLIENT", "ID")])
        clients = [c for c in await admin.client_list() if c["cmd"] != "client|list"]
        assert [int(c["id"]) for c in clients] == [mine]
    finally:
        await admin.aclose()


async def test_a_cancelled_caller_leaves_the_connection_in_step(wire: Wire) -> None:
    await wire.execute([("PING",)])  # connected
    gone = asyncio.ensure_future(wire.execute([("ECHO", "dropped")]))
    await asyncio.sleep(0)  # one step of the task: it writes its command and waits for the reply
    replies = wire._replies
    assert replies is not None and len(replies.waiting) == 1 and not gone.done()
    gone.cancel()
    assert await wire.execute([("ECHO", "mine")]) == ["mine"]
    assert gone.cancelled()


async def test_a_restart_fails_the_call_as_a_lost_connection_and_the_next_connects_again(
    tmp_path: Path,
) -> None:
    server = EmbeddedRedis(tmp_path / "r", appendonly=False)
    server.start()
    wire = _wire(server.url)
    try:
        assert await wire.execute([("SET", "k", "1")]) == ["OK"]
        server.stop()
        with pytest.raises(ConnectionError):
            await wire.execute([("GET", "k")])
        with pytest.raises(ConnectionError):  # nothing listens: the connect fails the same way
            await wire.execute([("GET", "k")])
        server.start()
        assert await wire.execute([("SET", "k", "2"), ("GET", "k")]) == ["OK", "2"]
    finally:
        await wire.aclose()
        server.stop()


async def test_a_frozen_server_fails_the_call_with_a_timeout_and_the_next_call_reconnects(
    tmp_path: Path,
) -> None:
    server = EmbeddedRedis(tmp_path / "r", appendonly=False)
    server.start()
    wire = _wire(server.url, timeout_s=0.5)
    pid = server.pid
    assert pid is not None
    try:
        assert await wire.execute([("PING",)]) == ["PONG"]
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(RedisTimeoutError):
                await wire.execute([("PING",)])
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await wire.execute([("ECHO", "after")]) == ["after"]
    finally:
        await wire.aclose()
        server.stop()


async def test_the_password_and_database_are_used_and_a_wrong_password_is_not_shown(
    tmp_path: Path,
) -> None:
    server = EmbeddedRedis(tmp_path / "r", appendonly=False, password=PASSWORD)
    server.start()
    host_port = server.url.split("//", 1)[1]
    good = _wire(f"redis://:{PASSWORD}@{host_port}/3")
    bad = _wire(f"redis://:not-{PASSWORD}@{host_port}")
    try:
        stored, info = await good.execute([("SET", "k", "in-3"), ("CLIENT", "INFO")])
        assert stored == "OK" and " db=3 " in info
        with pytest.raises(AuthenticationError) as refused:
            await bad.execute([("PING",)])
        assert PASSWORD not in str(refused.value)
    finally:
        await good.aclose()
        await bad.aclose()
        server.stop()


def test_only_a_plain_single_redis_gets_a_wire() -> None:
    assert Wire.of(Redis.from_url("redis://localhost:1"), 1.0) is not None
    assert Wire.of(Redis.from_url("unix:///tmp/none.sock"), 1.0) is not None
    assert Wire.of(Redis.from_url("rediss://localhost:1"), 1.0) is None
    assert Wire.of(RedisCluster(host="localhost", port=1), 1.0) is None


async def test_a_subscription_hands_over_each_message_in_order(wire: Wire, redis_url: str) -> None:
    got: asyncio.Queue[str] = asyncio.Queue()
    ended = await wire.subscribe("w:chan", got.put_nowait)
    publisher = Redis.from_url(redis_url, decode_responses=True)
    try:
        for n in range(50):
            assert await publisher.publish("w:chan", f"m{n}\x1e\x1f") == 1  # subscribed when it returned
        assert [await asyncio.wait_for(got.get(), 30) for _ in range(50)] == [
            f"m{n}\x1e\x1f" for n in range(50)
        ]
        assert not ended.done()
    finally:
        await publisher.aclose()
    await wire.aclose()
    with pytest.raises(ConnectionError):
        await ended


async def test_a_subscription_ends_with_the_lost_connection_or_its_consumers_error(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r", appendonly=False)
    server.start()
    wire, other = _wire(server.url), _wire(server.url)
    publisher = Redis.from_url(server.url)
    try:
        ended = await wire.subscribe("w:chan", lambda data: None)
        server.stop()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(ended, 30)
        server.start()

        def refuse(data: str) -> None:
            raise ValueError(f"cannot read {data}")

        ended = await other.subscribe("w:chan", refuse)
        assert await publisher.publish("w:chan", "x") == 1
        with pytest.raises(ValueError, match="cannot read x"):
            await asyncio.wait_for(ended, 30)
        assert await publisher.publish("w:chan", "y") == 0  # its connection was closed
    finally:
        await publisher.aclose()
        await wire.aclose()
        await other.aclose()
        server.stop()
