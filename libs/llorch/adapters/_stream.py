"""One engine stream on a connection of its own: a POST, its answer's head, then the body as SSE.

The pool manager reads every token of every task through here, so the read costs as little Python as
it can: llhttp (``httptools``, in C) parses the answer and undoes the chunked encoding inside
``data_received``, and the body goes straight into the stream's :class:`~llorch.adapters._sse.SseReader`,
which wakes the adapter once per read. aiohttp's client did the same through its stream reader, its
response object and a wake-up per buffer; measured on this 2-core box, 256 streams at 20 ms per token
read by one process cost 61-70 µs of CPU per token here against 76-82 µs through aiohttp.

Each stream opens its own connection and asks the engine to close it at the end (``Connection:
close``): there is no pool, so no keep-alive connection the engine may be closing as it is reused (see
``_KEEPALIVE_S`` in :mod:`llorch.adapters._http`), and leaving early (an abort) is closing the socket,
which is how every engine is told to stop. Control calls stay on aiohttp.
"""

from __future__ import annotations

import asyncio
import json
from typing import Final, cast
from urllib.parse import urlsplit

import httptools

from llorch.adapters._sse import SseReader

_ERROR_BODY_BYTES: Final = 64 * 1024  # a refusal's body: enough for any engine's error object


class EngineAnswer(asyncio.Protocol):
    """The answer to one streaming request: :attr:`head` resolves to its status once the headers are
    in; a 200's body feeds :attr:`reader`, any other status's body is kept for :meth:`body`.

    A connection lost before the head fails :attr:`head` with ``ConnectionResetError``; lost in a body
    that had a length or chunked encoding (cut off: the engine died), the reader raises it after the
    payloads before the cut. A body with neither ends with the connection.
    """

    def __init__(self, request: bytes) -> None:
        self.reader = SseReader()
        self.head: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._complete: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._request = request
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._framed = False  # Content-Length or Transfer-Encoding: the body does not end with the socket
        self._refusal: list[bytes] | None = None  # a non-200's body
        self._refusal_len = 0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._broken(ConnectionResetError(f"the engine's answer is not HTTP: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost says how the body ended

    def connection_lost(self, exc: Exception | None) -> None:
        if self._complete.done():
            return
        if self.head.done() and not self._framed:
            self.on_message_complete()  # a body without a length ends with the connection
            return
        self._broken(ConnectionResetError("the engine closed the connection mid-answer"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            return  # an interim answer (100 Continue); the real head follows
        if status != 200:
            self._refusal = []
        if not self.head.done():
            self.head.set_result(status)

    def on_body(self, body: bytes) -> None:
        refusal = self._refusal
        if refusal is None:
            try:
                self.reader.feed(body)
            except ValueError as exc:  # a line over the reader's limit: the reader raises it
                self.reader.fail(exc)
                self.close()
        elif self._refusal_len < _ERROR_BODY_BYTES:
            refusal.append(body)
            self._refusal_len += len(body)

    def on_message_complete(self) -> None:
        if not self.head.done():
            return  # the end of an interim answer
        if not self._complete.done():
            self._complete.set_result(None)
        self.reader.end()

    # the stream's side

    async def body(self) -> bytes:
        """A refused answer's body (its first 64 KiB), once it is complete."""
        await self._complete
        return b"".join(self._refusal or ())

    def close(self) -> None:
        """Drop the connection (idempotent): the engine sees the client leave and stops the task."""
        if self._transport is not None:
            self._transport.close()

    def _broken(self, error: ConnectionResetError) -> None:
        if not self.head.done():
            self.head.set_exception(error)
        if not self._complete.done():
            self._complete.set_exception(error)
            self._complete.exception()  # retrieved: body() may never be awaited
        self.reader.fail(error)
        self.close()


async def post_stream(
    url: str, payload: object, headers: dict[str, str], connect_timeout_s: float
) -> EngineAnswer:
    """POST ``payload`` as JSON to ``url`` on a new connection and wait for the answer's head.

    The pool manager launches every engine on loopback, so the URL is plain ``http://`` (anything else
    is a ``ValueError``). Raises ``OSError`` (refused, reset, closed before the head) or
    ``TimeoutError`` (no connection within ``connect_timeout_s``); the answer's status is in
    ``await answer.head``, already resolved. The head itself has no deadline: an engine may hold it
    until the prompt is read, and the scheduler owns decode timeouts. The caller closes the answer.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"an engine stream needs a plain http:// URL, not {parts.scheme!r}")
    host, port = parts.hostname, parts.port or 80
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    body = json.dumps(payload).encode()
    lines = [
        f"POST {target} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(connect_timeout_s):
        _, answer = await loop.create_connection(lambda: EngineAnswer(request), host, port)
    try:
        await answer.head
    except BaseException:
        answer.close()
        raise
    return answer
