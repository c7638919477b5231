"""The SSE relay's direct write (``_Stream._offer``) against a real connection: live events that simply
continue the stream go out at once as the frames the task would write (chunked or raw); every other
case is declined untouched, for the stream's task to handle."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from llorch.store import Event, Store
from llorch_gateway.metrics import LoopHistogram
from llorch_gateway.sse import WRITE_BUFFER_LIMIT, _frames, _Stream

HANG_GUARD_S = 30.0


@dataclass
class Pipe:
    """A connected pair: the relay's transport, and the client end that reads it."""

    transport: asyncio.WriteTransport
    reader: asyncio.StreamReader

    async def read(self, n: int) -> bytes:
        async with asyncio.timeout(HANG_GUARD_S):
            return await self.reader.readexactly(n)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    async with Store.connect(redis_url, prefix="so:") as s:
        yield s


@pytest.fixture
async def pipe() -> AsyncIterator[Pipe]:
    accepted: asyncio.Queue[asyncio.StreamReader] = asyncio.Queue()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(reader)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await asyncio.get_running_loop().create_connection(asyncio.Protocol, "127.0.0.1", port)
    async with asyncio.timeout(HANG_GUARD_S):
        reader = await accepted.get()
    yield Pipe(transport, reader)
    transport.close()
    server.close()


def _stream(store: Store, pipe: Pipe, after: int, log_at: int, chunked: bool = True) -> _Stream:
    response = web.StreamResponse()
    if chunked:
        response.enable_chunked_encoding()
    lag = LoopHistogram("lag", "", [1.0], CollectorRegistry())
    return _Stream(response, store, "t", after, log_at, lag, pipe.transport)


def _tokens(first: int, n: int) -> list[Event]:
    return [Event(seq, "token", f'{{"t":"w{seq}","i":{seq}}}') for seq in range(first, first + n)]


def _chunk(events: list[Event]) -> bytes:
    body = _frames(events)
    return f"{len(body):x}\r\n".encode() + body + b"\r\n"


def _observed(stream: _Stream) -> float:
    assert stream.lag is not None
    return next(s.value for m in stream.lag.collect() for s in m.samples if s.name.endswith("_count"))


def test_frames_are_the_events_in_sse_text() -> None:
    one = b'id: 5\nevent: token\ndata: {"t":"w5","i":5}\n\n'
    assert _frames(_tokens(5, 1)) == one
    assert _frames(_tokens(5, 2)) == one + b'id: 6\nevent: token\ndata: {"t":"w6","i":6}\n\n'


async def test_events_that_continue_the_stream_are_written_at_once(store: Store, pipe: Pipe) -> None:
    stream = _stream(store, pipe, after=4, log_at=4)
    assert stream._offer(_tokens(5, 1), 0.0)
    assert stream._offer(_tokens(6, 3), 0.0)
    assert (stream.after, stream.tail.log_at) == (8, 8)
    want = _chunk(_tokens(5, 1)) + _chunk(_tokens(6, 3))
    assert await pipe.read(len(want)) == want
    assert _observed(stream) == 2  # one lag observation per delivery


async def test_a_raw_body_gets_the_frames_without_chunk_framing(store: Store, pipe: Pipe) -> None:
    stream = _stream(store, pipe, after=-1, log_at=-1, chunked=False)
    assert stream._offer(_tokens(0, 2), 0.0)
    want = _frames(_tokens(0, 2))
    assert await pipe.read(len(want)) == want


async def test_everything_but_the_plain_case_is_left_to_the_task(store: Store, pipe: Pipe) -> None:
    stream = _stream(store, pipe, after=4, log_at=4)
    end = Event(6, "end", '{"tokens_out":2}')
    declined = {
        "a gap": _tokens(6, 1),
        "already read": _tokens(4, 2),
        "seqs that do not follow each other": [*_tokens(5, 1), *_tokens(7, 1)],
        "the terminal event": [*_tokens(5, 1), end],
        "an error event": [Event(5, "error", '{"code":"INTERNAL"}')],
    }
    for case, events in declined.items():
        assert not stream._offer(events, 0.0), case
        assert (stream.after, stream.tail.log_at) == (4, 4), case

    resumed = _stream(store, pipe, after=9, log_at=4)  # resumed past the end of a running task
    assert not resumed._offer(_tokens(5, 1), 0.0)
    ended = _stream(store, pipe, after=4, log_at=4)
    ended.tail.ended = True
    assert not ended._offer(_tokens(5, 1), 0.0)
    assert _observed(stream) == 0

    # Nothing was written by the declines: the first bytes the client gets are the next plain offer's.
    assert stream._offer(_tokens(5, 1), 0.0)
    want = _chunk(_tokens(5, 1))
    assert await pipe.read(len(want)) == want


async def test_a_client_that_does_not_read_gets_its_frames_through_the_task(store: Store, pipe: Pipe) -> None:
    sock = pipe.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stream = _stream(store, pipe, after=4, log_at=4)
    pipe.transport.write(b"x" * (128 * WRITE_BUFFER_LIMIT))  # more than the socket's buffers take
    assert pipe.transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT
    assert not stream._offer(_tokens(5, 1), 0.0)
    assert stream.tail.log_at == 4


async def test_a_closing_connection_is_left_to_the_task(store: Store, pipe: Pipe) -> None:
    stream = _stream(store, pipe, after=4, log_at=4)
    pipe.transport.close()
    assert not stream._offer(_tokens(5, 1), 0.0)
    assert stream.tail.log_at == 4
