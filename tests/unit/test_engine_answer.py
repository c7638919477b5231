"""The engine stream's own HTTP client (``llorch.adapters._stream``) against a raw socket that writes
exactly the bytes each case needs: framing (chunked, a length, until close), an interim answer, a
refusal's body, a body cut off, an answer that is not HTTP, and what the request itself carries; on
asyncio's loop and on uvloop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop

from llorch.adapters._stream import EngineAnswer, post_stream

Run = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Every case on both loops: the services run on uvloop, whose transports differ from asyncio's."""
    runner: Run = uvloop.run if request.param == "uvloop" else asyncio.run
    return runner


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def _engine(script: Script) -> AsyncIterator[str]:
    """A one-shot server at the yielded URL: reads the request's head and body, then runs ``script``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/completion?x=1"
    finally:
        server.close()
        await server.wait_closed()


async def _request(reader: asyncio.StreamReader) -> tuple[list[str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[:-2]
    length = next(int(line.split(":")[1]) for line in head if line.lower().startswith("content-length:"))
    return head, await reader.readexactly(length)


def _replying(wire: bytes) -> Script:
    """An engine that answers the request with exactly ``wire``, then closes."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(wire)

    return script


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _payloads(answer: EngineAnswer) -> list[bytes]:
    out = []
    while (data := await answer.reader.next_data()) is not None:
        out.append(data)
    return out


CHUNKED_200 = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_the_request_carries_the_json_the_headers_and_asks_to_close(run: Run) -> None:
    async def case() -> None:
        seen: list[tuple[list[str], bytes]] = []

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(await _request(reader))
            writer.write(CHUNKED_200 + _chunk(b'data: {"stop":true}\n\n') + b"0\r\n\r\n")

        payload = {"prompt": "h\u00e9", "n_predict": 2, "stream": True}
        async with _engine(script) as url:
            answer = await post_stream(url, payload, {"traceparent": "00-ab-cd-01"}, 5.0)
            assert await answer.head == 200
            assert await _payloads(answer) == [b'{"stop":true}']
            answer.close()
        (head, body) = seen[0]
        assert head[0] == "POST /completion?x=1 HTTP/1.1"
        assert {"Connection: close", "Content-Type: application/json", "traceparent: 00-ab-cd-01"} <= set(
            head
        )
        assert f"Host: {url.split('/')[2]}" in head
        assert json.loads(body) == payload

    run(case())


@pytest.mark.parametrize("split", [1, 5, 17, 1000])
def test_chunked_sse_split_anywhere_gives_every_payload(run: Run, split: int) -> None:
    async def case() -> None:
        events = b'data: {"content":"a"}\n\n: keep-alive\n\ndata: {"content":"b"}\r\n\r\ndata: [DONE]\n\n'
        body = b"".join(_chunk(events[i : i + 7]) for i in range(0, len(events), 7)) + b"0\r\n\r\n"
        wire = CHUNKED_200 + body

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _request(reader)
            for i in range(0, len(wire), split):
                writer.write(wire[i : i + split])
                await writer.drain()
            await reader.read()  # the client closes when it is done (Connection: close)

        async with _engine(script) as url:
            answer = await post_stream(url, {}, {}, 5.0)
            assert await _payloads(answer) == [b'{"content":"a"}', b'{"content":"b"}', b"[DONE]"]
            answer.close()

    run(case())


def test_a_body_with_a_length_ends_at_its_length_while_the_socket_stays_open(run: Run) -> None:
    async def case() -> None:
        body = b'data: {"content":"a"}\n\ndata: {"stop":true}'
        stay_open = asyncio.Event()

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await stay_open.wait()

        async with _engine(script) as url:
            answer = await post_stream(url, {}, {}, 5.0)
            assert await _payloads(answer) == [b'{"content":"a"}', b'{"stop":true}']
            answer.close()
            stay_open.set()

    run(case())


def test_a_body_without_framing_ends_with_the_connection(run: Run) -> None:
    async def case() -> None:
        async with _engine(_replying(b"HTTP/1.1 200 OK\r\n\r\ndata: 1\n\ndata: 2")) as url:
            answer = await post_stream(url, {}, {}, 5.0)
            assert await _payloads(answer) == [b"1", b"2"]

    run(case())


def test_an_interim_answer_is_skipped(run: Run) -> None:
    async def case() -> None:
        wire = b"HTTP/1.1 100 Continue\r\n\r\n" + CHUNKED_200 + _chunk(b"data: 1\n") + b"0\r\n\r\n"
        async with _engine(_replying(wire)) as url:
            answer = await post_stream(url, {}, {}, 5.0)
            assert await answer.head == 200
            assert await _payloads(answer) == [b"1"]
            answer.close()

    run(case())


def test_a_refusal_gives_its_status_and_body(run: Run) -> None:
    async def case() -> None:
        error = b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _request(reader)
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n" % len(error))
            await writer.drain()
            writer.write(error)  # the body after the head, in a read of its own

        async with _engine(script) as url:
            answer = await post_stream(url, {}, {}, 5.0)
            assert await answer.head == 503
            assert await answer.body() == error
            answer.close()

    run(case())


def test_a_body_cut_off_mid_chunk_raises_after_the_payloads_before_it(run: Run) -> None:
    async def case() -> None:
        wire = CHUNKED_200 + _chunk(b"data: 1\n\ndata: 2\n\n") + b"40\r\ndata: 3"
        async with _engine(_replying(wire)) as url:
            answer = await post_stream(url, {}, {}, 5.0)
            assert [await answer.reader.next_data(), await answer.reader.next_data()] == [b"1", b"2"]
            with pytest.raises(ConnectionResetError, match="mid-answer"):
                await answer.reader.next_data()

    run(case())


@pytest.mark.parametrize(
    "reply", [b"", b"SSH-2.0-OpenSSH_9.2\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"]
)
def test_no_answer_or_not_http_is_a_connection_error(run: Run, reply: bytes) -> None:
    async def case() -> None:
        async with _engine(_replying(reply)) as url:
            with pytest.raises(ConnectionResetError):
                await post_stream(url, {}, {}, 5.0)

    run(case())


def test_nothing_listening_is_an_os_error(run: Run) -> None:
    async def case() -> None:
        async with _engine(_request_only) as url:
            pass  # the server is closed again: its port refuses
        with pytest.raises(OSError):
            await post_stream(url, {}, {}, 5.0)

    run(case())


async def _request_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _request(reader)


def test_closing_the_answer_is_seen_by_the_engine(run: Run) -> None:
    async def case() -> None:
        client_left = asyncio.Event()

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _request(reader)
            writer.write(CHUNKED_200 + _chunk(b"data: 1\n"))
            await writer.drain()
            assert await reader.read() == b""  # EOF: the client closed its side
            client_left.set()

        async with _engine(script) as url:
            answer = await post_stream(url, {}, {}, 5.0)
            assert await answer.reader.next_data() == b"1"
            answer.close()
            await client_left.wait()

    run(case())


def test_a_line_over_the_limit_fails_the_reader_and_drops_the_connection(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def case() -> None:
        monkeypatch.setattr("llorch.adapters._sse.MAX_LINE_BYTES", 64)
        client_left = asyncio.Event()

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _request(reader)
            writer.write(CHUNKED_200 + _chunk(b"data: 1\n") + _chunk(b"data: " + b"x" * 100))
            await writer.drain()
            await reader.read()
            client_left.set()

        async with _engine(script) as url:
            answer = await post_stream(url, {}, {}, 5.0)
            assert await answer.reader.next_data() == b"1"
            with pytest.raises(ValueError, match="too big"):
                await answer.reader.next_data()
            await client_left.wait()

    run(case())


@pytest.mark.parametrize(
    "url", ["https://127.0.0.1:1/completion", "unix:///tmp/x.sock", "http:///completion"]
)
def test_only_plain_http_urls_are_taken(run: Run, url: str) -> None:
    async def case() -> None:
        with pytest.raises(ValueError, match="plain http"):
            await post_stream(url, {}, {}, 5.0)

    run(case())
