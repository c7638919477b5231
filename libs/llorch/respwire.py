"""Redis commands packed by hiredis (C), not by redis-py's asyncio connection (Python).

redis-py packs a command in C through ``hiredis.pack_command`` on its synchronous connections only;
the asyncio ones still build each argument's RESP frame in Python, about 1 µs an argument. ADMIT
carries ~50 arguments and an event-log APPEND ~15 per task, so packing was the largest single item in
the scheduler's profile under P4 (21 % of its CPU) and a large one in the pool manager's relay (issue
16). Measured on this box for one ADMIT: 50 µs in Python, 4.7 µs in hiredis, the same bytes.

The packing is the same as redis-py's own ``HiredisRespSerializer``: the command name may carry
literal words (``"CONFIG GET"``), buffers become bytes, and an argument that is not str, bytes, int or
float is a :class:`redis.exceptions.DataError`, as redis-py raises for it. The classes replace the
three asyncio connection classes a URL can select (``redis://``, ``rediss://``, ``unix://``).

:class:`Wire` goes further for the store's Lua scripts, the commands on every token's and every
admission's path, and for its hot plain commands: its own connection, with no redis-py code between
the call and the socket. A wire also carries the gateway's live-events subscription
(:meth:`Wire.subscribe`): each message is handed over from the connection's read callback, with no
listener task and no redis-py pub/sub parsing between the socket and the relay.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError


def _pack(args: tuple[Any, ...]) -> list[bytes]:
    head = args[0]
    if isinstance(head, str):
        args = (*head.encode().split(), *args[1:])
    elif b" " in head:
        args = (*head.split(), *args[1:])
    try:
        return [hiredis.pack_command(args)]
    except TypeError:  # hiredis takes no bytearray: the rare caller pays for the conversion
        args = tuple(bytes(arg) if isinstance(arg, bytearray | memoryview) else arg for arg in args)
    try:
        return [hiredis.pack_command(args)]
    except TypeError as exc:
        raise DataError(f"{exc} (command {args[0]!r})") from None


class HiredisConnection(Connection):
    def pack_command(self, *args: Any) -> list[bytes]:
        return _pack(args)


class HiredisSSLConnection(SSLConnection):
    def pack_command(self, *args: Any) -> list[bytes]:
        return _pack(args)


class HiredisUnixConnection(UnixDomainSocketConnection):
    def pack_command(self, *args: Any) -> list[bytes]:
        return _pack(args)


_FASTER: dict[type, type] = {
    Connection: HiredisConnection,
    SSLConnection: HiredisSSLConnection,
    UnixDomainSocketConnection: HiredisUnixConnection,
}


def pack_in_c(client: Redis | RedisCluster) -> None:
    """Make ``client``'s connections pack with hiredis; call before its first command (connections
    are made on first use, so none exists yet)."""
    if isinstance(client, RedisCluster):
        manager = client.nodes_manager
        kwargs = manager.connection_kwargs
        cls = kwargs.get("connection_class", Connection)
        kwargs["connection_class"] = _FASTER.get(cls, cls)
        for node in manager.startup_nodes.values():
            node.connection_class = _FASTER.get(node.connection_class, node.connection_class)
        return
    pool = client.connection_pool
    pool.connection_class = _FASTER.get(pool.connection_class, pool.connection_class)


class _Replies(asyncio.Protocol):
    """One connection's byte stream. RESP answers in the order commands were sent, so replies fill
    the oldest waiting batch, whose future settles with its last. A reply that is an error
    (``-ERR ...``) is a value, as in a pipeline with ``raise_on_error=False``; a lost connection fails
    every batch still waiting."""

    def __init__(self) -> None:
        # redis-py's own hiredis parser settings: error replies map to its exception classes
        # (NOSCRIPT is NoScriptError, LOADING is BusyLoadingError, a ConnectionError).
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error, encoding="utf-8"
        )
        self.waiting: deque[tuple[asyncio.Future[list[Any]], list[Any], int]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: RedisConnectionError | None = None
        # a subscriber's: what arrives while no command waits (pushed messages) goes here
        self.on_push: Callable[[Any], None] | None = None
        # fails with the reason once the connection is lost or closed (a subscriber waits on it)
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                if not self.waiting and self.on_push is not None:
                    self.on_push(reply)
                    continue
                future, replies, count = self.waiting[0]
                replies.append(reply)
                if len(replies) == count:
                    self.waiting.popleft()
                    if not future.done():  # its caller gave up (cancelled): the replies are dropped
                        future.set_result(replies)
        except (InvalidResponse, IndexError, ValueError):  # garbage (or not UTF-8), or unasked for
            self.close(RedisConnectionError("Protocol error: unexpected data from Redis"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(RedisConnectionError("Connection closed by server."))

    def close(self, why: RedisConnectionError) -> None:
        self.fail(why)
        if self.lost is None:
            self.lost = why
        if self.transport is not None:
            self.transport.close()
        while self.waiting:
            future, _, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(self.lost)

    def fail(self, why: Exception) -> None:
        """End :attr:`ended` with ``why`` (the first reason wins); retrieved here, so a subscription
        nobody waits on any more logs nothing."""
        if not self.ended.done():
            self.ended.set_exception(why)
            self.ended.exception()


class Wire:
    """Commands to one Redis over one connection of our own, pipelined: every call is written at once
    and waits for its reply in order, so concurrent callers share the connection and its round trips.

    redis-py's asyncio client spends ~240 µs of CPU per round trip on the 2-core box (a connection
    checked out of the pool, its health and retry wrappers, a Python parser loop); this costs ~77 µs
    for the same EVALSHA (interleaved microbenchmark, uvloop). The store sends its Lua scripts here,
    the commands on every token's and every admission's path, and the plain commands of its hot and
    periodic reads (``Store._round_trip``); its cold paths stay on redis-py.

    It keeps redis-py's failure contract, so the retries around the store work unchanged: a
    connection that cannot be made or is lost raises :class:`redis.exceptions.ConnectionError`, a
    reply not back within ``timeout_s`` raises :class:`redis.exceptions.TimeoutError` and drops the
    connection (later replies would be out of step), and the next call connects again. Plain TCP and
    Unix sockets only: :meth:`of` answers None for a cluster or TLS, which stay on redis-py. A caller
    cancelled while waiting leaves the connection in step: its replies are read and dropped."""

    def __init__(self, kwargs: dict[str, Any], timeout_s: float) -> None:
        self._kwargs = kwargs
        self._timeout_s = timeout_s
        self._replies: _Replies | None = None
        self._connecting = asyncio.Lock()

    @classmethod
    def of(cls, client: Redis | RedisCluster, timeout_s: float) -> Wire | None:
        """A wire to the server ``client`` talks to, with its address, credentials and database."""
        if isinstance(client, RedisCluster):
            return None
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        plain = pool.connection_class in (
            Connection,
            HiredisConnection,
            UnixDomainSocketConnection,
            HiredisUnixConnection,
        )
        if not plain or kwargs.get("credential_provider") is not None:
            return None
        return cls(kwargs, timeout_s)

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Each command's reply, in order; an error reply is returned as its exception."""
        if not commands:
            return []
        replies = await self._connected()
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        replies.waiting.append((future, [], len(commands)))
        cast(asyncio.Transport, replies.transport).write(b"".join(_pack(command)[0] for command in commands))
        try:
            async with asyncio.timeout(self._timeout_s):
                return await future
        except TimeoutError:
            replies.close(RedisConnectionError("Connection dropped after a read timeout"))
            raise RedisTimeoutError(f"Timeout reading from Redis after {self._timeout_s:g} s") from None

    async def subscribe(self, channel: str, on_message: Callable[[str], None]) -> asyncio.Future[None]:
        """Subscribe this wire's connection to ``channel``: each message's data goes to ``on_message``
        as it is read. Returns once subscribed, with a future that fails when the subscription ends:
        the connection lost (a ``ConnectionError``), or what ``on_message`` raised (the connection
        is then closed). The connection takes no other command from then on (Redis's subscribed
        mode), so a wire that subscribes is a subscriber's alone; :meth:`aclose` ends it."""
        replies = await self._connected()

        def push(reply: Any) -> None:
            if type(reply) is list and len(reply) == 3 and reply[0] == "message":
                try:
                    on_message(reply[2])
                except Exception as exc:  # the consumer's own failure ends the subscription with it
                    replies.fail(exc)
                    replies.close(RedisConnectionError("Subscription ended by its consumer"))

        replies.on_push = push
        [answer] = await self.execute([("SUBSCRIBE", channel)])
        if isinstance(answer, Exception):
            replies.close(RedisConnectionError("Connection closed after a refused SUBSCRIBE"))
            raise answer
        return replies.ended

    async def aclose(self) -> None:
        if self._replies is not None:
            self._replies.close(RedisConnectionError("Connection closed by the client."))

    async def _connected(self) -> _Replies:
        replies = self._replies
        if replies is not None and replies.lost is None:
            return replies
        async with self._connecting:
            if self._replies is None or self._replies.lost is not None:
                self._replies = await self._connect()
            return self._replies

    async def _connect(self) -> _Replies:
        kwargs = self._kwargs
        loop = asyncio.get_running_loop()
        path = kwargs.get("path")
        where = path or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        try:
            async with asyncio.timeout(kwargs.get("socket_connect_timeout") or self._timeout_s):
                if path:
                    _, replies = await loop.create_unix_connection(_Replies, path)
                else:
                    _, replies = await loop.create_connection(
                        _Replies, kwargs.get("host", "localhost"), kwargs.get("port", 6379)
                    )
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"Error connecting to {where}: {exc or 'timed out'}") from None
        sock = cast(asyncio.Transport, replies.transport).get_extra_info("socket")
        if sock is not None and not path and kwargs.get("socket_keepalive"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._replies = replies
        setup: list[tuple[Any, ...]] = []
        password = kwargs.get("password")
        if password is not None:
            username = kwargs.get("username")
            setup.append(("AUTH", username, password) if username else ("AUTH", password))
        if kwargs.get("db"):
            setup.append(("SELECT", kwargs["db"]))
        if setup:
            for answer in await self.execute(setup):
                if isinstance(answer, Exception):  # the server's words (never the password)
                    replies.close(RedisConnectionError("Connection closed after a failed setup"))
                    raise answer
        return replies
