"""Raw HTTP/1.1 over a socket, for edge tests that send what no HTTP client library will.

:func:`exchange` writes bytes, keeps the write side open (a slow or stuck client), and reads until
the server closes the connection, under a generous hang guard; never a sleep, never a timing check.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.support.redis_server import RedisServer

HANG_GUARD_S = 90.0
"""How long a reply may take before the test calls it a hang (not a timing assertion)."""


@dataclass
class RawReply:
    raw: bytes
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def envelope(self) -> dict[str, Any]:
        value = json.loads(self.body)
        assert isinstance(value, dict), self.body
        return value


def parse_reply(raw: bytes) -> RawReply:
    """One HTTP/1.x response (Content-Length or chunked body); an empty reply has status 0."""
    reply = RawReply(raw)
    if not raw:
        return reply
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, f"no end of head in {raw[:300]!r}"
    lines = head.decode("latin-1").split("\r\n")
    version, status, _ = lines[0].split(" ", 2)
    assert version in ("HTTP/1.0", "HTTP/1.1"), lines[0]  # a parser rejection answers as 1.0
    reply.status = int(status)
    for line in lines[1:]:
        name, _, value = line.partition(":")
        reply.headers[name.strip().lower()] = value.strip()
    if reply.headers.get("transfer-encoding") == "chunked":
        reply.body = dechunk(rest)
    else:
        reply.body = rest[: int(reply.headers.get("content-length", len(rest)))]
    return reply


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


async def exchange(
    port: int, payload: bytes, guard_s: float = HANG_GUARD_S, started: asyncio.Event | None = None
) -> RawReply:
    """Send ``payload``, then read until the server closes; ``started`` is set on the first bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        chunks: list[bytes] = []
        async with asyncio.timeout(guard_s):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
                if started is not None:
                    started.set()
        return parse_reply(b"".join(chunks))
    finally:
        writer.close()


def request(method: str, path: str, headers: Sequence[tuple[bytes, bytes]] = (), body: bytes = b"") -> bytes:
    """A request head (and body) from exact header bytes; Host is added."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class KillableRedis(RedisServer):
    """A test's own Redis that it may SIGKILL (the session's server is shared by other tests)."""

    def kill(self) -> None:
        self._server.kill()
