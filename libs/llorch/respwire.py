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
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError


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
